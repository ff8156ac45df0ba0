//! The fleet console against a real relais-server on each store, through a real HTTP
//! client keeping its cookies by hand (as a browser would): login with an admin token
//! and the session cookie's flags, refusals (a device token, no session, no or a wrong
//! CSRF token, another origin), the site and equipment forms with the admin API's
//! validation, the configuration's history and diff, masked secrets, escaping, logout
//! and a revoked token ending its session.

mod common;

use std::collections::HashMap;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use common::{Server, StoreKind};

common::on_both_stores!(
    login_sets_a_strict_http_only_cookie_and_refuses_device_tokens,
    pages_need_a_session_and_forms_their_csrf_token,
    an_invalid_form_shows_the_error_beside_its_field_and_stores_nothing,
    edits_move_the_hash_record_versions_and_diff_them_with_secrets_masked,
    names_are_escaped,
    logout_and_a_revoked_token_end_the_session,
    the_fleet_lists_the_agents_and_filters_them,
);

/// The equipment's PJLink password: it must appear in no page.
const PASSWORD: &str = "pj-s3cr3t-pw";

/// An answer as the tests read it.
struct Page {
    status: u16,
    location: Option<String>,
    set_cookies: Vec<String>,
    headers: HashMap<String, String>,
    body: String,
}

/// A client that keeps its cookies and follows no redirect (the tests check them).
struct Browser {
    agent: ureq::Agent,
    url: String,
    cookies: HashMap<String, String>,
}

impl Browser {
    fn new(server: &Server) -> Browser {
        Browser {
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(0)
                .build()
                .into(),
            url: server.url.clone(),
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn get(&mut self, path: &str) -> Page {
        let req = self
            .agent
            .get(format!("{}{path}", self.url))
            .header("Cookie", self.cookie_header());
        self.read(req.call().expect("GET"))
    }

    fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        self.post_with(path, fields, &[])
    }

    fn post_with(&mut self, path: &str, fields: &[(&str, &str)], headers: &[(&str, &str)]) -> Page {
        let body = fields
            .iter()
            .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
            .collect::<Vec<_>>()
            .join("&");
        let mut req = self
            .agent
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Cookie", self.cookie_header());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.read(req.send(body.as_bytes()).expect("POST"))
    }

    fn read(&mut self, mut resp: ureq::http::Response<ureq::Body>) -> Page {
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let location = header("location");
        let set_cookies: Vec<String> = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        for c in &set_cookies {
            let pair = c.split(';').next().unwrap_or_default();
            if let Some((k, v)) = pair.split_once('=') {
                if v.is_empty() || c.contains("Max-Age=0") {
                    self.cookies.remove(k);
                } else {
                    self.cookies.insert(k.to_string(), v.to_string());
                }
            }
        }
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().expect("body");
        Page {
            status,
            location,
            set_cookies,
            headers,
            body,
        }
    }

    /// Logs in with `token`: the login page first (its double-submit cookie), then the
    /// form.
    fn login(&mut self, token: &str) -> Page {
        let form = self.get("/login");
        assert_eq!(form.status, 200, "{}", form.body);
        let csrf = csrf_of(&form.body);
        self.post("/login", &[("csrf", &csrf), ("token", token)])
    }

    /// The session's CSRF token, from any logged-in page.
    fn csrf(&mut self) -> String {
        csrf_of(&self.get("/sites").body)
    }
}

fn csrf_of(body: &str) -> String {
    let at = body.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    body[at..].split('"').next().expect("value").to_string()
}

/// The text of the element with `id="ID"`, up to the next `<`.
fn text_of(body: &str, id: &str) -> String {
    let at = body
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {body}"));
    let rest = &body[at..];
    let start = rest.find('>').expect("tag end") + 1;
    rest[start..]
        .split('<')
        .next()
        .unwrap_or_default()
        .to_string()
}

fn logged_in(store: StoreKind) -> (Server, Browser, String) {
    let server = Server::start_authenticated(store, &["--token-cache-s", "0"], "info");
    let admin = server.token(&["--admin", "ops"]);
    let mut browser = Browser::new(&server);
    let page = browser.login(&admin);
    assert_eq!(page.status, 303, "{}", page.body);
    (server, browser, admin)
}

/// Creates a site through the console; returns its id.
fn create_site(browser: &mut Browser, name: &str) -> i64 {
    let csrf = browser.csrf();
    let page = browser.post(
        "/sites/new",
        &[
            ("csrf", &csrf),
            ("name", name),
            ("timezone", "Europe/Paris"),
            ("doubt_after_days", "2"),
            ("ok_interval_s", "300"),
            ("ko_interval_s", "60"),
        ],
    );
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(
        text_of(&page.body, "site-token").len(),
        64,
        "the token shown once"
    );
    let at = page.body.find("href=\"/sites/").expect("link to the site") + 13;
    page.body[at..]
        .split('"')
        .next()
        .and_then(|id| id.parse().ok())
        .expect("site id")
}

fn equipment_fields<'a>(
    csrf: &'a str,
    ip: &'a str,
    name: &'a str,
    driver_config: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("csrf", csrf),
        ("ip", ip),
        ("name", name),
        ("building", "A"),
        ("floor", "1"),
        ("room", "101"),
        ("type", "projector"),
        ("driver", "pjlink"),
        ("driver_config", driver_config),
        ("expectations", r#"{"always_on": false}"#),
    ]
}

