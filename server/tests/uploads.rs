//! Resumable media uploads (tus 1.0.0, `/api/uploads`) against a real relais-server,
//! on both stores: chunks, offsets, a restart in the middle, the checksums, a repeated
//! creation, expiry, racing PATCHes, bounded memory, and the completed row against a
//! JSON-pushed one.

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::{Server, StoreAt, StoreKind, client, pattern, post_as, scratch, sha256_hex, wait_for};
use sha2::Digest as _;

common::on_both_stores!(
    an_upload_in_chunks_is_stored_as_a_json_media_push_is,
    an_upload_resumes_from_heads_offset_after_a_restart,
    an_upload_goes_on_through_whichever_server_of_a_fleet,
    a_wrong_offset_is_409_and_a_bad_chunk_460_with_nothing_appended,
    a_whole_upload_whose_sha256_differs_stores_nothing,
    a_repeated_creation_is_one_upload_and_one_row,
    an_expired_upload_is_removed_with_its_file_and_created_afresh,
    of_two_racing_patches_one_appends_and_the_other_gets_409,
    a_64_mib_upload_in_1_mib_patches_keeps_memory_bounded,
);

const DEVICE: &str = "pi";

/// The media row's members but its BLOB, as a JSON push would carry them.
fn row_json(device: &str) -> String {
    r#"{"date": "2025-12-18T17:30:00.123456", "capteur": {"id": 4, "nom": "Caméra 1"}, "numero_camera": 1, "device_id": "DEVICE", "source": "sync_service"}"#
        .replace("DEVICE", device)
}

/// An answer: status, headers by lowercase name, body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn of(mut resp: ureq::http::Response<ureq::Body>) -> Answer {
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        Answer {
            status: resp.status().as_u16(),
            headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn offset(&self) -> u64 {
        self.header("upload-offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("Upload-Offset in {} {:?}", self.status, self.headers))
    }
}

/// A tus client for one server, with a device token when the server checks them.
struct Tus<'a> {
    server: &'a Server,
    token: Option<String>,
}

impl Tus<'_> {
    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        let req = req.header("Tus-Resumable", "1.0.0");
        match &self.token {
            Some(token) => req.header("Authorization", format!("Bearer {token}")),
            None => req,
        }
    }

    /// `POST /api/uploads` for a media row of `data` (its SHA-256 as `sha256`).
    fn create(&self, key: &str, length: usize, sha256: &str) -> Answer {
        let b64 = |s: &str| STANDARD.encode(s);
        let metadata = format!(
            "endpoint {},field {},json {},sha256 {},filename {}",
            b64("media"),
            b64("video_data"),
            b64(&row_json(DEVICE)),
            b64(sha256),
            b64("v.mp4")
        );
        let req = client()
            .post(format!("{}/api/uploads", self.server.url))
            .header("Upload-Length", length.to_string())
            .header("Upload-Metadata", metadata)
            .header("Idempotency-Key", key);
        Answer::of(self.auth(req).send_empty().expect("POST"))
    }

    fn head(&self, location: &str) -> Answer {
        let req = client().head(format!("{}{location}", self.server.url));
        Answer::of(self.auth(req).call().expect("HEAD"))
    }

    /// `PATCH` of `chunk` at `offset` with its own checksum, or `checksum_of`'s.
    fn patch_as(&self, location: &str, offset: u64, chunk: &[u8], checksum_of: &[u8]) -> Answer {
        let digest = sha2::Sha256::digest(checksum_of);
        let req = client()
            .patch(format!("{}{location}", self.server.url))
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .header(
                "Upload-Checksum",
                format!("sha256 {}", STANDARD.encode(digest)),
            );
        Answer::of(self.auth(req).send(chunk).expect("PATCH"))
    }

    fn patch(&self, location: &str, offset: u64, chunk: &[u8]) -> Answer {
        self.patch_as(location, offset, chunk, chunk)
    }

    /// Creates the upload of `data` and sends it in chunks of `chunk` bytes; the last
    /// answer.
    fn upload(&self, key: &str, data: &[u8], chunk: usize) -> Answer {
        let created = self.create(key, data.len(), &sha256_hex(data));
        assert_eq!(created.status, 201, "{}", created.body);
        let location = created.header("location").expect("Location").to_string();
        self.send_from(&location, data, 0, chunk)
    }

    /// Sends `data[from..]` in chunks; the last answer.
    fn send_from(&self, location: &str, data: &[u8], from: usize, chunk: usize) -> Answer {
        let mut offset = from;
        loop {
            let end = (offset + chunk).min(data.len());
            let answer = self.patch(location, offset as u64, &data[offset..end]);
            assert_eq!(answer.status, 204, "PATCH at {offset}: {}", answer.body);
            assert_eq!(answer.offset(), end as u64);
            offset = end;
            if offset == data.len() {
                return answer;
            }
        }
    }
}

