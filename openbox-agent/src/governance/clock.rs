//! UTC time as the protocol writes and reads it: RFC 3339 timestamps with milliseconds
//! and `Z` (§2.1), float Unix seconds (§2.2), and the three `approval_expiration_time`
//! forms of §5. Pure functions over `SystemTime`/strings, no time-zone database.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch as a float (ActivityCompleted `start_time`/`end_time`).
pub fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// `2026-01-15T10:30:45.123Z`: the SDK's `strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z'`
/// (milliseconds truncated, not rounded).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs() as i64;
    let millis = d.subsec_millis();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `2026-09-21T10:00:00.123456+00:00`: Python's `datetime.now(timezone.utc).isoformat()`
/// (microseconds, dropped when zero; always `+00:00`), the signing timestamp of §1.3.
pub fn python_isoformat_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs() as i64;
    let micros = d.subsec_micros();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    let fraction = if micros == 0 {
        String::new()
    } else {
        format!(".{micros:06}")
    };
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}{fraction}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `YYYY-MM-DD[T| ]HH:MM[:SS[.frac]][Z|±HH:MM|±HHMM]` into Unix seconds. A value
/// without a zone is UTC (§5: the SDK assumes UTC for naive times). `None` when the text
/// is not such a time.
pub fn parse_utc(text: &str) -> Option<f64> {
    let s = text.trim();
    let b = s.as_bytes();
    if b.len() < 16 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let year = num(0..4)?;
    if b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ') {
        return None;
    }
    let month = num(5..7)?;
    let day = num(8..10)?;
    let hour = num(11..13)?;
    if b[13] != b':' {
        return None;
    }
    let minute = num(14..16)?;
    let mut i = 16;
    let mut second = 0i64;
    let mut frac = 0f64;
    if b.get(i) == Some(&b':') {
        second = num(i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') || b.get(i) == Some(&b',') {
            let start = i + 1;
            let mut end = start;
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            if end == start {
                return None;
            }
            frac = format!("0.{}", &s[start..end]).parse().ok()?;
            i = end;
        }
    }
    let offset_secs = match &s[i..] {
        "" => 0,
        "Z" | "z" => 0,
        zone => {
            let sign = match zone.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let digits: String = zone[1..].chars().filter(|c| *c != ':').collect();
            if digits.len() != 4 || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let h: i64 = digits[0..2].parse().ok()?;
            let m: i64 = digits[2..4].parse().ok()?;
            sign * (h * 3600 + m * 60)
        }
    };
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs as f64 + frac)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

// Howard Hinnant's civil-date algorithms (proleptic Gregorian, days since 1970-01-01).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_is_utc_with_truncated_milliseconds_and_z() {
        let t = UNIX_EPOCH + Duration::from_nanos(1_768_473_045_123_999_999);
        assert_eq!(rfc3339_millis(t), "2026-01-15T10:30:45.123Z");
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn signing_timestamps_are_python_isoformat() {
        let t = UNIX_EPOCH + Duration::from_micros(1_789_984_800_123_456);
        assert_eq!(python_isoformat_utc(t), "2026-09-21T10:00:00.123456+00:00");
        let whole = UNIX_EPOCH + Duration::from_secs(1_789_984_800);
        assert_eq!(python_isoformat_utc(whole), "2026-09-21T10:00:00+00:00");
        let nanos = whole + Duration::from_nanos(999);
        assert_eq!(python_isoformat_utc(nanos), "2026-09-21T10:00:00+00:00");
    }

    #[test]
    fn unix_seconds_are_fractional() {
        let t = UNIX_EPOCH + Duration::from_millis(1_736_937_045_100);
        assert!((unix_seconds(t) - 1_736_937_045.1).abs() < 1e-6);
    }

    #[test]
    fn expiration_times_in_the_three_sdk_forms_parse_and_naive_is_utc() {
        let z = parse_utc("2026-01-11T17:43:39Z").unwrap();
        assert_eq!(parse_utc("2026-01-11T17:43:39+00:00"), Some(z));
        assert_eq!(parse_utc("2026-01-11 17:43:39"), Some(z));
        assert_eq!(parse_utc("2026-01-11T19:43:39+02:00"), Some(z));
        assert_eq!(parse_utc("2026-01-11T17:43:39.250Z"), Some(z + 0.25));
        assert_eq!(z, 1_768_153_419.0);
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-02-30 00:00:00",
            "2026-01-11T17:43:39 UTC",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }
}
