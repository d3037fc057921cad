//! A realistic target: web-1, a docker host running release `rel-7` (deployment `dep-42`) with
//! two components, as the docker executor reports it right after a successful deploy.

#![allow(dead_code)]

use std::collections::BTreeMap;

use stella_drift::{
    DesiredComponent, DesiredTarget, ObservedItem, ObservedSticker, ObservedTarget,
    StickerComponent, WorkloadState,
};
use time::OffsetDateTime;

pub const API_DIGEST: &str =
    "sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
pub const WORKER_DIGEST: &str =
    "sha256:a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
pub const OTHER_DIGEST: &str =
    "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

/// 2025-03-01T12:00:00Z: inventory time of every fixture.
pub fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_740_830_400).unwrap()
}

pub fn desired() -> DesiredTarget {
    DesiredTarget {
        target: "web-1".into(),
        kind: "docker".into(),
        release: "rel-7".into(),
        deployment_id: "dep-42".into(),
        components: vec![
            DesiredComponent {
                name: "api".into(),
                image: "registry.local/shop/api:2.4.1".into(),
                digest: API_DIGEST.into(),
            },
            DesiredComponent {
                name: "worker".into(),
                image: "registry.local/shop/worker:2.4.1".into(),
                digest: WORKER_DIGEST.into(),
            },
        ],
        sticker_expected: true,
    }
}

/// The labels the docker executor puts on a container of `component`.
pub fn stella_labels(component: &str, digest: &str) -> BTreeMap<String, String> {
    [
        ("stella.managed", "true"),
        ("stella.target", "web-1"),
        ("stella.component", component),
        ("stella.digest", digest),
        ("stella.release.id", "rel-7"),
        ("stella.deployment.id", "dep-42"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

pub fn managed(component: &str, digest: &str, docker_state: &str) -> ObservedItem {
    ObservedItem {
        component: Some(component.into()),
        name: format!("stella-web-1-{component}"),
        image: format!("registry.local/shop/{component}:2.4.1"),
        digest: Some(digest.into()),
        state: WorkloadState::from_reported(docker_state),
        managed: true,
        labels: stella_labels(component, digest),
    }
}

pub fn sticker(release: &str, deployment: &str) -> ObservedSticker {
    ObservedSticker {
        release: release.into(),
        deployment_id: deployment.into(),
        components: vec![
            StickerComponent {
                name: "api".into(),
                digest: API_DIGEST.into(),
            },
            StickerComponent {
                name: "worker".into(),
                digest: WORKER_DIGEST.into(),
            },
        ],
    }
}

/// The inventory of a target that runs exactly the desired state.
pub fn in_sync() -> ObservedTarget {
    ObservedTarget {
        target: "web-1".into(),
        observed_at: t0(),
        items: vec![
            managed("api", API_DIGEST, "running"),
            managed("worker", WORKER_DIGEST, "running"),
        ],
        sticker: Some(sticker("rel-7", "dep-42")),
    }
}

/// A container someone started by hand next to the release.
pub fn hand_started(name: &str, labels: &[(&str, &str)]) -> ObservedItem {
    ObservedItem {
        component: None,
        name: name.into(),
        image: "busybox:latest".into(),
        digest: Some(OTHER_DIGEST.into()),
        state: WorkloadState::Running,
        managed: false,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}
