//! How long streaming a media BLOB holds the application database's read lock, as a
//! function of the BLOB size and the chunk size, in rollback-journal mode (where that
//! lock stalls the application's commits) and in WAL mode (where it does not).
//!
//! Run: `cargo bench --bench lock_hold`. Prints one line per case: the longest single
//! hold and the whole upload's duration, against relais-server in-process on loopback.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use relais::demo::{create_app_db, insert_media, scratch_dir, settings_for};
use relais::received::EmbeddedServer;

const MIB: u64 = 1024 * 1024;

fn measure(size_mib: u64, chunk: u64, wal: bool) -> Result<(Duration, Duration), String> {
    let dir = scratch_dir("lock-hold");
    let db = dir.join("app.db");
    let conn = create_app_db(&db, wal).map_err(|e| e.to_string())?;
    insert_media(&conn, Some(size_mib * MIB)).map_err(|e| e.to_string())?;
    drop(conn);
    let server = EmbeddedServer::start(&dir.join("server"))?;
    let config = dir.join("relais.json");
    let chunk_setting = format!("{{\"blob_chunk_bytes\": {chunk}, \"log_dir\": \"-\"}}");
    std::fs::write(&config, chunk_setting).map_err(|e| e.to_string())?;
    let config_var = config.display().to_string();
    let settings = settings_for(
        &db,
        &server.url(),
        &dir,
        &[("RELAIS_CONFIG", config_var.as_str())],
    )?;
    let mut pusher =
        relais::daemon::build_pusher(&settings, None, Arc::new(AtomicBool::new(false)))?;
    let report = pusher.sync_once();
    server.shutdown()?;
    let _ = std::fs::remove_dir_all(&dir);
    let media = report
        .tables
        .iter()
        .find(|t| t.table == "media")
        .ok_or("no media report")?;
    if media.pushed != 1 {
        return Err(format!("upload failed: {report}"));
    }
    Ok((media.max_lock_hold, report.duration))
}

fn main() {
    println!(
        "{:<9} {:>8} {:>10} {:>16} {:>12}",
        "mode", "BLOB", "chunk", "longest hold", "upload"
    );
    for wal in [false, true] {
        for size in [1, 16, 64, 256] {
            for chunk in [MIB, 4 * MIB] {
                match measure(size, chunk, wal) {
                    Ok((hold, total)) => println!(
                        "{:<9} {:>5} MiB {:>6} MiB {:>13.1} ms {:>10.2} s",
                        if wal { "wal" } else { "rollback" },
                        size,
                        chunk / MIB,
                        hold.as_secs_f64() * 1000.0,
                        total.as_secs_f64()
                    ),
                    Err(e) => println!("{size} MiB: {e}"),
                }
            }
        }
    }
}
