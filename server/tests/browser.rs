//! The console in a real browser (Debian's Chromium, headless, through chromedriver:
//! server/tests/common/browser.rs): every page visited is checked for console errors
//! and saved as a screenshot under `target/console-screenshots/<test>/`.

mod common;

use std::time::{Duration, Instant};

use common::browser::{Browser, DESKTOP, Deadline, PHONE};
use common::{Server, StoreKind};

/// The harness itself: a page loads, its screenshot is written, and an error in the
/// page's console is seen (else "no console error" would prove nothing).
#[test]
fn the_harness_sees_console_errors_and_saves_screenshots() {
    let server = Server::start();
    runtime().block_on(harness(&server));
}

async fn harness(server: &Server) {
    let Some(browser) = Browser::start("harness", &server.url).await else {
        return;
    };
    browser.open("/health").await;
    assert!(
        browser.text("body").await.contains("ok"),
        "{}",
        browser.text("body").await
    );
    // A JSON page: what Chromium says of it (a missing favicon, unless the console
    // serves one) is not this test's business.
    browser.console_errors().await;
    let shot = browser.screenshot("health").await;
    let png = std::fs::read(&shot).expect("screenshot");
    assert_eq!(&png[1..4], b"PNG", "{}", shot.display());

    browser
        .script("console.error('relais-probe'); return null;")
        .await;
    let errors = browser.console_errors().await;
    assert!(
        errors.iter().any(|e| e.contains("relais-probe")),
        "{errors:?}"
    );
    assert!(browser.console_errors().await.is_empty(), "read once");
    browser.close().await;
}

/// The device (agent) of the scenario: its device token's id.
const AGENT: &str = "pi-042";
/// The console's "late" rule is no contact for 3 push intervals, never sooner than a
/// floor (server/src/console/fleet.rs, README "Fleet console"): 3 min by default, longer
/// than this test may take; the scenario's server sets it to nothing, so the agent's 1 s
/// interval decides and "late" is waited for in real time.
const NO_LATE_FLOOR: &[&str] = &["--console-late-floor-s", "0"];
/// The agent's push interval, as `Agent::start` sets it.
const AGENT_INTERVAL: Duration = Duration::from_secs(1);
/// The equipment's driver configuration, with a password that no page may show.
const PJLINK: &str = r#"{"pjlink": {"password": "admin-secret", "port": 4352, "timeout_s": 2}}"#;

/// The issue's scenario on the SQLite store: log in (a device token refused), a site and
/// its equipment (an invalid IP refused beside its field, nothing saved; fixed: the hash
/// moves), a real agent that pulls the new hash and pushes rows (the fleet shows it
/// current, ok, with its rows), stopped (late), a `<script>` name shown as text, a form
/// without its CSRF token refused, logout.
#[test]
fn the_console_in_chromium() {
    let server = Server::start_authenticated(StoreKind::Sqlite, NO_LATE_FLOOR, "info");
    runtime().block_on(scenario(&server));
}

