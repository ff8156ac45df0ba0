//! The heartbeat an agent sends after each event-lane pass (`POST` [`HEARTBEAT_PATH`],
//! README "Heartbeats"): what the server keeps per device to say whether an agent is
//! alive, late, behind or failing. Both ends use this type: the agent builds and
//! [`Heartbeat::encode`]s it, the server [`Heartbeat::parse`]s it.
//!
//! Bounded by construction: every string is cut to a fixed number of characters, the
//! table list to [`MAX_TABLES`], and [`Heartbeat::encode`] drops tables from the end
//! (counting them in `tables_truncated`) until the JSON fits [`MAX_BYTES`], whatever the
//! names hold (an escaped control character takes six bytes). It carries names, counts
//! and times only, never a token or a password.

use miniserde::json::{self, Value};
use miniserde::{Deserialize, Serialize};

/// The endpoint, relative to the backend URL.
pub const HEARTBEAT_PATH: &str = "/api/agent/heartbeat";
/// The encoded body at most; the server refuses larger ones (413).
pub const MAX_BYTES: usize = 16 * 1024;
/// Tables listed at most; the others are counted in `tables_truncated`.
pub const MAX_TABLES: usize = 64;
/// Characters of an error line at most.
pub const MAX_ERROR_CHARS: usize = 300;
/// Characters of a device id at most (a longer one is cut, and refused by a server
/// whose token names the whole id).
pub const MAX_DEVICE_ID_CHARS: usize = 256;
/// Characters of a name (source file, table, version, hash) at most.
pub const MAX_NAME_CHARS: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sending device, as its pushes name it. A server taking tokens goes by the
    /// token's device (and refuses another one here); with `--no-auth` by this.
    pub device_id: Option<String>,
    pub agent_version: String,
    /// The agent's push interval: a heartbeat older than a few of these is late.
    pub interval_s: u64,
    /// The event lane's last pass.
    pub pass: Pass,
    pub tables: Vec<TableState>,
    /// Tables left out of `tables` to keep the bound.
    pub tables_truncated: u64,
    pub config: ConfigState,
    /// Free bytes of the state directory's file system (statvfs); `None` when unknown.
    pub free_bytes: Option<u64>,
    /// The media lane's last pass, when the agent runs one.
    pub media_lane: Option<Pass>,
}

/// One pass of a lane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pass {
    /// Unix seconds of the pass's end.
    pub at: i64,
    pub ok: bool,
    /// Rows the backend took in the pass.
    pub pushed: u64,
    /// Rows given up or rejected in the pass.
    pub failed: u64,
    /// Why the pass failed, one line of at most [`MAX_ERROR_CHARS`] characters.
    pub error: Option<String>,
}

/// One synced table of one source file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableState {
    /// The source file's name, without its directory.
    pub source: String,
    pub table: String,
    /// Rows on the application's side not sent yet.
    pub backlog: u64,
    /// Rows given up or rejected, kept in the state database.
    pub failed: u64,
    /// Age in seconds of the oldest unsent row, when the table has a time column.
    pub oldest_unsent_s: Option<u64>,
}

/// The pulled configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// The hash of the configuration the agent holds.
    pub hash: Option<String>,
    pub last_pull_at: Option<i64>,
    pub last_pull_ok: Option<bool>,
    pub error: Option<String>,
}

/// Why a body is not a heartbeat, naming the member at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatError {
    NotJson,
    NotAnObject,
    /// A required member is missing.
    Missing(&'static str),
    /// A member is present with the wrong type or shape.
    Invalid(&'static str),
}

impl std::fmt::Display for HeartbeatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeartbeatError::NotJson => write!(f, "heartbeat: not valid JSON"),
            HeartbeatError::NotAnObject => write!(f, "heartbeat: expected a JSON object"),
            HeartbeatError::Missing(m) => write!(f, "heartbeat: {m}: missing"),
            HeartbeatError::Invalid(m) => {
                write!(f, "heartbeat: {m}: not of the expected type or shape")
            }
        }
    }
}

