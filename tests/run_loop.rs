//! `relais run` with the configuration pull on its own clock: SIGUSR1 pulls now as well
//! as pushing, and a hanging configuration endpoint never stalls the push.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{
    ConfigFault, Receiver, Scratch, agent_env, drain, log_text, send_signal, spawn_logged,
    wait_exit, wait_for,
};
use relais::demo::{create_app_db, insert_events};

const TOKEN: &str = "site-token-run-loop";
const CONFIG: &str = r#"{"site_name": "Site Paris", "timezone": "Europe/Paris", "devices": [{"ip": "192.168.1.10", "name": "Projecteur",
 "type": "projector", "driver": "pjlink", "pjlink": {"password": "admin"}}]}"#;

#[test]
fn a_hanging_config_endpoint_never_stalls_the_push_and_sigusr1_pulls_now() {
    let dir = Scratch::new("run-loop");
    let db = dir.join("surveillance.db");
    let app = create_app_db(&db, false).unwrap();
    let receiver = Receiver::start(&dir.join("receiver"));
    receiver.set_config(TOKEN, CONFIG).unwrap();
    // The first pull hangs for 8 s; the push must go on meanwhile.
    receiver.push_config_fault(ConfigFault::Delay(Duration::from_secs(8)));
    let agent_config = dir.join("agent/config.json");
    let path = agent_config.display().to_string();
    let vars = agent_env(
        &db,
        &receiver.url(),
        dir.path(),
        &[
            ("SITE_TOKEN", TOKEN),
            ("AGENT_CONFIG", &path),
            ("SYNC_INTERVAL_SECONDS", "3600"),
        ],
    );
    let (mut agent, stderr) = spawn_logged(&["run"], &vars);
    let _stdout = drain(agent.stdout.take().unwrap());
    assert!(
        wait_for(Duration::from_secs(20), || dir.state_db().exists()),
        "first pass never ran"
    );

    // SIGUSR1: a pull now (it hangs) and a push pass.
    send_signal(agent.id(), "USR1");
    insert_events(&app, 30).unwrap();
    send_signal(agent.id(), "USR1");
    assert!(
        wait_for(Duration::from_secs(6), || receiver.rows().len() == 30),
        "the push stalled behind the hanging pull: {} rows arrived",
        receiver.rows().len()
    );
    assert!(!agent_config.exists(), "the pull did not hang as injected");

    // Once the endpoint answers, the configuration is written, private, whole.
    assert!(
        wait_for(Duration::from_secs(20), || agent_config.exists()),
        "configuration never pulled"
    );
    let written = std::fs::read_to_string(&agent_config).unwrap();
    assert!(
        written.contains("Projecteur") && written.contains("config_hash"),
        "{written}"
    );
    assert_eq!(
        std::fs::metadata(&agent_config)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    send_signal(agent.id(), "TERM");
    assert!(wait_exit(&mut agent, Duration::from_secs(10)).success());
    let log = log_text(stderr);
    assert!(
        !log.contains(TOKEN),
        "the site token reached the log:\n{log}"
    );
    assert!(
        log.contains("config changed"),
        "no config change logged:\n{log}"
    );
}
