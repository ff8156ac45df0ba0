//! A shaped uplink for the benchmarks: a TCP proxy on 127.0.0.1 that delays every chunk by
//! a fixed time each way, optionally caps the bandwidth and cuts every connection
//! periodically. It stands in for `tc netem`, which the bench machine lacks.
//!
//! Each direction of a connection is a reader thread that timestamps what it reads into a
//! bounded channel and a writer thread that sleeps until each chunk is due, so requests
//! pipelined on one connection, and several connections, each pay the delay once (a
//! round trip is not serialised behind the previous one), and a full channel blocks the
//! reader: TCP backpressure, bounded memory. A new connection waits one round trip before
//! its first byte moves, as the TCP handshake costs over a real link.
//!
//! The bandwidth cap is one token bucket per direction shared by all connections: a real
//! uplink is one radio, so parallel connections share it rather than each getting the
//! full rate.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Largest chunk moved at once; also the granularity of the bandwidth cap.
const CHUNK: usize = 16 * 1024;
/// Chunks queued per direction and connection: 1 MiB at most in the proxy's hands, which
/// also bounds one connection's rate to QUEUE × CHUNK per `delay_each_way`.
const QUEUE: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub delay_each_way: Duration,
    /// Bytes per second, per direction, shared by all connections.
    pub bytes_per_sec: Option<u64>,
    /// Every this long, every open connection is shut down (both sockets).
    pub cut_every: Option<Duration>,
}

#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

/// Virtual-time token bucket: `debt` is how far ahead of the rate the link has sent.
struct Bucket {
    rate: f64,
    state: Mutex<(Instant, f64)>,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate: rate.max(1) as f64,
            state: Mutex::new((Instant::now(), 0.0)),
        }
    }

    /// Sleeps until `n` more bytes fit the rate; callers sharing the bucket queue up.
    fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            // A burst of 50 ms at most: an idle link does not bank unlimited credit.
            let credit = (self.rate / 20.0).max(CHUNK as f64);
            let debt = (s.1 - now.duration_since(s.0).as_secs_f64() * self.rate).max(-credit);
            *s = (now, debt + n as f64);
            s.1 / self.rate
        };
        if wait > 0.0 {
            thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

struct Shared {
    target: SocketAddr,
    shape: Shape,
    stop: AtomicBool,
    forwarded: [AtomicU64; 2],
    cuts: AtomicU64,
    buckets: Option<[Bucket; 2]>,
    next_id: AtomicU64,
    /// Both sockets of every open connection, for the cuts and the drop.
    open: Mutex<HashMap<u64, [TcpStream; 2]>>,
}

impl Shared {
    /// Shuts down every open connection.
    fn cut_all(&self) {
        let open: Vec<[TcpStream; 2]> = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, s)| s)
            .collect();
        // Counted before the shutdown, so whoever sees a connection end sees it counted.
        self.cuts.fetch_add(open.len() as u64, Ordering::SeqCst);
        for sock in open.iter().flatten() {
            let _ = sock.shutdown(Shutdown::Both);
        }
    }
}

pub struct Link {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropped with the link, which ends the cutter's wait.
    _cutter: Option<Sender<()>>,
}

impl Link {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `target`.
    pub fn start(target: SocketAddr, shape: Shape) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").expect("link: bind 127.0.0.1");
        let addr = listener.local_addr().expect("link: local address");
        let shared = Arc::new(Shared {
            target,
            shape,
            stop: AtomicBool::new(false),
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
            cuts: AtomicU64::new(0),
            buckets: shape
                .bytes_per_sec
                .map(|r| [Bucket::new(r), Bucket::new(r)]),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
        });
        let s = Arc::clone(&shared);
        thread::spawn(move || accept(listener, s));
        let cutter = shape.cut_every.map(|every| {
            let (tx, rx) = std::sync::mpsc::channel();
            let s = Arc::clone(&shared);
            thread::spawn(move || cut(every, rx, s));
            tx
        });
        Link {
            addr,
            shared,
            _cutter: cutter,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes written to the target so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.forwarded[Direction::Up as usize].load(Ordering::SeqCst)
    }

