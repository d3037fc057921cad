//! Durations as operators write them in templates: `500ms`, `5s`, `10m`, `1h`, `1h30m`.

use std::time::Duration;

/// The longest duration a template may hold. Run times are computed by adding durations to
/// wall-clock instants; a bound keeps that arithmetic far from overflow and catches typos
/// such as `5000h`.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Parses `<number><unit>` pairs (units `ms`, `s`, `m`, `h`), e.g. `500ms`, `10m`, `1h30m`.
/// Returns a message suitable for a template error on failure.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let expected = "expected a duration such as 500ms, 5s, 10m or 1h";
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("empty duration ({expected})"));
    }
    let mut total = Duration::ZERO;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(format!("invalid duration {text:?} ({expected})"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("duration {text:?} is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let (unit, after) = rest.split_at(unit_len);
        let part = match unit {
            "ms" => Some(Duration::from_millis(number)),
            "s" => number.checked_mul(1).map(Duration::from_secs),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "" if after.is_empty() => {
                return Err(format!("duration {text:?} has no unit ({expected})"));
            }
            "" => return Err(format!("invalid duration {text:?} ({expected})")),
            other => {
                return Err(format!(
                    "duration {text:?} has unknown unit {other:?} (expected ms, s, m or h)"
                ));
            }
        }
        .ok_or_else(|| format!("duration {text:?} is too large"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
        rest = after;
    }
    if total > MAX_DURATION {
        return Err(format!(
            "duration {text:?} is longer than the maximum of 720h"
        ));
    }
    Ok(total)
}

/// Renders a duration in the template syntax, largest units first (`1h30m`, `500ms`).
pub fn format_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut millis = duration.as_millis();
    for (unit, size) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        let count = millis / size;
        if count > 0 {
            out.push_str(&format!("{count}{unit}"));
            millis %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit_and_compounds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_malformed_and_oversized() {
        for bad in ["", "5", "s", "5 s", "5sec", "-5s", "1.5s", "5d", "721h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("720h").is_ok());
    }

    #[test]
    fn formats_back_to_template_syntax() {
        for text in ["500ms", "5s", "10m", "1h", "1h30m", "0s", "2h5s"] {
            let parsed = parse_duration(text).unwrap();
            assert_eq!(format_duration(parsed), text);
        }
    }
}