fn login_sets_a_strict_http_only_cookie_and_refuses_device_tokens(store: StoreKind) {
    let server = Server::start_authenticated(store, &[], "info");
    let admin = server.token(&["--admin", "ops"]);
    let device = server.token(&["--device", "pi-042"]);

    let mut browser = Browser::new(&server);
    let page = browser.login(&device);
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(
        text_of(&page.body, "login-error").contains("device token"),
        "{}",
        page.body
    );
    assert!(!browser.cookies.contains_key("relais_session"));
    let page = browser.login("not-a-token");
    assert_eq!(page.status, 401);
    assert!(text_of(&page.body, "login-error").contains("unknown or revoked"));

    let page = browser.login(&admin);
    assert_eq!((page.status, page.location.as_deref()), (303, Some("/")));
    let session = page
        .set_cookies
        .iter()
        .find(|c| c.starts_with("relais_session="))
        .expect("session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(session.contains(flag), "{session}");
    }
    assert!(!session.contains("Secure"), "plain HTTP: {session}");
    let page = browser.get("/");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("id=\"logout\""));
    assert_eq!(
        page.headers
            .get("content-security-policy")
            .map(String::as_str),
        Some(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'"
        )
    );
    assert_eq!(
        page.headers
            .get("x-content-type-options")
            .map(String::as_str),
        Some("nosniff")
    );
    assert_eq!(
        page.headers.get("cache-control").map(String::as_str),
        Some("no-store")
    );
    assert_eq!(
        page.headers.get("referrer-policy").map(String::as_str),
        Some("same-origin")
    );
    assert!(!page.body.contains("<script"), "no script at all");
    for secret in [&admin, &device] {
        assert!(
            !server.log_text().contains(secret.as_str()),
            "a token in the log"
        );
    }

    // Behind a TLS proxy the cookie is Secure.
    let mut tls = Browser::new(&server);
    let form = tls.get("/login");
    let page = tls.post_with(
        "/login",
        &[("csrf", &csrf_of(&form.body)), ("token", &admin)],
        &[("X-Forwarded-Proto", "https")],
    );
    assert_eq!(page.status, 303);
    assert!(
        page.set_cookies
            .iter()
            .any(|c| c.starts_with("relais_session=") && c.contains("; Secure"))
    );

    // The other routes are as they were: the JSON error layer, the admin gate.
    let api = browser.get("/admin/sites");
    assert_eq!(api.status, 401, "a session cookie opens no admin API");
    assert!(api.body.starts_with("{\"detail\""), "{}", api.body);
    assert_eq!(browser.get("/health").status, 200);
    assert_eq!(browser.get("/favicon.ico").status, 204);
    let css = browser.get("/console.css");
    assert_eq!(css.status, 200);
    assert!(css.headers["content-type"].starts_with("text/css"));
}

