//! The fleet page: one row per agent with its state ([`state`], the README's rules),
//! last contact, rows received today, backlog, failed rows and the configuration hash
//! it holds against its site's current one; sorted by any column and filtered by state
//! and text with plain links and a GET form (no script). Also the site page's list of
//! the agents that pulled its configuration ([`pulled`]).

use std::cmp::Ordering;
use std::collections::HashMap;

use axum::extract::{RawQuery, State};
use maud::{Markup, html};

use super::Console;
use super::error::Error;
use super::form::Form;
use super::layout;
use super::session::LoggedIn;
use crate::http::uploads::now_s;
use crate::store::{FleetEntry, Store};

/// An agent's state, from its latest heartbeat (README, "Fleet console").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgentState {
    // In the order the fleet sorts by state: the worst first.
    Failing,
    Stuck,
    Late,
    NeverSeen,
    Ok,
}

pub const STATES: [AgentState; 5] = [
    AgentState::Ok,
    AgentState::Late,
    AgentState::Stuck,
    AgentState::Failing,
    AgentState::NeverSeen,
];

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Ok => "ok",
            AgentState::Late => "late",
            AgentState::Stuck => "stuck",
            AgentState::Failing => "failing",
            AgentState::NeverSeen => "never-seen",
        }
    }

    fn parse(s: &str) -> Option<AgentState> {
        STATES.into_iter().find(|st| st.as_str() == s)
    }
}

/// Late: no heartbeat for this many push intervals, and never sooner than the console's
/// floor (`--console-late-floor-s`, 3 min), so a short interval and a slow link do not
/// flap.
const LATE_INTERVALS: i64 = 3;
/// Stuck: the oldest unsent row waits longer than this many intervals...
const STUCK_INTERVALS: u64 = 6;
/// ... and longer than this.
const STUCK_MIN_S: u64 = 600;

/// The README's rules, in this order: never seen (no heartbeat); late (the last contact
/// is older than 3 push intervals, at least `late_floor_s`: 3 min by default); failing (the last pass failed or
/// rows failed for good); stuck (in contact, rows waiting, the oldest longer than 6
/// intervals, at least 10 min, and the last pass pushed nothing); else ok.
pub fn state(entry: &FleetEntry, now: i64, late_floor_s: i64) -> AgentState {
    let Some(hb) = &entry.heartbeat else {
        return AgentState::NeverSeen;
    };
    let interval = i64::try_from(hb.interval_s).unwrap_or(i64::MAX).max(1);
    let contact = entry.last_contact.unwrap_or(hb.pass.at);
    if now - contact > (interval.saturating_mul(LATE_INTERVALS)).max(late_floor_s) {
        return AgentState::Late;
    }
    if !hb.pass.ok || hb.tables.iter().any(|t| t.failed > 0) {
        return AgentState::Failing;
    }
    let waited = (hb.interval_s.saturating_mul(STUCK_INTERVALS)).max(STUCK_MIN_S);
    let oldest = hb
        .tables
        .iter()
        .filter(|t| t.backlog > 0)
        .filter_map(|t| t.oldest_unsent_s)
        .max();
    if hb.pass.pushed == 0 && oldest.is_some_and(|s| s > waited) {
        return AgentState::Stuck;
    }
    AgentState::Ok
}

/// A fleet row as shown, computed once per request.
struct Row<'a> {
    entry: &'a FleetEntry,
    state: AgentState,
    site: Option<&'a str>,
    backlog: Option<u64>,
    failed: Option<u64>,
    /// The hash the agent holds: its heartbeat's, else its last pull's.
    held: Option<&'a str>,
    /// `Some(true)` when it is its site's current hash; `None` without a site or hash.
    current: Option<bool>,
}

