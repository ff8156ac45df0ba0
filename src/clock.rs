//! Wall-clock helpers: Unix seconds and ISO-8601 UTC timestamps, without a date crate;
//! how retry times are judged by a wall clock that may be wrong, and noticing it jump.
//!
//! A Raspberry Pi has no real-time clock: it boots in 1970 or at the last saved time, and
//! NTP moves the clock later, by years. Waits are timed by the monotonic clock
//! ([`std::time::Instant`]), which never jumps; only what is stored (retry times, dates)
//! uses the wall clock.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the clock is set before 1970.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2025-12-18T17:30:00+00:00`, the form the contract's status uses.
pub fn iso8601(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

pub fn now_iso8601() -> String {
    iso8601(unix_now())
}

/// The wall clock as stored retry times are judged by. A retry time later than `now`
/// plus the longest delay relais ever schedules cannot have been set by this clock: it
/// was stored under a clock running ahead, or the clock has gone back since (a Pi that
/// failed a row with the right time, then rebooted into 1970). Such a row is due now;
/// its next failure is scheduled from the current clock. Without this rule the row
/// would wait for as long as the clock was wrong, years.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryClock {
    pub now: i64,
    /// Retry times after this are due now.
    pub latest: i64,
}

impl RetryClock {
    /// The wall clock now, for retries scheduled at most `longest_delay` ahead.
    pub fn read(longest_delay: Duration) -> RetryClock {
        RetryClock::at(unix_now(), longest_delay)
    }

    pub fn at(now: i64, longest_delay: Duration) -> RetryClock {
        let longest = i64::try_from(longest_delay.as_secs()).unwrap_or(i64::MAX);
        RetryClock {
            now,
            latest: now.saturating_add(longest),
        }
    }

    pub fn is_due(&self, retry_at: i64) -> bool {
        retry_at <= self.now || retry_at > self.latest
    }
}

/// A wall-clock jump smaller than this is drift or a slow NTP slew, not worth a warning.
const JUMP_WORTH_A_WARNING: Duration = Duration::from_secs(120);

/// Notices the wall clock jumping relative to the monotonic clock (NTP setting a clock
/// that booted in 1970, `date -s` by hand) between two observations.
#[derive(Debug)]
pub struct ClockWatch {
    mono: Instant,
    wall: SystemTime,
}

