//! Access against a real relais-server: tokens managed by the binary and stored hashed,
//! a push needs its device's token, `/admin/` and `/metrics` an admin token, tokens never
//! logged, and `--no-auth` opens everything with one warning; on both stores, the
//! `token` commands included.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::{
    Server, StoreAt, StoreKind, client, event, get_as, media, pattern, post_as, sha256_hex,
    wait_for,
};

common::on_both_stores!(
    tokens_are_added_listed_and_revoked_by_the_binary_and_stored_hashed,
    a_push_needs_a_valid_device_token,
    a_device_token_cannot_push_another_devices_rows,
    admin_paths_need_an_admin_token,
    tokens_never_reach_the_log_even_at_trace,
    no_auth_opens_everything_with_one_warning,
);

/// POSTs an event for `device` with `token`; returns the status, the `WWW-Authenticate`
/// header and the body.
fn push(server: &Server, token: Option<&str>, device: &str) -> (u16, Option<String>, String) {
    let mut req = client()
        .post(format!("{}/api/evenements", server.url))
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", format!("{device}:evenement:1"));
    if let Some(token) = token {
        req = req.header("Authorization", format!("Bearer {token}"));
    }
    common::answer(req.send(event(device, 1).as_bytes()).expect("request"))
}

fn tokens_are_added_listed_and_revoked_by_the_binary_and_stored_hashed(store: StoreKind) {
    let server = Server::start_authenticated(store, &[], "info");
    let device = server.token(&["--device", "pi-1", "--note", "gate 3"]);
    let admin = server.token(&["--admin", "ops"]);
    assert_eq!(device.len(), 64, "{device}");
    let list = |s: &Server| String::from_utf8(s.cli(&["token", "list"]).stdout).expect("utf-8");
    let before = list(&server);
    let lines: Vec<&str> = before.lines().collect();
    assert_eq!(lines.len(), 3, "{before}");
    assert!(lines[0].starts_with("id  kind"), "{before}");
    let first: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &first[..5],
        ["1", "device", "pi-1", "gate", "3"],
        "{before}"
    );
    assert!(lines[1].ends_with(" -"), "not revoked: {before}");
    assert_eq!(common::shape(first[5]), "dddd-dd-ddTdd:dd:ddZ", "{before}");
    assert!(lines[2].starts_with("2   admin   -       ops"), "{before}");
    assert!(!before.contains(&device) && !before.contains(&admin));
    assert_eq!(
        server.rows("SELECT sha256 FROM tokens ORDER BY id"),
        [
            [Some(sha256_hex(device.as_bytes()))],
            [Some(sha256_hex(admin.as_bytes()))]
        ]
    );

    let revoked = server.cli(&["token", "revoke", "1"]);
    assert!(revoked.status.success(), "{revoked:?}");
    let after = list(&server);
    assert!(
        !after.lines().nth(1).expect("line").ends_with(" -"),
        "{after}"
    );
    let unknown = server.cli(&["token", "revoke", "99"]);
    assert_eq!(unknown.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("token: no token with id 99"), "{stderr}");
    let neither = server.cli(&["token", "add"]);
    assert_eq!(neither.status.code(), Some(2), "{neither:?}");

    if let StoreAt::Sqlite(db) = &server.store {
        for file in [db.clone(), db.with_extension("db-wal")] {
            let mode = std::fs::metadata(&file)
                .expect("store file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", file.display());
        }
    }
}

fn a_push_needs_a_valid_device_token(store: StoreKind) {
    let server = Server::start_authenticated(store, &[], "info");
    let token = server.token(&["--device", "pi-1"]);
    let admin = server.token(&["--admin", "ops"]);
    let wrong = "0".repeat(64);
    for (what, bearer) in [
        ("no token", None),
        ("an unknown token", Some(wrong.as_str())),
    ] {
        let (status, challenge, body) = push(&server, bearer, "pi-1");
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(challenge.as_deref(), Some("Bearer"), "{what}");
        assert!(body.starts_with("{\"detail\": \"auth: "), "{what}: {body}");
    }
    let (status, _, body) = push(&server, Some(&admin), "pi-1");
    assert_eq!(status, 403, "an admin token pushes nothing: {body}");
    assert_eq!(server.count("SELECT count(*) FROM received"), 0);

    let (status, _, body) = push(&server, Some(&token), "pi-1");
    assert_eq!(status, 201, "{body}");
    assert!(server.cli(&["token", "revoke", "1"]).status.success());
    // The server trusts a token it found for --token-cache-s (2 s): a push for another
    // device, refused either way (403 while the token is trusted, 401 once it is not),
    // tells when the revocation has reached it without storing anything.
    let revoked_at = Instant::now();
    assert!(
        wait_for(Duration::from_secs(5), || push(
            &server,
            Some(&token),
            "pi-2"
        )
        .0 == 401),
        "the revoked token still accepted"
    );
    assert!(revoked_at.elapsed() < Duration::from_secs(4));
    let (status, challenge, body) = push(&server, Some(&token), "pi-1");
    assert_eq!(
        (status, challenge.as_deref()),
        (401, Some("Bearer")),
        "revoked: {body}"
    );
    assert_eq!(server.count("SELECT count(*) FROM received"), 1);
}