/// The sortable columns, as `?sort=` names them.
const COLUMNS: [(&str, &str); 8] = [
    ("device", "Device"),
    ("site", "Site"),
    ("state", "State"),
    ("last-contact", "Last contact"),
    ("rows-today", "Rows today"),
    ("backlog", "Backlog"),
    ("failed", "Failed"),
    ("config", "Config"),
];

fn compare(a: &Row, b: &Row, column: &str) -> Ordering {
    match column {
        "site" => a.site.cmp(&b.site),
        "state" => a.state.cmp(&b.state),
        "last-contact" => a.entry.last_contact.cmp(&b.entry.last_contact),
        "rows-today" => a.entry.rows_today.cmp(&b.entry.rows_today),
        "backlog" => a.backlog.cmp(&b.backlog),
        "failed" => a.failed.cmp(&b.failed),
        "config" => a.current.cmp(&b.current),
        _ => Ordering::Equal,
    }
    .then_with(|| a.entry.device_id.cmp(&b.entry.device_id))
}

/// `GET /?sort=COLUMN&dir=asc|desc&state=STATE&q=TEXT`.
pub async fn page<S: Store>(
    State(console): State<Console<S>>,
    session: LoggedIn,
    RawQuery(query): RawQuery,
) -> Result<Markup, Error> {
    let query = Form::parse(query.as_deref().unwrap_or(""));
    let now = now_s();
    let store = &console.app.store;
    let entries = store.fleet(now - now.rem_euclid(86_400)).await?;
    let sites = store.sites().await?;
    let site_of: HashMap<i64, (&str, &str)> = sites
        .iter()
        .map(|s| (s.id, (s.fields.name.as_str(), s.config_version.as_str())))
        .collect();
    let mut rows: Vec<Row> = entries
        .iter()
        .map(|entry| {
            let hb = entry.heartbeat.as_ref();
            let held = hb
                .and_then(|h| h.config.hash.as_deref())
                .or(entry.pulled_hash.as_deref());
            let site = entry.site_id.and_then(|id| site_of.get(&id));
            Row {
                entry,
                state: state(entry, now, console.late_floor_s),
                site: site.map(|s| s.0),
                backlog: hb.map(|h| h.tables.iter().map(|t| t.backlog).sum()),
                failed: hb.map(|h| h.tables.iter().map(|t| t.failed).sum::<u64>() + h.pass.failed),
                held,
                current: site.zip(held).map(|(s, held)| s.1 == held),
            }
        })
        .collect();
    let wanted_state = query.get("state").and_then(AgentState::parse);
    let text = query.value("q").trim().to_lowercase();
    rows.retain(|r| {
        wanted_state.is_none_or(|s| s == r.state)
            && (text.is_empty()
                || r.entry.device_id.to_lowercase().contains(&text)
                || r.site.is_some_and(|s| s.to_lowercase().contains(&text)))
    });
    let sort = COLUMNS
        .iter()
        .map(|c| c.0)
        .find(|c| Some(*c) == query.get("sort"))
        .unwrap_or("state");
    let descending = query.get("dir") == Some("desc");
    rows.sort_by(|a, b| {
        let o = compare(a, b, sort);
        if descending { o.reverse() } else { o }
    });
    let mut counts = [0usize; 5];
    for r in &rows {
        counts[STATES.iter().position(|s| *s == r.state).unwrap_or(0)] += 1;
    }
    let link = |column: &str| {
        let dir = if column == sort && !descending {
            "desc"
        } else {
            "asc"
        };
        let mut href = format!("/?sort={column}&dir={dir}");
        if let Some(s) = wanted_state {
            href.push_str(&format!("&state={}", s.as_str()));
        }
        if !text.is_empty() {
            href.push_str("&q=");
            href.push_str(
                &percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC)
                    .to_string(),
            );
        }
        href
    };
    Ok(layout::page(
        "Fleet",
        &session.csrf,
        html! {
            h1 { "Fleet" }
            p class="muted" {
                (rows.len()) " agent(s) shown: "
                @for (i, s) in STATES.iter().enumerate() {
                    span class={ "state state-" (s.as_str()) } { (counts[i]) " " (s.as_str()) }
                    @if i + 1 < STATES.len() { ", " }
                }
            }
            form id="fleet-filter" class="filter" method="get" action="/" {
                div {
                    label for="state" { "State" }
                    select name="state" id="state" {
                        option value="" { "any" }
                        @for s in STATES {
                            option value=(s.as_str()) selected[wanted_state == Some(s)] { (s.as_str()) }
                        }
                    }
                }
                div {
                    label for="q" { "Device or site" }
                    input type="search" name="q" id="q" value=(text);
                }
                input type="hidden" name="sort" value=(sort);
                input type="hidden" name="dir" value=(if descending { "desc" } else { "asc" });
                div { button type="submit" id="filter-submit" { "Filter" } }
            }
            div class="table-wrap" {
                table id="fleet" {
                    thead { tr {
                        @for (column, label) in COLUMNS {
                            th class={ "c-" (column) } {
                                a href=(link(column)) class=[(column == sort).then_some("sorted")] {
                                    (label)
                                    @if column == sort { (if descending { " ▼" } else { " ▲" }) }
                                }
                            }
                        }
                        th { "Agent" }
                    } }
                    tbody {
                        @for r in &rows {
                            (row(r, now))
                        }
                    }
                }
            }
        },
    ))
}

