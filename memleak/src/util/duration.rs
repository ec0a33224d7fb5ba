//! Durations as users write them: `200s`, `5m`, `500ms`, `1h30m`, `2d`.
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration (write it like 200s, 5m or 500ms)")]
    Empty,
    #[error("`{input}`: expected a number before `{rest}`")]
    MissingNumber { input: String, rest: String },
    #[error("`{input}`: unknown unit `{unit}` (use ms, s, m, h or d)")]
    UnknownUnit { input: String, unit: String },
    #[error("`{input}`: missing unit after {number} (use ms, s, m, h or d)")]
    MissingUnit { input: String, number: u64 },
    #[error("`{input}`: fractions are not supported (write 1500ms rather than 1.5s)")]
    Fractional { input: String },
    #[error("`{input}` is too long")]
    Overflow { input: String },
    #[error("`{input}` is out of range: must be between {min:?} and {max:?}")]
    OutOfRange {
        input: String,
        min: Duration,
        max: Duration,
    },
}

/// Parses a sequence of `<number><unit>` terms; the unit is mandatory so that `200` is not
/// silently read as seconds or milliseconds.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let text = input.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::MissingNumber {
                input: input.to_owned(),
                rest: rest.to_owned(),
            });
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::Overflow {
                input: input.to_owned(),
            })?;
        rest = &rest[digits..];
        if rest.starts_with(['.', ',']) {
            return Err(DurationError::Fractional {
                input: input.to_owned(),
            });
        }
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(DurationError::MissingUnit {
                    input: input.to_owned(),
                    number,
                });
            }
            other => {
                return Err(DurationError::UnknownUnit {
                    input: input.to_owned(),
                    unit: other.to_owned(),
                });
            }
        };
        let millis =
            number
                .checked_mul(millis_per_unit)
                .ok_or_else(|| DurationError::Overflow {
                    input: input.to_owned(),
                })?;
        total = total
            .checked_add(Duration::from_millis(millis))
            .ok_or_else(|| DurationError::Overflow {
                input: input.to_owned(),
            })?;
    }
    Ok(total)
}

/// Parses and checks `min <= duration <= max`.
pub fn parse_in_range(
    input: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, DurationError> {
    let duration = parse(input)?;
    if duration < min || duration > max {
        return Err(DurationError::OutOfRange {
            input: input.to_owned(),
            min,
            max,
        });
    }
    Ok(duration)
}

/// `1m 05s`-style rendering for reports.
pub fn display(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1_000 {
        return format!("{millis}ms");
    }
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{}.{:01}s", seconds, duration.subsec_millis() / 100),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h{:02}m", seconds / 3600, seconds / 60 % 60),
        _ => format!("{}d{:02}h", seconds / 86400, seconds / 3600 % 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("200s"), Ok(Duration::from_secs(200)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("5min"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("1d"), Ok(Duration::from_secs(86400)));
    }

    #[test]
    fn parses_compound_terms() {
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1m500ms"), Ok(Duration::from_millis(60_500)));
        assert_eq!(parse(" 10s "), Ok(Duration::from_secs(10)));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert!(matches!(
            parse("200"),
            Err(DurationError::MissingUnit { number: 200, .. })
        ));
        assert!(matches!(
            parse("10y"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse("s"),
            Err(DurationError::MissingNumber { .. })
        ));
        assert!(matches!(
            parse("-5s"),
            Err(DurationError::MissingNumber { .. })
        ));
        assert!(matches!(
            parse("1.5s"),
            Err(DurationError::Fractional { .. })
        ));
        assert!(matches!(
            parse("99999999999999999999s"),
            Err(DurationError::Overflow { .. })
        ));
        assert!(matches!(
            parse("18446744073709551615d"),
            Err(DurationError::Overflow { .. })
        ));
    }

    #[test]
    fn enforces_range() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(3600);
        assert_eq!(parse_in_range("1s", min, max), Ok(Duration::from_secs(1)));
        assert!(matches!(
            parse_in_range("0s", min, max),
            Err(DurationError::OutOfRange { .. })
        ));
        assert!(matches!(
            parse_in_range("2h", min, max),
            Err(DurationError::OutOfRange { .. })
        ));
        // Both bounds are allowed.
        assert_eq!(parse_in_range("100ms", min, max), Ok(min));
        assert_eq!(parse_in_range("1h", min, max), Ok(max));
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(display(Duration::from_millis(250)), "250ms");
        assert_eq!(display(Duration::from_millis(999)), "999ms");
        assert_eq!(display(Duration::from_millis(1_000)), "1.0s");
        assert_eq!(display(Duration::from_millis(4_200)), "4.2s");
        assert_eq!(display(Duration::from_secs(200)), "3m20s");
        assert_eq!(display(Duration::from_secs(7_260)), "2h01m");
        assert_eq!(display(Duration::from_secs(90_000)), "1d01h");
    }
}
