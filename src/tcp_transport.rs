//! The TCP transport under ureq, with timeouts that follow the bytes on the wire.
//!
//! ureq's own transport applies its per-read limit to the wait for the answer too, and
//! starts its answer budget when the body's last byte was handed to the kernel, while
//! megabytes may still sit in the socket's send queue on a slow uplink: a slow backend,
//! or a slow upload, was cut off and sent again from zero. Its per-write limit is a
//! kernel send timeout, which a writer blocked behind a large send buffer may reach
//! while the queue is still moving. This transport measures progress as the kernel's
//! count of unsent bytes (SIOCOUTQ) shrinking: a write, or the wait for the send queue
//! to drain once the request is written, is cut only when nothing has left the socket
//! for `io`; the answer's headers must then arrive within `response`, and every other
//! read may be silent for `io`.
//!
//! The answer wait is ureq's `RecvResponse` phase, which ureq names in the
//! [`NextTimeout`] of each read, through the TLS layer too. It is recognised that way
//! rather than as "the first read after a write" because TLS 1.3 session tickets can
//! be the first bytes read after the request. For the phase to carry that name, ureq's
//! own `RecvResponse` budget is set, to [`NEVER`], and no global or per-call budget.
//! A total limit on one exchange (the configuration pull's) is therefore not one of
//! ureq's budgets but a [`Deadline`] the connector shares with its connections: it caps
//! every phase's budget, and its expiry is reported as [`Timeout::Global`].
//!
//! Built on `ureq::unversioned::transport`, which is exempt from semver: Cargo.lock pins
//! ureq 3.5.1, and a ureq upgrade must be checked against this module.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, ShutdownHandle,
    Transport,
};
use ureq::{Error, Timeout};

/// How long one blocked write or one look at the send queue lasts before progress is
/// checked again: short enough to start the answer wait promptly, cheap on a Pi.
const SLICE: Duration = Duration::from_millis(20);

/// Longest blocking read between two watchdog keepalives (a quarter of the watchdog
/// period when that is shorter).
const WATCHDOG_SLICE: Duration = Duration::from_secs(1);

/// ureq's `RecvResponse` budget: a name for the phase, never the limit (100 years).
pub const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The idle and answer limits (`http.io_timeout_s`, `http.response_timeout_s`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub io: Duration,
    pub response: Duration,
}

/// When the exchange in progress on one agent must be over, if it has such a limit.
/// Set and cleared around a call by its one user thread; shared with every connection
/// the agent opens, pooled ones included.
#[derive(Debug, Clone, Default)]
pub struct Deadline(Arc<Mutex<Option<Instant>>>);