fn row(r: &Row, now: i64) -> Markup {
    let e = r.entry;
    let current = match r.current {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    let number = |n: Option<u64>| n.map_or("-".to_string(), |n| n.to_string());
    html! {
        tr data-device=(e.device_id) data-state=(r.state.as_str()) data-hash=(r.held.unwrap_or(""))
            data-current=(current) {
            td class="c-device" { a href={ "/devices/" (path_segment(&e.device_id)) } { (e.device_id) } }
            td class="c-site" {
                @match (e.site_id, r.site) {
                    (Some(id), Some(name)) => a href={ "/sites/" (id) } { (name) },
                    _ => span class="muted" { "-" },
                }
            }
            td class={ "c-state state state-" (r.state.as_str()) } { (r.state.as_str()) }
            td class="c-last-contact" title=(layout::absolute(e.last_contact)) {
                (layout::relative(e.last_contact, now))
                br; small { (layout::absolute(e.last_contact)) }
            }
            td class="c-rows-today num" { (e.rows_today) }
            td class="c-backlog num" { (number(r.backlog)) }
            td class="c-failed num" { (number(r.failed)) }
            td class={ "c-config current-" (current) } {
                @match r.held {
                    Some(h) => code title=(h) { (layout::short(h)) },
                    None => span class="muted" { "-" },
                }
                " " (match r.current { Some(true) => "current", Some(false) => "old", None => "" })
            }
            td class="c-agent" { (e.heartbeat.as_ref().map_or("-", |h| h.agent_version.as_str())) }
        }
    }
}

/// A device id as one path segment (it may hold `/`, `:` or spaces).
pub fn path_segment(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The site page's `<ul id="pulled">`: the agents whose last pull (or, without one,
/// heartbeat) holds the site's current hash, and then those holding another one.
pub async fn pulled<S: Store>(
    console: &Console<S>,
    site_id: i64,
    hash: &str,
) -> Result<Markup, Error> {
    let now = now_s();
    let entries = console
        .app
        .store
        .fleet(now - now.rem_euclid(86_400))
        .await?;
    let held = |e: &FleetEntry| {
        e.pulled_hash
            .clone()
            .or_else(|| e.heartbeat.as_ref().and_then(|h| h.config.hash.clone()))
    };
    let of_site: Vec<(&FleetEntry, Option<String>)> = entries
        .iter()
        .filter(|e| e.site_id == Some(site_id))
        .map(|e| (e, held(e)))
        .collect();
    let (current, other): (Vec<_>, Vec<_>) = of_site
        .iter()
        .partition(|(_, h)| h.as_deref() == Some(hash));
    Ok(html! {
        h2 { "Agents holding the current configuration" }
        ul id="pulled" {
            @for (e, _) in &current {
                li data-device=(e.device_id) {
                    a href={ "/devices/" (path_segment(&e.device_id)) } { (e.device_id) }
                    " pulled " (layout::relative(e.pulled_at, now))
                }
            }
        }
        @if current.is_empty() { p class="muted" { "None yet." } }
        @if !other.is_empty() {
            h2 { "Agents holding an older configuration" }
            ul id="not-pulled" {
                @for (e, h) in &other {
                    li data-device=(e.device_id) {
                        a href={ "/devices/" (path_segment(&e.device_id)) } { (e.device_id) }
                        " holds " code { (h.as_deref().map_or("-", layout::short)) }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use relais_wire::heartbeat::{ConfigState, Heartbeat, Pass, TableState};

    const NOW: i64 = 1_700_000_000;

    fn entry(hb: Option<Heartbeat>, last_contact: i64) -> FleetEntry {
        FleetEntry {
            device_id: "pi-1".into(),
            last_contact: hb.as_ref().map(|_| last_contact),
            heartbeat: hb,
            rows_today: 0,
            site_id: None,
            pulled_hash: None,
            pulled_at: None,
        }
    }

    fn heartbeat(
        ok: bool,
        pushed: u64,
        backlog: u64,
        failed: u64,
        oldest: Option<u64>,
    ) -> Heartbeat {
        Heartbeat {
            device_id: None,
            agent_version: "0.1.0".into(),
            interval_s: 60,
            pass: Pass {
                at: NOW,
                ok,
                pushed,
                failed: 0,
                error: None,
            },
            tables: vec![TableState {
                source: "s".into(),
                table: "t".into(),
                backlog,
                failed,
                oldest_unsent_s: oldest,
            }],
            tables_truncated: 0,
            config: ConfigState {
                hash: None,
                last_pull_at: None,
                last_pull_ok: None,
                error: None,
            },
            free_bytes: None,
            media_lane: None,
        }
    }

    #[test]
    fn the_readme_rules() {
        let at = |hb, ago| state(&entry(hb, NOW - ago), NOW, 180);
        assert_eq!(at(None, 0), AgentState::NeverSeen);
        let fine = heartbeat(true, 10, 0, 0, None);
        assert_eq!(at(Some(fine.clone()), 30), AgentState::Ok);
        assert_eq!(
            at(Some(fine.clone()), 180),
            AgentState::Ok,
            "3 min at the least"
        );
        assert_eq!(at(Some(fine.clone()), 181), AgentState::Late);
        let mut slow = fine.clone();
        slow.interval_s = 300;
        assert_eq!(
            at(Some(slow.clone()), 899),
            AgentState::Ok,
            "3 intervals of 5 min"
        );
        assert_eq!(at(Some(slow), 901), AgentState::Late);
        assert_eq!(
            at(Some(heartbeat(false, 0, 0, 0, None)), 10),
            AgentState::Failing
        );
        assert_eq!(
            at(Some(heartbeat(true, 5, 3, 2, Some(5))), 10),
            AgentState::Failing
        );
        assert_eq!(
            at(Some(heartbeat(false, 0, 0, 0, None)), 4000),
            AgentState::Late,
            "late before failing: the failure is old news"
        );
        assert_eq!(
            at(Some(heartbeat(true, 0, 50, 0, Some(601))), 10),
            AgentState::Stuck
        );
        assert_eq!(
            at(Some(heartbeat(true, 0, 50, 0, Some(599))), 10),
            AgentState::Ok,
            "10 min at the least"
        );
        assert_eq!(
            at(Some(heartbeat(true, 7, 50, 0, Some(3600))), 10),
            AgentState::Ok,
            "it moves"
        );
    }
}
