//! Secrets and files under attack, with real child processes: no secret in any byte the
//! agent writes (its output, its log files, its state) at trace level, even split across
//! lines or as hex; a symbolic link planted at a temporary file's old name is never
//! followed; a log file deleted or moved away is opened again.
#![cfg(feature = "demo")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    Receiver, Scratch, agent_env, run_relais, send_signal, spawn_relais, wait_exit, wait_for,
};
use relais::demo::{create_app_db, insert_events, insert_media};

const PASS: Duration = Duration::from_secs(30);
// Random-looking, so that no window of them occurs in a log by chance.
const BEARER: &str = "Qz7Xw9Kp2Vb4Ny6M";
const SITE_TOKEN: &str = "Jr5Tc8Lm3Hd1Fs0G";
const PASSWORD: &str = "Wv2Bn6Yx9Pk4Qe7A";
const CONFIG: &str = r#"{"site_name": "Site Secret", "timezone": "Europe/Paris", "doubt_after_days": 2,
 "reporting": {"ok_interval_s": 300, "ko_interval_s": 60}, "devices": []}"#;

fn receiver(dir: &Scratch) -> Receiver {
    let rx = Receiver::start(&dir.join("receiver"));
    rx.set_config(SITE_TOKEN, CONFIG).expect("set config");
    rx
}

/// Every byte of every file under `dir`, recursively.
fn bytes_under(dir: &Path, out: &mut Vec<u8>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            bytes_under(&path, out);
        } else if let Ok(b) = std::fs::read(&path) {
            out.extend_from_slice(&b);
            out.push(b'\n');
        }
    }
}

/// Every window of 6 characters of `secret`, as text and as the hex a byte dump shows.
fn fragments(secret: &str) -> Vec<String> {
    let b = secret.as_bytes();
    let mut out = Vec::new();
    for w in b.windows(6) {
        out.push(String::from_utf8_lossy(w).into_owned());
        out.push(w.iter().map(|x| format!("{x:02x}")).collect());
    }
    out
}

fn assert_no_secret(what: &str, bytes: &[u8]) {
    use base64::Engine;
    let text = String::from_utf8_lossy(bytes);
    // Hex dumps put spaces between byte pairs and split rows across lines.
    let packed: String = text
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_lowercase();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("relais:{PASSWORD}"));
    for secret in [BEARER, SITE_TOKEN, PASSWORD, basic.as_str()] {
        for f in fragments(secret) {
            assert!(
                !text.contains(&f) && !packed.contains(&f.to_lowercase()),
                "{what}: a piece of the secret {secret} ({f}) is in it"
            );
        }
    }
}

#[test]
fn no_secret_reaches_any_output_at_trace_level() {
    let dir = Scratch::new("secrets");
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).unwrap();
    insert_events(&conn, 3).unwrap();
    insert_media(&conn, Some(100_000)).unwrap();
    let rx = receiver(&dir);
    let url = rx
        .url()
        .replace("http://", &format!("http://relais:{PASSWORD}@"));
    let agent_config = dir.join("agent").join("config.json").display().to_string();
    let extra = [
        ("RELAIS_LOG_LEVEL", "trace"),
        ("RELAIS_BEARER_TOKEN", BEARER),
        ("SITE_TOKEN", SITE_TOKEN),
        ("AGENT_CONFIG", agent_config.as_str()),
    ];
    let vars = agent_env(&db, &url, dir.path(), &extra);
    let mut written = Vec::new();
    let once = run_relais(&["once"], &vars, PASS);
    assert_eq!(
        once.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    assert_eq!(rx.stats().stored, 4);
    // The same with an unreachable backend: error paths print URLs and requests too.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://relais:{PASSWORD}@{}", dead.local_addr().unwrap());
    drop(dead);
    insert_events(&conn, 2).unwrap();
    let failing = run_relais(
        &["once"],
        &agent_env(&db, &dead_url, dir.path(), &extra),
        PASS,
    );
    assert_eq!(failing.status.code(), Some(1));
    for out in [
        once,
        failing,
        run_relais(&["status"], &vars, PASS),
        run_relais(&["status", "--json"], &vars, PASS),
    ] {
        written.extend_from_slice(&out.stdout);
        written.extend_from_slice(&out.stderr);
    }
    let trace_lines = String::from_utf8_lossy(&written)
        .lines()
        .filter(|l| l.contains("TRACE") || l.contains("DEBUG"))
        .count();
    assert!(trace_lines > 0, "the agent logged at debug and trace");
    assert_no_secret("stdout and stderr", &written);
    let mut files = Vec::new();
    bytes_under(&dir.join("log"), &mut files);
    bytes_under(&dir.join("state"), &mut files);
    assert!(!files.is_empty());
    assert_no_secret("the log and state files", &files);
}

#[test]
fn a_link_planted_at_the_config_temp_name_is_not_followed() {
    let dir = Scratch::new("planted-link");
    let db = dir.join("surveillance.db");
    create_app_db(&db, false).unwrap();
    let rx = receiver(&dir);
    let agent_config = dir.join("config.json");
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("config.json.tmp")).unwrap();
    let target = agent_config.display().to_string();
    let vars = agent_env(
        &db,
        &rx.url(),
        dir.path(),
        &[
            ("SITE_TOKEN", SITE_TOKEN),
            ("AGENT_CONFIG", target.as_str()),
        ],
    );
    let out = run_relais(&["once"], &vars, PASS);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    use std::os::unix::fs::PermissionsExt;
    let victim_mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
    assert_ne!(victim_mode, 0o600, "the link's target was chmodded");
    let meta = std::fs::symlink_metadata(&agent_config).unwrap();
    assert!(meta.file_type().is_file(), "AGENT_CONFIG is a regular file");
    let written = std::fs::read_to_string(&agent_config).unwrap();
    assert!(written.contains("Site Secret"), "{written}");
}

#[test]
fn a_log_file_deleted_or_moved_away_is_opened_again() {
    let dir = Scratch::new("log-reopen");
    let db = dir.join("surveillance.db");
    create_app_db(&db, false).unwrap();
    let rx = receiver(&dir);
    let vars = agent_env(
        &db,
        &rx.url(),
        dir.path(),
        &[("SYNC_INTERVAL_SECONDS", "3600")],
    );
    let mut agent = spawn_relais(&["run"], &vars);
    let log = dir.join("log").join("relais.log");
    let says =
        |path: &Path, what: &str| std::fs::read_to_string(path).is_ok_and(|t| t.contains(what));
    assert!(wait_for(Duration::from_secs(20), || says(
        &log,
        "sync report"
    )));

    std::fs::remove_file(&log).unwrap();
    send_signal(agent.id(), "USR1");
    assert!(
        wait_for(Duration::from_secs(20), || says(&log, "SIGUSR1")),
        "no new relais.log after it was deleted"
    );

    // logrotate's way: moved away, a new file expected at the old name.
    let rotated = dir.join("log").join("relais.log.2026-12-01");
    std::fs::rename(&log, &rotated).unwrap();
    let before = std::fs::read_to_string(&rotated).unwrap();
    send_signal(agent.id(), "USR1");
    assert!(
        wait_for(Duration::from_secs(20), || says(&log, "sync report")),
        "no new relais.log after it was moved away"
    );
    assert_eq!(std::fs::read_to_string(&rotated).unwrap(), before);
    send_signal(agent.id(), "TERM");
    assert!(wait_exit(&mut agent, Duration::from_secs(10)).success());
}
