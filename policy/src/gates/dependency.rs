use crate::gates::{Gate, GateResult};
use crate::input::PromotionInput;

/// Deployment statuses of a deployment that has not finished yet.
const UNFINISHED: &[&str] = &["pending", "queued", "running"];

/// The release must have been deployed successfully to the previous environment.
pub(crate) fn dependency(input: &PromotionInput) -> GateResult {
    let Some(previous) = input.environment.previous.as_deref() else {
        return GateResult::passed(
            Gate::Dependency,
            format!("{} is the first environment", input.environment.name),
        );
    };
    let release = &input.release.name;
    let Some(deployment) = &input.previous_environment_deployment else {
        return GateResult::failed(
            Gate::Dependency,
            format!("release {release} has not been deployed to {previous}"),
        );
    };
    if deployment.release != *release {
        // The plane handed over another release's deployment: never count it for this one.
        return GateResult::failed(
            Gate::Dependency,
            format!(
                "the deployment given for {previous} is of release {}, not {release}",
                deployment.release
            ),
        );
    }
    match deployment.status.as_str() {
        "succeeded" => {
            let when = deployment
                .finished_at
                .map(|at| format!(" at {at}"))
                .unwrap_or_default();
            GateResult::passed(
                Gate::Dependency,
                format!("release {release} was deployed to {previous}{when}"),
            )
        }
        status if UNFINISHED.contains(&status) => GateResult::pending(
            Gate::Dependency,
            format!("release {release} is still deploying to {previous} ({status})"),
        ),
        status => GateResult::failed(
            Gate::Dependency,
            format!("the deployment of release {release} to {previous} ended {status}"),
        ),
    }
}