    /// Bytes written back to the clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.forwarded[Direction::Down as usize].load(Ordering::SeqCst)
    }

    /// Connections shut down by the periodic cut so far.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
        self.shared.cut_all();
    }
}

fn accept(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let s = Arc::clone(&shared);
        thread::spawn(move || connect(client, s));
    }
}

fn connect(client: TcpStream, shared: Arc<Shared>) {
    // The SYN and SYN-ACK of a real link.
    thread::sleep(shared.shape.delay_each_way * 2);
    let Ok(server) = TcpStream::connect(shared.target) else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let clones = (|| {
        Some((
            [client.try_clone().ok()?, server.try_clone().ok()?],
            client.try_clone().ok()?,
            server.try_clone().ok()?,
        ))
    })();
    let Some((registered, client2, server2)) = clones else {
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    if shared.stop.load(Ordering::SeqCst) {
        return;
    }
    shared
        .open
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, registered);
    let live = Arc::new(AtomicUsize::new(2));
    pump(client, server, Direction::Up, id, &live, &shared);
    pump(server2, client2, Direction::Down, id, &live, &shared);
}

/// `from` → `to` through a reader and a writer thread; the last pump of a connection to
/// end forgets its sockets.
fn pump(
    from: TcpStream,
    to: TcpStream,
    dir: Direction,
    id: u64,
    live: &Arc<AtomicUsize>,
    shared: &Arc<Shared>,
) {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUE);
    let delay = shared.shape.delay_each_way;
    let Ok(from2) = from.try_clone() else { return };
    thread::spawn(move || read_chunks(from, delay, tx));
    let (live, shared) = (Arc::clone(live), Arc::clone(shared));
    thread::spawn(move || {
        write_chunks(rx, &to, &from2, dir, &shared);
        if live.fetch_sub(1, Ordering::SeqCst) == 1 {
            shared
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
    });
}

