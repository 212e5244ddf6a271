//! Timestamps as the engine's Go runtime reads and writes them (`time.Time` in JSON).
//!
//! Reading is `Time.UnmarshalJSON`: the strict RFC 3339 form (`2006-01-02T15:04:05[.fraction](Z|±hh:mm)`,
//! a calendar-valid date), and where that fails Go's layout parser, which also takes a one-digit hour,
//! a comma before the fraction and zone offsets up to `±24:60`. Fraction digits past the ninth are
//! dropped. Writing is `Time.MarshalJSON`: RFC 3339 with up to nine fraction digits, trailing zeros
//! trimmed, in the time's own zone offset (`Z` for offset 0), and an error for an offset of 24 hours
//! or more, which Go refuses to write.

/// A wall-clock time in its own zone offset, with nanoseconds: what a Go `time.Time` parsed from JSON
/// holds that its JSON form shows. The default is Go's zero time, `0001-01-01T00:00:00Z`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoTime {
    year: i32,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    nanos: u32,
    /// Seconds east of UTC.
    offset: i32,
}

impl Default for GoTime {
    fn default() -> Self {
        GoTime {
            year: 1,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
            nanos: 0,
            offset: 0,
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in(month: u8, year: i32) -> u8 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A zone as RFC 3339 writes it at the end of a time (`Z`, `+hh:mm`, `-hh:mm`), in seconds east of
/// UTC; hours and minutes up to `max_h` and `max_m` (Go's fast path is strict, its layout parser lax).
fn zone_offset(rest: &[u8], max_h: u32, max_m: u32) -> Option<i32> {
    match rest {
        [b'Z'] => Some(0),
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (h, m) = (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?);
            if h > max_h || m > max_m {
                return None;
            }
            let off = (h * 3600 + m * 60) as i32;
            Some(if *sign == b'-' { -off } else { off })
        }
        _ => None,
    }
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, c| n * 10 + u32::from(c - b'0')))
}

/// Nanoseconds of a fraction's digits (the first nine count, as Go's parser keeps them).
fn fraction_nanos(frac: &[u8]) -> u32 {
    let kept = &frac[..frac.len().min(9)];
    let n = digits(kept).unwrap_or(0);
    n * 10u32.pow(9 - kept.len() as u32)
}

impl GoTime {
    /// Parses the text of a JSON string as `Time.UnmarshalJSON` does; `None` where Go reports an error.
    pub fn parse(s: &str) -> Option<GoTime> {
        Self::strict(s.as_bytes()).or_else(|| Self::layout(s.as_bytes()))
    }

    /// Go's fast path (`parseRFC3339`).
    fn strict(s: &[u8]) -> Option<GoTime> {
        if s.len() < 19 || s[4] != b'-' || s[7] != b'-' || s[10] != b'T' {
            return None;
        }
        if s[13] != b':' || s[16] != b':' {
            return None;
        }
        let (year, month) = (digits(&s[0..4])?, digits(&s[5..7])?);
        let (day, hour) = (digits(&s[8..10])?, digits(&s[11..13])?);
        let (minute, second) = (digits(&s[14..16])?, digits(&s[17..19])?);
        if !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        let (year, month) = (year as i32, month as u8);
        if day < 1 || day > u32::from(days_in(month, year)) {
            return None;
        }
        let mut rest = &s[19..];
        let mut nanos = 0;
        if rest.len() >= 2 && rest[0] == b'.' && rest[1].is_ascii_digit() {
            let n = 1 + rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
            nanos = fraction_nanos(&rest[1..n]);
            rest = &rest[n..];
        }
        let offset = zone_offset(rest, 23, 59)?;
        Some(GoTime {
            year,
            month,
            day: day as u8,
            hour: hour as u8,
            minute: minute as u8,
            second: second as u8,
            nanos,
            offset,
        })
    }

