//! When media may go up, and how fast: the media lane's bandwidth cap and its time
//! windows in local time (`media_lane` in the configuration file). A metered LTE plan
//! wants large media at night only, or slowly by day; the event lane is never held or
//! throttled by any of this.
//!
//! Local time is the system's (`localtime_r`: `TZ`, else `/etc/localtime`), read at
//! each decision, so a time zone set after boot or a DST change applies at once.

use std::fmt;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const DAY: u32 = 24 * 60 * 60;
/// Longest sleep of the throttle between two checks of the stop flag and the window.
const THROTTLE_NAP: Duration = Duration::from_millis(250);
/// Unused budget a throttled body may catch up on: bursts stay this short.
const BURST: Duration = Duration::from_millis(250);

/// A daily window, `from` to `to` in local time (seconds since midnight; `to` before
/// `from` crosses midnight, equal means all day).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub from: u32,
    pub to: u32,
    /// The cap within the window, instead of the lane's.
    pub max_bytes_per_sec: Option<u64>,
    /// Media larger than this wait for another window ("large media only at night").
    pub max_media_bytes: Option<u64>,
}

impl Window {
    fn contains(&self, t: u32) -> bool {
        match self.from.cmp(&self.to) {
            std::cmp::Ordering::Equal => true,
            std::cmp::Ordering::Less => (self.from..self.to).contains(&t),
            std::cmp::Ordering::Greater => t >= self.from || t < self.to,
        }
    }

    /// Seconds from `t` until the window next opens (0 when it is open).
    fn opens_in(&self, t: u32) -> u32 {
        if self.contains(t) {
            0
        } else {
            (self.from + DAY - t) % DAY
        }
    }

    /// Seconds from `t` until the window closes (`None`: it never does).
    fn closes_in(&self, t: u32) -> Option<u32> {
        (self.from != self.to).then(|| (self.to + DAY - t) % DAY)
    }
}

/// The media lane's policy. Without windows media go at any time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MediaPolicy {
    pub max_bytes_per_sec: Option<u64>,
    /// The first window that contains the time decides; outside all of them, media wait.
    pub windows: Vec<Window>,
    /// `relais once --now`: the windows do not apply (the cap still does).
    pub override_windows: bool,
}

/// What the policy says at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowance {
    Open {
        max_bytes_per_sec: Option<u64>,
        max_media_bytes: Option<u64>,
    },
    /// No media now; the next window opens in this long.
    Closed { opens_in: Duration },
}

impl MediaPolicy {
    /// The allowance at `t` seconds after local midnight.
    pub fn at(&self, t: u32) -> Allowance {
        if self.windows.is_empty() || self.override_windows {
            return Allowance::Open {
                max_bytes_per_sec: self.max_bytes_per_sec,
                max_media_bytes: None,
            };
        }
        match self.windows.iter().find(|w| w.contains(t)) {
            Some(w) => Allowance::Open {
                max_bytes_per_sec: w.max_bytes_per_sec.or(self.max_bytes_per_sec),
                max_media_bytes: w.max_media_bytes,
            },
            None => {
                let opens_in = self.windows.iter().map(|w| w.opens_in(t)).min();
                Allowance::Closed {
                    opens_in: Duration::from_secs(opens_in.unwrap_or(DAY).into()),
                }
            }
        }
    }

    pub fn now(&self) -> Allowance {
        self.at(local_time_of_day())
    }

    /// Whether a media of `len` bytes may go now as far as its size goes: the open
    /// window may take only smaller ones (a closed one is for the caller to judge).
    pub fn takes(&self, len: u64) -> bool {
        match self.now() {
            Allowance::Open {
                max_media_bytes: Some(max),
                ..
            } => len <= max,
            _ => true,
        }
    }

    /// When the allowance next changes, from `t`: the time to wake a lane that waits
    /// for a window with a larger allowance (a media too large for this one).
    pub fn next_change(&self, t: u32) -> Option<Duration> {
        if self.override_windows {
            return None;
        }
        self.windows
            .iter()
            .flat_map(|w| [Some(w.opens_in(t)), w.closes_in(t)])
            .flatten()
            .filter(|&s| s > 0)
            .min()
            .map(|s| Duration::from_secs(s.into()))
    }
}