fn pages_need_a_session_and_forms_their_csrf_token(store: StoreKind) {
    let (server, mut browser, _admin) = logged_in(store);
    let mut stranger = Browser::new(&server);
    for path in ["/", "/sites", "/sites/new", "/devices/pi-1", "/sites/1"] {
        let page = stranger.get(path);
        assert_eq!(
            (page.status, page.location.as_deref()),
            (303, Some("/login")),
            "{path}"
        );
    }
    let refused = stranger.post("/sites/new", &[("name", "x")]);
    assert_eq!(refused.status, 303, "no session: to the login page");

    let site = [("name", "S"), ("timezone", "UTC")];
    let page = browser.post("/sites/new", &site);
    assert_eq!(page.status, 403);
    assert!(page.body.contains("id=\"csrf-refused\""), "{}", page.body);
    let page = browser.post("/sites/new", &[&[("csrf", "0123")][..], &site].concat());
    assert_eq!(page.status, 403);
    assert!(page.body.contains("id=\"csrf-refused\""));
    let csrf = browser.csrf();
    let page = browser.post_with(
        "/sites/new",
        &[&[("csrf", csrf.as_str())][..], &site].concat(),
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(page.status, 403, "another origin");
    assert_eq!(server.count("SELECT count(*) FROM sites"), 0);

    // The login form's double submit: its field without its cookie is refused.
    let mut fresh = Browser::new(&server);
    let form = fresh.get("/login");
    fresh.cookies.clear();
    let page = fresh.post("/login", &[("csrf", &csrf_of(&form.body)), ("token", "x")]);
    assert_eq!(page.status, 403);
    assert!(page.body.contains("id=\"csrf-refused\""));
}

fn an_invalid_form_shows_the_error_beside_its_field_and_stores_nothing(store: StoreKind) {
    let (server, mut browser, _admin) = logged_in(store);
    let csrf = browser.csrf();
    let page = browser.post(
        "/sites/new",
        &[
            ("csrf", &csrf),
            ("name", "Lyon"),
            ("timezone", "UTC"),
            ("ok_interval_s", "zero"),
        ],
    );
    assert_eq!(page.status, 422, "{}", page.body);
    assert!(
        page.body
            .contains("<p class=\"field-error\" data-field=\"ok_interval_s\">"),
        "{}",
        page.body
    );
    assert!(page.body.contains("value=\"Lyon\""), "the form re-filled");
    assert_eq!(server.count("SELECT count(*) FROM sites"), 0);

    let site = create_site(&mut browser, "Lyon");
    let path = format!("/sites/{site}/equipment/new");
    let config = format!(r#"{{"pjlink": {{"password": "{PASSWORD}"}}}}"#);
    let page = browser.post(&path, &equipment_fields(&csrf, "999.1.1", "P1", &config));
    assert_eq!(page.status, 422, "{}", page.body);
    assert!(page.body.contains("<p class=\"field-error\" data-field=\"ip\">devices.ip: &quot;999.1.1&quot; is not an IP address</p>"), "{}", page.body);
    assert!(
        !page.body.contains(PASSWORD),
        "the re-filled form masks the password"
    );
    let page = browser.post(&path, &equipment_fields(&csrf, "10.0.0.1", "P1", "{nope"));
    assert_eq!(page.status, 422);
    assert!(
        page.body
            .contains("data-field=\"driver_config\">devices.driver_config: is not JSON")
    );
    assert_eq!(server.count("SELECT count(*) FROM devices"), 0);

    let page = browser.post(&path, &equipment_fields(&csrf, "10.0.0.1", "P1", &config));
    assert_eq!(page.status, 303, "{}", page.body);
    let page = browser.post(&path, &equipment_fields(&csrf, "10.0.0.1", "P2", "{}"));
    assert_eq!(page.status, 422, "a duplicate IP");
    assert!(
        page.body
            .contains("data-field=\"ip\">devices.ip: the site already has equipment")
    );
    assert_eq!(server.count("SELECT count(*) FROM devices"), 1);

    // Deleting takes the confirmation box.
    let page = browser.post(&format!("/sites/{site}/delete"), &[("csrf", &csrf)]);
    assert_eq!(page.status, 422);
    assert_eq!(server.count("SELECT count(*) FROM sites"), 1);
    let page = browser.post(
        &format!("/sites/{site}/delete"),
        &[("csrf", &csrf), ("confirm", "yes")],
    );
    assert_eq!(
        (page.status, page.location.as_deref()),
        (303, Some("/sites"))
    );
    assert_eq!(server.count("SELECT count(*) FROM sites"), 0);
    assert_eq!(server.count("SELECT count(*) FROM devices"), 0);
}

fn edits_move_the_hash_record_versions_and_diff_them_with_secrets_masked(store: StoreKind) {
    let (server, mut browser, admin) = logged_in(store);
    let csrf = browser.csrf();
    let site = create_site(&mut browser, "Paris");
    let site_page = format!("/sites/{site}");
    let first = browser.get(&site_page);
    let first_hash = text_of(&first.body, "config-hash");
    assert_eq!(first_hash.len(), 32);

    let config = format!(r#"{{"pjlink": {{"password": "{PASSWORD}", "port": 4352}}}}"#);
    let page = browser.post(
        &format!("{site_page}/equipment/new"),
        &equipment_fields(&csrf, "192.168.1.10", "Projecteur A", &config),
    );
    assert_eq!(page.status, 303, "{}", page.body);
    let second = browser.get(&site_page);
    let second_hash = text_of(&second.body, "config-hash");
    assert_ne!(first_hash, second_hash, "the hash moved");
    assert!(
        second
            .body
            .contains("&quot;password&quot;: &quot;••••••&quot;"),
        "{}",
        second.body
    );
    assert_eq!(
        second.body.matches("<tr data-version=").count(),
        2,
        "{}",
        second.body
    );
    let id = server.row("SELECT id FROM devices")[0].clone();

    // The edit form shows the password masked; sent back so, it keeps the stored one.
    let edit = browser.get(&format!("/equipment/{id}/edit"));
    assert_eq!(edit.status, 200);
    assert!(!edit.body.contains(PASSWORD));
    let masked = r#"{"pjlink": {"password": "••••••", "port": 4353}}"#;
    let page = browser.post(
        &format!("/equipment/{id}/edit"),
        &equipment_fields(&csrf, "192.168.1.10", "Projecteur B", masked),
    );
    assert_eq!(page.status, 303, "{}", page.body);
    let (status, _, json) = common::get_as(
        &common::client(),
        &server.url,
        &format!("/admin/devices/{id}"),
        Some(&admin),
    );
    assert_eq!(status, 200);
    assert!(
        json.contains(PASSWORD) && json.contains("4353") && json.contains("Projecteur B"),
        "{json}"
    );

    let third = browser.get(&site_page);
    assert_eq!(third.body.matches("<tr data-version=").count(), 3);
    let versions: Vec<String> = third
        .body
        .match_indices("<tr data-version=\"")
        .map(|(at, _)| {
            third.body[at + 18..]
                .split('"')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let diff = browser.get(&format!(
        "{site_page}/config/diff?from={}&to={}",
        versions[1], versions[0]
    ));
    assert_eq!(diff.status, 200, "{}", diff.body);
    assert!(
        diff.body.contains(
            "<del class=\"del\">-       &quot;name&quot;: &quot;Projecteur A&quot;,</del>"
        ),
        "{}",
        diff.body
    );
    assert!(
        diff.body.contains(
            "<ins class=\"add\">+       &quot;name&quot;: &quot;Projecteur B&quot;,</ins>"
        )
    );
    assert!(diff.body.contains("&quot;port&quot;: 4353"));
    assert!(diff.body.contains("id=\"diff\""));

    // A site edit that changes nothing keeps the hash and adds no version.
    let fields = [
        ("csrf", csrf.as_str()),
        ("name", "Paris"),
        ("timezone", "Europe/Paris"),
        ("doubt_after_days", "2"),
        ("ok_interval_s", "300"),
        ("ko_interval_s", "60"),
    ];
    assert_eq!(
        browser.post(&format!("{site_page}/edit"), &fields).status,
        303
    );
    assert_eq!(
        browser
            .get(&site_page)
            .body
            .matches("<tr data-version=")
            .count(),
        3
    );
    let mut renamed = fields;
    renamed[1] = ("name", "Paris Nord");
    assert_eq!(
        browser.post(&format!("{site_page}/edit"), &renamed).status,
        303
    );
    let fourth = browser.get(&site_page);
    assert_eq!(fourth.body.matches("<tr data-version=").count(), 4);
    assert_eq!(
        server.row(&format!(
            "SELECT config_version FROM sites WHERE id = {site}"
        ))[0],
        text_of(&fourth.body, "config-hash")
    );

    for path in [
        "/",
        "/sites",
        &site_page,
        &format!("/equipment/{id}/edit"),
        &format!("/sites/{site}/edit"),
    ] {
        assert!(!browser.get(path).body.contains(PASSWORD), "{path}");
    }
    assert!(!server.log_text().contains(PASSWORD));
}

fn names_are_escaped(store: StoreKind) {
    let (_server, mut browser, _admin) = logged_in(store);
    let site = create_site(&mut browser, "<script>alert(1)</script>");
    for path in ["/sites".to_string(), format!("/sites/{site}")] {
        let page = browser.get(&path);
        assert!(!page.body.contains("<script>"), "{path}: {}", page.body);
        assert!(
            page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{path}"
        );
    }
}

fn logout_and_a_revoked_token_end_the_session(store: StoreKind) {
    let (server, mut browser, admin) = logged_in(store);
    let stolen = browser.cookies.clone();
    let csrf = browser.csrf();
    let page = browser.post("/logout", &[("csrf", &csrf)]);
    assert_eq!(
        (page.status, page.location.as_deref()),
        (303, Some("/login"))
    );
    assert!(
        page.set_cookies
            .iter()
            .any(|c| c.starts_with("relais_session=;") && c.contains("Max-Age=0"))
    );
    assert_eq!(browser.get("/").status, 303);
    browser.cookies = stolen;
    assert_eq!(browser.get("/").status, 303, "the old cookie opens nothing");
    assert_eq!(server.count("SELECT count(*) FROM console_sessions"), 0);

    assert_eq!(browser.login(&admin).status, 303);
    assert_eq!(browser.get("/").status, 200);
    let id = server.row("SELECT id FROM tokens WHERE kind = 'admin'")[0].clone();
    assert!(server.cli(&["token", "revoke", &id]).status.success());
    let page = browser.get("/");
    assert_eq!(
        (page.status, page.location.as_deref()),
        (303, Some("/login")),
        "the session died with its token"
    );
    assert_eq!(server.count("SELECT count(*) FROM console_sessions"), 0);
}

fn the_fleet_lists_the_agents_and_filters_them(store: StoreKind) {
    let (server, mut browser, _admin) = logged_in(store);
    server.token(&["--device", "pi-001"]);
    server.token(&["--device", "pi-002"]);
    let page = browser.get("/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<table id=\"fleet\""));
    for device in ["pi-001", "pi-002"] {
        assert!(
            page.body.contains(&format!("<tr data-device=\"{device}\" data-state=\"never-seen\" data-hash=\"\" data-current=\"unknown\">")),
            "{}",
            page.body
        );
    }
    let page = browser.get("/?state=never-seen&q=pi-002");
    assert!(
        page.body.contains("data-device=\"pi-002\"")
            && !page.body.contains("data-device=\"pi-001\"")
    );
    let page = browser.get("/?state=ok");
    assert!(!page.body.contains("<tr data-device="));
    let page = browser.get("/?sort=device&dir=desc");
    let (a, b) = (
        page.body.find("data-device=\"pi-002\""),
        page.body.find("data-device=\"pi-001\""),
    );
    assert!(a < b, "descending");
    let page = browser.get("/devices/pi-001");
    assert_eq!(page.status, 200, "{}", page.body);
    for hook in [
        "<svg id=\"chart-rows\"",
        "<svg id=\"chart-backlog\"",
        "id=\"errors\"",
        "<table id=\"media\"",
    ] {
        assert!(page.body.contains(hook), "{hook}");
    }
}
