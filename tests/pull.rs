//! Integration tests of the configuration pull: the tests' backend on 127.0.0.1
//! (relais-server's sites and devices, a misbehaving endpoint through the proxy's
//! faults), real files, settings loaded as the agent loads them. Also the SIGKILL test
//! of the atomic replacement, with the test binary re-running itself as the child that
//! replaces the file in a loop.
#![cfg(feature = "demo")]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use common::{ConfigFault, Receiver, Scratch};
use miniserde::json::Value;
use relais::atomic_file;
use relais::pull::{self, PullError, PullOutcome, PullWake, Puller, SyncStatus};
use relais::settings::Settings;

// ---------------------------------------------------------------- helpers

/// Every log line of the process, to check what the puller says and never says.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = format!("{} {}", record.level(), record.args());
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }
    fn flush(&self) {}
}

fn logs() -> &'static Capture {
    static LOGS: OnceLock<&'static Capture> = OnceLock::new();
    LOGS.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        let _ = log::set_logger(capture);
        log::set_max_level(log::LevelFilter::Debug);
        capture
    })
}

fn log_lines() -> Vec<String> {
    logs().0.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// No captured line holds any of `secrets`.
fn assert_never_logged(secrets: &[&str]) {
    for line in log_lines() {
        for s in secrets {
            assert!(!line.contains(s), "secret {s:?} logged: {line}");
        }
    }
}

fn assert_logged(needle: &str) {
    assert!(
        log_lines().iter().any(|l| l.contains(needle)),
        "no log line contains {needle:?}; lines: {:#?}",
        log_lines()
    );
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A site configuration with `devices` devices; `tag` makes versions differ.
/// Non-ASCII names exercise the `\uXXXX` hashing; passwords must never be logged.
fn site(tag: &str, devices: usize) -> String {
    let list: Vec<String> = (0..devices)
        .map(|i| {
            format!(
                r#"{{"ip": "192.168.1.{i}", "name": "Projecteur {i} {tag} é 📽", "building": "Bâtiment A",
                   "type": "projector", "driver": "pjlink", "pjlink": {{"password": "pw-secret-{i}", "port": 4352, "timeout_s": 2.5}},
                   "expectations": {{"always_on": false, "alert_after_s": 300, "note": null}}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"site_name": "Site {tag}", "timezone": "Europe/Paris", "doubt_after_days": 2,
            "reporting": {{"ok_interval_s": 300, "ko_interval_s": 60}}, "devices": [{}]}}"#,
        list.join(", ")
    )
}

/// One agent against one receiver: directories, token, settings.
struct Fixture {
    dir: Scratch,
    rx: Receiver,
    token: String,
}

impl Fixture {
    fn new() -> Fixture {
        logs();
        let dir = Scratch::new("pull-agent");
        let rx = Receiver::start(&dir.0.join("receiver"));
        let token = format!(
            "site-token-pull-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Fixture { dir, rx, token }
    }

    /// The configuration file lives in a directory the puller must create.
    fn agent_config(&self) -> PathBuf {
        self.dir.0.join("agent").join("config.json")
    }

    fn prev(&self) -> PathBuf {
        self.dir.0.join("agent").join("config.json.prev")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.0.join("state")
    }

    fn hook_log(&self) -> PathBuf {
        self.dir.0.join("hook.log")
    }

    /// Settings as the agent loads them: environment plus a JSON file (`extra` members
    /// are added to it; the hook appends the new hash to `hook.log`).
    fn settings_for(&self, backend: &str, extra: &str) -> Settings {
        let hook = format!(
            r#""on_config_change": {{"command": ["sh", "-c", "echo \"$RELAIS_CONFIG_HASH\" >> '{}'"], "timeout_s": 10}}"#,
            self.hook_log().display()
        );
        let mut members = vec![
            r#""config_max_bytes": 20000"#.to_string(),
            r#""http": {"connect_timeout_s": 2, "io_timeout_s": 2, "response_timeout_s": 1}"#
                .to_string(),
            hook,
        ];
        if !extra.is_empty() {
            members.push(extra.to_string());
        }
        let file = self.dir.0.join(format!(
            "relais-{}.json",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&file, format!("{{{}}}", members.join(", "))).expect("config file");
        let vars = [
            ("BACKEND_URL", backend.to_string()),
            ("SITE_TOKEN", self.token.clone()),
            ("AGENT_CONFIG", self.agent_config().display().to_string()),
            ("RELAIS_STATE_DIR", self.state_dir().display().to_string()),
            ("RELAIS_LOG_DIR", "-".to_string()),
            ("DEVICE_ID", common::DEVICE.to_string()),
        ];
        let env = move |k: &str| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.clone())
        };
        Settings::load(&env, Some(&file)).expect("settings load")
    }

    fn settings(&self) -> Settings {
        self.settings_for(&self.rx.url(), "")
    }

    fn puller(&self) -> Puller {
        Puller::new(&self.settings()).expect("puller")
    }

    fn set(&self, json: &str) -> String {
        self.rx.set_config(&self.token, json).expect("set_config")
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(self.agent_config()).expect("config file readable")
    }

    fn status(&self) -> SyncStatus {
        pull::read_status(&self.state_dir()).expect("status file")
    }

    fn hook_runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.hook_log())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Sets version A and pulls it; returns its hash and the bytes written.
    fn pulled(&self, puller: &mut Puller) -> (String, Vec<u8>) {
        let hash = self.set(&site("A", 2));
        match puller.pull_once() {
            PullOutcome::Updated { new_hash, .. } => assert_eq!(new_hash, hash),
            other => panic!("first pull: {other:?}"),
        }
        (hash, self.file())
    }
}

fn served_hash(bytes: &[u8]) -> String {
    let text = std::str::from_utf8(bytes).expect("utf8");
    match miniserde::json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => match obj.get("config_hash") {
            Some(Value::String(h)) => h.clone(),
            other => panic!("config_hash: {other:?}"),
        },
        other => panic!("not an object: {other:?}"),
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

fn identity(path: &Path) -> (u64, i64, i64) {
    let m = std::fs::metadata(path).expect("metadata");
    (m.ino(), m.mtime(), m.mtime_nsec())
}

// ---------------------------------------------------------------- pulling

#[test]
fn unchanged_config_is_not_rewritten() {
    let fx = Fixture::new();
    let mut puller = fx.puller();
    let (hash, bytes) = fx.pulled(&mut puller);
    let before = identity(&fx.agent_config());

    // 304 path: the receiver honours If-None-Match.
    assert_eq!(
        puller.pull_once(),
        PullOutcome::Unchanged { hash: hash.clone() }
    );
    // 200 path: a backend without 304 support serving the same hash.
    fx.rx.push_config_fault(ConfigFault::Body(
        String::from_utf8(bytes.clone()).expect("utf8"),
    ));
    assert_eq!(
        puller.pull_once(),
        PullOutcome::Unchanged { hash: hash.clone() }
    );

    assert_eq!(identity(&fx.agent_config()), before, "file was rewritten");
    assert_eq!(fx.file(), bytes);
    assert_eq!(fx.hook_runs().len(), 1, "hook runs only on replacement");
    let status = fx.status();
    assert!(status.last_sync_ok);
    assert_eq!(status.last_sync_error, None);
    assert_eq!(status.current_hash.as_deref(), Some(hash.as_str()));
    assert_eq!(status.backend_hash.as_deref(), Some(hash.as_str()));
    assert_logged(&format!("config up to date (hash {}…)", &hash[..12]));
    assert_never_logged(&[&fx.token, "pw-secret"]);
}

#[test]
fn changed_config_replaces_file_keeps_prev_runs_hook() {
    let fx = Fixture::new();
    let mut puller = fx.puller();
    let (old_hash, old_bytes) = fx.pulled(&mut puller);
    assert_eq!(mode(&fx.agent_config()), 0o600);
    let first_update = fx.status().config_updated_at.expect("updated at");

    let new_hash = fx.set(&site("B", 3));
    assert_eq!(
        puller.pull_once(),
        PullOutcome::Updated {
            old_hash: Some(old_hash.clone()),
            new_hash: new_hash.clone(),
            devices: 3
        }
    );
    let bytes = fx.file();
    assert_eq!(served_hash(&bytes), new_hash);
    assert!(String::from_utf8_lossy(&bytes).contains("Site B"));
    assert_eq!(std::fs::read(fx.prev()).expect("prev"), old_bytes);
    assert_eq!(mode(&fx.agent_config()), 0o600);
    assert_eq!(mode(&fx.prev()), 0o600);
    assert_eq!(fx.hook_runs(), vec![old_hash.clone(), new_hash.clone()]);

    let status = fx.status();
    assert!(status.last_sync_ok);
    assert_eq!(status.current_hash.as_deref(), Some(new_hash.as_str()));
    assert_eq!(status.backend_hash.as_deref(), Some(new_hash.as_str()));
    assert!(status.config_updated_at.expect("updated at") >= first_update);
    assert!(status.last_sync_at.is_some());
    assert_logged(&format!(
        "config changed: old hash {}…, new hash {}…",
        &old_hash[..12],
        &new_hash[..12]
    ));
    assert_logged("3 devices");
    assert_never_logged(&[&fx.token, "pw-secret"]);
}

/// Recognises the expected error of a failure case.
type ErrorCheck = fn(&PullError) -> bool;

/// Pulls version A, makes the next pull fail with `fault`, and checks the file is
/// intact byte for byte and the status shows `expected`.
fn assert_failure_keeps_file(
    fx: &Fixture,
    puller: &mut Puller,
    inject: impl FnOnce(&Fixture),
    expected: impl Fn(&PullError) -> bool,
) {
    let (hash, bytes) = fx.pulled(puller);
    let before = identity(&fx.agent_config());
    inject(fx);
    let err = match puller.pull_once() {
        PullOutcome::Failed(e) => e,
        other => panic!("expected a failure, got {other:?}"),
    };
    assert!(expected(&err), "unexpected error {err:?}");
    assert_eq!(fx.file(), bytes, "file changed");
    assert_eq!(identity(&fx.agent_config()), before);
    let status = fx.status();
    assert!(!status.last_sync_ok);
    assert_eq!(
        status.last_sync_error.as_deref(),
        Some(err.to_string().as_str())
    );
    assert_eq!(status.current_hash.as_deref(), Some(hash.as_str()));
    assert_eq!(fx.hook_runs().len(), 1);
    assert_logged(&format!("{err}; keeping the current configuration"));
    assert_never_logged(&[&fx.token, "pw-secret"]);
}

/// [`assert_failure_keeps_file`] for a fresh agent and receiver, returned for more checks.
fn failure_keeps_file(inject: impl FnOnce(&Fixture), expected: ErrorCheck) -> Fixture {
    let fx = Fixture::new();
    let mut puller = fx.puller();
    assert_failure_keeps_file(&fx, &mut puller, inject, expected);
    fx
}

#[test]
fn server_errors_keep_the_file() {
    for code in [500, 503] {
        let _fx = failure_keeps_file(
            |fx| fx.rx.push_config_fault(ConfigFault::Status(code)),
            |e| matches!(e, PullError::Status { status: 500 | 503, detail } if detail.contains("injected")),
        );
    }
}

#[test]
fn unauthorized_and_not_found_keep_the_file() {
    let _fx = failure_keeps_file(
        |fx| fx.rx.push_config_fault(ConfigFault::Status(404)),
        |e| *e == PullError::NotFound,
    );
    // A token the receiver does not know: its real 401.
    let _fx = failure_keeps_file(
        |fx| fx.rx.push_config_fault(ConfigFault::Status(401)),
        |e| *e == PullError::Unauthorized,
    );
    let unknown = Fixture::new();
    let mut lone = unknown.puller();
    match lone.pull_once() {
        PullOutcome::Failed(PullError::Unauthorized) => {}
        other => panic!("unknown token: {other:?}"),
    }
    assert!(!unknown.agent_config().exists());
    assert!(
        unknown
            .status()
            .last_sync_error
            .is_some_and(|e| e.contains("401"))
    );
}

#[test]
fn bad_bodies_keep_the_file() {
    let cases: [(ConfigFault, ErrorCheck); 4] = [
        (ConfigFault::Body("<html>oops</html>".into()), |e| {
            *e == PullError::NotJson
        }),
        (
            ConfigFault::Body(r#"{"devices": []}"#.into()),
            |e| matches!(e, PullError::Shape(m) if m.contains("config_hash is missing")),
        ),
        (
            ConfigFault::Body(r#"{"config_hash": "x1", "devices": [{"ip": "1.2.3.4"}]}"#.into()),
            |e| matches!(e, PullError::Shape(m) if m == "devices[0].name is missing or not a string"),
        ),
        (ConfigFault::Body(r#"["config_hash"]"#.into()), |e| {
            matches!(e, PullError::Shape(_))
        }),
    ];
    for (fault, expected) in cases {
        let _fx = failure_keeps_file(|fx| fx.rx.push_config_fault(fault), expected);
    }
}

#[test]
fn wrong_shape_from_the_backend_keeps_the_file() {
    let fx = failure_keeps_file(
        |fx| {
            fx.rx.push_config_fault(ConfigFault::Body(
                r#"{"config_hash": "0123456789abcdef", "site_name": "no devices"}"#.into(),
            ))
        },
        |e| matches!(e, PullError::Shape(m) if m == "devices is missing or not an array"),
    );
    assert!(fx.status().backend_hash.is_some());
}

#[test]
fn oversized_config_keeps_the_file() {
    let _fx = failure_keeps_file(
        |fx| {
            fx.set(&site("huge", 100));
        },
        |e| *e == PullError::TooLarge { max_bytes: 20000 },
    );
}

#[test]
fn timeout_keeps_the_file() {
    let fx = Fixture::new();
    let mut puller = fx.puller();
    assert_slow_answer_cut(&fx, &mut puller, "in time", Duration::from_secs(4));
}

/// A backend answering after 4 s is cut within `bound`, with `message`, the file kept.
fn assert_slow_answer_cut(fx: &Fixture, puller: &mut Puller, message: &str, bound: Duration) {
    let started = Instant::now();
    assert_failure_keeps_file(
        fx,
        puller,
        |fx| {
            fx.rx
                .push_config_fault(ConfigFault::Delay(Duration::from_secs(4)))
        },
        |e| matches!(e, PullError::Network(m) if m.contains(message)),
    );
    assert!(
        started.elapsed() < bound,
        "not cut in time: {:?}",
        started.elapsed()
    );
}

/// The total deadline caps the wait for the answer's headers too, whatever
/// `response_timeout_s` allows.
#[test]
fn the_pull_deadline_cuts_a_slow_answer() {
    let fx = Fixture::new();
    let mut settings = fx.settings();
    settings.http.response_timeout = Duration::from_secs(30);
    settings.config_pull_timeout = Duration::from_secs(1);
    let mut puller = Puller::new(&settings).expect("puller");
    assert_slow_answer_cut(
        &fx,
        &mut puller,
        "did not end within 1.0 s (config_pull_timeout_s)",
        Duration::from_secs(3),
    );
}

#[test]
fn server_down_keeps_the_file() {
    let fx = Fixture::new();
    let (hash, bytes) = fx.pulled(&mut fx.puller());
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let down = fx.settings_for(&format!("http://127.0.0.1:{port}"), "");
    let mut puller = Puller::new(&down).expect("puller");
    match puller.pull_once() {
        PullOutcome::Failed(PullError::Network(m)) => assert!(m.contains("cannot connect"), "{m}"),
        other => panic!("server down: {other:?}"),
    }
    assert_eq!(fx.file(), bytes);
    let status = fx.status();
    assert!(!status.last_sync_ok);
    assert_eq!(status.current_hash.as_deref(), Some(hash.as_str()));
    assert_never_logged(&[&fx.token]);
}

// ---------------------------------------------------------------- local file

#[test]
fn hand_edited_file_is_restored() {
    let fx = Fixture::new();
    let mut puller = fx.puller();
    let (hash, bytes) = fx.pulled(&mut puller);
    let edited = String::from_utf8(bytes.clone())
        .expect("utf8")
        .replace("Site A", "Site hacked");
    std::fs::write(fx.agent_config(), edited).expect("edit");
    assert_eq!(
        puller.pull_once(),
        PullOutcome::Updated {
            old_hash: None,
            new_hash: hash.clone(),
            devices: 2
        }
    );
    assert_eq!(fx.file(), bytes);
    // A new puller (agent restart) sees the restored file as intact: no rewrite.
    let before = identity(&fx.agent_config());
    assert_eq!(fx.puller().pull_once(), PullOutcome::Unchanged { hash });
    assert_eq!(identity(&fx.agent_config()), before);
}

#[test]
fn unparsable_file_at_start_is_replaced() {
    let fx = Fixture::new();
    let hash = fx.set(&site("A", 1));
    std::fs::create_dir_all(fx.agent_config().parent().expect("parent")).expect("dir");
    std::fs::write(fx.agent_config(), b"{\"config_hash\": \"tor").expect("torn file");
    let mut puller = fx.puller();
    assert_logged(&format!(
        "config file {} is not JSON; the next pull replaces it",
        fx.agent_config().display()
    ));
    assert_eq!(
        puller.pull_once(),
        PullOutcome::Updated {
            old_hash: None,
            new_hash: hash.clone(),
            devices: 1
        }
    );
    assert_eq!(served_hash(&fx.file()), hash);
    assert_eq!(
        std::fs::read(fx.prev()).expect("prev"),
        b"{\"config_hash\": \"tor"
    );
}

/// A backend whose hash is not the hash of the served object (the seed's hashes a
/// projection): the file written is still recognised, so it is not rewritten.
#[test]
fn opaque_backend_hash_is_not_rewritten_every_pull() {
    let fx = Fixture::new();
    let body = site("A", 1).replacen('{', r#"{"config_hash": "0123456789abcdef", "#, 1);
    fx.rx.push_config_fault(ConfigFault::Body(body.clone()));
    let mut puller = fx.puller();
    assert!(matches!(puller.pull_once(), PullOutcome::Updated { .. }));
    let before = identity(&fx.agent_config());
    fx.rx.push_config_fault(ConfigFault::Body(body.clone()));
    assert_eq!(
        Puller::new(&fx.settings()).expect("puller").pull_once(),
        PullOutcome::Unchanged {
            hash: "0123456789abcdef".into()
        }
    );
    assert_eq!(identity(&fx.agent_config()), before);
}

// ---------------------------------------------------------------- hook and loop

#[test]
fn slow_hook_is_killed_at_its_timeout() {
    let fx = Fixture::new();
    let marker = fx.dir.0.join("late");
    let mut settings = fx.settings();
    settings.on_config_change = Some(relais::settings::HookSpec {
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("sleep 5; touch '{}'", marker.display()),
        ],
        timeout: Duration::from_millis(300),
    });
    fx.set(&site("A", 1));
    let started = Instant::now();
    assert!(matches!(
        Puller::new(&settings).expect("puller").pull_once(),
        PullOutcome::Updated { .. }
    ));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "hook blocked the pull"
    );
    assert_logged("config hook sh killed after its 300 ms timeout");
    assert!(!marker.exists());
}

#[test]
fn run_loop_pulls_on_wake_and_stops() {
    let fx = Fixture::new();
    let hash = fx.set(&site("A", 1));
    let (tx, rx) = mpsc::channel();
    let settings = fx.settings();
    let handle = std::thread::spawn(move || pull::run_loop(settings, rx, Default::default()));
    // The first timed pull is 10 s away: only the wake-up can make this one happen.
    tx.send(PullWake::Now).expect("send");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pull::read_status(&fx.state_dir()).and_then(|s| s.current_hash) != Some(hash.clone()) {
        assert!(Instant::now() < deadline, "no pull after PullWake::Now");
        std::thread::sleep(Duration::from_millis(10));
    }
    tx.send(PullWake::Stop).expect("send");
    let stopping = Instant::now();
    handle.join().expect("loop thread");
    assert!(stopping.elapsed() < Duration::from_secs(1));
    assert_eq!(pull::FIRST_PULL_DELAY, Duration::from_secs(10));
}

// ---------------------------------------------------------------- SIGKILL

const CHILD_ENV: &str = "RELAIS_PULL_TEST_REPLACE_LOOP";
const READY: &str = "REPLACE-LOOP-READY";

/// Two versions of a large configuration, of different lengths, so a torn or mixed
/// file cannot equal either.
fn versions() -> (String, String) {
    (site("kill-A", 400), site("kill-B-longer", 450))
}

/// Not a test on its own: the child of `sigkill_during_replacement_never_tears_the_file`.
/// Without the environment variable it returns at once.
#[test]
fn replace_loop_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    let (a, b) = versions();
    println!("{READY}");
    // Bounded, so a parent that fails before killing it leaves no endless writer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        atomic_file::replace(&path, a.as_bytes(), 0o600).expect("replace A");
        atomic_file::replace(&path, b.as_bytes(), 0o600).expect("replace B");
    }
}

/// A tiny xorshift generator: random kill instants without a crate.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn sigkill_during_replacement_never_tears_the_file() {
    let dir = Scratch::new("pull-kill");
    let path = dir.0.join("config.json");
    // A kill mid-write leaves the temporary file (`config.json.new-<pid>-<n>`).
    let temp_left = || {
        std::fs::read_dir(&dir.0)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("config.json.new-")
            })
    };
    let (a, b) = versions();
    atomic_file::replace(&path, a.as_bytes(), 0o600).expect("initial");
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        | 1;
    let exe = std::env::current_exe().expect("test binary");
    let (mut saw_a, mut saw_b, mut mid_write) = (0, 0, 0);
    for i in 0..200 {
        let mut child = Command::new(&exe)
            .args([
                "replace_loop_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        // libtest prints `test replace_loop_child ... ` before the test's own output.
        let ready = BufReader::new(stdout)
            .lines()
            .any(|l| l.is_ok_and(|l| l.contains(READY)));
        assert!(ready, "child {i} never started its loop");
        // The random instant: up to 20 ms into the replacement loop.
        std::thread::sleep(Duration::from_micros(next_random(&mut seed) % 20_000));
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        mid_write += usize::from(temp_left());
        let text = std::fs::read_to_string(&path).expect("file readable");
        assert!(
            miniserde::json::from_str::<Value>(&text).is_ok(),
            "kill {i}: file does not parse ({} bytes)",
            text.len()
        );
        if text == a {
            saw_a += 1;
        } else if text == b {
            saw_b += 1;
        } else {
            panic!("kill {i}: file is neither version ({} bytes)", text.len());
        }
        assert_eq!(mode(&path), 0o600);
    }
    eprintln!("200 kills: {saw_a} x A, {saw_b} x B, {mid_write} with a temporary file left");
    assert!(
        saw_a > 0 && saw_b > 0,
        "kills never landed between versions"
    );
    assert!(
        mid_write > 0,
        "no kill landed during a write: the test proved nothing"
    );
}

// ---------------------------------------------------------------- hook retries, errors

#[test]
fn run_loop_retries_a_failed_hook_with_backoff_without_a_pull() {
    let fx = Fixture::new();
    let hash = fx.set(&site("A", 1));
    let fixed = fx.dir.0.join("fixed");
    let mut settings = fx.settings_for(
        &fx.rx.url(),
        r#""retry": {"initial_backoff_s": 0.2, "max_backoff_s": 0.4}"#,
    );
    settings.on_config_change = Some(relais::settings::HookSpec {
        command: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "echo \"$RELAIS_CONFIG_HASH\" >> '{}'; test -e '{}'",
                fx.hook_log().display(),
                fixed.display()
            ),
        ],
        timeout: Duration::from_secs(10),
    });
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || pull::run_loop(settings, rx, Default::default()));
    tx.send(PullWake::Now).expect("send");
    assert!(
        common::wait_for(Duration::from_secs(5), || fx.hook_runs().len() >= 2),
        "the failed hook was not retried: {:?}",
        fx.hook_runs()
    );
    let status = fx.status();
    assert!(!status.last_sync_ok);
    assert_eq!(status.hook_due.as_deref(), Some(hash.as_str()));
    assert_logged("config hook sh failed: exit status: 1; it stays due: next try in");
    // A pull from now on would fail and say so in the status.
    fx.rx.push_config_fault(ConfigFault::Status(500));
    std::fs::write(&fixed, b"").expect("fix the hook");
    // Only the retry timer can run it now: the next pull is 5 min away.
    assert!(
        common::wait_for(Duration::from_secs(5), || fx.status().hook_due.is_none()),
        "the fixed hook never ran"
    );
    let status = fx.status();
    assert!(status.last_sync_ok, "{status:?}");
    assert_eq!(status.last_sync_error, None);
    assert!(fx.hook_runs().iter().all(|h| *h == hash));
    tx.send(PullWake::Stop).expect("send");
    handle.join().expect("loop thread");
}