fn no_auth(server: &Server) -> Tus<'_> {
    Tus {
        server,
        token: None,
    }
}

fn partial_files(server: &Server) -> Vec<std::path::PathBuf> {
    server
        .media_files()
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/.uploads/"))
        .collect()
}

fn an_upload_in_chunks_is_stored_as_a_json_media_push_is(store: StoreKind) {
    let server = Server::start_authenticated(store, &[], "info");
    let tus = Tus {
        server: &server,
        token: Some(server.token(&["--device", DEVICE])),
    };
    let other = Tus {
        server: &server,
        token: Some(server.token(&["--device", "pi-2"])),
    };
    let data = pattern(300_000, 3);
    let options = client()
        .options(format!("{}/api/uploads", server.url))
        .header(
            "Authorization",
            format!("Bearer {}", tus.token.as_deref().unwrap_or("")),
        )
        .call()
        .expect("OPTIONS");
    let options = Answer::of(options);
    assert_eq!(options.status, 204, "{}", options.body);
    assert_eq!(options.header("tus-version"), Some("1.0.0"));
    assert_eq!(
        options.header("tus-extension"),
        Some("creation,checksum,expiration")
    );
    assert_eq!(options.header("tus-checksum-algorithm"), Some("sha256"));

    let created = tus.create("pi:media:1", data.len(), &sha256_hex(&data));
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.header("tus-resumable"), Some("1.0.0"));
    assert!(
        created
            .header("upload-expires")
            .is_some_and(|v| v.ends_with(" GMT"))
    );
    let location = created.header("location").expect("Location").to_string();
    assert!(location.starts_with("/api/uploads/"), "{location}");
    assert_eq!(created.offset(), 0);

    let first = tus.patch(&location, 0, &data[..100_000]);
    assert_eq!(
        (first.status, first.offset()),
        (204, 100_000),
        "{}",
        first.body
    );
    let head = tus.head(&location);
    assert_eq!(head.status, 200);
    assert_eq!(head.offset(), 100_000);
    assert_eq!(head.header("upload-length"), Some("300000"));
    assert_eq!(head.header("cache-control"), Some("no-store"));
    assert_eq!(other.head(&location).status, 403, "another device's upload");
    let no_version = client()
        .head(format!("{}{location}", server.url))
        .header(
            "Authorization",
            format!("Bearer {}", tus.token.as_deref().unwrap_or("")),
        )
        .call()
        .expect("HEAD");
    assert_eq!(Answer::of(no_version).status, 412, "no Tus-Resumable");

    let last = tus.send_from(&location, &data, 100_000, 100_000);
    let id = last
        .header("upload-result-id")
        .expect("Upload-Result-Id")
        .to_string();
    assert_eq!(
        server.row("SELECT id FROM received")[0],
        id,
        "the remote id answered"
    );
    assert!(
        partial_files(&server).is_empty(),
        "the partial file was placed"
    );

    // The same row pushed as JSON, with its BLOB in base64.
    let pushed = common::media(DEVICE, &STANDARD.encode(&data));
    let (status, answer) = post_as(
        &client(),
        &server.url,
        "/api/media",
        tus.token.as_deref(),
        Some("pi:media:2"),
        pushed.as_bytes(),
    );
    assert_eq!(status, 201, "{answer}");
    let columns = "device_id, endpoint, local_id, media_size, media_sha256";
    let rows = server.rows(&format!("SELECT {columns} FROM received ORDER BY id"));
    assert_eq!(rows.len(), 2);
    let (upload, json) = (&rows[0], &rows[1]);
    assert_eq!(upload[..2], json[..2]);
    assert_eq!(upload[3..], json[3..]);
    assert_eq!(
        upload[2].as_deref(),
        Some("1"),
        "the local id of pi:media:1"
    );
    let view = "date, capteur_id, capteur_nom, numero_camera, media_size, media_sha256";
    let rows = server.rows(&format!("SELECT {view} FROM media ORDER BY id"));
    assert_eq!(rows[0], rows[1], "the media view");
    assert_eq!(rows[0][5].as_deref(), Some(sha256_hex(&data).as_str()));
    for row in server.rows("SELECT media_path, body FROM received") {
        let (path, body) = (
            row[0].clone().unwrap_or_default(),
            row[1].clone().unwrap_or_default(),
        );
        let on_disk = std::fs::read(server.media_dir().join(&path)).expect("media file");
        assert_eq!(on_disk, data);
        assert!(
            body.contains(&format!(
                "\"video_data\": {{\"media_path\": \"{path}\", \"size\": 300000"
            )),
            "{body}"
        );
    }
    let capabilities = common::get_as(
        &client(),
        &server.url,
        "/api/capabilities",
        tus.token.as_deref(),
    );
    assert!(
        capabilities
            .2
            .contains(r#""uploads": {"path": "/api/uploads", "protocol": "tus/1.0.0""#),
        "{}",
        capabilities.2
    );
}