async fn scenario(server: &Server) {
    let admin = server.token(&["--admin", "browser-test"]);
    let device_token = server.token(&["--device", AGENT]);
    let Some(b) = Browser::start("console", &server.url).await else {
        return;
    };

    // Not logged in: the console sends the browser to the login page.
    b.open("/").await;
    assert_eq!(b.path().await, "/login");
    b.page("login").await;
    b.fill("#token", &device_token).await;
    b.click("#login-submit").await;
    let refusal = b.text("#login-error").await;
    assert!(refusal.contains("device"), "{refusal}");
    b.page_answered("login-device-token-refused", 403).await;
    log_in(&b, &admin).await;
    let row = format!("#fleet tr[data-device=\"{AGENT}\"]");
    assert_eq!(
        b.attr(&row, "data-state").await.as_deref(),
        Some("never-seen")
    );
    b.page("fleet-never-seen").await;

    // A site, its token shown once.
    b.open("/sites").await;
    b.page("sites-empty").await;
    b.click("#new-site").await;
    b.fill("#name", "Site Paris").await;
    b.fill("#timezone", "Europe/Paris").await;
    b.fill("#doubt_after_days", "2").await;
    b.fill("#ok_interval_s", "300").await;
    b.fill("#ko_interval_s", "60").await;
    b.page("site-form").await;
    b.click("#save").await;
    let site_token = b.text("#site-token").await;
    assert!(site_token.len() >= 16, "{site_token}");
    b.page("site-created").await;
    b.open("/sites").await;
    let site_id = b
        .attr("#sites tr[data-site]", "data-site")
        .await
        .expect("id");
    b.page("sites").await;
    let site_page = format!("/sites/{site_id}");
    b.open(&site_page).await;
    let empty_hash = b.text("#config-hash").await;

    // Equipment with an invalid IP: the error beside the field, nothing saved.
    b.click("#new-equipment").await;
    fill_equipment(&b, "999.1.1.1", "Projecteur Salle A").await;
    b.click("#save").await;
    let error = b.text("p.field-error[data-field=\"ip\"]").await;
    assert!(!error.is_empty());
    assert_eq!(
        b.find("#equipment-form #ip")
            .await
            .prop("value")
            .await
            .expect("value")
            .as_deref(),
        Some("999.1.1.1"),
        "the form is filled again"
    );
    b.page_answered("equipment-form-error", 422).await;
    assert_eq!(
        equipment_count(server, &admin, &site_id),
        0,
        "nothing saved"
    );
    // Fixed: saved, and the site's configuration has a new hash. The form came back
    // with the password masked (never sent back to the browser), so it is typed again.
    b.fill("#ip", "192.168.1.10").await;
    b.fill("#equipment-form #driver_config", PJLINK).await;
    save(&b, &site_page).await;
    assert_eq!(b.find_all("#equipment tr[data-equipment]").await.len(), 1);
    assert_eq!(equipment_count(server, &admin, &site_id), 1);
    let hash = b.text("#config-hash").await;
    assert_ne!(hash, empty_hash, "the hash moved");
    assert!(!b.text("#config").await.contains("admin-secret"), "masked");
    b.page("site").await;
    b.click("#config-diff #diff-submit").await;
    let diff = b.text("#diff").await;
    assert!(diff.contains("192.168.1.10"), "{diff}");
    assert!(b.exists("#diff ins, #diff .add").await, "an added line");
    assert!(!diff.contains("admin-secret"), "masked before the diff");
    b.page("diff").await;

    // A real agent: pulls the new hash with its device token, pushes rows, reports in.
    let agent = Agent::start(server, &device_token, &site_token);
    let deadline = Deadline::after(Duration::from_secs(60), "the agent on the new hash");
    loop {
        b.open("/").await;
        let seen = fleet_row(&b, &row).await;
        if seen.state == "ok" && seen.hash == hash && seen.current == "yes" && seen.rows_today > 0 {
            break;
        }
        if server.count("SELECT count(*) FROM heartbeats_latest") > 0 {
            agent.pull_now();
        }
        deadline.next(&format!("{seen:?}")).await;
    }
    assert!(
        b.text(&format!("{row} .c-site"))
            .await
            .contains("Site Paris")
    );
    b.page("fleet").await;
    b.window(PHONE).await;
    b.open("/").await;
    b.page("fleet-phone").await;
    b.window(DESKTOP).await;
    b.open(&format!("/devices/{AGENT}")).await;
    for hook in [
        "svg#chart-rows",
        "svg#chart-backlog",
        "#errors",
        "table#media",
    ] {
        assert!(b.exists(hook).await, "{hook} on the device page");
    }
    b.page("device").await;
    b.open(&site_page).await;
    assert!(
        b.text("#pulled").await.contains(AGENT),
        "the agent pulled it"
    );
    b.page("site-pulled").await;

    // Stopped: late once 3 push intervals passed without contact, not before.
    agent.stop();
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(30);
    loop {
        b.open("/").await;
        let state = fleet_row(&b, &row).await.state;
        if state == "late" {
            break;
        }
        assert_eq!(state, "ok", "until it is late");
        assert!(Instant::now() < deadline, "never shown late");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Its last heartbeat came at most one interval before the stop.
    assert!(
        stopped.elapsed() >= 2 * AGENT_INTERVAL,
        "late after {:?}: sooner than 3 intervals",
        stopped.elapsed()
    );
    b.page("fleet-late").await;

    // A name with a script: shown as text, never run.
    let xss = "<script>window.__relais_xss=1</script>";
    b.open(&site_page).await;
    b.click("#equipment tr[data-equipment] a").await;
    b.fill("#name", xss).await;
    save(&b, &site_page).await;
    assert!(b.text("#equipment").await.contains(xss), "shown literally");
    assert_eq!(
        b.script("return typeof window.__relais_xss;").await,
        "undefined"
    );
    b.page("site-script-name").await;

    // A form whose CSRF token was taken out: refused.
    b.open(&format!("{site_page}/edit")).await;
    b.script("document.querySelector('#site-form input[name=csrf]').remove(); return null;")
        .await;
    b.fill("#name", "Site Lyon").await;
    b.click("#save").await;
    assert!(b.exists("#csrf-refused").await, "{}", b.path().await);
    b.page_answered("csrf-refused", 403).await;
    b.open(&site_page).await;
    assert!(!b.text("h1").await.contains("Lyon"), "nothing changed");

    // Logged out: the console is closed again.
    b.click("#logout button").await;
    b.open("/").await;
    assert_eq!(b.path().await, "/login");
    b.page("logged-out").await;
    b.close().await;
}

/// Login and the fleet page on PostgreSQL.
#[test]
fn login_and_fleet_on_postgres() {
    // The PostgreSQL helpers use the blocking client: outside the runtime.
    let Some(store) = StoreKind::postgres() else {
        return;
    };
    let server = Server::start_authenticated(store, &[], "info");
    runtime().block_on(postgres_smoke(&server));
}

async fn postgres_smoke(server: &Server) {
    let admin = server.token(&["--admin", "browser-test"]);
    server.token(&["--device", AGENT]);
    let Some(b) = Browser::start("console-postgres", &server.url).await else {
        return;
    };
    b.open("/").await;
    b.page("login").await;
    log_in(&b, &admin).await;
    let row = format!("#fleet tr[data-device=\"{AGENT}\"]");
    assert_eq!(fleet_row(&b, &row).await.state, "never-seen");
    b.page("fleet").await;
    b.close().await;
}

/// The browser's runtime (fantoccini runs its session as a task); the server and the
/// agent are processes and threads of their own.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn log_in(b: &Browser, admin: &str) {
    b.open("/login").await;
    b.fill("#token", admin).await;
    b.click("#login-submit").await;
    assert_eq!(b.path().await, "/");
    assert!(b.exists("table#fleet").await);
    assert!(b.exists("form#logout").await);
}

