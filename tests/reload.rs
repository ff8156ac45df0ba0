//! SIGHUP to `relais run`: the configuration file is read again and applied from the next
//! pass, the configuration pull restarted with it; an invalid file keeps the settings in
//! use. A real agent, relais-server in-process, the log file.
#![cfg(feature = "demo")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    Receiver, Scratch, agent_env, drain, log_text, send_signal, spawn_logged, wait_exit, wait_for,
};
use relais::demo::{create_app_db, insert_events, insert_media};
use relais::settings::DEFAULT_EVENT_QUERY;

const TOKEN: &str = "site-token-reload";
const CONFIG: &str = r#"{"site_name": "Site Lyon", "timezone": "Europe/Paris",
 "devices": [{"ip": "192.168.1.11", "name": "Ecran", "type": "screen", "driver": "ping"}]}"#;

/// Replaces the configuration file whole, as an editor or a deployment tool would.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn log_file(dir: &Scratch) -> String {
    std::fs::read_to_string(dir.join("log").join(relais::logging::LOG_FILE_NAME))
        .unwrap_or_default()
}

fn rows_at(receiver: &Receiver, endpoint: &str) -> usize {
    receiver
        .rows()
        .iter()
        .filter(|r| r.endpoint == endpoint)
        .count()
}

#[test]
fn sighup_reloads_the_configuration_file_and_keeps_the_old_one_when_invalid() {
    let dir = Scratch::new("reload");
    let db = dir.join("surveillance.db");
    let app = create_app_db(&db, false).unwrap();
    insert_events(&app, 5).unwrap();
    insert_media(&app, Some(3000)).unwrap();
    insert_media(&app, Some(5000)).unwrap();
    let receiver = Receiver::start(&dir.join("receiver"));
    receiver.set_config(TOKEN, CONFIG).unwrap();

    // First the events alone, the pulled configuration written to a.json.
    let (first, second) = (dir.join("a.json"), dir.join("b.json"));
    let config = dir.join("relais.json");
    let query = miniserde::json::to_string(DEFAULT_EVENT_QUERY);
    write_config(
        &config,
        &format!(
            r#"{{"agent_config": "{}", "tables": [{{"name": "evenement", "endpoint": "/api/evenements", "query": {query}}}]}}"#,
            first.display()
        ),
    );
    let vars = agent_env(
        &db,
        &receiver.url(),
        dir.path(),
        &[
            ("RELAIS_CONFIG", &config.display().to_string()),
            ("SITE_TOKEN", TOKEN),
            ("SYNC_INTERVAL_SECONDS", "3600"),
        ],
    );
    let (mut agent, stderr) = spawn_logged(&["run"], &vars);
    let _stdout = drain(agent.stdout.take().unwrap());
    assert!(
        wait_for(Duration::from_secs(20), || rows_at(&receiver, "evenements")
            == 5),
        "the events never arrived"
    );
    send_signal(agent.id(), "USR1");
    assert!(
        wait_for(Duration::from_secs(10), || first.exists()),
        "no configuration pulled"
    );

    // An invalid file: one error line, and the agent goes on with what it had.
    write_config(&config, r#"{"tabels": []}"#);
    send_signal(agent.id(), "HUP");
    assert!(
        wait_for(Duration::from_secs(10), || log_file(&dir).contains(
            "ERROR reload: the settings in use are kept: setting tabels: unknown key in"
        )),
        "no error line for the invalid file:\n{}",
        log_file(&dir)
    );
    insert_events(&app, 3).unwrap();
    send_signal(agent.id(), "USR1");
    assert!(
        wait_for(Duration::from_secs(10), || rows_at(&receiver, "evenements")
            == 8),
        "the agent stopped pushing after an invalid reload"
    );
    assert_eq!(rows_at(&receiver, "media"), 0);

    // A valid file: the default tables (media too) from the next pass, which starts now,
    // and the pull restarted on the new path.
    write_config(
        &config,
        &format!(r#"{{"agent_config": "{}"}}"#, second.display()),
    );
    send_signal(agent.id(), "HUP");
    assert!(
        wait_for(Duration::from_secs(10), || rows_at(&receiver, "media") == 2),
        "the reloaded tables were not pushed:\n{}",
        log_file(&dir)
    );
    assert!(
        wait_for(Duration::from_secs(5), || log_file(&dir)
            .contains("reload: settings read again: 2 tables")),
        "{}",
        log_file(&dir)
    );
    send_signal(agent.id(), "USR1");
    assert!(
        wait_for(Duration::from_secs(10), || second.exists()),
        "the configuration pull did not restart with the new settings:\n{}",
        log_file(&dir)
    );

    send_signal(agent.id(), "TERM");
    assert_eq!(
        wait_exit(&mut agent, Duration::from_secs(10)).code(),
        Some(0)
    );
    let log = log_text(stderr);
    assert_eq!(
        log.matches("SIGHUP: reading the settings again").count(),
        2,
        "{log}"
    );
    assert_eq!(rows_at(&receiver, "evenements"), 8, "{log}");
    assert!(
        !log.contains(TOKEN),
        "the site token reached the log:\n{log}"
    );
}