#[test]
fn a_missing_config_directory_that_cannot_be_made_is_named() {
    let fx = Fixture::new();
    let not_a_dir = fx.dir.0.join("plain-file");
    std::fs::write(&not_a_dir, b"").expect("file");
    let mut settings = fx.settings();
    settings.agent_config = not_a_dir.join("agent").join("config.json");
    fx.set(&site("A", 1));
    let err = match Puller::new(&settings).expect("puller").pull_once() {
        PullOutcome::Failed(e) => e.to_string(),
        other => panic!("expected a failure, got {other:?}"),
    };
    let dir = not_a_dir.join("agent");
    assert!(
        err.contains(&format!(
            "cannot create {}, the directory of AGENT_CONFIG: Not a directory",
            dir.display()
        )),
        "{err}"
    );
    assert_eq!(fx.status().last_sync_error.as_deref(), Some(err.as_str()));
    assert!(
        fx.status().hook_due.is_none(),
        "a hook is due for a file never written"
    );
}

#[test]
fn a_body_that_is_not_utf8_is_reported_as_such() {
    let fx = Fixture::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let body = b"{\"config_hash\": \"x\xe9\", \"devices\": []}";
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = listener.accept().expect("accept");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(answer.as_bytes()).expect("head");
        conn.write_all(body).expect("body");
    });
    let err = match Puller::new(&fx.settings_for(&url, ""))
        .expect("puller")
        .pull_once()
    {
        PullOutcome::Failed(e) => e,
        other => panic!("expected a failure, got {other:?}"),
    };
    server.join().expect("server");
    assert_eq!(err, PullError::NotUtf8 { offset: 18 });
    assert_eq!(
        err.to_string(),
        "config pull: the answer is not UTF-8 (invalid byte at offset 18)"
    );
}
