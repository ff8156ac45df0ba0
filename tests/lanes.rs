//! The uplink's lanes, with `relais run` as a child process: an event recorded while a
//! media row uploads goes up before the media is done, and a backend failing the media
//! does not hold the events back. Uploads that must last go through a throttling proxy;
//! every wait is on a condition with a deadline.
#![cfg(feature = "demo")]

mod common;

use std::time::Duration;

use common::{
    DEVICE, FaultProxy, Proxy, ProxyFault, Receiver, Scratch, agent_env, log_text, run_relais,
    send_signal, spawn_logged, tracked, wait_exit, wait_for,
};
use relais::demo::{check_delivery, create_app_db, insert_events, insert_media};

const KIB: u64 = 1 << 10;

fn arrived(rx: &Receiver, endpoint: &str) -> usize {
    rx.rows().iter().filter(|r| r.endpoint == endpoint).count()
}

#[test]
fn an_event_recorded_during_a_long_media_upload_goes_up_before_the_media_is_done() {
    let dir = Scratch::new("lanes-long-media");
    let db = dir.join("surveillance.db");
    let app = create_app_db(&db, true).expect("app db");
    // 2 MiB of BLOB, 2.7 MiB of base64 at 256 KiB/s: the upload takes about 10 s.
    insert_media(&app, Some(2048 * KIB)).expect("media");
    let rx = Receiver::start(&dir.join("receiver"));
    let proxy = Proxy::start(&rx.url(), 256 * KIB);
    let vars = agent_env(
        &db,
        &proxy.url(),
        dir.path(),
        &[("SYNC_INTERVAL_SECONDS", "1")],
    );
    let (mut agent, stderr) = spawn_logged(&["run"], &vars);
    assert!(
        wait_for(Duration::from_secs(30), || proxy.forwarded() > 256 * KIB),
        "the media upload did not start"
    );
    insert_events(&app, 1).expect("event");
    let event_up = wait_for(Duration::from_secs(30), || arrived(&rx, "evenements") == 1);
    let media_up_before = arrived(&rx, "media");
    let media_up = wait_for(Duration::from_secs(60), || arrived(&rx, "media") == 1);
    send_signal(agent.id(), "TERM");
    let status = wait_exit(&mut agent, Duration::from_secs(10));
    let log = log_text(stderr);
    assert!(event_up, "the event never arrived\n{log}");
    assert_eq!(
        media_up_before, 0,
        "the event waited for the media upload to finish\n{log}"
    );
    assert!(media_up, "the media never arrived\n{log}");
    assert_eq!(status.code(), Some(0), "{log}");
    let d = check_delivery(&db, &rx.rows(), DEVICE).expect("delivery check");
    assert!(d.is_exact(), "{d:?}");
}

#[test]
fn a_backend_failing_the_media_does_not_hold_the_events_back() {
    let dir = Scratch::new("lanes-media-down");
    let db = dir.join("surveillance.db");
    let app = create_app_db(&db, true).expect("app db");
    insert_media(&app, Some(64 * KIB)).expect("media");
    insert_events(&app, 3).expect("events");
    let rx = Receiver::start(&dir.join("receiver"));
    let proxy = FaultProxy::start(&rx.url());
    proxy.set_policy(|r| match r.path.as_str() {
        "/api/media" => ProxyFault::Status(503, None),
        _ => ProxyFault::Pass,
    });
    // A minute of backoff after the media's 503: a lane shared with the events would
    // hold them that long.
    let config = dir.join("relais.json");
    std::fs::write(
        &config,
        r#"{"retry": {"initial_backoff_s": 60, "max_backoff_s": 120}}"#,
    )
    .expect("config");
    let config = config.display().to_string();
    let vars = agent_env(
        &db,
        &proxy.url(),
        dir.path(),
        &[("SYNC_INTERVAL_SECONDS", "1"), ("RELAIS_CONFIG", &config)],
    );
    let (mut agent, stderr) = spawn_logged(&["run"], &vars);
    let first = wait_for(Duration::from_secs(30), || {
        proxy.stats().faults >= 1 && arrived(&rx, "evenements") == 3
    });
    insert_events(&app, 2).expect("more events");
    let later = wait_for(Duration::from_secs(20), || arrived(&rx, "evenements") == 5);
    send_signal(agent.id(), "TERM");
    let status = wait_exit(&mut agent, Duration::from_secs(10));
    let log = log_text(stderr);
    assert!(
        first,
        "the first events or the media's 503 never came\n{log}"
    );
    assert!(
        later,
        "events recorded after the media failed waited for its backoff\n{log}"
    );
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(proxy.stats().faults, 1, "the media lane backed off once");
    assert_eq!(arrived(&rx, "media"), 0);
    let media = tracked(&dir.state_db(), "media", 1).expect("media tracked");
    assert_eq!(media.status, "failed", "{media:?}");
    for id in 1..=5 {
        let event = tracked(&dir.state_db(), "evenement", id).expect("event tracked");
        assert_eq!(event.status, "success", "{event:?}");
    }
    let out = run_relais(&["status"], &vars, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("last pass: "), "{text}");
    assert!(text.contains("last media pass: "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("last media error: ") && l.contains("503")),
        "{text}"
    );
}