impl Deadline {
    pub fn set(&self, at: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }

    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens the TCP connections of the agent (the TLS connector wraps them for https).
#[derive(Debug)]
pub struct TcpConnector(pub Limits, pub Deadline);

impl<In: Transport> Connector<In> for TcpConnector {
    type Out = Either<In, TcpTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, Error> {
        // A CONNECT proxy already made the connection, over this connector.
        if let Some(tunnel) = chained {
            return Ok(Some(Either::A(tunnel)));
        }
        let budget = Budget::of(details.timeout, &self.1);
        let stream = Arc::new(connect(&details.addrs, budget)?);
        stream.set_nodelay(details.config.no_delay())?;
        (details.register_shutdown)(Arc::downgrade(&stream) as Weak<dyn ShutdownHandle>)?;
        Ok(Some(Either::B(TcpTransport {
            stream,
            buffers: LazyBuffers::new(
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
            limits: self.0,
            deadline: self.1.clone(),
            answer_by: None,
        })))
    }
}

/// Tries each resolved address in turn, each with an equal share of what is left of the
/// connect budget, and reports the last failure.
fn connect(addrs: &[SocketAddr], budget: Budget) -> Result<TcpStream, Error> {
    let mut last = Error::HostNotFound;
    for (i, addr) in addrs.iter().enumerate() {
        let attempt = match budget.left()? {
            None => TcpStream::connect(addr),
            Some(left) => {
                let share = left / (addrs.len() - i) as u32;
                TcpStream::connect_timeout(addr, share.max(Duration::from_millis(1)))
            }
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) => last = io_error(e, Timeout::Connect),
        }
    }
    Err(last)
}

pub struct TcpTransport {
    /// Shared (weakly) with ureq's shutdown handle.
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
    limits: Limits,
    deadline: Deadline,
    /// When the answer's headers are due, once the request has left the socket.
    answer_by: Option<Instant>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

impl Transport for TcpTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        // A write outside the answer wait (TLS may write during it) is a new request.
        if timeout.reason != Timeout::RecvResponse {
            self.answer_by = None;
        }
        let budget = Budget::of(timeout, &self.deadline);
        let mut watch = SendWatch::new(&self.stream, self.limits.io);
        let mut rest = &self.buffers.output()[..amount];
        self.stream.set_write_timeout(Some(SLICE))?;
        while !rest.is_empty() {
            crate::notify::keepalive();
            budget.left()?;
            match (&*self.stream).write(rest) {
                Ok(0) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    rest = &rest[n..];
                    watch.restart(&self.stream);
                }
                Err(e) if is_timeout(&e) => watch.check(&self.stream)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        let budget = Budget::of(timeout, &self.deadline);
        let (limit, reason) = if timeout.reason == Timeout::RecvResponse {
            let by = match self.answer_by {
                Some(by) => by,
                None => {
                    self.wait_until_sent(&budget)?;
                    *self.answer_by.insert(Instant::now() + self.limits.response)
                }
            };
            (
                by.saturating_duration_since(Instant::now()),
                Timeout::RecvResponse,
            )
        } else {
            (self.limits.io, Timeout::PerRead)
        };
        let (limit, reason) = budget.cap(limit, reason)?;
        let buf = self.buffers.input_append_buf();
        let amount = read_within(&self.stream, buf, limit).map_err(|e| io_error(e, reason))?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    /// A pooled connection is reusable while nothing waits to be read: a byte or an EOF
    /// means the server closed it or sent something unasked.
    fn is_open(&mut self) -> bool {
        matches!(readable(&self.stream, Duration::ZERO), Ok(false))
    }
}

impl TcpTransport {
    /// Waits until the kernel has sent the whole request and had it acknowledged, so
    /// that the answer wait starts when the backend has had every byte. Ends early when
    /// bytes arrive (a backend may answer 413 before it has read the body); bytes
    /// already waiting, such as TLS session tickets, do not count.
    fn wait_until_sent(&self, budget: &Budget) -> Result<(), Error> {
        let mut watch = SendWatch::new(&self.stream, self.limits.io);
        let unread = unread_bytes(&self.stream);
        while watch.queued > 0 {
            // The kernel has no wake-up for "send queue empty": look every SLICE, and at
            // once when bytes arrive.
            let woken = readable(&self.stream, SLICE)?;
            if unread_bytes(&self.stream) > unread {
                break;
            }
            if woken {
                // Old bytes or an EOF, which keep the socket readable: pace the loop.
                std::thread::sleep(SLICE);
            }
            budget.left()?;
            watch.check(&self.stream)?;
            crate::notify::keepalive();
        }
        Ok(())
    }
}

/// Notices a stalled send: the kernel's count of unsent bytes has not shrunk for `idle`.
struct SendWatch {
    idle: Duration,
    queued: usize,
    moved_at: Instant,
}

impl SendWatch {
    fn new(stream: &TcpStream, idle: Duration) -> SendWatch {
        SendWatch {
            idle,
            queued: unsent_bytes(stream),
            moved_at: Instant::now(),
        }
    }

    /// Bytes entered the queue: the count starts again from here.
    fn restart(&mut self, stream: &TcpStream) {
        *self = SendWatch::new(stream, self.idle);
    }