    /// Go's layout parser with the RFC 3339 layout, where it is more lenient than the fast path: a
    /// one-digit hour, `,` before the fraction, offsets with an hour up to 24 and minutes up to 60.
    fn layout(s: &[u8]) -> Option<GoTime> {
        let fixed = |s: &[u8], at: usize, n: usize| s.get(at..at + n).and_then(digits);
        if s.get(4) != Some(&b'-') || s.get(7) != Some(&b'-') || s.get(10) != Some(&b'T') {
            return None;
        }
        let (year, month, day) = (fixed(s, 0, 4)?, fixed(s, 5, 2)?, fixed(s, 8, 2)?);
        // The hour takes one digit or two.
        let hour_len = if s.get(12).is_some_and(u8::is_ascii_digit) {
            2
        } else {
            1
        };
        let hour = fixed(s, 11, hour_len)?;
        let mut at = 11 + hour_len;
        if s.get(at) != Some(&b':') {
            return None;
        }
        let minute = fixed(s, at + 1, 2)?;
        if s.get(at + 3) != Some(&b':') {
            return None;
        }
        let second = fixed(s, at + 4, 2)?;
        at += 6;
        let mut nanos = 0;
        if matches!(s.get(at), Some(b'.' | b',')) && s.get(at + 1).is_some_and(u8::is_ascii_digit) {
            let n = s[at + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            nanos = fraction_nanos(&s[at + 1..at + 1 + n]);
            at += 1 + n;
        }
        let offset = zone_offset(&s[at..], 24, 60)?;
        let (year, month) = (year as i32, month as u8);
        if !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        if day < 1 || day > u32::from(days_in(month, year)) {
            return None;
        }
        Some(GoTime {
            year,
            month,
            day: day as u8,
            hour: hour as u8,
            minute: minute as u8,
            second: second as u8,
            nanos,
            offset,
        })
    }

    /// Seconds since the unix epoch of this instant.
    fn unix_seconds(&self) -> i64 {
        let days = days_from_civil(
            i64::from(self.year),
            i64::from(self.month),
            i64::from(self.day),
        );
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
            - i64::from(self.offset)
    }

    /// Unix milliseconds of this instant.
    pub fn unix_ms(&self) -> i64 {
        self.unix_seconds() * 1000 + i64::from(self.nanos / 1_000_000)
    }

    /// Go's `Time.IsZero`: the instant of the zero time, whatever zone it is shown in.
    pub fn is_zero(&self) -> bool {
        self.nanos == 0 && self.unix_seconds() == GoTime::default().unix_seconds()
    }

    /// Appends the JSON string `Time.MarshalJSON` writes; an error where Go refuses to write one (a
    /// zone offset of 24 hours or more).
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let minutes = self.offset / 60;
        if minutes.abs() / 60 >= 24 {
            return Err("Time.MarshalJSON: timezone hour outside of range [0,23]".into());
        }
        let mut text = format!(
            "\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        );
        if self.nanos > 0 {
            let frac = format!("{:09}", self.nanos);
            text.push('.');
            text.push_str(frac.trim_end_matches('0'));
        }
        if minutes == 0 {
            text.push('Z');
        } else {
            let sign = if minutes < 0 { '-' } else { '+' };
            let abs = minutes.abs();
            text.push_str(&format!("{sign}{:02}:{:02}", abs / 60, abs % 60));
        }
        text.push('"');
        out.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(s: &str) -> Result<String, String> {
        let t = GoTime::parse(s).ok_or("parse")?;
        let mut out = Vec::new();
        t.write_json(&mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    /// Each input as Go 1.26's encoding/json reads and writes it back (measured with a Go program).
    #[test]
    fn reads_and_writes_as_go_does() {
        let cases: &[(&str, &str)] = &[
            (
                "2026-03-18T09:14:03.120481123Z",
                "\"2026-03-18T09:14:03.120481123Z\"",
            ),
            (
                "2026-03-18T09:14:03.1204811239Z",
                "\"2026-03-18T09:14:03.120481123Z\"",
            ),
            (
                "2026-03-18T09:14:03.100+01:00",
                "\"2026-03-18T09:14:03.1+01:00\"",
            ),
            ("2026-03-18T09:14:03-00:00", "\"2026-03-18T09:14:03Z\""),
            ("2026-03-18T9:14:03Z", "\"2026-03-18T09:14:03Z\""),
            ("2026-03-18T09:14:03,5Z", "\"2026-03-18T09:14:03.5Z\""),
            ("0001-01-01T01:00:00+01:00", "\"0001-01-01T01:00:00+01:00\""),
            ("2026-03-18T09:14:03.000000000Z", "\"2026-03-18T09:14:03Z\""),
            (
                "2026-03-18T09:14:03.5-09:30",
                "\"2026-03-18T09:14:03.5-09:30\"",
            ),
        ];
        for (input, json) in cases {
            assert_eq!(shown(input).as_deref(), Ok(*json), "{input}");
        }
        for refused in ["2026-03-18T09:14:03+24:00", "2026-03-18T09:14:03+23:60"] {
            assert!(
                shown(refused).unwrap_err().contains("timezone hour"),
                "{refused}"
            );
        }
        for bad in [
            "2026-02-31T09:14:03Z",
            "2026-03-18t09:14:03Z",
            "2026-03-18T09:14:03.Z",
            "2026-03-18T09:14:60Z",
            "2026-03-18T09:14:03z",
            "2026-03-18T09:14:03 Z",
            "2026-03-18 09:14:03Z",
            "2026-03-18T09:14:03+0100",
            "2026-03-18T09:14:03.5+01:00:00",
            "2026-03-18T24:00:00Z",
            "2026-03-18T09:14:03Zjunk",
            "",
            "yesterday",
        ] {
            assert_eq!(GoTime::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_zero_instant_in_any_zone_is_zero() {
        assert!(GoTime::default().is_zero());
        assert!(GoTime::parse("0001-01-01T01:00:00+01:00")
            .unwrap()
            .is_zero());
        assert!(!GoTime::parse("0001-01-01T00:00:00.000000001Z")
            .unwrap()
            .is_zero());
        let mut out = Vec::new();
        GoTime::default().write_json(&mut out).unwrap();
        assert_eq!(out, b"\"0001-01-01T00:00:00Z\"");
    }

    #[test]
    fn leap_days_and_unix_ms() {
        assert!(GoTime::parse("2024-02-29T00:00:00Z").is_some());
        assert!(GoTime::parse("2100-02-29T00:00:00Z").is_none());
        assert!(GoTime::parse("2000-02-29T00:00:00Z").is_some());
        assert_eq!(GoTime::parse("1970-01-01T00:00:00Z").unwrap().unix_ms(), 0);
        assert_eq!(
            GoTime::parse("2026-03-18T10:14:05.9+01:00")
                .unwrap()
                .unix_ms(),
            GoTime::parse("2026-03-18T09:14:05.900Z").unwrap().unix_ms()
        );
        assert_eq!(
            GoTime::parse("2026-03-18T09:14:03.120481Z")
                .unwrap()
                .unix_ms(),
            1_773_825_243_120
        );
    }
}
