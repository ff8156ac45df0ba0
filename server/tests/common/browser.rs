//! A real browser for the console tests: Debian's `chromedriver` as a child process on a
//! free port of 127.0.0.1, driving Debian's Chromium headless through WebDriver
//! (fantoccini). Chromium runs with a fresh profile in a scratch directory and without
//! any of its own network traffic (this machine's network is closed: no sync, no
//! component updates, no QUIC probes), so what it loads is what the page asks for.
//!
//! After each page a test calls [`Browser::page`]: it reads the browser's console log
//! (`goog:loggingPrefs`, chromedriver's `POST /session/{id}/se/log`) and fails on any
//! `SEVERE` entry (a script error, a resource that did not load, a CSP violation), then
//! saves a screenshot to `target/console-screenshots/<test>/<nn>-<page>.png`.
//!
//! chromedriver is started in a process group of its own and that group is killed when
//! the [`Browser`] is dropped, so a failing test leaves no Chromium behind (a panic
//! cannot run the asynchronous end of the session).
//!
//! Without the binaries the test is skipped with a loud line, except under `CI=true`,
//! where that is a failure (as for PostgreSQL, [`super::pg`]).

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use super::{scratch, skip_without, wait_for};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The window of every page but the phone one.
pub const DESKTOP: (u32, u32) = (1280, 900);
/// A phone's screen (an iPhone 12's CSS pixels).
pub const PHONE: (u32, u32) = (390, 844);

pub struct Browser {
    client: Client,
    /// Dropped after `client`: fields drop in declaration order.
    _driver: Driver,
    /// The console's URL, without a trailing slash.
    base: String,
    /// Where this test's screenshots go.
    shots: PathBuf,
    shot: AtomicU32,
}

/// chromedriver's answer to `POST /session/{id}/se/log`: the browser's console entries
/// since the last call. Not in the W3C protocol, so not a fantoccini method.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

impl Browser {
    /// A browser on the console at `base` (`http://127.0.0.1:PORT`), its screenshots
    /// under the directory of `test` (emptied first). `None` (see the module doc)
    /// without Chromium or chromedriver.
    pub async fn start(test: &str, base: &str) -> Option<Browser> {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(bin).exists() {
                let reason = format!(
                    "{bin} not found; install Debian's chromium and chromium-driver packages"
                );
                skip_without("browser", &reason);
                return None;
            }
        }
        let dir = scratch("browser");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group, killed as one with the Chromium processes it starts.
            .process_group(0)
            .spawn()
            .expect("spawn chromedriver");
        // From here the group is killed on every path (Drop), ready or not.
        let driver = Driver {
            child: driver,
            dir: dir.clone(),
        };
        let driver_url = format!("http://127.0.0.1:{port}");
        assert!(
            wait_for(Duration::from_secs(20), || driver_ready(&driver_url)),
            "chromedriver did not answer /status ready on {driver_url}"
        );

