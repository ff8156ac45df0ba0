//! systemd's notification protocol (`sd_notify`), without libsystemd: `READY=1` once the
//! agent is set up, `WATCHDOG=1` while it makes progress, `STOPPING=1` on the way out.
//! Without `NOTIFY_SOCKET` (not under systemd, or `Type=simple`) every call does nothing.
//!
//! Watchdog pings come from progress points (each row sent, each read of a request body
//! by the HTTP client, each batch of the legacy import, each wait between passes), never
//! from a timer thread: a timer would keep pinging while the agent itself is hung, which
//! is exactly what the watchdog must catch.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// Half of systemd's `WatchdogSec`, when the watchdog is on.
    watchdog: Option<Duration>,
    last_ping: Mutex<Option<Instant>>,
}

static NOTIFIER: OnceLock<Notifier> = OnceLock::new();

fn notifier() -> &'static Notifier {
    NOTIFIER.get_or_init(Notifier::from_env)
}

impl Notifier {
    fn from_env() -> Notifier {
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us > 0)
            .filter(|_| watchdog_is_ours())
            .map(|us| Duration::from_micros(us / 2));
        Notifier {
            socket: open_socket(),
            watchdog,
            last_ping: Mutex::new(None),
        }
    }

    fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket {
            // Notifications are best effort: systemd not listening must not stop the agent.
            let _ = socket.send_to_addr(message.as_bytes(), addr);
        }
    }
}

/// `WATCHDOG_PID`, when set, names the process the watchdog is meant for.
fn watchdog_is_ours() -> bool {
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) => pid.trim() == std::process::id().to_string(),
        Err(_) => true,
    }
}

fn open_socket() -> Option<(UnixDatagram, std::os::unix::net::SocketAddr)> {
    let path = std::env::var("NOTIFY_SOCKET")
        .ok()
        .filter(|p| !p.is_empty())?;
    let addr = match path.strip_prefix('@') {
        Some(name) => abstract_addr(name)?,
        None => std::os::unix::net::SocketAddr::from_pathname(&path).ok()?,
    };
    Some((UnixDatagram::unbound().ok()?, addr))
}

fn abstract_addr(name: &str) -> Option<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()
}

/// Tells systemd the agent is set up and working.
pub fn ready(status: &str) {
    notifier().send(&format!("READY=1\nSTATUS={status}"));
}

/// Updates the one-line status `systemctl status relais` shows.
pub fn status(status: &str) {
    notifier().send(&format!("STATUS={status}"));
}

/// Tells systemd the agent is stopping.
pub fn stopping() {
    notifier().send("STOPPING=1");
}

/// Pings the watchdog if half its period has passed since the last ping. Cheap enough
/// to call at every progress point, every read of a body included: an uncontended lock
/// and a monotonic clock read (no system call through the vDSO), a datagram only when
/// due.
pub fn keepalive() {
    let n = notifier();
    let Some(period) = n.watchdog else { return };
    let mut last = n.last_ping.lock().unwrap_or_else(PoisonError::into_inner);
    if last.is_none_or(|t| t.elapsed() >= period / 2) {
        *last = Some(Instant::now());
        n.send("WATCHDOG=1");
    }
}

/// A reader that pings the watchdog each time it is read: wrapped around a request body,
/// it pings for as long as the HTTP client takes bytes, however slow the uplink.
pub struct Progress<R>(pub R);

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        keepalive();
        self.0.read(buf)
    }
}

/// How long the agent may sleep before it must ping the watchdog, if it is on.
pub fn watchdog_period() -> Option<Duration> {
    notifier().watchdog
}