impl std::error::Error for HeartbeatError {}

/// Whether `value` reads as a `T` (through its JSON text: miniserde reads only text).
fn reads_as<T: Deserialize>(value: &Value) -> bool {
    json::from_str::<T>(&json::to_string(value)).is_ok()
}

/// Whether a member's value reads as its type.
type Check = fn(&Value) -> bool;

/// The top-level members, whether each is required, and its check.
const MEMBERS: &[(&str, bool, Check)] = &[
    ("device_id", false, reads_as::<Option<String>>),
    ("agent_version", true, reads_as::<String>),
    ("interval_s", true, reads_as::<u64>),
    ("pass", true, reads_as::<Pass>),
    ("tables", true, reads_as::<Vec<TableState>>),
    ("tables_truncated", true, reads_as::<u64>),
    ("config", true, reads_as::<ConfigState>),
    ("free_bytes", false, reads_as::<Option<u64>>),
    ("media_lane", false, reads_as::<Option<Pass>>),
];

impl Heartbeat {
    /// Reads a heartbeat; the error names the first member at fault. Members it does
    /// not know are ignored, so a newer agent may send more.
    pub fn parse(text: &str) -> Result<Heartbeat, HeartbeatError> {
        if let Ok(heartbeat) = json::from_str::<Heartbeat>(text) {
            return Ok(heartbeat);
        }
        // miniserde says only that it failed: find the member by checking each.
        let value: Value = json::from_str(text).map_err(|_| HeartbeatError::NotJson)?;
        let Value::Object(object) = value else {
            return Err(HeartbeatError::NotAnObject);
        };
        for &(name, required, check) in MEMBERS {
            match object.get(name) {
                None if required => return Err(HeartbeatError::Missing(name)),
                Some(member) if !check(member) => return Err(HeartbeatError::Invalid(name)),
                _ => {}
            }
        }
        Err(HeartbeatError::Invalid("(the object)"))
    }

    /// The JSON body, within [`MAX_BYTES`]: strings cut, tables beyond [`MAX_TABLES`]
    /// and then as many as needed from the end counted in `tables_truncated`.
    pub fn encode(mut self) -> String {
        self.cut();
        loop {
            let text = json::to_string(&self);
            if text.len() <= MAX_BYTES || self.tables.is_empty() {
                // With no table left, the cut strings alone are far below the bound
                // (the `bound_holds_for_the_worst_strings` test).
                return text;
            }
            // Half of what is over, at least one: a few rounds at most.
            let over = text.len() - MAX_BYTES;
            let drop = (over / 256).clamp(1, self.tables.len());
            self.tables.truncate(self.tables.len() - drop);
            self.tables_truncated += drop as u64;
        }
    }

    fn cut(&mut self) {
        if let Some(device_id) = &mut self.device_id {
            cut(device_id, MAX_DEVICE_ID_CHARS);
        }
        cut(&mut self.agent_version, MAX_NAME_CHARS);
        self.pass.cut();
        if let Some(media) = &mut self.media_lane {
            media.cut();
        }
        if self.tables.len() > MAX_TABLES {
            self.tables_truncated += (self.tables.len() - MAX_TABLES) as u64;
            self.tables.truncate(MAX_TABLES);
        }
        for t in &mut self.tables {
            cut(&mut t.source, MAX_NAME_CHARS);
            cut(&mut t.table, MAX_NAME_CHARS);
        }
        if let Some(hash) = &mut self.config.hash {
            cut(hash, MAX_NAME_CHARS * 2);
        }
        if let Some(error) = &mut self.config.error {
            *error = one_line(error);
        }
    }

    /// Backlog rows over every listed table.
    pub fn backlog_total(&self) -> u64 {
        self.tables.iter().map(|t| t.backlog).sum()
    }

    /// Failed rows over every listed table.
    pub fn failed_total(&self) -> u64 {
        self.tables.iter().map(|t| t.failed).sum()
    }
}

