use crate::gates::{Gate, GateResult};
use crate::input::{FreezeWindow, PromotionInput};

/// Failed inside any active freeze window, unless an override was requested by a user the
/// window lets override it. Merely being an override user is not enough: a freeze is only
/// bypassed on purpose, and the record says who did it.
pub(crate) fn freeze_window(input: &PromotionInput) -> GateResult {
    let active: Vec<&FreezeWindow> = input
        .environment
        .freeze_windows
        .iter()
        .filter(|w| w.is_active(input.now))
        .collect();
    if active.is_empty() {
        return GateResult::passed(Gate::FreezeWindow, "no freeze window is active");
    }
    let overrider = input.overrides.freeze_override_by.as_deref();
    let mut blocked = Vec::new();
    let mut overridden = Vec::new();
    for window in active {
        let what = format!("freeze window '{}' until {}", window.reason, window.end);
        match overrider {
            Some(user) if window.override_users.iter().any(|u| u == user) => {
                overridden.push(format!("{what} overridden by {user}"));
            }
            Some(user) if window.override_users.is_empty() => blocked.push(format!(
                "{what} (override: requested by {user}, but nobody may override this window)"
            )),
            Some(user) => blocked.push(format!(
                "{what} (override: requested by {user}, who is not allowed; allowed: {})",
                window.override_users.join(", ")
            )),
            None => blocked.push(format!("{what} (override: not requested)")),
        }
    }
    if blocked.is_empty() {
        GateResult::passed(Gate::FreezeWindow, overridden.join("; "))
    } else {
        GateResult::failed(Gate::FreezeWindow, blocked.join("; "))
    }
}