/// A new store of `kind` in `dir`, outliving any one server.
fn store_in(kind: StoreKind, dir: &std::path::Path) -> StoreAt {
    match kind {
        StoreKind::Sqlite => StoreAt::Sqlite(dir.join("store.db")),
        StoreKind::Postgres(cluster) => StoreAt::Postgres(cluster.create_db()),
    }
}

fn an_upload_resumes_from_heads_offset_after_a_restart(store: StoreKind) {
    let dir = scratch("tus-restart");
    let (store, media) = (store_in(store, &dir), dir.join("media"));
    let data = pattern(500_000, 5);
    let location = {
        let server = Server::start_member(store.clone(), "127.0.0.1:0", &media, &[]);
        let tus = no_auth(&server);
        let created = tus.create("pi:media:7", data.len(), &sha256_hex(&data));
        assert_eq!(created.status, 201, "{}", created.body);
        let location = created.header("location").expect("Location").to_string();
        assert_eq!(tus.patch(&location, 0, &data[..200_000]).status, 204);
        server.signal(libc::SIGKILL);
        location
    };
    let server = Server::start_member(store, "127.0.0.1:0", &media, &[]);
    let tus = no_auth(&server);
    let offset = tus.head(&location).offset();
    assert_eq!(offset, 200_000, "fsynced and recorded before the 204");
    let last = tus.send_from(&location, &data, offset as usize, 150_000);
    assert!(last.header("upload-result-id").is_some());
    let row = server.row("SELECT media_path, media_sha256 FROM media");
    assert_eq!(row[1], sha256_hex(&data));
    assert_eq!(std::fs::read(media.join(&row[0])).expect("file"), data);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two servers on one store and one media directory, as behind a balancer: each chunk
/// goes to the other server; the upload knows no server of its own.
fn an_upload_goes_on_through_whichever_server_of_a_fleet(store: StoreKind) {
    let dir = scratch("tus-fleet");
    let (store, media) = (store_in(store, &dir), dir.join("media"));
    let servers = [
        Server::start_member(store.clone(), "127.0.0.1:0", &media, &[]),
        Server::start_member(store, "127.0.0.1:0", &media, &[]),
    ];
    let data = pattern(600_000, 29);
    let created = no_auth(&servers[0]).create("pi:media:3", data.len(), &sha256_hex(&data));
    let location = created.header("location").expect("Location").to_string();
    let mut offset = 0;
    for (i, part) in data.chunks(100_000).enumerate() {
        let tus = no_auth(&servers[(i + 1) % 2]);
        assert_eq!(tus.head(&location).offset(), offset as u64);
        let answer = tus.patch(&location, offset as u64, part);
        assert_eq!(answer.status, 204, "{}", answer.body);
        offset += part.len();
    }
    let again = no_auth(&servers[1]).create("pi:media:3", data.len(), &sha256_hex(&data));
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(servers[0].count("SELECT count(*) FROM media"), 1);
    assert_eq!(
        servers[0].row("SELECT media_sha256 FROM media")[0],
        sha256_hex(&data)
    );
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

fn a_wrong_offset_is_409_and_a_bad_chunk_460_with_nothing_appended(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let tus = no_auth(&server);
    let data = pattern(1000, 9);
    let created = tus.create("pi:media:1", data.len(), &sha256_hex(&data));
    let location = created.header("location").expect("Location").to_string();
    assert_eq!(tus.patch(&location, 0, &data[..400]).status, 204);
    let wrong = tus.patch(&location, 300, &data[300..600]);
    assert_eq!(wrong.status, 409, "{}", wrong.body);
    let corrupt = tus.patch_as(&location, 400, &data[400..700], b"something else");
    assert_eq!(corrupt.status, 460, "{}", corrupt.body);
    assert!(
        corrupt.body.contains("nothing appended"),
        "{}",
        corrupt.body
    );
    assert_eq!(tus.head(&location).offset(), 400);
    let partial = partial_files(&server);
    assert_eq!(partial.len(), 1);
    assert_eq!(std::fs::metadata(&partial[0]).expect("partial").len(), 400);
    let beyond = tus.patch(&location, 400, &pattern(601, 1));
    assert_eq!(beyond.status, 413, "{}", beyond.body);
    let last = tus.send_from(&location, &data, 400, 600);
    assert!(last.header("upload-result-id").is_some());
    assert_eq!(server.count("SELECT count(*) FROM media"), 1);
    let unknown = tus.head("/api/uploads/0123456789abcdef0123456789abcdef");
    assert_eq!(unknown.status, 404);
}

fn a_whole_upload_whose_sha256_differs_stores_nothing(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let tus = no_auth(&server);
    let data = pattern(5000, 11);
    let created = tus.create("pi:media:1", data.len(), &sha256_hex(b"another video"));
    let location = created.header("location").expect("Location").to_string();
    assert_eq!(tus.patch(&location, 0, &data[..2500]).status, 204);
    let last = tus.patch(&location, 2500, &data[2500..]);
    assert_eq!(last.status, 460, "{}", last.body);
    assert!(last.body.contains("nothing stored"), "{}", last.body);
    assert_eq!(server.count("SELECT count(*) FROM received"), 0);
    assert_eq!(server.count("SELECT count(*) FROM uploads"), 0);
    assert!(
        server.media_files().is_empty(),
        "{:?}",
        server.media_files()
    );
    assert_eq!(tus.head(&location).status, 404);
    // Created again, with the right hash: stored.
    assert!(
        tus.upload("pi:media:1", &data, 5000)
            .header("upload-result-id")
            .is_some()
    );
}

fn a_repeated_creation_is_one_upload_and_one_row(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let tus = no_auth(&server);
    let data = pattern(4000, 13);
    let sha = sha256_hex(&data);
    let first = tus.create("pi:media:1", data.len(), &sha);
    let location = first.header("location").expect("Location").to_string();
    assert_eq!(tus.patch(&location, 0, &data[..1000]).status, 204);
    // The answer to the first POST was lost: the same upload, where it stands.
    let again = tus.create("pi:media:1", data.len(), &sha);
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.header("location"), Some(location.as_str()));
    assert_eq!(again.offset(), 1000);
    assert_eq!(server.count("SELECT count(*) FROM uploads"), 1);
    let other = tus.create("pi:media:1", data.len() + 1, &sha);
    assert_eq!(
        other.status, 422,
        "the key with another length: {}",
        other.body
    );
    let last = tus.send_from(&location, &data, 1000, 3000);
    let id = last
        .header("upload-result-id")
        .expect("Upload-Result-Id")
        .to_string();
    // The last PATCH's answer lost: sent again (empty, at the end), the same id.
    let repeated = tus.patch(&location, data.len() as u64, b"");
    assert_eq!(repeated.status, 204, "{}", repeated.body);
    assert_eq!(repeated.header("upload-result-id"), Some(id.as_str()));
    // Created again after completion: the row's id, no second upload.
    let done = tus.create("pi:media:1", data.len(), &sha);
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.body, format!("{{\"id\": {id}}}"));
    assert_eq!(done.header("upload-result-id"), Some(id.as_str()));
    assert_eq!(server.count("SELECT count(*) FROM received"), 1);
    assert_eq!(server.count("SELECT count(*) FROM uploads"), 1);
    let media: Vec<_> = server
        .media_files()
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("/."))
        .collect();
    assert_eq!(media.len(), 1, "{media:?}");
    for (name, value) in [
        ("relais_server_uploads_created_total", 1),
        ("relais_server_uploads_completed_total", 1),
        ("relais_server_rows_stored_total", 1),
    ] {
        assert_eq!(metric(&server, name), value, "{name}");
    }
}

