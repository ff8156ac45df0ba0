//! What `relais` refuses before it does anything, with real processes: a `BACKEND_URL`
//! that the endpoints cannot be appended to, an empty variable that would silently mean
//! its default, an unknown key in the configuration file; and `relais help`.
#![cfg(feature = "demo")]

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::{Receiver, Scratch, agent_env, run_relais};
use relais::demo::{create_app_db, insert_events};

fn app(dir: &Scratch) -> PathBuf {
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("create app db");
    insert_events(&conn, 3).expect("insert events");
    db
}

fn once(vars: &[(String, String)]) -> Output {
    run_relais(&["once"], vars, Duration::from_secs(30))
}

/// Exit code 2 and exactly one line on stderr, which is returned.
fn refused(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    stderr.trim_end().to_string()
}

#[test]
fn a_backend_url_the_endpoints_cannot_be_appended_to_stops_start_up() {
    let dir = Scratch::new("start-url");
    let db = app(&dir);
    let receiver = Receiver::start(&dir.join("receiver"));
    let url = receiver.url();
    let port = url.rsplit(':').next().unwrap();
    for (backend, problem) in [
        (format!("{url}/?x=1"), "has a query string"),
        (format!("{url}#x"), "has a fragment"),
        ("http://[::1".to_string(), "not closed with ']'"),
        (
            format!("http://127.0.0.1:{port}0000"),
            "is not a number from 1 to 65535",
        ),
    ] {
        let line = refused(&once(&agent_env(&db, &backend, dir.path(), &[])));
        assert!(
            line.starts_with("relais: setting BACKEND_URL: ") && line.contains(problem),
            "{backend}: {line}"
        );
    }
    assert_eq!(receiver.stats().requests, 0, "a request was sent");
    assert!(!dir.state_db().exists(), "the agent started");
}

#[test]
fn an_empty_variable_is_an_error_never_the_default() {
    let dir = Scratch::new("start-empty");
    let db = app(&dir);
    // Where the defaults would go: systemd's directories, made to point into the scratch.
    let defaults = [
        ("STATE_DIRECTORY", dir.join("default-state")),
        ("LOGS_DIRECTORY", dir.join("default-log")),
    ];
    for var in [
        "RELAIS_STATE_DIR",
        "RELAIS_LOG_DIR",
        "AGENT_CONFIG",
        "LOCAL_DB_PATH",
        "BACKEND_URL",
    ] {
        let mut vars = agent_env(&db, "http://127.0.0.1:9", dir.path(), &[]);
        for (k, v) in &defaults {
            vars.push((k.to_string(), v.display().to_string()));
        }
        vars.push((var.to_string(), " ".to_string()));
        let line = refused(&once(&vars));
        assert!(
            line.starts_with(&format!(
                "relais: setting {var}: is empty: leave it unset for "
            )),
            "{line}"
        );
    }
    for (_, default) in defaults {
        assert!(!default.exists(), "{} was created", default.display());
    }
}

#[test]
fn an_unknown_key_in_the_configuration_file_is_named_with_a_suggestion() {
    let dir = Scratch::new("start-keys");
    let db = app(&dir);
    let config = dir.join("relais.json");
    std::fs::write(&config, r#"{"batch_size": 10, "http": {"io_timout_s": 1}}"#).unwrap();
    let vars = agent_env(
        &db,
        "http://127.0.0.1:9",
        dir.path(),
        &[("RELAIS_CONFIG", &config.display().to_string())],
    );
    let line = refused(&once(&vars));
    assert_eq!(
        line,
        format!(
            "relais: setting http.io_timout_s: unknown key in {}; did you mean \"io_timeout_s\"?",
            config.display()
        )
    );
}

#[test]
fn help_prints_the_usage_and_exits_0() {
    for args in [&["help"][..], &["--help"], &["-h"]] {
        // No settings at all: help must not need valid ones.
        let out = run_relais(args, &[], Duration::from_secs(10));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        assert!(stdout.starts_with("usage: relais"), "{args:?}: {stdout}");
        assert!(stdout.contains("SIGHUP"), "{stdout}");
        assert!(out.stderr.is_empty(), "{args:?}: {out:?}");
    }
}
