//! Time: ISO-8601 / RFC 3339 timestamps to epoch milliseconds and back to fields
//! (UTC, proleptic Gregorian calendar).

/// Epoch milliseconds as `YYYY-MM-DDThh:mm:ss.fffZ` (UTC), what [`parse_iso8601`]
/// reads back; years outside 0000-9999 are written with as many digits as they take.
pub fn format_iso8601(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(86_400_000));
    let t = ms.rem_euclid(86_400_000);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        t / 3_600_000,
        t / 60_000 % 60,
        t / 1000 % 60,
        t % 1000
    )
}

/// `YYYY-MM-DD[T ]hh:mm[:ss[.fff]][Z|±hh:mm|±hhmm]` (no zone: UTC), or a date alone.
pub fn parse_iso8601(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter().all(u8::is_ascii_digit).then(|| {
            part.iter()
                .fold(0i64, |acc, d| acc * 10 + (d - b'0') as i64)
        })
    };
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    if b.get(4) != Some(&b'-')
        || b.get(7) != Some(&b'-')
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
    {
        return None;
    }
    let mut ms = days_from_civil(year, month, day) * 86_400_000;
    let mut at = 10;
    if at == b.len() {
        return Some(ms);
    }
    if !matches!(b.get(at), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let (hour, minute) = (num(at + 1, 2)?, num(at + 4, 2)?);
    if b.get(at + 3) != Some(&b':') || hour > 23 || minute > 59 {
        return None;
    }
    ms += hour * 3_600_000 + minute * 60_000;
    at += 6;
    if b.get(at) == Some(&b':') {
        let second = num(at + 1, 2)?;
        if second > 60 {
            return None;
        }
        ms += second * 1000;
        at += 3;
        if matches!(b.get(at), Some(b'.' | b',')) {
            at += 1;
            let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 {
                return None;
            }
            let frac = &b[at..at + digits];
            let mut v = 0i64;
            for (i, d) in frac.iter().take(3).enumerate() {
                v += (d - b'0') as i64 * [100, 10, 1][i];
            }
            ms += v;
            at += digits;
        }
    }
    match b.get(at) {
        None => Some(ms),
        Some(b'Z' | b'z') if at + 1 == b.len() => Some(ms),
        Some(sign @ (b'+' | b'-')) => {
            let oh = num(at + 1, 2)?;
            let om = match b.len() - at {
                3 => 0,
                5 => num(at + 3, 2)?,
                6 if b[at + 3] == b':' => num(at + 4, 2)?,
                _ => return None,
            };
            let offset = (oh * 60 + om) * 60_000;
            Some(if *sign == b'+' {
                ms - offset
            } else {
                ms + offset
            })
        }
        _ => None,
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

/// (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
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