/// A counter of `/metrics` (the server runs with `--no-auth`).
fn metric(server: &Server, name: &str) -> u64 {
    let (status, _, text) = common::get_as(&client(), &server.url, "/metrics", None);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {text}"))
}

fn an_expired_upload_is_removed_with_its_file_and_created_afresh(store: StoreKind) {
    // Times are whole seconds: 2 s is at least one second of life.
    let server = Server::start_on(store, &["--upload-expiry-s", "2"]);
    let tus = no_auth(&server);
    let data = pattern(3000, 17);
    let sha = sha256_hex(&data);
    let created = tus.create("pi:media:1", data.len(), &sha);
    let location = created.header("location").expect("Location").to_string();
    assert_eq!(tus.patch(&location, 0, &data[..1000]).status, 204);
    assert_eq!(partial_files(&server).len(), 1);
    assert!(
        wait_for(Duration::from_secs(10), || {
            server.count("SELECT count(*) FROM uploads") == 0 && partial_files(&server).is_empty()
        }),
        "the expired upload and its file are still there"
    );
    assert!(wait_for(Duration::from_secs(2), || server
        .logged("removed 1 expired upload(s)")));
    assert_eq!(metric(&server, "relais_server_uploads_expired_total"), 1);
    assert_eq!(tus.head(&location).status, 404);
    assert_eq!(tus.patch(&location, 1000, &data[1000..]).status, 404);
    let fresh = tus.create("pi:media:1", data.len(), &sha);
    assert_eq!(fresh.status, 201, "{}", fresh.body);
    assert_eq!(fresh.offset(), 0);
    assert_ne!(fresh.header("location"), Some(location.as_str()));
}

