//! The page shell (header, navigation, the logout form), the stylesheet, the headers
//! every console answer carries, and the small formatters the pages share (times,
//! sizes, short hashes).

use std::time::{Duration, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

/// No script, no inline style, no frame: the pages are plain HTML with one stylesheet
/// and the charts as inline SVG (presentation attributes, not styles).
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'";

/// Middleware on the console's routes: the security headers, and no caching of pages
/// that show the fleet to whoever holds the session.
pub async fn headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A logged-in page: the navigation and the logout form (with the session's CSRF
/// token) around `content`.
pub fn page(title: &str, csrf: &str, content: Markup) -> Markup {
    shell(
        title,
        html! {
            header {
                nav {
                    a href="/" { "Fleet" }
                    a href="/sites" { "Sites" }
                }
                form id="logout" method="post" action="/logout" {
                    input type="hidden" name="csrf" value=(csrf);
                    button type="submit" id="logout-submit" { "Log out" }
                }
            }
            main { (content) }
        },
    )
}

/// A page without a session (login, errors).
pub fn bare(title: &str, content: Markup) -> Markup {
    shell(title, html! { main { (content) } })
}

fn shell(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · relais" }
                link rel="icon" href="data:,";
                link rel="stylesheet" href="/console.css";
            }
            body { (body) }
        }
    }
}

pub async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
        .into_response()
}

/// Browsers ask for it whatever the page says; an empty answer keeps their consoles
/// free of a 404.
pub async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `Tue, 15 Nov 2025 08:12:31 GMT` (UTC), or `-` for no time.
pub fn absolute(unix: Option<i64>) -> String {
    match unix {
        Some(t) => httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)),
        None => "-".into(),
    }
}

/// `42 s ago`, `5 min ago`, `3 h ago`, `2 d ago` (or `in ...` for a clock ahead).
pub fn relative(unix: Option<i64>, now: i64) -> String {
    let Some(t) = unix else {
        return "never".into();
    };
    let d = (now - t).abs();
    let amount = match d {
        0..60 => format!("{d} s"),
        60..3600 => format!("{} min", d / 60),
        3600..86_400 => format!("{} h", d / 3600),
        _ => format!("{} d", d / 86_400),
    };
    if t <= now {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

/// `812 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The first 8 digits of a hash: enough to tell versions apart on a screen.
pub fn short(hash: &str) -> &str {
    hash.get(..8).unwrap_or(hash)
}

const STYLESHEET: &str = r#"
:root { --fg: #1d232a; --muted: #5c6670; --line: #d5dbe0; --bg: #f6f8fa;
  --ok: #1a7f37; --late: #9a6700; --stuck: #bc4c00; --failing: #cf222e; --never: #6e7781; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.4 system-ui, sans-serif; color: var(--fg); background: #fff; }
header { display: flex; justify-content: space-between; align-items: center; gap: 1em;
  padding: .5em 1em; background: var(--bg); border-bottom: 1px solid var(--line); }
header nav a { margin-right: 1em; font-weight: 600; }
main { padding: 1em; max-width: 80em; }
a { color: #0969da; }
h1 { font-size: 1.4em; margin: .2em 0 .6em; }
h2 { font-size: 1.15em; margin: 1.4em 0 .5em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th a { color: inherit; text-decoration: none; }
th a.sorted { text-decoration: underline; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted, small { color: var(--muted); }
code, pre { font: 13px/1.35 ui-monospace, monospace; }
pre { background: var(--bg); border: 1px solid var(--line); padding: .6em; overflow-x: auto; }
pre#diff .add, pre#diff ins { display: block; background: #dafbe1; text-decoration: none; }
pre#diff .del, pre#diff del { display: block; background: #ffebe9; text-decoration: none; }
pre#diff .same { display: block; }
.state { font-weight: 600; white-space: nowrap; }
.state-ok { color: var(--ok); } .state-late { color: var(--late); }
.state-stuck { color: var(--stuck); } .state-failing { color: var(--failing); }
.state-never-seen { color: var(--never); }
.current-yes { color: var(--ok); } .current-no { color: var(--failing); }
form.inline { display: inline; }
form.filter { display: flex; flex-wrap: wrap; gap: .5em; align-items: end; margin-bottom: 1em; }
label { display: block; font-weight: 600; margin-top: .6em; }
input, select, textarea, button { font: inherit; padding: .3em .4em; }
input[type=text], input[type=number], textarea, select { width: 100%; max-width: 36em; }
form.filter input, form.filter select { width: auto; }
textarea { min-height: 6em; font-family: ui-monospace, monospace; }
.field-error, .error { color: var(--failing); margin: .2em 0; }
.notice { background: #fff8c5; border: 1px solid #d4a72c; padding: .6em; }
.token { font-family: ui-monospace, monospace; word-break: break-all; }
.chart { width: 100%; max-width: 760px; height: auto; border: 1px solid var(--line); }
.danger { margin-top: 2em; border-top: 1px solid var(--line); padding-top: 1em; }
.table-wrap { overflow-x: auto; }
/* A phone: the fleet table scrolls sideways with the device column kept in view. */
@media (max-width: 720px) {
  main { padding: .5em; }
  th, td { padding: .3em .4em; white-space: nowrap; }
  table#fleet th.c-device, table#fleet td.c-device { position: sticky; left: 0;
    background: #fff; box-shadow: 1px 0 0 var(--line); }
  header { flex-wrap: wrap; }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(relative(Some(100), 142), "42 s ago");
        assert_eq!(relative(Some(100), 100 + 300), "5 min ago");
        assert_eq!(relative(Some(100), 100 + 3 * 86_400), "3 d ago");
        assert_eq!(relative(Some(200), 100), "in 1 min");
        assert_eq!(relative(None, 100), "never");
        assert_eq!(absolute(Some(0)), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(size(812), "812 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(short("12a51431a53fed83"), "12a51431");
        assert_eq!(short("abc"), "abc");
    }
}
