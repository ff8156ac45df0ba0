//! The console in a real browser (Debian's Chromium, headless, through chromedriver:
//! server/tests/common/browser.rs).

mod common;

use common::Server;
use common::browser::Browser;

/// The harness itself: a page loads, its screenshot is written, and an error in the
/// page's console is seen (else "no console error" would prove nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_sees_console_errors_and_saves_screenshots() {
    let server = Server::start();
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