/// Seconds since local midnight, now.
pub fn local_time_of_day() -> u32 {
    let now = crate::clock::unix_now() as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which outlives the call; both pointers
    // are valid for the call's duration.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        // Only for a time outside the C library's range: UTC's time of day then.
        return (crate::clock::unix_now().rem_euclid(DAY as i64)) as u32;
    }
    (tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec) as u32
}

/// `HH:MM` (or `HH:MM:SS`) as seconds since midnight; `24:00` is midnight at the end.
pub fn parse_time_of_day(text: &str) -> Option<u32> {
    let mut parts = text.trim().split(':');
    let mut field = |max: u32| {
        parts
            .next()
            .filter(|p| p.len() == 2)
            .and_then(|p| p.parse::<u32>().ok())
            .filter(|&n| n <= max)
    };
    let (h, m) = (field(24)?, field(59)?);
    let s = match parts.next() {
        None => 0,
        Some(p) => p.parse::<u32>().ok().filter(|&n| n <= 59 && p.len() == 2)?,
    };
    let t = h * 3600 + m * 60 + s;
    (t <= DAY).then_some(t % DAY)
}

/// `HH:MM` of seconds since midnight, for log lines.
pub struct TimeOfDay(pub u32);

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 3600, self.0 / 60 % 60)
    }
}

/// Why a throttled body stopped being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The window closed mid-upload: the row waits for the next one.
    WindowClosed,
    Stopped,
}

/// A body read at most at the policy's cap, the policy looked at again at every read: a
/// window that closes stops the upload (the row waits, it has not failed).
pub struct Throttle<'a, R> {
    inner: R,
    policy: &'a MediaPolicy,
    stop: &'a AtomicBool,
    /// When the bytes read so far may have gone at the cap.
    due: Instant,
    cut: Option<Cut>,
}

impl<'a, R: Read> Throttle<'a, R> {
    pub fn new(inner: R, policy: &'a MediaPolicy, stop: &'a AtomicBool) -> Throttle<'a, R> {
        Throttle {
            inner,
            policy,
            stop,
            due: Instant::now(),
            cut: None,
        }
    }

    /// The same pace for the next body: an upload's chunks, each a request of its own,
    /// go at the cap together, not each from a fresh start.
    pub fn next_body<S: Read>(self, inner: S) -> Throttle<'a, S> {
        Throttle {
            inner,
            policy: self.policy,
            stop: self.stop,
            due: self.due,
            cut: None,
        }
    }

    /// Why the body was cut short, if it was.
    pub fn cut(&self) -> Option<Cut> {
        self.cut
    }

    fn stop_with(&mut self, cut: Cut) -> std::io::Error {
        self.cut = Some(cut);
        std::io::Error::other(match cut {
            Cut::WindowClosed => "the media window closed",
            Cut::Stopped => "shutdown requested",
        })
    }

    /// Waits until the bytes read so far fit the cap, in naps that watch the stop flag.
    fn wait_for_budget(&mut self) -> std::io::Result<()> {
        loop {
            let now = Instant::now();
            let Some(ahead) = self.due.checked_duration_since(now) else {
                return Ok(());
            };
            if self.stop.load(Ordering::Relaxed) {
                return Err(self.stop_with(Cut::Stopped));
            }
            crate::notify::keepalive();
            std::thread::sleep(ahead.min(THROTTLE_NAP));
        }
    }
}

