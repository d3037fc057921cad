use thiserror::Error;

/// Why an input value, a policy module or a decision could not be built.
#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("{value:?} is not an RFC 3339 time: {reason}")]
    InvalidTimestamp { value: String, reason: String },
    #[error("{value:?} is not a UTC time of day HH:MM (00:00 to 24:00)")]
    InvalidTimeOfDay { value: String },
    #[error("{value:?} is not a day of the week (mon, tue, wed, thu, fri, sat, sun)")]
    InvalidWeekday { value: String },
    #[error("Rego module {name:?}: {message}")]
    InvalidModule { name: String, message: String },
    #[error("canonical JSON of the input: {0}")]
    Canonical(#[from] serde_json::Error),
}
