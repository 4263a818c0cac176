//! One clock for the whole process: CLOCK_MONOTONIC nanoseconds for scheduling (the
//! same clock the timerfd uses), mapped to approximate Unix microseconds for the `t_us`
//! carried in messages. Publisher and subscriber live in this process, so latencies are
//! differences on one monotonic clock.

use std::sync::OnceLock;

/// CLOCK_MONOTONIC in nanoseconds.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn offset_us() -> u64 {
    static OFFSET: OnceLock<u64> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        wall.saturating_sub(mono_ns() / 1000)
    })
}

/// The Unix-like microsecond timestamp of a monotonic instant.
pub fn us_of(mono_ns: u64) -> u64 {
    offset_us() + mono_ns / 1000
}

/// Now, as [`us_of`] would give it.
pub fn now_us() -> u64 {
    us_of(mono_ns())
}

/// Seconds since the Unix epoch (wall clock).
pub fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// (year, month, day, hour, minute, second) in UTC.
pub fn civil(unix_s: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (unix_s / 86_400) as i64;
    let rem = unix_s % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

/// `2026-11-23T17:00:00Z`
pub fn rfc3339(unix_s: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_s);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `20261123T170000Z`, for directory names.
pub fn compact(unix_s: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(unix_s);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_453_200), "2026-11-23T17:00:00Z");
        assert_eq!(compact(1_795_453_200), "20261123T170000Z");
    }

    #[test]
    fn monotonic_and_mapped() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a);
        let wall = unix_s() * 1_000_000;
        let mapped = now_us();
        assert!(mapped.abs_diff(wall) < 5_000_000, "{mapped} vs {wall}");
    }
}