fn of_two_racing_patches_one_appends_and_the_other_gets_409(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let tus = no_auth(&server);
    let data = pattern(4 << 20, 19);
    let created = tus.create("pi:media:1", data.len(), &sha256_hex(&data));
    let location = created.header("location").expect("Location").to_string();
    for round in 0..3 {
        let offset = tus.head(&location).offset();
        let (a, b) = std::thread::scope(|s| {
            let chunk = &data[offset as usize..offset as usize + (1 << 20)];
            let a = s.spawn(|| tus.patch(&location, offset, chunk).status);
            let b = s.spawn(|| tus.patch(&location, offset, chunk).status);
            (a.join().expect("a"), b.join().expect("b"))
        });
        let mut statuses = [a, b];
        statuses.sort();
        assert_eq!(statuses, [204, 409], "round {round}");
    }
    let offset = tus.head(&location).offset();
    assert_eq!(offset, 3 << 20);
    let last = tus.send_from(&location, &data, offset as usize, 1 << 20);
    assert!(last.header("upload-result-id").is_some());
    let row = server.row("SELECT media_sha256 FROM media");
    assert_eq!(row[0], sha256_hex(&data), "not corrupted");
}

fn a_64_mib_upload_in_1_mib_patches_keeps_memory_bounded(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let tus = no_auth(&server);
    let before = server.peak_rss_kib();
    let data = pattern(64 << 20, 23);
    let last = tus.upload("pi:media:1", &data, 1 << 20);
    assert!(last.header("upload-result-id").is_some());
    let peak = server.peak_rss_kib();
    eprintln!("server VmHWM: {before} KiB at start, {peak} KiB after a 64 MiB upload");
    assert!(
        peak < before + 8 * 1024,
        "peak RSS {peak} KiB (from {before} KiB) for a 64 MiB upload"
    );
    let row = server.row("SELECT media_size, media_sha256 FROM media");
    assert_eq!(row, vec![(64 << 20).to_string(), sha256_hex(&data)]);
}
