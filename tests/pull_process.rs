//! The configuration pull in real `relais once` and `relais run` processes: a server
//! that trickles its answer is cut at `config_pull_timeout_s`, a pull asked for while
//! one runs says so, and a failed or interrupted `on_config_change` hook stays due
//! until it succeeds (exit code, `relais status`, the next start).
#![cfg(feature = "demo")]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    Receiver, Scratch, agent_env, run_relais, send_signal, spawn_logged, wait_exit, wait_for,
};
use miniserde::json::Value;
use relais::demo::create_app_db;

const TOKEN: &str = "site-token-pull-process";
const CONFIG: &str = r#"{"site_name": "Site Paris", "timezone": "Europe/Paris", "devices": [{"ip": "192.168.1.10", "name": "Projecteur",
 "type": "projector", "driver": "pjlink", "pjlink": {"password": "admin"}}]}"#;

/// A config endpoint that announces a 10 MiB body and sends one byte every 200 ms, on
/// every connection; counts the connections.
struct Trickle {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Trickle {
    fn start() -> Trickle {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stopping = Arc::new(AtomicBool::new(false));
        let (count, stop) = (accepted.clone(), stopping.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || trickle(conn));
            }
        });
        Trickle {
            port,
            accepted,
            stopping,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Reads the request head, answers the headers at once, then a byte per 200 ms until
/// the client goes away (bounded, so no writer outlives the test by much).
fn trickle(mut conn: TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let headers =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n\r\n";
    if conn.write_all(headers.as_bytes()).is_err() {
        return;
    }
    for _ in 0..300 {
        // Pacing the trickle is the point here, not synchronisation.
        std::thread::sleep(Duration::from_millis(200));
        if conn.write_all(b" ").is_err() {
            return;
        }
    }
}

/// An agent's directory: an empty application database (the push has nothing to
/// send), a settings file, the pulled configuration's path.
struct AgentDir {
    dir: Scratch,
    db: PathBuf,
    settings: PathBuf,
}

impl AgentDir {
    fn new(tag: &str, settings: &str) -> AgentDir {
        let dir = Scratch::new(tag);
        let db = dir.join("surveillance.db");
        create_app_db(&db, false).expect("app db");
        let path = dir.join("relais.json");
        std::fs::write(&path, settings).expect("settings file");
        AgentDir {
            dir,
            db,
            settings: path,
        }
    }

    fn agent_config(&self) -> PathBuf {
        self.dir.join("agent").join("config.json")
    }

    fn env(&self, backend: &str) -> Vec<(String, String)> {
        let (config, settings) = (
            self.agent_config().display().to_string(),
            self.settings.display().to_string(),
        );
        agent_env(
            &self.db,
            backend,
            self.dir.path(),
            &[
                ("SITE_TOKEN", TOKEN),
                ("AGENT_CONFIG", &config),
                ("RELAIS_CONFIG", &settings),
                ("SYNC_INTERVAL_SECONDS", "3600"),
            ],
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log").join("relais.log")).unwrap_or_default()
    }

    fn once(&self, backend: &str) -> (Output, String) {
        let out = run_relais(&["once"], &self.env(backend), Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out, stderr)
    }

    /// `relais status --json`'s `config_pull` object.
    fn pull_status(&self, backend: &str) -> miniserde::json::Object {
        let out = run_relais(
            &["status", "--json"],
            &self.env(backend),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let Ok(Value::Object(mut all)) = miniserde::json::from_str::<Value>(&text) else {
            panic!("status --json is not an object: {text}");
        };
        match all.remove("config_pull") {
            Some(Value::Object(pull)) => pull,
            other => panic!("config_pull: {other:?} in {text}"),
        }
    }

    fn status_text(&self, backend: &str) -> String {
        let out = run_relais(&["status"], &self.env(backend), Duration::from_secs(10));
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn member<'a>(obj: &'a miniserde::json::Object, key: &str) -> &'a Value {
    obj.get(key)
        .unwrap_or_else(|| panic!("no {key} in the status"))
}

fn string_member(obj: &miniserde::json::Object, key: &str) -> Option<String> {
    match member(obj, key) {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => panic!("{key}: {other:?}"),
    }
}

fn identity(path: &Path) -> (u64, i64, i64, Vec<u8>) {
    let m = std::fs::metadata(path).expect("metadata");
    (
        m.ino(),
        m.mtime(),
        m.mtime_nsec(),
        std::fs::read(path).expect("read"),
    )
}

// ---------------------------------------------------------------- the deadline

#[test]
fn once_cuts_a_trickling_config_server_at_the_deadline() {
    let trickle = Trickle::start();
    let agent = AgentDir::new(
        "pull-trickle-once",
        r#"{"config_pull_timeout_s": 2, "http": {"connect_timeout_s": 1, "io_timeout_s": 1, "response_timeout_s": 1}}"#,
    );
    let old = agent.agent_config();
    std::fs::create_dir_all(old.parent().expect("parent")).expect("dir");
    std::fs::write(&old, br#"{"config_hash": "old", "devices": []}"#).expect("old config");
    let before = identity(&old);

    let started = Instant::now();
    let (out, stderr) = agent.once(&trickle.url());
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        took < Duration::from_secs(10),
        "once took {took:?}:\n{stderr}"
    );
    assert_eq!(trickle.accepted(), 1, "{stderr}");
    let cut: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("config_pull_timeout_s"))
        .collect();
    assert_eq!(cut.len(), 1, "{stderr}");
    assert!(
        cut[0].contains("did not end within 2.0 s (config_pull_timeout_s): cut"),
        "{stderr}"
    );
    assert_eq!(identity(&old), before, "the old configuration was touched");
}

#[test]
fn a_pull_asked_for_while_one_is_stuck_says_it_is_skipped() {
    let trickle = Trickle::start();
    let agent = AgentDir::new(
        "pull-trickle-run",
        r#"{"config_pull_timeout_s": 3, "http": {"connect_timeout_s": 1, "io_timeout_s": 1, "response_timeout_s": 1}}"#,
    );
    let (mut child, _stderr) = spawn_logged(&["run"], &agent.env(&trickle.url()));
    // The handlers are installed before the start-up line; SIGUSR1 kills before that.
    assert!(
        wait_for(Duration::from_secs(20), || agent
            .log()
            .contains(" started: ")),
        "never started:\n{}",
        agent.log()
    );
    send_signal(child.id(), "USR1");
    assert!(
        wait_for(Duration::from_secs(10), || trickle.accepted() == 1),
        "no pull after SIGUSR1"
    );
    send_signal(child.id(), "USR1");
    assert!(
        wait_for(Duration::from_secs(5), || agent.log().contains(
            "config pull skipped: the previous pull is still running (since "
        )),
        "no skip line:\n{}",
        agent.log()
    );
    // The stuck pull ends at its deadline, and the request is answered right after.
    assert!(
        wait_for(Duration::from_secs(10), || trickle.accepted() == 2),
        "the request made during the stuck pull was lost:\n{}",
        agent.log()
    );
    assert!(
        agent
            .log()
            .contains("did not end within 3.0 s (config_pull_timeout_s): cut"),
        "{}",
        agent.log()
    );
    send_signal(child.id(), "TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

// ---------------------------------------------------------------- the hook

/// The settings of an agent whose hook appends the hash to `hook.log`, then fails
/// (exit 3) unless the file `fixed` exists; `slow` makes it wait instead of failing.
fn hook_settings(dir: &Path, slow: bool) -> String {
    let fail = if slow {
        format!(
            "echo $$ > '{}'; exec sleep 30",
            dir.join("hook.pid").display()
        )
    } else {
        "exit 3".to_string()
    };
    let script = format!(
        "echo \\\"$RELAIS_CONFIG_HASH\\\" >> '{}'; test -e '{}' && exit 0; {fail}",
        dir.join("hook.log").display(),
        dir.join("fixed").display()
    );
    format!(r#"{{"on_config_change": {{"command": ["sh", "-c", "{script}"], "timeout_s": 60}}}}"#)
}

fn hook_runs(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("hook.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// An agent dir whose settings need paths inside it: made first, then filled in.
fn hook_agent(tag: &str, slow: bool) -> AgentDir {
    let agent = AgentDir::new(tag, "{}");
    let settings = hook_settings(agent.dir.path(), slow);
    std::fs::write(&agent.settings, settings).expect("settings");
    agent
}

#[test]
fn a_failed_hook_fails_once_shows_in_status_and_runs_again_unchanged() {
    let dir = Scratch::new("pull-hook-receiver");
    let rx = Receiver::start(&dir.join("receiver"));
    let hash = rx.set_config(TOKEN, CONFIG).expect("set config");
    let agent = hook_agent("pull-hook-fails", false);

    let (out, stderr) = agent.once(&rx.url());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(hook_runs(agent.dir.path()), vec![hash.clone()]);
    assert!(
        stderr.contains("config hook sh failed: exit status: 3; it stays due"),
        "{stderr}"
    );
    let status = agent.pull_status(&rx.url());
    assert!(matches!(
        member(&status, "last_sync_ok"),
        Value::Bool(false)
    ));
    assert_eq!(string_member(&status, "hook_due"), Some(hash.clone()));
    assert!(
        string_member(&status, "hook_error").is_some_and(|e| e.contains("exit status: 3")),
        "{status:?}"
    );
    let text = agent.status_text(&rx.url());
    assert!(
        text.contains("failed: config hook sh failed: exit status: 3")
            && text.contains(&format!("on_config_change:  due for hash {}", &hash[..12])),
        "{text}"
    );

    // Unchanged configuration, hook fixed: the next once runs it and succeeds.
    std::fs::write(agent.dir.join("fixed"), b"").expect("fix the hook");
    let (out, stderr) = agent.once(&rx.url());
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("config up to date"), "{stderr}");
    assert_eq!(hook_runs(agent.dir.path()), vec![hash.clone(), hash]);
    let status = agent.pull_status(&rx.url());
    assert!(matches!(member(&status, "last_sync_ok"), Value::Bool(true)));
    assert_eq!(string_member(&status, "hook_due"), None);
    assert_eq!(string_member(&status, "hook_error"), None);
}

#[test]
fn a_hook_cut_by_sigkill_runs_at_the_next_start() {
    let dir = Scratch::new("pull-hook-kill-receiver");
    let rx = Receiver::start(&dir.join("receiver"));
    let hash = rx.set_config(TOKEN, CONFIG).expect("set config");
    let agent = hook_agent("pull-hook-kill", true);
    let pid_file = agent.dir.join("hook.pid");

    let (mut child, _stderr) = spawn_logged(&["once"], &agent.env(&rx.url()));
    assert!(
        wait_for(Duration::from_secs(20), || std::fs::read_to_string(
            &pid_file
        )
        .is_ok_and(|p| p.ends_with('\n'))),
        "the hook never started:\n{}",
        agent.log()
    );
    // A power cut: the agent and its hook die together, the file already replaced.
    child.kill().expect("SIGKILL relais");
    child.wait().expect("reap");
    let hook_pid = std::fs::read_to_string(&pid_file).expect("hook pid");
    send_signal(hook_pid.trim().parse().expect("pid"), "KILL");
    assert!(
        std::fs::read_to_string(agent.agent_config()).is_ok_and(|c| c.contains(&hash)),
        "the configuration was not replaced before the hook"
    );
    let status = relais::pull::read_status(&agent.dir.join("state")).expect("status file");
    assert_eq!(status.hook_due.as_deref(), Some(hash.as_str()));

    std::fs::write(agent.dir.join("fixed"), b"").expect("fast hook");
    let (out, stderr) = agent.once(&rx.url());
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("config up to date"), "{stderr}");
    assert_eq!(hook_runs(agent.dir.path()), vec![hash.clone(), hash]);
    let status = relais::pull::read_status(&agent.dir.join("state")).expect("status file");
    assert_eq!(status.hook_due, None);
    assert!(status.last_sync_ok);
}

// ---------------------------------------------------------------- what once says

#[test]
fn once_does_not_promise_a_retry_after_a_failed_pull() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let agent = AgentDir::new("pull-once-down", r#"{"http": {"connect_timeout_s": 1}}"#);
    let (out, stderr) = agent.once(&format!("http://127.0.0.1:{port}"));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("next try in"), "{stderr}");
    assert!(
        stderr
            .contains("keeping the current configuration (relais once does not retry: it exits 1)"),
        "{stderr}"
    );
}
