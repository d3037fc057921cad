use crate::calendar::Weekday;
use crate::gates::{Gate, GateResult};
use crate::input::PromotionInput;

/// Passed when `now` falls in one of the environment's schedule windows (or there are none).
/// Outside them the gate fails rather than waits: the promotion is asked for again in the
/// window, so that nothing starts unattended at the moment a window opens.
pub(crate) fn schedule_window(input: &PromotionInput) -> GateResult {
    let windows = &input.environment.schedule_windows;
    if windows.is_empty() {
        return GateResult::passed(
            Gate::ScheduleWindow,
            "no schedule windows: promotions may happen at any time",
        );
    }
    let invalid: Vec<String> = windows
        .iter()
        .filter(|w| w.days.is_empty() || w.end <= w.start)
        .map(|w| format!("'{w}'"))
        .collect();
    if !invalid.is_empty() {
        // A window that can never match is a configuration mistake; failing says so instead
        // of silently narrowing when promotions may run.
        return GateResult::failed(
            Gate::ScheduleWindow,
            format!(
                "invalid schedule window {} (needs at least one day and an end after its start)",
                invalid.join(", ")
            ),
        );
    }
    let day = Weekday::of(input.now);
    let clock = input.now.as_offset_date_time().time();
    let second_of_day =
        u32::from(clock.hour()) * 3600 + u32::from(clock.minute()) * 60 + u32::from(clock.second());
    let open = windows.iter().find(|w| {
        w.days.contains(&day)
            && w.start.seconds_since_midnight() <= second_of_day
            && second_of_day < w.end.seconds_since_midnight()
    });
    match open {
        Some(window) => GateResult::passed(
            Gate::ScheduleWindow,
            format!("{} is inside schedule window {window}", input.now),
        ),
        None => {
            let all: Vec<String> = windows.iter().map(ToString::to_string).collect();
            GateResult::failed(
                Gate::ScheduleWindow,
                format!(
                    "{} ({day}) is outside every schedule window: {}",
                    input.now,
                    all.join("; ")
                ),
            )
        }
    }
}
