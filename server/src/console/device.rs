//! One agent's page: its latest heartbeat, two charts over the last 7 days (rows
//! received per hour as bars, backlog as a line, [`super::svg`]), its last errors (the
//! latest heartbeat's pass, media lane, tables and configuration pull) and its recent
//! media.

use axum::extract::{Path, State};
use maud::{Markup, html};

use super::Console;
use super::error::Error;
use super::layout;
use super::session::LoggedIn;
use super::svg::{self, Point, Shape};
use crate::http::uploads::now_s;
use crate::store::{HourPoint, Store};
use relais_wire::heartbeat::Heartbeat;

const DAYS: i64 = 7;
const MEDIA_SHOWN: u32 = 20;

/// `GET /devices/{device_id}`.
pub async fn page<S: Store>(
    State(console): State<Console<S>>,
    session: LoggedIn,
    Path(device_id): Path<String>,
) -> Result<Markup, Error> {
    let now = now_s();
    let first_hour = now - now.rem_euclid(3600) - (DAYS * 24 - 1) * 3600;
    let store = &console.app.store;
    let history = store.device_history(device_id.clone(), first_hour).await?;
    let media = store.recent_media(device_id.clone(), MEDIA_SHOWN).await?;
    let rows = hourly(&history.hours, first_hour, |h| Some(h.rows_received));
    let backlog = hourly(&history.hours, first_hour, |h| h.backlog);
    let latest = history.latest.as_ref();
    let errors = latest.map(|(_, hb)| errors(hb)).unwrap_or_default();
    Ok(layout::page(
        &device_id,
        &session.csrf,
        html! {
            p { a href="/" { "← Fleet" } }
            h1 { (device_id) }
            @match latest {
                None => p class="muted" { "No heartbeat received from this agent yet." },
                Some((at, hb)) => dl {
                    dt { "Last heartbeat" }
                    dd { (layout::relative(Some(*at), now)) " (" (layout::absolute(Some(*at))) ")" }
                    dt { "Agent" } dd { (hb.agent_version) ", a pass every " (hb.interval_s) " s" }
                    dt { "Last pass" }
                    dd {
                        (if hb.pass.ok { "ok" } else { "failed" }) ", "
                        (hb.pass.pushed) " pushed, " (hb.pass.failed) " failed, "
                        (layout::relative(Some(hb.pass.at), now))
                    }
                    dt { "Configuration" }
                    dd { code { (hb.config.hash.as_deref().unwrap_or("-")) } }
                    @if let Some(free) = hb.free_bytes {
                        dt { "Free space" } dd { (layout::size(free)) }
                    }
                },
            }
            h2 { "Rows received per hour (7 days)" }
            (svg::chart("chart-rows", "Rows received per hour over the last 7 days", "rows", Shape::Bars, &rows))
            h2 { "Backlog (7 days)" }
            (svg::chart("chart-backlog", "Rows waiting on the agent over the last 7 days", "rows", Shape::Line, &backlog))
            h2 { "Last errors" }
            ul id="errors" {
                @for e in &errors { li class="error" { (e) } }
            }
            @if errors.is_empty() { p class="muted" { "None in the latest heartbeat." } }
            @if let Some((_, hb)) = latest {
                @if !hb.tables.is_empty() {
                    h2 { "Tables" }
                    div class="table-wrap" {
                        table id="tables" {
                            thead { tr { th { "Source" } th { "Table" } th class="num" { "Backlog" }
                                th class="num" { "Failed" } th class="num" { "Oldest unsent" } } }
                            tbody {
                                @for t in &hb.tables {
                                    tr {
                                        td { (t.source) } td { (t.table) }
                                        td class="num" { (t.backlog) } td class="num" { (t.failed) }
                                        td class="num" { (t.oldest_unsent_s.map_or("-".into(), |s| format!("{s} s"))) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Recent media" }
            div class="table-wrap" {
                table id="media" {
                    thead { tr { th { "Row" } th { "Received" } th class="num" { "Size" } } }
                    tbody {
                        @for m in &media {
                            tr data-row=(m.id) {
                                td { (m.id) }
                                td { (m.received_at) }
                                td class="num" { (m.size.map_or("-".into(), layout::size)) }
                            }
                        }
                    }
                }
            }
            @if media.is_empty() { p class="muted" { "No media received from this agent." } }
        },
    ))
}

/// One point per hour from `first_hour` to now, `None` where the history has no hour.
fn hourly(
    hours: &[HourPoint],
    first_hour: i64,
    value: impl Fn(&HourPoint) -> Option<u64>,
) -> Vec<Point> {
    (0..DAYS * 24)
        .map(|i| {
            let hour = first_hour + i * 3600;
            let found = hours.iter().find(|h| h.hour == hour);
            Point {
                hour,
                value: found.and_then(&value),
            }
        })
        .collect()
}

/// The errors a heartbeat reports, each as `where: what`.
fn errors(hb: &Heartbeat) -> Vec<String> {
    let pass = hb.pass.error.iter().map(|e| format!("push: {e}"));
    let media = hb
        .media_lane
        .iter()
        .filter_map(|p| p.error.as_ref())
        .map(|e| format!("media: {e}"));
    let config = hb
        .config
        .error
        .iter()
        .map(|e| format!("configuration pull: {e}"));
    let tables = hb.tables.iter().filter(|t| t.failed > 0).map(|t| {
        format!(
            "{}/{}: {} row(s) failed for good",
            t.source, t.table, t.failed
        )
    });
    pass.chain(media).chain(config).chain(tables).collect()
}
