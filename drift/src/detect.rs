//! Desired vs observed: the findings of one inventory report.

use std::collections::{BTreeMap, BTreeSet};

use time::OffsetDateTime;

use crate::finding::{Finding, FindingKind, fingerprint};
use crate::ignore::IgnoreRules;
use crate::state::{DesiredTarget, ObservedItem, ObservedSticker, ObservedTarget, WorkloadState};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    #[error("desired state is for target {desired:?} but the inventory is for target {observed:?}")]
    TargetMismatch { desired: String, observed: String },
    #[error("desired state of target {target:?} names component {component:?} twice")]
    DuplicateComponent { target: String, component: String },
}

/// The findings for one target, in a stable order: per desired component (in release
/// order), then extra workloads (in report order), then the sticker. Findings an ignore rule
/// silences are left out.
///
/// `desired` is `None` while no deployment to the target has succeeded: Stella has no claim
/// on the target yet, so nothing there is drift, not even workloads Stella did not start
/// (they were there first; reporting them would only be noise an operator has to silence).
pub fn detect(
    desired: Option<&DesiredTarget>,
    observed: &ObservedTarget,
    ignore: &IgnoreRules,
    now: OffsetDateTime,
) -> Result<Vec<Finding>, DetectError> {
    let Some(desired) = desired else {
        return Ok(Vec::new());
    };
    if desired.target != observed.target {
        return Err(DetectError::TargetMismatch {
            desired: desired.target.clone(),
            observed: observed.target.clone(),
        });
    }
    let mut names = BTreeSet::new();
    for component in &desired.components {
        if !names.insert(component.name.as_str()) {
            return Err(DetectError::DuplicateComponent {
                target: desired.target.clone(),
                component: component.name.clone(),
            });
        }
    }

    let report = Report { desired, now };
    let mut findings = Vec::new();
    for component in &desired.components {
        let items: Vec<&ObservedItem> = observed
            .items
            .iter()
            .filter(|i| i.component.as_deref() == Some(component.name.as_str()))
            .collect();
        let present: Vec<&ObservedItem> = items
            .iter()
            .copied()
            .filter(|i| i.state != WorkloadState::Missing)
            .collect();
        if present.is_empty() {
            findings.push(report.finding(
                FindingKind::Missing,
                Some(&component.name),
                None,
                Some(&component.digest),
                None,
                &items,
                format!(
                    "component {} ({}) of release {} has no workload on the target",
                    component.name, component.digest, desired.release
                ),
            ));
            continue;
        }

        let mut other_digests: BTreeMap<&str, Vec<&ObservedItem>> = BTreeMap::new();
        for item in &present {
            if let Some(digest) = item.digest.as_deref().filter(|d| *d != component.digest) {
                other_digests.entry(digest).or_default().push(item);
            }
        }
        for (digest, items) in other_digests {
            findings.push(report.finding(
                FindingKind::DigestChanged,
                Some(&component.name),
                None,
                Some(&component.digest),
                Some(digest),
                &items,
                format!(
                    "component {} runs {digest} in {}; release {} wants {}",
                    component.name,
                    workload_names(&items),
                    desired.release,
                    component.digest
                ),
            ));
        }

        let running = present.iter().any(|i| i.state == WorkloadState::Running);
        let stopped: Vec<&ObservedItem> = present
            .iter()
            .copied()
            .filter(|i| i.state == WorkloadState::Stopped)
            .collect();
        if !running && !stopped.is_empty() {
            findings.push(report.finding(
                FindingKind::Stopped,
                Some(&component.name),
                None,
                Some(WorkloadState::Running.as_str()),
                Some(WorkloadState::Stopped.as_str()),
                &stopped,
                format!(
                    "component {} is not running: {} stopped",
                    component.name,
                    workload_names(&stopped)
                ),
            ));
        }
    }

    for item in &observed.items {
        let claimed = item.component.as_deref().is_some_and(|c| names.contains(c));
        if claimed || item.state == WorkloadState::Missing {
            continue;
        }
        let what = item.digest.as_deref().unwrap_or(item.image.as_str());
        let detail = match &item.component {
            Some(component) => format!(
                "workload {} ({what}) claims component {component}, which release {} does not have",
                item.name, desired.release
            ),
            None if item.managed => format!(
                "workload {} ({what}) carries Stella's labels but no component",
                item.name
            ),
            None => format!("workload {} ({what}) is not managed by Stella", item.name),
        };
        findings.push(report.finding(
            FindingKind::UnmanagedExtra,
            item.component.as_deref(),
            Some(&item.name),
            None,
            Some(what),
            &[item],
            detail,
        ));
    }

    if desired.sticker_expected {
        let expected = desired_sticker_summary(desired);
        match &observed.sticker {
            None => findings.push(report.finding(
                FindingKind::StickerMissing,
                None,
                None,
                Some(&expected),
                None,
                &[],
                format!(
                    "the target has no version sticker; deployment {} of release {} wrote one",
                    desired.deployment_id, desired.release
                ),
            )),
            Some(sticker) => {
                let differences = sticker_differences(desired, sticker);
                if !differences.is_empty() {
                    findings.push(report.finding(
                        FindingKind::StickerMismatch,
                        None,
                        None,
                        Some(&expected),
                        Some(&sticker_summary(sticker)),
                        &[],
                        format!("the version sticker differs: {}", differences.join("; ")),
                    ));
                }
            }
        }
    }

    findings.retain(|f| ignore.silencing(f).is_none());
    Ok(findings)
}

