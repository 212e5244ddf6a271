//! Wall-clock helpers: unix milliseconds, durations for messages, and RFC 3339 timestamps (read as Go
//! reads them, `format::gotime`).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::format::gotime::GoTime;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `30d`, `90s`, `500ms` when a unit divides the value evenly (as configs are written); otherwise the
/// largest unit it reaches, with one decimal: `1.2d`, `5.3s`.
pub fn human_ms(ms: i64) -> String {
    const UNITS: [(&str, i64); 4] = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ];
    if let Some((unit, size)) = UNITS.iter().find(|(_, size)| ms != 0 && ms % size == 0) {
        return format!("{}{unit}", ms / size);
    }
    match UNITS.iter().find(|(_, size)| ms.abs() >= *size) {
        Some((unit, size)) => format!("{:.1}{unit}", ms as f64 / *size as f64),
        None => format!("{ms}ms"),
    }
}

#[cfg(test)]
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// `2026-03-18T09:14:03.120Z` for unix milliseconds.
#[cfg(test)]
pub fn format_rfc3339_ms(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let secs = rem / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        rem % 1000
    )
}

/// Parses an RFC 3339 timestamp (`2026-03-18T09:14:03.120Z`, any zone offset, a calendar-valid date)
/// into unix milliseconds, as Go reads one (`format::gotime`).
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    GoTime::parse(s).map(|t| t.unix_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_engine_timestamps() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2026-03-18T09:14:03.120481Z"),
            Some(1_773_825_243_120)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-03-18T09:14:05.9Z"),
            Some(1_773_825_245_900)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-03-18T10:14:05+01:00"),
            parse_rfc3339_ms("2026-03-18T09:14:05Z")
        );
        assert_eq!(
            parse_rfc3339_ms("0001-01-01T00:00:00Z"),
            Some(-62_135_596_800_000)
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-03-18T09:14:03",
            "2026-03-18T09:14:03.Z",
            "2026-03-18T09:14:03Zjunk",
            "2026-02-31T09:14:03Z",
            "2026-03-18t09:14:03Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_ms(30 * 86_400_000), "30d");
        assert_eq!(human_ms(90_000), "90s");
        assert_eq!(human_ms(1500), "1.5s");
        assert_eq!(human_ms(500), "500ms");
        assert_eq!(human_ms(123_456), "2.1m");
        assert_eq!(human_ms(86_400_123), "1.0d");
        assert_eq!(human_ms(0), "0ms");
    }

    #[test]
    fn formats_round_trip() {
        for ms in [0, 1_773_825_243_120, 951_782_400_000, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Some(ms));
        }
        assert_eq!(
            format_rfc3339_ms(1_773_825_243_120),
            "2026-03-18T09:14:03.120Z"
        );
    }
}