        let profile = driver.dir.join("profile");
        let window = format!("--window-size={},{}", DESKTOP.0, DESKTOP.1);
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display()),
                    window,
                ],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let Value::Object(caps) = caps else {
            unreachable!("a JSON object literal")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&driver_url)
            .await
            .unwrap_or_else(|e| {
                let log = std::fs::read_to_string(driver.dir.join("chromedriver.log"))
                    .unwrap_or_default();
                panic!("no Chromium session: {e}\nchromedriver's log:\n{log}")
            });

        let shots = screenshot_root().join(test);
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).expect("screenshot dir");
        eprintln!("browser: screenshots of {test} in {}", shots.display());
        let browser = Browser {
            client,
            _driver: driver,
            base: base.trim_end_matches('/').to_string(),
            shots,
            shot: AtomicU32::new(0),
        };
        browser.window(DESKTOP).await;
        Some(browser)
    }

    /// The WebDriver client, for what the helpers below do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Loads `path` of the console (`/login`) and waits for its load event.
    pub async fn open(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    /// The path (and query) of the page shown.
    pub async fn path(&self) -> String {
        let url = self.client.current_url().await.expect("current URL");
        match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        }
    }

    /// The end of a page: fails on any `SEVERE` console entry since the last call,
    /// then saves the screenshot `<nn>-<name>.png`; returns its path.
    pub async fn page(&self, name: &str) -> PathBuf {
        let errors = self.console_errors().await;
        let path = self.screenshot(name).await;
        assert!(
            errors.is_empty(),
            "page {name} ({}): console errors in Chromium:\n{}",
            self.path().await,
            errors.join("\n")
        );
        path
    }

    /// [`Browser::page`] for a page answered with an error `status` on purpose (a
    /// refused form): Chromium logs the document's own status as a failed resource,
    /// which is the one `SEVERE` entry allowed (any other still fails the test).
    pub async fn page_answered(&self, name: &str, status: u16) -> PathBuf {
        let url = self.client.current_url().await.expect("current URL");
        let own = format!(
            "{url} - Failed to load resource: the server responded with a status of {status}"
        );
        let errors: Vec<String> = self
            .console_errors()
            .await
            .into_iter()
            .filter(|e| !e.contains(&own))
            .collect();
        let path = self.screenshot(name).await;
        assert!(
            errors.is_empty(),
            "page {name} ({url}): console errors in Chromium:\n{}",
            errors.join("\n")
        );
        path
    }

    /// The console entries at level `SEVERE` since the last read (the read empties
    /// chromedriver's buffer), as `level source: message` lines.
    pub async fn console_errors(&self) -> Vec<String> {
        let entries = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("the browser's console log");
        let Value::Array(entries) = entries else {
            panic!("console log: not a list: {entries}")
        };
        entries
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| {
                let line = format!(
                    "{} {}: {}",
                    e["level"].as_str().unwrap_or("?"),
                    e["source"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("?")
                );
                eprintln!("browser console: {line}");
                line
            })
            .collect()
    }

    /// Saves the viewport as `<nn>-<name>.png` in the test's directory.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let n = self.shot.fetch_add(1, Ordering::Relaxed) + 1;
        let path = self.shots.join(format!("{n:02}-{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("browser: screenshot {}", path.display());
        path
    }

    /// Resizes the window so that the page's viewport is `width` × `height` CSS pixels
    /// (headless Chromium still counts a window frame around the viewport: the first
    /// try measures it).
    pub async fn window(&self, (width, height): (u32, u32)) {
        let (mut w, mut h) = (width, height);
        for _ in 0..2 {
            self.client
                .set_window_size(w, h)
                .await
                .expect("window size");
            let inner = self
                .script("return [window.innerWidth, window.innerHeight];")
                .await;
            let (iw, ih) = (
                inner[0].as_u64().expect("innerWidth") as u32,
                inner[1].as_u64().expect("innerHeight") as u32,
            );
            if (iw, ih) == (width, height) {
                return;
            }
            w += width.saturating_sub(iw);
            h += height.saturating_sub(ih);
        }
        panic!("the viewport is not {width}x{height}");
    }

    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element,
            Err(e) => panic!("{css} on {}: {e}", self.path().await),
        }
    }

    pub async fn find_all(&self, css: &str) -> Vec<fantoccini::elements::Element> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
    }

    pub async fn exists(&self, css: &str) -> bool {
        !self.find_all(css).await.is_empty()
    }

    /// The rendered text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.find(css)
            .await
            .text()
            .await
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    /// Attribute `name` of the first element matching `css`.
    pub async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.find(css)
            .await
            .attr(name)
            .await
            .unwrap_or_else(|e| panic!("{name} of {css}: {e}"))
    }

    /// Replaces the value of the field matching `css` by typing `value`.
    pub async fn fill(&self, css: &str, value: &str) {
        let field = self.find(css).await;
        field
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        field
            .send_keys(value)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Clicks the element matching `css` (a link or a submit button) and waits until
    /// the page it loads is there. WebDriver's click does not wait for a form's POST
    /// to answer, and the new page may have the old one's URL (a refused form): the old
    /// document is marked, and the wait is for a complete document without the mark.
    pub async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.script("window.__relais_old_page = true; return null;")
            .await;
        element
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
        let deadline = Deadline::after(Duration::from_secs(10), &format!("the page {css} loads"))
            .every(Duration::from_millis(20));
        loop {
            let state = self
                .client
                .execute(
                    "return window.__relais_old_page === undefined \
                     && document.readyState === 'complete';",
                    Vec::new(),
                )
                .await;
            // An error: the script ran while the document was being replaced.
            if let Ok(Value::Bool(true)) = state {
                return;
            }
            deadline.next(&format!("{state:?}")).await;
        }
    }

    /// Runs `script` (a function body) in the page; its `return` value.
    pub async fn script(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// Ends the session (Chromium quits), then stops chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// The chromedriver child, leader of its process group, and its scratch directory
/// (Chromium's profile, chromedriver's log): dropping it kills the group (chromedriver
/// and the Chromium processes it started), reaps chromedriver, then removes the
/// directory.
struct Driver {
    child: Child,
    dir: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group our own child leads (process_group(0)).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// chromedriver's `GET /status` says `ready`.
fn driver_ready(url: &str) -> bool {
    let Ok(mut resp) = super::client().get(format!("{url}/status")).call() else {
        return false;
    };
    resp.body_mut()
        .read_to_string()
        .ok()
        .and_then(|body| serde_json::from_str::<Value>(&body).ok())
        .is_some_and(|status| status["value"]["ready"] == true)
}

/// `target/console-screenshots`: next to the tests' scratch directory
/// (`CARGO_TARGET_TMPDIR` is `<target dir>/tmp`), so `CARGO_TARGET_DIR` moves it too.
pub fn screenshot_root() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("console-screenshots")
}

/// A deadline for a condition polled on pages (the page is loaded again each time).
pub struct Deadline {
    what: String,
    end: Instant,
    pause: Duration,
}

impl Deadline {
    pub fn after(timeout: Duration, what: &str) -> Deadline {
        Deadline {
            what: what.to_string(),
            end: Instant::now() + timeout,
            pause: Duration::from_millis(250),
        }
    }

    /// The same, looking again every `pause`.
    pub fn every(self, pause: Duration) -> Deadline {
        Deadline { pause, ..self }
    }

    /// Fails with `last` (what the page showed) past the deadline; else waits a
    /// moment before the next look.
    pub async fn next(&self, last: &str) {
        assert!(
            Instant::now() < self.end,
            "timed out waiting for {}; last seen: {last}",
            self.what
        );
        tokio::time::sleep(self.pause).await;
    }
}