impl Default for ClockWatch {
    fn default() -> ClockWatch {
        ClockWatch {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

impl ClockWatch {
    /// By how many seconds the wall clock jumped (forward if positive) since the last
    /// observation, when that is more than two minutes.
    pub fn jumped(&mut self) -> Option<i64> {
        self.observe(Instant::now(), SystemTime::now())
    }

    fn observe(&mut self, mono: Instant, wall: SystemTime) -> Option<i64> {
        let mono_elapsed = mono.saturating_duration_since(self.mono).as_secs_f64();
        let wall_elapsed = match wall.duration_since(self.wall) {
            Ok(d) => d.as_secs_f64(),
            Err(back) => -back.duration().as_secs_f64(),
        };
        (self.mono, self.wall) = (mono, wall);
        let jump = wall_elapsed - mono_elapsed;
        (jump.abs() > JUMP_WORTH_A_WARNING.as_secs_f64()).then_some(jump.round() as i64)
    }
}

/// A `Retry-After` value as a delay: seconds, or an HTTP date. The date is measured
/// against the answer's own `Date` when it has one (both from the server's clock, so a
/// device clock off by years changes nothing), else against the local clock. A date in
/// the past means now; an absurdly far one is capped by the backoff.
pub fn retry_after(value: &str, date: Option<&str>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_http_date(value)?;
    let now = date
        .and_then(|d| parse_http_date(d.trim()))
        .unwrap_or_else(unix_now);
    Some(Duration::from_secs(at.saturating_sub(now).max(0) as u64))
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Parses an HTTP date in its preferred form (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110)
/// into Unix seconds.
pub fn parse_http_date(text: &str) -> Option<i64> {
    let mut parts = text.split_whitespace();
    let (_weekday, day, month, year, time, zone) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if zone != "GMT" || parts.next().is_some() {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms[..] else { return None };
    if !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + sec)
}

/// Parses an ISO 8601 time into Unix seconds: what [`iso8601`] writes
/// (`2025-12-18T17:30:00+00:00`, the pull status's times) and what applications write
/// in their `date` columns (`2025-12-18 17:30:00.123`, `...Z`, `...+02:00`). A time
/// without an offset is taken as UTC: the heartbeat's ages are then off by the device's
/// offset at most, never unknown.
pub fn parse_iso8601(text: &str) -> Option<i64> {
    let (date, time) = text.trim().split_once(['T', ' '])?;
    let (time, offset_s) = split_offset(time)?;
    let ymd: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let whole_seconds = time.split_once('.').map_or(time, |(whole, _)| whole);
    let hms: Vec<i64> = whole_seconds
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let (&[y, mo, d], &[h, mi, sec]) = (&ymd[..], &hms[..]) else {
        return None;
    };
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_s)
}

/// A time of day and its UTC offset in seconds (`Z`, `+HH:MM`, `-HH:MM`, or none: 0).
fn split_offset(time: &str) -> Option<(&str, i64)> {
    if let Some(t) = time.strip_suffix('Z') {
        return Some((t, 0));
    }
    let Some(at) = time.rfind(['+', '-']) else {
        return Some((time, 0));
    };
    let (t, offset) = time.split_at(at);
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let (h, m) = offset[1..].split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    Some((t, sign * (h * 3600 + m * 60)))
}

/// Howard Hinnant's civil-to-days algorithm, the inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Human-readable duration for reports: `850 ms`, `12.3 s`, `4 min 05 s`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} min {:02} s", ms / 60_000, ms / 1000 % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_round_trips() {
        for t in [0, 1_766_079_000, 951_782_400] {
            assert_eq!(parse_iso8601(&iso8601(t)), Some(t));
        }
    }

    #[test]
    fn application_dates_parse_with_their_offset() {
        let utc = parse_iso8601("2025-12-18T17:30:00+00:00");
        assert!(utc.is_some());
        assert_eq!(parse_iso8601("2025-12-18T17:30:00Z"), utc);
        assert_eq!(parse_iso8601("2025-12-18 17:30:00"), utc);
        assert_eq!(parse_iso8601("2025-12-18 17:30:00.250"), utc);
        assert_eq!(parse_iso8601("2025-12-18T19:30:00+02:00"), utc);
        assert_eq!(parse_iso8601("2025-12-18T15:00:00-02:30"), utc);
        assert_eq!(parse_iso8601("2025-12-18"), None);
        assert_eq!(parse_iso8601("yesterday at noon"), None);
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(iso8601(1_768_732_200), "2026-01-18T10:30:00+00:00");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00+00:00");
    }

    #[test]
    fn parses_http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 00:00:00 GMT"),
            Some(951_782_400)
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 CET"), None);
        assert_eq!(parse_http_date("120"), None);
    }

    #[test]
    fn retry_times_beyond_the_longest_delay_are_due() {
        let hour = Duration::from_secs(3600);
        let clock = RetryClock::at(1_000_000, hour);
        assert!(clock.is_due(999_000) && clock.is_due(1_000_000));
        assert!(!clock.is_due(1_000_001) && !clock.is_due(1_003_600));
        // Stored under a clock ten years ahead, or before the clock went back ten years.
        assert!(clock.is_due(1_000_000 + 315_360_000));
        assert!(RetryClock::at(0, Duration::MAX).latest == i64::MAX);
    }

    #[test]
    fn notices_wall_clock_jumps_only() {
        let (mono, wall) = (Instant::now(), SystemTime::now());
        let mut watch = ClockWatch { mono, wall };
        let later = Duration::from_secs(300);
        assert_eq!(watch.observe(mono + later, wall + later), None);
        let ten_years = Duration::from_secs(315_360_000);
        let (mono, wall) = (mono + later * 2, wall + later * 2 + ten_years);
        assert_eq!(watch.observe(mono, wall), Some(315_360_000));
        assert_eq!(watch.observe(mono, wall - ten_years), Some(-315_360_000));
        assert_eq!(watch.observe(mono, wall - ten_years), None, "logged once");
    }

    #[test]
    fn retry_after_dates_use_the_servers_clock() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let two_minutes_later = "Sun, 06 Nov 1994 08:51:37 GMT";
        assert_eq!(retry_after(" 7 ", None), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after(two_minutes_later, Some(date)),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(date, Some(two_minutes_later)),
            Some(Duration::ZERO)
        );
        // Without the server's Date, against the local clock: 1994 is long past.
        assert_eq!(retry_after(date, None), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", None), None);
    }
}
