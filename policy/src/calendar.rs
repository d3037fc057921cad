//! The time values of the input document: instants, UTC times of day and days of the week.
//!
//! Instants are always written in UTC with a `Z` suffix, so equal instants have equal text:
//! the input hash does not depend on the offset a caller happened to use, and Rego authors may
//! compare the strings directly.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::error::PolicyError;

/// An instant, serialized as RFC 3339 in UTC (`2026-12-24T00:00:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    /// Milliseconds since the Unix epoch, as the control plane stores them.
    pub fn from_unix_millis(millis: i64) -> Result<Self, PolicyError> {
        let invalid = |reason: String| PolicyError::InvalidTimestamp {
            value: format!("{millis} ms since the epoch"),
            reason,
        };
        let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
            .map_err(|e| invalid(e.to_string()))?;
        Self::try_from(at).map_err(|_| invalid("outside years 0000 to 9999".to_string()))
    }

    pub fn as_offset_date_time(&self) -> OffsetDateTime {
        self.0
    }
}

impl TryFrom<OffsetDateTime> for Timestamp {
    type Error = PolicyError;

    /// RFC 3339 has four-digit years only; anything outside is refused here rather than when
    /// the document is serialized.
    fn try_from(at: OffsetDateTime) -> Result<Self, PolicyError> {
        let utc = at.to_offset(UtcOffset::UTC);
        if !(0..=9999).contains(&utc.year()) {
            return Err(PolicyError::InvalidTimestamp {
                value: at.to_string(),
                reason: "outside years 0000 to 9999".to_string(),
            });
        }
        Ok(Self(utc))
    }
}

impl FromStr for Timestamp {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let at = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| PolicyError::InvalidTimestamp {
            value: s.to_string(),
            reason: e.to_string(),
        })?;
        Self::try_from(at)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.format(&Rfc3339).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self.0.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A UTC time of day, `HH:MM`, from `00:00` to `24:00` (the end of the day).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay {
    minutes: u16,
}

impl TimeOfDay {
    pub const MIDNIGHT: Self = Self { minutes: 0 };
    pub const END_OF_DAY: Self = Self { minutes: 24 * 60 };

    pub fn new(hour: u8, minute: u8) -> Result<Self, PolicyError> {
        let valid = (hour < 24 && minute < 60) || (hour == 24 && minute == 0);
        if !valid {
            return Err(PolicyError::InvalidTimeOfDay {
                value: format!("{hour:02}:{minute:02}"),
            });
        }
        Ok(Self {
            minutes: u16::from(hour) * 60 + u16::from(minute),
        })
    }

    /// Seconds since midnight, the unit the schedule gate compares in.
    pub fn seconds_since_midnight(&self) -> u32 {
        u32::from(self.minutes) * 60
    }
}

impl FromStr for TimeOfDay {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let invalid = || PolicyError::InvalidTimeOfDay {
            value: s.to_string(),
        };
        let (hour, minute) = s.split_once(':').ok_or_else(invalid)?;
        let two_digits = |part: &str| part.len() == 2 && part.bytes().all(|b| b.is_ascii_digit());
        if !two_digits(hour) || !two_digits(minute) {
            return Err(invalid());
        }
        let hour = hour.parse().map_err(|_| invalid())?;
        let minute = minute.parse().map_err(|_| invalid())?;
        Self::new(hour, minute).map_err(|_| invalid())
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.minutes / 60, self.minutes % 60)
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A day of the week, written `mon` … `sun`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    pub const ALL: [Self; 7] = [
        Self::Mon,
        Self::Tue,
        Self::Wed,
        Self::Thu,
        Self::Fri,
        Self::Sat,
        Self::Sun,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Mon => "mon",
            Self::Tue => "tue",
            Self::Wed => "wed",
            Self::Thu => "thu",
            Self::Fri => "fri",
            Self::Sat => "sat",
            Self::Sun => "sun",
        }
    }

    /// The UTC day of the week of `at`.
    pub fn of(at: Timestamp) -> Self {
        match at.as_offset_date_time().weekday() {
            time::Weekday::Monday => Self::Mon,
            time::Weekday::Tuesday => Self::Tue,
            time::Weekday::Wednesday => Self::Wed,
            time::Weekday::Thursday => Self::Thu,
            time::Weekday::Friday => Self::Fri,
            time::Weekday::Saturday => Self::Sat,
            time::Weekday::Sunday => Self::Sun,
        }
    }
}

impl FromStr for Weekday {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Self::ALL
            .into_iter()
            .find(|day| day.as_str() == s)
            .ok_or_else(|| PolicyError::InvalidWeekday {
                value: s.to_string(),
            })
    }
}

impl fmt::Display for Weekday {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_written_in_utc_whatever_offset_they_arrived_in() {
        let a: Timestamp = "2026-12-24T01:30:00+01:00".parse().unwrap();
        let b: Timestamp = "2026-12-24T00:30:00Z".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "2026-12-24T00:30:00Z");
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            "\"2026-12-24T00:30:00Z\""
        );
    }

    #[test]
    fn bad_timestamps_are_refused_with_the_value_in_the_message() {
        let err = "24 December".parse::<Timestamp>().unwrap_err();
        assert!(err.to_string().contains("\"24 December\""), "{err}");
        let err = serde_json::from_str::<Timestamp>("\"2026-13-01T00:00:00Z\"").unwrap_err();
        assert!(err.to_string().contains("RFC 3339"), "{err}");
    }

    #[test]
    fn unix_millis_round_trip_and_out_of_range_is_refused() {
        let at = Timestamp::from_unix_millis(1_798_070_400_000).unwrap();
        assert_eq!(at.to_string(), "2026-12-24T00:00:00Z");
        assert!(Timestamp::from_unix_millis(i64::MAX).is_err());
    }

    #[test]
    fn time_of_day_accepts_hh_mm_up_to_the_end_of_the_day() {
        assert_eq!("09:05".parse::<TimeOfDay>().unwrap().to_string(), "09:05");
        assert_eq!("24:00".parse::<TimeOfDay>().unwrap(), TimeOfDay::END_OF_DAY);
        for bad in ["24:01", "9:05", "09:60", "0905", "", "ab:cd", "+1:00"] {
            let err = bad.parse::<TimeOfDay>().unwrap_err();
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn weekdays_are_three_lowercase_letters() {
        assert_eq!(serde_json::to_string(&Weekday::Sat).unwrap(), "\"sat\"");
        assert_eq!("sun".parse::<Weekday>().unwrap(), Weekday::Sun);
        assert!("Sunday".parse::<Weekday>().is_err());
        let saturday: Timestamp = "2026-12-26T12:00:00Z".parse().unwrap();
        assert_eq!(Weekday::of(saturday), Weekday::Sat);
    }
}