async fn fill_equipment(b: &Browser, ip: &str, name: &str) {
    for (field, value) in [
        ("ip", ip),
        ("name", name),
        ("building", "Bâtiment A"),
        ("floor", "1"),
        ("room", "Salle 101"),
        ("type", "projector"),
        ("driver_config", PJLINK),
        (
            "expectations",
            r#"{"always_on": false, "alert_after_s": 300}"#,
        ),
    ] {
        b.fill(&format!("#equipment-form #{field}"), value).await;
    }
    b.find("#equipment-form #driver")
        .await
        .select_by_value("pjlink")
        .await
        .expect("driver pjlink");
}

/// Submits the form and expects to land on `path`; else fails with the page's errors.
async fn save(b: &Browser, path: &str) {
    b.click("#save").await;
    let at = b.path().await;
    if at != path {
        let mut errors = Vec::new();
        for e in b.find_all(".field-error, #form-error").await {
            errors.push(e.text().await.unwrap_or_default());
        }
        b.screenshot("save-failed").await;
        let body = b.text("body").await;
        panic!("saved to {at}, not {path}: {errors:?}\n{body}");
    }
}

/// How many devices (equipment) the admin API lists for the site.
fn equipment_count(server: &Server, admin: &str, site_id: &str) -> usize {
    let (status, _, body) = common::get_as(
        &common::client(),
        &server.url,
        &format!("/admin/devices?site_id={site_id}"),
        Some(admin),
    );
    assert_eq!(status, 200, "{body}");
    body.matches("\"ip\"").count()
}

