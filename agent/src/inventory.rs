//! What the agent reports about one target's workloads, in the protocol's form: Stella's own
//! and, where the executor can tell, foreign ones in the target's watched scope (drift needs
//! both, plus names, images and labels for ignore rules).

use stella_plugin_sdk::{Executor, ObservedWorkload, PluginError, TargetRef};
use stella_proto::Workload;

/// The workloads of `target`, as `executor` observes them.
pub async fn workloads(
    executor: &dyn Executor,
    target: &TargetRef,
) -> Result<Vec<Workload>, PluginError> {
    Ok(executor
        .observe(target)
        .await?
        .into_iter()
        .map(workload)
        .collect())
}

fn workload(o: ObservedWorkload) -> Workload {
    let i = o.item;
    Workload {
        component: i.component,
        digest: i.digest,
        state: i.state,
        health: i.health.unwrap_or_default(),
        workload_id: i.workload_id,
        release_id: i.release_id.unwrap_or_default(),
        deployment_id: i.deployment_id.unwrap_or_default(),
        name: o.name,
        image: o.image,
        unmanaged: !o.managed,
        labels: o.labels.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stella_plugin_sdk::InventoryItem;

    #[test]
    fn foreign_workloads_are_marked_unmanaged_and_keep_their_labels() {
        let item = InventoryItem {
            component: String::new(),
            digest: format!("sha256:{}", "c".repeat(64)),
            state: "running".to_string(),
            health: None,
            workload_id: "abc".to_string(),
            release_id: None,
            deployment_id: None,
        };
        let w = workload(ObservedWorkload {
            item,
            name: "intruder".to_string(),
            image: "demo/x:1".to_string(),
            managed: false,
            labels: [("team".to_string(), "ops".to_string())].into(),
        });
        assert!(w.unmanaged);
        assert_eq!(w.name, "intruder");
        assert_eq!(w.image, "demo/x:1");
        assert_eq!(w.labels.get("team").map(String::as_str), Some("ops"));
        assert_eq!(w.workload_id, "abc");
        assert_eq!(w.release_id, "");
    }
}
