//! The agent speaks systemd's notification protocol: READY=1 after start-up, WATCHDOG=1
//! while idle between passes, STOPPING=1 on SIGTERM; and runs the same without it.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("relais-notify-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn relais(dir: &std::path::Path) -> Command {
    let db = dir.join("app.db");
    relais::demo::create_app_db(&db, false).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_relais"));
    cmd.env_clear()
        .env("LOCAL_DB_PATH", &db)
        // Nothing listens there; an empty database sends nothing anyway.
        .env("BACKEND_URL", "http://127.0.0.1:9")
        .env("RELAIS_STATE_DIR", dir.join("state"))
        .env("RELAIS_LOG_DIR", "-")
        .env("SYNC_INTERVAL_SECONDS", "3600")
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn receive_until(socket: &UnixDatagram, wanted: &str, messages: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while !messages.iter().any(|m| m.lines().any(|l| l == wanted)) {
        assert!(Instant::now() < deadline, "no {wanted} in {messages:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

#[test]
fn ready_watchdog_and_stopping() {
    let dir = scratch("sd");
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = relais(&dir)
        .env("NOTIFY_SOCKET", &path)
        // 400 ms watchdog: the idle agent must ping at least every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .spawn()
        .unwrap();
    let mut messages = Vec::new();
    receive_until(&socket, "READY=1", &mut messages);
    receive_until(&socket, "WATCHDOG=1", &mut messages);
    let pings_before = messages.iter().filter(|m| *m == "WATCHDOG=1").count();
    messages.retain(|m| m != "WATCHDOG=1");
    receive_until(&socket, "WATCHDOG=1", &mut messages);
    assert!(pings_before >= 1);
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    receive_until(&socket, "STOPPING=1", &mut messages);
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn runs_without_systemd() {
    let dir = scratch("plain");
    let mut child = relais(&dir).spawn().unwrap();
    // The state database appears once the agent has run its first pass.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("state/relais.db").exists() {
        assert!(Instant::now() < deadline, "agent never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}