fn a_device_token_cannot_push_another_devices_rows(store: StoreKind) {
    let server = Server::start_authenticated(store, &[], "info");
    let token = server.token(&["--device", "pi-1"]);
    let agent = client();
    let blob = STANDARD.encode(pattern(200 * 1024, 3));
    let cases = [
        (
            "another device_id",
            "/api/evenements",
            "pi-1:evenement:1",
            event("pi-2", 1),
        ),
        (
            "another device's key",
            "/api/evenements",
            "pi-2:evenement:1",
            event("pi-1", 1),
        ),
        (
            "a key of a device named like a prefix",
            "/api/evenements",
            "pi-10:evenement:1",
            event("pi-1", 1),
        ),
        (
            "a media body for another device",
            "/api/media",
            "pi-1:media:1",
            media("pi-2", &blob),
        ),
    ];
    for (what, path, key, body) in &cases {
        let (status, answer) = post_as(
            &agent,
            &server.url,
            path,
            Some(&token),
            Some(key),
            body.as_bytes(),
        );
        assert_eq!(status, 403, "{what}: {answer}");
        assert!(
            answer.starts_with("{\"detail\": \"auth: "),
            "{what}: {answer}"
        );
    }
    assert_eq!(server.count("SELECT count(*) FROM received"), 0);
    assert!(
        wait_for(Duration::from_secs(5), || server.media_files().is_empty()),
        "{:?}",
        server.media_files()
    );
    let own = media("pi-1", &blob);
    let (status, answer) = post_as(
        &agent,
        &server.url,
        "/api/media",
        Some(&token),
        Some("pi-1:media:1"),
        own.as_bytes(),
    );
    assert_eq!(status, 201, "{answer}");
    assert_eq!(
        server.count("SELECT count(*) FROM media WHERE device_id = 'pi-1'"),
        1
    );
}

fn admin_paths_need_an_admin_token(store: StoreKind) {
    let server = Server::start_authenticated(store, &[], "info");
    let device = server.token(&["--device", "pi-1"]);
    let admin = server.token(&["--admin", "ops"]);
    let agent = client();
    for path in ["/admin/anything", "/admin", "/metrics"] {
        let (status, challenge, body) = get_as(&agent, &server.url, path, None);
        assert_eq!(
            (status, challenge.as_deref()),
            (401, Some("Bearer")),
            "{path}: {body}"
        );
        assert!(body.starts_with("{\"detail\": \"auth: "), "{path}: {body}");
        let (status, _, body) = get_as(&agent, &server.url, path, Some(&device));
        assert_eq!(status, 403, "{path} with a device token: {body}");
    }
    let (status, _, body) = get_as(&agent, &server.url, "/admin/anything", Some(&admin));
    assert_eq!(status, 404, "behind the gate, no such route: {body}");
    assert!(body.starts_with("{\"detail\": "), "{body}");
    let (status, _, body) = get_as(&agent, &server.url, "/metrics", Some(&admin));
    assert_eq!(status, 200, "{body}");
    for open in ["/health", "/ready"] {
        assert_eq!(get_as(&agent, &server.url, open, None).0, 200, "{open}");
    }
}

fn tokens_never_reach_the_log_even_at_trace(store: StoreKind) {
    let server = Server::start_authenticated(store, &[], "trace");
    let added = server.cli(&["token", "add", "--device", "pi-1"]);
    let device = String::from_utf8(added.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    assert!(!String::from_utf8_lossy(&added.stderr).contains(&device));
    let admin = server.token(&["--admin", "ops"]);
    let unknown = "f".repeat(64);
    assert_eq!(push(&server, Some(&device), "pi-1").0, 201);
    assert_eq!(push(&server, Some(&device), "pi-2").0, 403);
    assert_eq!(push(&server, Some(&unknown), "pi-1").0, 401);
    let agent = client();
    assert_eq!(get_as(&agent, &server.url, "/admin/x", Some(&admin)).0, 404);
    assert_eq!(get_as(&agent, &server.url, "/metrics", Some(&admin)).0, 200);
    assert!(
        wait_for(Duration::from_secs(5), || server
            .log_text()
            .matches("status=")
            .count()
            >= 5),
        "{}",
        server.log_text()
    );
    let log = server.log_text();
    for secret in [&device, &admin, &unknown] {
        assert!(!log.contains(secret.as_str()), "a token in the log:\n{log}");
    }
}

fn no_auth_opens_everything_with_one_warning(store: StoreKind) {
    let server = Server::start_on(store, &[]);
    let warnings = server
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("--no-auth"))
        .count();
    assert_eq!(warnings, 1, "{}", server.log_text());
    let agent = client();
    assert_eq!(push(&server, None, "anyone").0, 201);
    assert_eq!(get_as(&agent, &server.url, "/admin/x", None).0, 404);
    assert_eq!(get_as(&agent, &server.url, "/metrics", None).0, 200);
}