    fn check(&mut self, stream: &TcpStream) -> Result<(), Error> {
        let queued = unsent_bytes(stream);
        if queued < self.queued {
            self.moved_at = Instant::now();
        } else if self.moved_at.elapsed() >= self.idle {
            return Err(Error::Timeout(Timeout::PerWrite));
        }
        self.queued = queued;
        Ok(())
    }
}

/// What ureq's own timeouts leave of the current phase (the connect timeout while the
/// TLS handshake runs over this transport, no limit otherwise), or what is left before
/// the exchange's [`Deadline`] when that comes first.
struct Budget {
    end: Option<Instant>,
    reason: Timeout,
}

impl Budget {
    fn of(timeout: NextTimeout, deadline: &Deadline) -> Budget {
        let phase = (!timeout.after.is_not_happening()).then(|| Instant::now() + *timeout.after);
        match (phase, deadline.get()) {
            (Some(end), Some(by)) if end <= by => Budget {
                end: Some(end),
                reason: timeout.reason,
            },
            // ureq's own global budget is never set, so the name is free for the deadline.
            (_, Some(by)) => Budget {
                end: Some(by),
                reason: Timeout::Global,
            },
            (end, None) => Budget {
                end,
                reason: timeout.reason,
            },
        }
    }

    /// The time left (`None`: no limit), or the timeout when there is none.
    fn left(&self) -> Result<Option<Duration>, Error> {
        match self
            .end
            .map(|end| end.saturating_duration_since(Instant::now()))
        {
            Some(left) if left.is_zero() => Err(Error::Timeout(self.reason)),
            left => Ok(left),
        }
    }

    /// `limit` for `reason`, or what is left of the budget when that is shorter.
    fn cap(&self, limit: Duration, reason: Timeout) -> Result<(Duration, Timeout), Error> {
        Ok(match self.left()? {
            Some(left) if left < limit => (left, self.reason),
            _ => (limit, reason),
        })
    }
}

/// One read, waiting at most `limit` for its first byte. The wait is cut in slices that
/// feed systemd's watchdog: the answer may take `response_timeout_s` (120 s by default),
/// longer than `WatchdogSec`, and a bounded wait is not a hang.
fn read_within(stream: &TcpStream, buf: &mut [u8], limit: Duration) -> io::Result<usize> {
    let end = Instant::now() + limit;
    loop {
        crate::notify::keepalive();
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let slice = crate::notify::watchdog_period().map_or(WATCHDOG_SLICE, |p| {
            (p / 4).clamp(Duration::from_millis(1), WATCHDOG_SLICE)
        });
        stream.set_read_timeout(Some(left.min(slice)))?;
        match (&*stream).read(buf) {
            // Linux does not restart a socket read with a timeout after a signal.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {}
            result => return result,
        }
    }
}

/// Whether a read would not block (data, EOF or an error waiting), after up to `wait`.
fn readable(stream: &TcpStream, wait: Duration) -> io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for a descriptor the stream keeps open.
    match unsafe { libc::poll(&mut fd, 1, wait.as_millis() as libc::c_int) } {
        n if n >= 0 => Ok(n > 0),
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            e => Err(e),
        },
    }
}

/// Bytes written to the socket that the peer has not acknowledged yet.
#[cfg(target_os = "linux")]
fn unsent_bytes(stream: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a socket) writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    // Unknown (the call failed): the answer wait starts now, as it would with ureq's.
    if rc == 0 { n.max(0) as usize } else { 0 }
}

/// Elsewhere the queue is unknown: the answer wait starts when the last byte was written.
#[cfg(not(target_os = "linux"))]
fn unsent_bytes(_: &TcpStream) -> usize {
    0
}

/// Bytes received and not read yet (0 when unknown).
fn unread_bytes(stream: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 { n.max(0) as usize } else { 0 }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn io_error(e: io::Error, reason: Timeout) -> Error {
    if is_timeout(&e) {
        Error::Timeout(reason)
    } else {
        Error::Io(e)
    }
}
