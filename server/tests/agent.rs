//! End to end: the relais agent (its library, in-process) pushes a demo database to a
//! real relais-server; every row arrives once with identical media bytes, and a second
//! pass sends nothing. On both stores.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use common::{Server, StoreKind, sha256_hex};
use relais::demo::{create_app_db, insert_events, insert_media, settings_for};

common::on_both_stores!(the_agent_pushes_a_demo_database_exactly_once);

fn the_agent_pushes_a_demo_database_exactly_once(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let dir = common::scratch("agent");
    std::fs::create_dir_all(dir.join("log")).expect("log dir");
    let db = dir.join("surveillance.db");
    let conn = create_app_db(&db, false).expect("app db");
    insert_events(&conn, 120).expect("events");
    for size in [Some(300 * 1024), None, Some(3 << 20)] {
        insert_media(&conn, size).expect("media");
    }
    let blobs: HashMap<String, Option<Vec<u8>>> = conn
        .prepare("SELECT id_media, video FROM media")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get::<_, i64>(0)?.to_string(), r.get(1)?)))?
                .collect()
        })
        .expect("blobs");
    drop(conn);

    let settings = settings_for(&db, &server.url, &dir, &[]).expect("settings");
    let mut pusher =
        relais::daemon::build_pusher(&settings, None, Arc::new(AtomicBool::new(false)))
            .expect("pusher");
    let report = pusher.sync_once();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.pushed(), 123, "{report}");

    assert_eq!(settings.device_id, "demo-pi");
    let events: Vec<Option<String>> = server
        .rows(
            "SELECT local_id FROM evenements WHERE device_id = 'demo-pi'
             ORDER BY CAST(local_id AS INTEGER)",
        )
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect();
    let expected: Vec<Option<String>> = (1..=120).map(|i| Some(i.to_string())).collect();
    assert_eq!(events, expected, "every event once");
    let media = server.rows("SELECT local_id, media_path, media_size, media_sha256 FROM media");
    assert_eq!(media.len(), blobs.len(), "{media:?}");
    for row in &media {
        let [Some(local_id), path, size, sha] = &row[..] else {
            panic!("media row {row:?}");
        };
        match &blobs[local_id] {
            Some(bytes) => {
                assert_eq!(*size, Some(bytes.len().to_string()), "media {local_id}");
                assert_eq!(
                    sha.as_deref(),
                    Some(sha256_hex(bytes).as_str()),
                    "media {local_id}"
                );
                let file = std::fs::read(server.media_dir().join(path.as_deref().expect("path")))
                    .expect("media file");
                assert_eq!(
                    sha256_hex(&file),
                    sha256_hex(bytes),
                    "media {local_id} on disk"
                );
            }
            None => assert_eq!((path, size), (&None, &None), "media {local_id} had no BLOB"),
        }
    }

    let second = pusher.sync_once();
    assert_eq!(second.pushed(), 0, "{second}");
    assert_eq!(server.count("SELECT count(*) FROM received"), 123);
    let _ = std::fs::remove_dir_all(&dir);
}