#[derive(Debug)]
struct FleetRow {
    state: String,
    hash: String,
    current: String,
    rows_today: u64,
}

async fn fleet_row(b: &Browser, row: &str) -> FleetRow {
    let attr = async |name: &str| b.attr(row, name).await.unwrap_or_default();
    let rows_today = b.text(&format!("{row} .c-rows-today")).await;
    FleetRow {
        state: attr("data-state").await,
        hash: attr("data-hash").await,
        current: attr("data-current").await,
        rows_today: rows_today
            .chars()
            .filter(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0),
    }
}

/// The relais agent as a process of its own, running what `relais run` runs (its lanes,
/// heartbeats and configuration pull loop; `daemon::run` owns the process's signals and
/// exits it after a stop's grace period, so it cannot run inside this one): this test
/// binary again, running only [`agent_process`], its settings in the environment as the
/// agent's service would give them. A demo database, a 1 s push interval.
struct Agent {
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    pulled: std::cell::Cell<bool>,
}

/// Set in the environment of the agent's process.
const AGENT_PROCESS: &str = "RELAIS_BROWSER_TEST_AGENT";

/// Not a test of its own: the body of the agent's process ([`Agent`]); returns at once
/// in a normal run.
#[test]
fn agent_process() {
    if std::env::var_os(AGENT_PROCESS).is_none() {
        return;
    }
    let env = |k: &str| std::env::var(k).ok();
    let settings = relais::settings::Settings::load(&env, None).expect("agent settings");
    let load = || relais::settings::Settings::load(&env, None);
    std::process::exit(relais::daemon::run(&settings, false, &load));
}

impl Agent {
    fn start(server: &Server, device_token: &str, site_token: &str) -> Agent {
        let dir = common::scratch("agent");
        std::fs::create_dir_all(dir.join("log")).expect("log dir");
        let db = dir.join("surveillance.db");
        let conn = relais::demo::create_app_db(&db, false).expect("app db");
        relais::demo::insert_events(&conn, 40).expect("events");
        drop(conn);
        let child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "agent_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(AGENT_PROCESS, "1")
            .env("LOCAL_DB_PATH", &db)
            .env("BACKEND_URL", &server.url)
            .env("DEVICE_ID", AGENT)
            .env("RELAIS_BEARER_TOKEN", device_token)
            .env("SITE_TOKEN", site_token)
            .env("AGENT_CONFIG", dir.join("config.json"))
            .env(
                "SYNC_INTERVAL_SECONDS",
                AGENT_INTERVAL.as_secs().to_string(),
            )
            .env("RELAIS_HEARTBEAT", "1")
            .env("RELAIS_STATE_DIR", dir.join("state"))
            .env("RELAIS_LOG_DIR", dir.join("log"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn the agent");
        Agent {
            dir,
            child: Some(child),
            pulled: std::cell::Cell::new(false),
        }
    }

    /// SIGUSR1, once: a pass and a configuration pull now rather than after the pull
    /// loop's first delay (10 s). Called once the agent reported in, so its signal
    /// handlers are installed (they are before its first pass).
    fn pull_now(&self) {
        if !self.pulled.replace(true) {
            signal(self.child.as_ref().expect("running"), libc::SIGUSR1);
        }
    }

    /// SIGTERM, as systemd stops it; its exit code is 0.
    fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        let status = child.wait().expect("the agent's exit");
        assert!(status.success(), "the agent's exit: {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill");
}