impl<R: Read> Read for Throttle<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(cut) = self.cut {
            return Err(self.stop_with(cut));
        }
        let cap = match self.policy.now() {
            Allowance::Closed { .. } => return Err(self.stop_with(Cut::WindowClosed)),
            Allowance::Open {
                max_bytes_per_sec: None,
                ..
            } => return self.inner.read(buf),
            Allowance::Open {
                max_bytes_per_sec: Some(cap),
                ..
            } => cap.max(1),
        };
        self.wait_for_budget()?;
        // A quarter of a second's worth per read, so the pace is smooth at any cap.
        let len = buf.len();
        let slice = ((cap / 4) as usize).clamp(1, len.max(1)).min(len);
        let n = self.inner.read(&mut buf[..slice])?;
        let floor = Instant::now().checked_sub(BURST).unwrap_or(self.due);
        self.due = self.due.max(floor) + Duration::from_secs_f64(n as f64 / cap as f64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(from: &str, to: &str) -> Window {
        Window {
            from: parse_time_of_day(from).unwrap(),
            to: parse_time_of_day(to).unwrap(),
            max_bytes_per_sec: None,
            max_media_bytes: None,
        }
    }

    const H: u32 = 3600;

    #[test]
    fn a_night_window_crosses_midnight() {
        let policy = MediaPolicy {
            windows: vec![window("22:00", "06:00")],
            ..MediaPolicy::default()
        };
        assert!(matches!(policy.at(23 * H), Allowance::Open { .. }));
        assert!(matches!(policy.at(2 * H), Allowance::Open { .. }));
        assert_eq!(
            policy.at(6 * H),
            Allowance::Closed {
                opens_in: Duration::from_secs(16 * H as u64)
            }
        );
        assert_eq!(
            policy.at(21 * H + 59 * 60),
            Allowance::Closed {
                opens_in: Duration::from_secs(60)
            }
        );
        assert_eq!(
            policy.next_change(23 * H),
            Some(Duration::from_secs(7 * H as u64))
        );
    }

    #[test]
    fn the_first_window_that_holds_the_time_decides_and_its_cap_wins() {
        let mut day = window("06:00", "22:00");
        day.max_bytes_per_sec = Some(20_000);
        day.max_media_bytes = Some(1 << 20);
        let policy = MediaPolicy {
            max_bytes_per_sec: Some(500_000),
            windows: vec![window("22:00", "06:00"), day],
            override_windows: false,
        };
        assert_eq!(
            policy.at(12 * H),
            Allowance::Open {
                max_bytes_per_sec: Some(20_000),
                max_media_bytes: Some(1 << 20)
            }
        );
        assert_eq!(
            policy.at(23 * H),
            Allowance::Open {
                max_bytes_per_sec: Some(500_000),
                max_media_bytes: None
            }
        );
    }

    #[test]
    fn once_now_overrides_the_windows_not_the_cap() {
        let policy = MediaPolicy {
            max_bytes_per_sec: Some(1000),
            windows: vec![window("22:00", "06:00")],
            override_windows: true,
        };
        assert_eq!(
            policy.at(12 * H),
            Allowance::Open {
                max_bytes_per_sec: Some(1000),
                max_media_bytes: None
            }
        );
    }

    #[test]
    fn times_of_day_parse_strictly() {
        assert_eq!(parse_time_of_day("06:30"), Some(6 * H + 1800));
        assert_eq!(parse_time_of_day("23:59:30"), Some(23 * H + 3570));
        assert_eq!(parse_time_of_day("24:00"), Some(0));
        for bad in ["6:30", "24:01", "12:60", "noon", "12", "12:00:5", ""] {
            assert_eq!(parse_time_of_day(bad), None, "{bad}");
        }
        assert_eq!(TimeOfDay(22 * H + 5 * 60).to_string(), "22:05");
    }

    #[test]
    fn the_throttle_keeps_to_its_cap() {
        let policy = MediaPolicy {
            max_bytes_per_sec: Some(400_000),
            ..MediaPolicy::default()
        };
        let stop = AtomicBool::new(false);
        let body = vec![7u8; 200_000];
        let began = Instant::now();
        let mut out = Vec::new();
        Throttle::new(body.as_slice(), &policy, &stop)
            .read_to_end(&mut out)
            .unwrap();
        let took = began.elapsed();
        assert_eq!(out, body);
        // 200 kB at 400 kB/s: half a second, less the burst allowance at most.
        assert!(took >= Duration::from_millis(450), "{took:?}");
    }

    #[test]
    fn a_closed_window_cuts_the_body() {
        let policy = MediaPolicy {
            windows: vec![Window {
                from: 0,
                to: 1,
                max_bytes_per_sec: None,
                max_media_bytes: None,
            }],
            ..MediaPolicy::default()
        };
        let stop = AtomicBool::new(false);
        let mut t = Throttle::new(&b"abc"[..], &policy, &stop);
        let mut buf = [0u8; 8];
        // Open between 00:00:00 and 00:00:01 local time only: closed almost always.
        if local_time_of_day() != 0 {
            assert!(t.read(&mut buf).is_err());
            assert!(matches!(t.cut(), Some(Cut::WindowClosed)));
        }
    }
}