fn read_chunks(mut from: TcpStream, delay: Duration, tx: SyncSender<(Instant, Vec<u8>)>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Writes each chunk when due and within the rate; passes the end of the stream on as a
/// half close, a failed write as the end of the whole connection.
fn write_chunks(
    rx: Receiver<(Instant, Vec<u8>)>,
    mut to: &TcpStream,
    from: &TcpStream,
    dir: Direction,
    shared: &Shared,
) {
    for (due, chunk) in rx {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if let Some(b) = &shared.buckets {
            b[dir as usize].take(chunk.len());
        }
        // Counted before the write, so a peer that has read the bytes sees them counted.
        let forwarded = &shared.forwarded[dir as usize];
        forwarded.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        if to.write_all(&chunk).is_err() {
            forwarded.fetch_sub(chunk.len() as u64, Ordering::SeqCst);
            let _ = (to.shutdown(Shutdown::Both), from.shutdown(Shutdown::Both));
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn cut(every: Duration, rx: Receiver<()>, shared: Arc<Shared>) {
    while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
        shared.cut_all();
    }
}

/// The link's own check, run before any figure that uses it: the delay is paid once per
/// direction, pipelined and parallel requests are not serialised, the cap holds, cuts cut.
pub fn self_check() -> Result<(), String> {
    let echo = echo_server();
    let delay = Duration::from_millis(50);
    let plain = Shape {
        delay_each_way: delay,
        bytes_per_sec: None,
        cut_every: None,
    };
    let link = Link::start(echo, plain);
    let mut c = link_client(&link)?;
    // The first exchange also pays the handshake's round trip.
    let first = round_trips(&mut c, 1)?;
    let one = round_trips(&mut c, 1)?;
    let eight = round_trips(&mut c, 8)?;
    check(
        (0.2..0.25).contains(&first),
        format!("first round trip on a new connection {first:.3} s, want [0.2, 0.25)"),
    )?;
    check(
        (0.1..0.15).contains(&one),
        format!("echo round trip {one:.3} s, want [0.1, 0.15)"),
    )?;
    check(
        (0.1..0.15).contains(&eight),
        format!("8 pipelined round trips {eight:.3} s, want [0.1, 0.15)"),
    )?;
    check(
        link.bytes_up() == 10 && link.bytes_down() == 10,
        format!(
            "forwarded {} B up and {} B down, want 10 each",
            link.bytes_up(),
            link.bytes_down()
        ),
    )?;
    let parallel = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = link.url();
            thread::spawn(move || {
                let mut c = TcpStream::connect(url.trim_start_matches("http://")).ok()?;
                round_trips(&mut c, 1).ok()
            })
        })
        .collect();
    for c in clients {
        c.join()
            .ok()
            .flatten()
            .ok_or("link: a parallel client failed")?;
    }
    let four = parallel.elapsed().as_secs_f64();
    check(
        four < 0.3,
        format!("4 new connections in parallel took {four:.3} s, want < 0.3"),
    )?;
    drop(link);

    let capped = Link::start(
        echo,
        Shape {
            bytes_per_sec: Some(1_000_000),
            ..plain
        },
    );
    let mut c = link_client(&capped)?;
    round_trips(&mut c, 1)?;
    let total = 2_000_000;
    let t = transfer(&mut c, total)?;
    check(
        (1.8..2.3).contains(&t),
        format!("2 MB at 1 MB/s took {t:.2} s, want 2 s ± 10% plus the delay"),
    )?;
    drop(capped);

    let cutting = Link::start(
        echo,
        Shape {
            cut_every: Some(Duration::from_millis(400)),
            ..plain
        },
    );
    let mut c = link_client(&cutting)?;
    round_trips(&mut c, 1)?;
    let mut byte = [0u8; 1];
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let closed = matches!(c.read(&mut byte), Ok(0) | Err(_));
    check(
        closed && cutting.cuts() == 1,
        format!(
            "cut: connection closed {closed}, {} connections cut, want 1",
            cutting.cuts()
        ),
    )
}

fn check(ok: bool, what: String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("link: {what}"))
    }
}

fn link_client(link: &Link) -> Result<TcpStream, String> {
    let c = TcpStream::connect(link.url().trim_start_matches("http://"))
        .map_err(|e| format!("link: connect: {e}"))?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(c)
}

/// `n` one-byte requests written 2 ms apart (separate chunks for the link, as pipelined
/// requests are), then their `n` answers; seconds.
fn round_trips(c: &mut TcpStream, n: usize) -> Result<f64, String> {
    let t = Instant::now();
    let io = |e: std::io::Error| format!("link: echo: {e}");
    for i in 0..n {
        if i > 0 {
            thread::sleep(Duration::from_millis(2));
        }
        c.write_all(b"x").map_err(io)?;
    }
    c.read_exact(&mut vec![0u8; n]).map_err(io)?;
    Ok(t.elapsed().as_secs_f64())
}

/// Sends `total` bytes and reads their echo; seconds until the last byte came back.
fn transfer(c: &mut TcpStream, total: usize) -> Result<f64, String> {
    let t = Instant::now();
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let writer = thread::spawn(move || w.write_all(&vec![7u8; total]).is_ok());
    let mut got = 0;
    let mut buf = vec![0u8; CHUNK];
    while got < total {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let sent = writer.join().unwrap_or(false);
    if !sent || got != total {
        return Err(format!("link: transfer: {got} of {total} bytes echoed"));
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Echoes every connection's bytes back, on 127.0.0.1, for the self-check.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("link: bind the echo server");
    let addr = l.local_addr().expect("link: echo address");
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || {
                let mut r = &s;
                let _ = std::io::copy(&mut r, &mut &s);
            });
        }
    });
    addr
}