impl Pass {
    fn cut(&mut self) {
        if let Some(error) = &mut self.error {
            *error = one_line(error);
        }
    }
}

/// `s` on one line (line breaks become spaces), at most [`MAX_ERROR_CHARS`]
/// characters.
pub fn one_line(s: &str) -> String {
    let mut line: String = s
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    cut(&mut line, MAX_ERROR_CHARS);
    line
}

/// Cuts `s` to `max` characters, at a character boundary.
fn cut(s: &mut String, max: usize) {
    if let Some((at, _)) = s.char_indices().nth(max) {
        s.truncate(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(error: Option<String>) -> Pass {
        Pass {
            at: 1_700_000_000,
            ok: error.is_none(),
            pushed: u64::MAX,
            failed: u64::MAX,
            error,
        }
    }

    fn heartbeat(tables: usize, name: &str) -> Heartbeat {
        Heartbeat {
            device_id: Some(name.repeat(1000)),
            agent_version: name.repeat(10),
            interval_s: u64::MAX,
            pass: pass(Some(name.repeat(1000))),
            tables: (0..tables)
                .map(|_| TableState {
                    source: name.repeat(100),
                    table: name.repeat(100),
                    backlog: u64::MAX,
                    failed: u64::MAX,
                    oldest_unsent_s: Some(u64::MAX),
                })
                .collect(),
            tables_truncated: 0,
            config: ConfigState {
                hash: Some(name.repeat(1000)),
                last_pull_at: Some(i64::MIN),
                last_pull_ok: Some(false),
                error: Some(name.repeat(1000)),
            },
            free_bytes: Some(u64::MAX),
            media_lane: Some(pass(Some(name.repeat(1000)))),
        }
    }

    #[test]
    fn bound_holds_for_the_worst_strings() {
        // A control character escapes to six bytes, the worst case per character.
        for name in ["\u{1}", "é", "a", "\u{10348}"] {
            for tables in [0, 1, 64, 1000] {
                let hb = heartbeat(tables, name);
                let text = hb.clone().encode();
                assert!(text.len() <= MAX_BYTES, "{} bytes", text.len());
                let back = Heartbeat::parse(&text).expect("parses");
                assert_eq!(
                    back.tables.len() as u64 + back.tables_truncated,
                    tables as u64
                );
                assert!(back.tables.len() <= MAX_TABLES);
                let error = back.pass.error.expect("error");
                assert_eq!(error.chars().count(), MAX_ERROR_CHARS);
            }
        }
        let mut usual = heartbeat(64, "a");
        for t in &mut usual.tables {
            t.source = "2025_12_18.db".into();
            t.table = "evenement".into();
        }
        let back = Heartbeat::parse(&usual.encode()).expect("parses");
        assert_eq!(back.tables.len(), 64, "64 tables of usual names fit");
    }

    #[test]
    fn parse_names_the_member_at_fault() {
        let good = json::to_string(&heartbeat(1, "a"));
        assert!(Heartbeat::parse(&good).is_ok());
        assert_eq!(Heartbeat::parse("{"), Err(HeartbeatError::NotJson));
        assert_eq!(Heartbeat::parse("[1]"), Err(HeartbeatError::NotAnObject));
        let no_pass = good.replace("\"pass\":", "\"pasx\":");
        assert_eq!(
            Heartbeat::parse(&no_pass),
            Err(HeartbeatError::Missing("pass"))
        );
        let bad_interval = good.replace(
            &format!("\"interval_s\":{}", u64::MAX),
            "\"interval_s\":\"x\"",
        );
        assert_eq!(
            Heartbeat::parse(&bad_interval),
            Err(HeartbeatError::Invalid("interval_s"))
        );
        let media_off = good.replace("\"media_lane\":", "\"media_x\":");
        assert!(Heartbeat::parse(&media_off).is_ok(), "media_lane optional");
    }

    #[test]
    fn one_line_errors() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }
}
