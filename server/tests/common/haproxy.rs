//! A real load balancer in front of several relais-servers: Debian's `haproxy` as a
//! child process (`-db`: in the foreground), its configuration and admin socket in a
//! scratch directory, on a free port of 127.0.0.1. Round robin, a health check on
//! `GET /ready` every 100 ms (one failure takes a server out, one success brings it
//! back), and a failed connection retried on another server (`retries`, `option
//! redispatch`), as the README's "Running a fleet" configures it.
//!
//! Without the binary the test is skipped with a loud line, except under `CI=true`,
//! where that is a failure (as for PostgreSQL, [`super::pg`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{scratch, wait_for};

/// The backend's name in the configuration and on the admin socket.
const BACKEND: &str = "relais";

pub struct Haproxy {
    child: Child,
    dir: PathBuf,
    /// `http://127.0.0.1:PORT`, what the agents are given as their backend.
    pub url: String,
}

impl Haproxy {
    /// Balances over `backends` (`HOST:PORT`), named `s0`, `s1`, ... in that order;
    /// waits until it accepts connections. `None` (see the module doc) without haproxy.
    pub fn start(backends: &[&str]) -> Option<Haproxy> {
        let Some(bin) = find_bin() else {
            let reason = "haproxy not found in /usr/sbin or PATH; install Debian's haproxy package";
            super::skip_without("fleet", reason);
            return None;
        };
        let dir = scratch("haproxy");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config(port, &dir.join("admin.sock"), backends)).expect("config");
        let mut child = Command::new(bin)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn haproxy");
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("haproxy: {line}");
            }
        });
        let haproxy = Haproxy {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        let listening = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        assert!(
            wait_for(Duration::from_secs(10), listening),
            "haproxy did not start"
        );
        Some(haproxy)
    }

    /// Whether haproxy's health check has server `name` (`s0`, ...) up.
    pub fn is_up(&self, name: &str) -> bool {
        self.status(name).is_some_and(|s| s.starts_with("UP"))
    }

    /// The server's status column of `show stat` (`UP`, `DOWN`, `UP 1/2`, ...).
    fn status(&self, name: &str) -> Option<String> {
        let mut sock = UnixStream::connect(self.dir.join("admin.sock")).ok()?;
        sock.write_all(b"show stat\n").ok()?;
        let mut csv = String::new();
        sock.read_to_string(&mut csv).ok()?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let column = header.iter().position(|&h| h == "status")?;
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&BACKEND) && f.get(1) == Some(&name))
            .and_then(|f| f.get(column).map(|s| s.to_string()))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(port: u16, admin: &Path, backends: &[&str]) -> String {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, addr)| format!("    server s{i} {addr} check\n"))
        .collect();
    format!(
        "global
    maxconn 512
    stats socket {admin} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    # A connection refused by a dead server is tried on another one.
    retries 3
    option redispatch 1

frontend fleet
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
    default-server inter 100ms fall 1 rise 1
{servers}",
        admin = admin.display()
    )
}

fn find_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    [PathBuf::from("/usr/sbin")]
        .into_iter()
        .chain(on_path)
        .map(|dir| dir.join("haproxy"))
        .find(|bin| bin.is_file())
}