struct Report<'a> {
    desired: &'a DesiredTarget,
    now: OffsetDateTime,
}

impl Report<'_> {
    #[allow(clippy::too_many_arguments)]
    fn finding(
        &self,
        kind: FindingKind,
        component: Option<&str>,
        workload: Option<&str>,
        expected: Option<&str>,
        observed: Option<&str>,
        items: &[&ObservedItem],
        detail: String,
    ) -> Finding {
        let mut labels = BTreeMap::new();
        for item in items {
            for (key, value) in &item.labels {
                labels.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        let target = &self.desired.target;
        Finding {
            fingerprint: fingerprint(target, kind, component, workload, expected, observed),
            target: target.clone(),
            kind,
            severity: kind.severity(),
            component: component.map(str::to_string),
            workload: workload.map(str::to_string),
            expected: expected.map(str::to_string),
            observed: observed.map(str::to_string),
            labels,
            detail,
            detected_at: self.now,
        }
    }
}

fn workload_names(items: &[&ObservedItem]) -> String {
    items
        .iter()
        .map(|i| i.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn desired_sticker_summary(desired: &DesiredTarget) -> String {
    summary(
        &desired.release,
        &desired.deployment_id,
        desired
            .components
            .iter()
            .map(|c| (c.name.as_str(), c.digest.as_str())),
    )
}

fn sticker_summary(sticker: &ObservedSticker) -> String {
    summary(
        &sticker.release,
        &sticker.deployment_id,
        sticker
            .components
            .iter()
            .map(|c| (c.name.as_str(), c.digest.as_str())),
    )
}

// Sorted by component name, so the same sticker always reads (and fingerprints) the same.
fn summary<'a>(
    release: &str,
    deployment_id: &str,
    components: impl Iterator<Item = (&'a str, &'a str)>,
) -> String {
    let mut components: Vec<_> = components.collect();
    components.sort();
    let mut out = format!("release={release} deployment={deployment_id}");
    for (name, digest) in components {
        out.push_str(&format!(" {name}={digest}"));
    }
    out
}

fn sticker_differences(desired: &DesiredTarget, sticker: &ObservedSticker) -> Vec<String> {
    let mut out = Vec::new();
    if sticker.release != desired.release {
        out.push(format!(
            "release {} instead of {}",
            sticker.release, desired.release
        ));
    }
    if sticker.deployment_id != desired.deployment_id {
        out.push(format!(
            "deployment {} instead of {}",
            sticker.deployment_id, desired.deployment_id
        ));
    }
    let written: BTreeMap<&str, &str> = sticker
        .components
        .iter()
        .map(|c| (c.name.as_str(), c.digest.as_str()))
        .collect();
    for component in &desired.components {
        match written.get(component.name.as_str()) {
            None => out.push(format!("component {} absent", component.name)),
            Some(digest) if *digest != component.digest => out.push(format!(
                "component {} at {digest} instead of {}",
                component.name, component.digest
            )),
            Some(_) => {}
        }
    }
    for name in written.keys() {
        if !desired.components.iter().any(|c| c.name == *name) {
            out.push(format!("component {name} not in the release"));
        }
    }
    out
}
