//! The agent's settings: the seed's environment variables (contract section 5), an
//! optional JSON configuration file for everything else, and their validation.
//!
//! Precedence is environment, then file, then built-in defaults. Every setting is
//! validated before the agent does anything; an error names the setting.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;
use miniserde::json::{Number, Value};

use crate::logging::LogSettings;
use crate::media_window::{self, MediaPolicy, Window};

/// A setting that is missing, malformed or out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    pub setting: String,
    pub problem: String,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "setting {}: {}", self.setting, self.problem)
    }
}

impl std::error::Error for SettingsError {}

fn invalid(setting: &str, problem: impl Into<String>) -> SettingsError {
    SettingsError {
        setting: setting.to_string(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Once,
    Periodic,
    Continuous,
}

/// How to talk to the backend.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    pub backend_url: String,
    /// Opening a connection, the TLS handshake included.
    pub connect_timeout: Duration,
    /// Longest time without progress on a connection: no byte of the request leaving
    /// the socket's send queue, or no byte of the answer's body arriving. A long upload
    /// that keeps moving is never cut off, a stalled one is.
    pub io_timeout: Duration,
    /// Longest wait for the answer's headers, counted from when the peer acknowledged
    /// the request's last byte (the backend may take a while to store a large media row).
    pub response_timeout: Duration,
    pub bearer_token: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Event uploads sent at once, each on its own kept-alive connection
    /// (`RELAIS_IN_FLIGHT`, `http.in_flight`): over a 100 ms round trip one at a time is
    /// 10 rows/s whatever the link's bandwidth.
    pub in_flight: usize,
    /// Whether to use the backend's batch endpoint when it offers one (`RELAIS_BATCHES`
    /// `auto`, the default, or `off`; `http.batches` true or false).
    pub batches: bool,
    /// Whether media go as resumable uploads when the backend offers them
    /// (`RELAIS_UPLOADS` `auto`, the default, or `off`; `http.uploads` true or false).
    pub uploads: bool,
}

/// When failed rows are tried again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First delay after a transient failure (server down, timeout, 5xx); doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Delay before a row rejected by the backend (4xx) is tried again: the seed's hourly retry.
    pub permanent_retry: Duration,
}

/// The BLOB column of a table, streamed from SQLite and sent as a base64 field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobSpec {
    /// Table holding the BLOB; its rowid must be the row's `local_id`.
    pub table: String,
    pub column: String,
    /// Top-level payload field carrying the base64 text (`null` for a NULL BLOB).
    pub field: String,
}

/// One table to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// Name recorded in `sync_tracking.table_name` and in the idempotency key.
    pub name: String,
    /// A `SELECT` yielding `local_id` and the payload columns; a dotted alias
    /// (`"capteur.nom"`) becomes a nested object.
    pub query: String,
    /// Path appended to the backend URL, e.g. `/api/evenements`.
    pub endpoint: String,
    pub blob: Option<BlobSpec>,
}

/// The command run after the pulled configuration file is replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct HookSpec {
    pub command: Vec<String>,
    pub timeout: Duration,
}

/// Everything the agent needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The application's database; may be a glob on the file name (`/data/*.db`).
    pub local_db_path: String,
    pub device_id: String,
    /// Where `device_id` came from, for the start-up line: `DEVICE_ID`, the file's key,
    /// or `derived from /etc/machine-id`.
    pub device_id_origin: String,
    pub mode: SyncMode,
    pub interval: Duration,
    pub http: HttpSettings,
    pub retry: RetryPolicy,
    /// The media lane's bandwidth cap and time windows.
    pub media: MediaPolicy,
    pub tables: Vec<TableSpec>,
    /// Rows read from the application's database per short read.
    pub batch_size: usize,
    /// Bytes of BLOB read per SQLite access while streaming media.
    pub blob_chunk_bytes: usize,
    pub state_dir: PathBuf,
    pub log: LogSettings,
    pub site_token: Option<String>,
    pub config_interval: Duration,
    pub agent_config: PathBuf,
    /// Largest configuration body accepted from the backend.
    pub config_max_bytes: u64,
    /// Longest configuration exchange, connection to last byte (`config_pull_timeout_s`).
    pub config_pull_timeout: Duration,
    pub on_config_change: Option<HookSpec>,
    /// How long `relais once` (and `run`, `state reset`) waits for another process to
    /// release the state directory (`state_lock_wait_s`).
    pub state_lock_wait: Duration,
    /// Whether a heartbeat follows each event-lane pass ([`crate::heartbeat`];
    /// `RELAIS_HEARTBEAT` `1`, the default, or `0`; the file's `heartbeat` true or false).
    pub heartbeat: bool,
}

pub const DEFAULT_EVENT_QUERY: &str = "SELECT e.id_evenement AS local_id, e.date AS date, \
     e.id_capteur AS \"capteur.id\", c.nom AS \"capteur.nom\", c.etat AS \"capteur.etat\" \
     FROM evenement e LEFT JOIN capteur c ON c.id_capteur = e.id_capteur";

pub const DEFAULT_MEDIA_QUERY: &str = "SELECT m.id_media AS local_id, m.date AS date, \
     m.id_capteur AS \"capteur.id\", c.nom AS \"capteur.nom\", m.numero_camera AS numero_camera \
     FROM media m LEFT JOIN capteur c ON c.id_capteur = m.id_capteur";

/// The seed's two tables and payloads (contract section 2).
pub fn default_tables() -> Vec<TableSpec> {
    vec![
        TableSpec {
            name: "evenement".into(),
            query: DEFAULT_EVENT_QUERY.into(),
            endpoint: relais_wire::EVENTS_PATH.into(),
            blob: None,
        },
        TableSpec {
            name: "media".into(),
            query: DEFAULT_MEDIA_QUERY.into(),
            endpoint: relais_wire::MEDIA_PATH.into(),
            blob: Some(BlobSpec {
                table: "media".into(),
                column: "video".into(),
                field: "video_data".into(),
            }),
        },
    ]
}

/// The parsed configuration file: a JSON object, looked up by key with errors naming the key.
struct FileConfig {
    root: BTreeMap<String, Value>,
}

impl FileConfig {
    fn read(path: &Path) -> Result<FileConfig, SettingsError> {
        let setting = "RELAIS_CONFIG";
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(setting, format!("cannot read {}: {e}", path.display())))?;
        match miniserde::json::from_str::<Value>(&text) {
            Ok(Value::Object(obj)) => {
                let root = obj.into_iter().collect();
                check_keys(&root, FILE_KEYS, "").map_err(|(key, hint)| {
                    invalid(&key, format!("unknown key in {}{hint}", path.display()))
                })?;
                Ok(FileConfig { root })
            }
            Ok(_) => Err(invalid(
                setting,
                format!("{} is not a JSON object", path.display()),
            )),
            Err(_) => Err(invalid(
                setting,
                format!("{} is not valid JSON", path.display()),
            )),
        }
    }

    fn empty() -> FileConfig {
        FileConfig {
            root: BTreeMap::new(),
        }
    }
}

/// What a key of the configuration file holds, for the unknown-key check: a misspelt key
/// (`tabels`) would otherwise be ignored and its default used without a word.
enum Key {
    /// A value, whose type the parser checks.
    Value,
    Object(&'static [(&'static str, Key)]),
    /// An array of objects with these keys.
    Objects(&'static [(&'static str, Key)]),
}

/// Every key the file may hold; a key the parser reads must be here too (the README's
/// example is checked against it).
const FILE_KEYS: &[(&str, Key)] = &[
    ("agent_config", Key::Value),
    ("backend_url", Key::Value),
    ("batch_size", Key::Value),
    ("blob_chunk_bytes", Key::Value),
    ("config_max_bytes", Key::Value),
    ("config_pull_timeout_s", Key::Value),
    ("config_sync_interval_min", Key::Value),
    ("device_id", Key::Value),
    ("heartbeat", Key::Value),
    ("http", Key::Object(HTTP_KEYS)),
    ("local_db_path", Key::Value),
    ("log_dir", Key::Value),
    ("log_level", Key::Value),
    ("log_max_bytes", Key::Value),
    ("media_lane", Key::Object(MEDIA_LANE_KEYS)),
    ("on_config_change", Key::Object(HOOK_KEYS)),
    ("retry", Key::Object(RETRY_KEYS)),
    ("site_token", Key::Value),
    ("state_dir", Key::Value),
    ("state_lock_wait_s", Key::Value),
    ("sync_interval_minutes", Key::Value),
    ("sync_interval_seconds", Key::Value),
    ("sync_mode", Key::Value),
    ("tables", Key::Objects(TABLE_KEYS)),
];
const HTTP_KEYS: &[(&str, Key)] = &[
    ("batches", Key::Value),
    ("bearer_token", Key::Value),
    ("ca_file", Key::Value),
    ("connect_timeout_s", Key::Value),
    ("in_flight", Key::Value),
    ("io_timeout_s", Key::Value),
    ("response_timeout_s", Key::Value),
    ("uploads", Key::Value),
];
const MEDIA_LANE_KEYS: &[(&str, Key)] = &[
    ("max_bytes_per_sec", Key::Value),
    ("windows", Key::Objects(WINDOW_KEYS)),
];
const WINDOW_KEYS: &[(&str, Key)] = &[
    ("from", Key::Value),
    ("max_bytes_per_sec", Key::Value),
    ("max_media_bytes", Key::Value),
    ("to", Key::Value),
];
const RETRY_KEYS: &[(&str, Key)] = &[
    ("initial_backoff_s", Key::Value),
    ("max_backoff_s", Key::Value),
    ("permanent_retry_s", Key::Value),
];
const TABLE_KEYS: &[(&str, Key)] = &[
    ("blob", Key::Object(BLOB_KEYS)),
    ("endpoint", Key::Value),
    ("name", Key::Value),
    ("query", Key::Value),
];
const BLOB_KEYS: &[(&str, Key)] = &[
    ("column", Key::Value),
    ("field", Key::Value),
    ("table", Key::Value),
];
const HOOK_KEYS: &[(&str, Key)] = &[("command", Key::Value), ("timeout_s", Key::Value)];

/// The first key of `map` (recursively) that `known` does not list: its full path
/// (`tables[0].blob.colum`) and the end of the message (a suggestion, or the known keys).
/// A value of the wrong type is left to the parser, which names it.
fn check_keys(
    map: &BTreeMap<String, Value>,
    known: &[(&str, Key)],
    prefix: &str,
) -> Result<(), (String, String)> {
    for (key, value) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let Some((_, shape)) = known.iter().find(|(k, _)| k == key) else {
            return Err((path, suggest(key, known)));
        };
        match (shape, value) {
            (Key::Object(keys), Value::Object(obj)) => check_keys(obj_map(obj), keys, &path)?,
            (Key::Objects(keys), Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Object(obj) = item {
                        check_keys(obj_map(obj), keys, &format!("{path}[{i}]"))?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// "; did you mean ...?" when a known key is a few edits away, else the known keys.
fn suggest(key: &str, known: &[(&str, Key)]) -> String {
    let closest = known
        .iter()
        .map(|(k, _)| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(1))
        .min();
    match closest {
        Some((_, k)) => format!("; did you mean {k:?}?"),
        None => {
            let names: Vec<&str> = known.iter().map(|(k, _)| *k).collect();
            format!(" (known here: {})", names.join(", "))
        }
    }
}

/// Levenshtein distance, on characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Reads typed values from a JSON object, naming `prefix.key` in errors.
struct Fields<'a> {
    prefix: String,
    map: &'a BTreeMap<String, Value>,
}

impl<'a> Fields<'a> {
    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, SettingsError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(&self.name(key), "must be a string")),
        }
    }

    fn boolean(&self, key: &str) -> Result<Option<bool>, SettingsError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(invalid(&self.name(key), "must be true or false")),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, SettingsError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(Number::U64(n))) => Ok(Some(*n as f64)),
            Some(Value::Number(Number::I64(n))) => Ok(Some(*n as f64)),
            Some(Value::Number(Number::F64(n))) => Ok(Some(*n)),
            Some(_) => Err(invalid(&self.name(key), "must be a number")),
        }
    }

    /// The object under `key`, or an empty one when absent: every member then takes
    /// its default.
    fn section(&self, key: &str) -> Result<Fields<'a>, SettingsError> {
        static EMPTY: BTreeMap<String, Value> = BTreeMap::new();
        Ok(self.object(key)?.unwrap_or(Fields {
            prefix: self.name(key),
            map: &EMPTY,
        }))
    }

    /// A duration in seconds, greater than 0; `default` when absent.
    fn seconds(&self, key: &str, default: f64) -> Result<Duration, SettingsError> {
        match self.number(key)? {
            None => Ok(seconds(default)),
            Some(n) if n > 0.0 => Ok(seconds(n)),
            Some(n) => Err(invalid(
                &self.name(key),
                format!("must be greater than 0, got {n}"),
            )),
        }
    }

    fn object(&self, key: &str) -> Result<Option<Fields<'a>>, SettingsError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(obj)) => Ok(Some(Fields {
                prefix: self.name(key),
                map: obj_map(obj),
            })),
            Some(_) => Err(invalid(&self.name(key), "must be an object")),
        }
    }
}

// miniserde's Object is a BTreeMap<String, Value> underneath and derefs to it.
fn obj_map(obj: &miniserde::json::Object) -> &BTreeMap<String, Value> {
    obj
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Looks a setting up in the environment, then in the file.
struct Source<'a> {
    env: Env<'a>,
    file: Fields<'a>,
}

impl Source<'_> {
    fn env(&self, var: &str) -> Option<String> {
        (self.env)(var).filter(|v| !v.trim().is_empty())
    }

    /// The name an error reports: the variable when the environment sets it, else the
    /// file's key.
    fn origin(&self, var: &str, key: &str) -> String {
        match self.env(var) {
            Some(_) => var.to_string(),
            None => self.file.name(key),
        }
    }

    fn string(&self, var: &str, key: &str) -> Result<Option<String>, SettingsError> {
        match self.env(var) {
            Some(v) => Ok(Some(v)),
            None => self.file.string(key),
        }
    }

    /// A positive number, from the environment (`var`) or the file (`key`).
    fn positive(&self, var: &str, key: &str) -> Result<Option<f64>, SettingsError> {
        let (value, name) = match self.env(var) {
            Some(v) => {
                let parsed = v
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| invalid(var, format!("{v:?} is not a number")))?;
                (Some(parsed), var.to_string())
            }
            None => (self.file.number(key)?, self.file.name(key)),
        };
        match value {
            Some(n) if !(n > 0.0 && n.is_finite()) => {
                Err(invalid(&name, format!("must be greater than 0, got {n}")))
            }
            other => Ok(other),
        }
    }
}

fn seconds(n: f64) -> Duration {
    Duration::from_secs_f64(n.min(1e9))
}

/// Settings whose empty (or blank) value is an error, never a request for the default:
/// `RELAIS_STATE_DIR=` in an env file means someone meant to set it and did not, and the
/// default (another directory, another backend, an id shared by devices) would be taken
/// silently. Each comes with what leaving it unset gives. Not listed, so empty means
/// unset: `SITE_TOKEN`, `RELAIS_BEARER_TOKEN`, `RELAIS_CA_FILE` and `RELAIS_CONFIG`,
/// whose unset value turns a feature off (an env file switches them off with `VAR=`),
/// and systemd's `STATE_DIRECTORY` and `LOGS_DIRECTORY`.
const NOT_EMPTY: &[(&str, &str, &str)] = &[
    (
        "LOCAL_DB_PATH",
        "local_db_path",
        "leave it unset for /data/surveillance.db",
    ),
    (
        "BACKEND_URL",
        "backend_url",
        "leave it unset for http://backend:8000",
    ),
    (
        "DEVICE_ID",
        "device_id",
        "set a name unique to this device, or leave it unset to derive one from /etc/machine-id",
    ),
    ("SYNC_MODE", "sync_mode", "leave it unset for continuous"),
    (
        "SYNC_INTERVAL_MINUTES",
        "sync_interval_minutes",
        "leave it unset for 5",
    ),
    (
        "SYNC_INTERVAL_SECONDS",
        "sync_interval_seconds",
        "leave it unset to use SYNC_INTERVAL_MINUTES",
    ),
    (
        "CONFIG_SYNC_INTERVAL_MIN",
        "config_sync_interval_min",
        "leave it unset for 5",
    ),
    (
        "AGENT_CONFIG",
        "agent_config",
        "leave it unset for /agent/config/config.json",
    ),
    (
        "RELAIS_STATE_DIR",
        "state_dir",
        "leave it unset for $STATE_DIRECTORY, else /var/lib/relais",
    ),
    (
        "RELAIS_LOG_DIR",
        "log_dir",
        "leave it unset for $LOGS_DIRECTORY, else /var/log/relais ('-': stderr only)",
    ),
    ("RELAIS_LOG_LEVEL", "log_level", "leave it unset for info"),
];

/// The first setting of [`NOT_EMPTY`] set to an empty value, in the environment or in
/// the file.
fn reject_empty(src: &Source) -> Result<(), SettingsError> {
    let blank = |v: &str| v.trim().is_empty();
    for (var, key, unset) in NOT_EMPTY {
        let name = match ((src.env)(var), src.file.get(key)) {
            (Some(v), _) if blank(&v) => var.to_string(),
            (None, Some(Value::String(v))) if blank(v) => src.file.name(key),
            _ => continue,
        };
        return Err(invalid(&name, format!("is empty: {unset}")));
    }
    Ok(())
}

impl Settings {
    /// Loads the settings from the process environment and the file named by
    /// `config_path` (the `--config` option) or `RELAIS_CONFIG`.
    pub fn from_env(config_path: Option<&Path>) -> Result<Settings, SettingsError> {
        let env = |k: &str| std::env::var(k).ok();
        Settings::load(&env, config_path)
    }

    /// Loads the settings from `env` (injectable for tests) and the configuration file.
    pub fn load(env: Env<'_>, config_path: Option<&Path>) -> Result<Settings, SettingsError> {
        let path = config_path.map(Path::to_path_buf).or_else(|| {
            env("RELAIS_CONFIG")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        });
        let file = match &path {
            Some(p) => FileConfig::read(p)?,
            None => FileConfig::empty(),
        };
        let src = Source {
            env,
            file: Fields {
                prefix: String::new(),
                map: &file.root,
            },
        };
        reject_empty(&src)?;
        let local_db_path = src
            .string("LOCAL_DB_PATH", "local_db_path")?
            .unwrap_or_else(|| "/data/surveillance.db".into());
        let (device_id, device_id_origin) = parse_device_id(&src)?;
        let settings = Settings {
            local_db_path,
            device_id,
            device_id_origin,
            mode: parse_mode(&src)?,
            interval: parse_interval(&src)?,
            http: parse_http(&src)?,
            retry: parse_retry(&src.file)?,
            media: parse_media_lane(&src)?,
            tables: parse_tables(&src.file)?,
            batch_size: src.file.number("batch_size")?.map_or(Ok(100.0), |n| {
                whole(n, 1.0, 10_000.0, &src.file.name("batch_size"))
            })? as usize,
            blob_chunk_bytes: src
                .file
                .number("blob_chunk_bytes")?
                .map_or(Ok(4.0 * 1024.0 * 1024.0), |n| {
                    whole(n, 3.0 * 1024.0, 64.0 * 1024.0 * 1024.0, "blob_chunk_bytes")
                })? as usize,
            state_dir: dir_setting(
                &src,
                "RELAIS_STATE_DIR",
                "state_dir",
                "STATE_DIRECTORY",
                "/var/lib/relais",
            )?,
            log: parse_log(&src)?,
            site_token: src.string("SITE_TOKEN", "site_token")?,
            config_interval: seconds(
                src.positive("CONFIG_SYNC_INTERVAL_MIN", "config_sync_interval_min")?
                    .unwrap_or(5.0)
                    * 60.0,
            ),
            agent_config: PathBuf::from(
                src.string("AGENT_CONFIG", "agent_config")?
                    .unwrap_or_else(|| "/agent/config/config.json".into()),
            ),
            config_max_bytes: src
                .file
                .number("config_max_bytes")?
                .map_or(Ok(4.0 * 1024.0 * 1024.0), |n| {
                    whole(n, 2.0, 1e9, "config_max_bytes")
                })? as u64,
            config_pull_timeout: src.file.seconds("config_pull_timeout_s", 60.0)?,
            on_config_change: parse_hook(&src.file)?,
            state_lock_wait: src.file.seconds("state_lock_wait_s", 30.0)?,
            heartbeat: parse_heartbeat(&src)?,
        };
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        if self.device_id.chars().any(char::is_control) {
            return Err(invalid("DEVICE_ID", "must not contain control characters"));
        }
        if self.agent_config.file_name().is_none() {
            return Err(invalid("AGENT_CONFIG", "must name a file"));
        }
        if let Some(t) = &self.site_token {
            if t.contains('/') || t.chars().any(|c| c.is_control() || c == ' ') {
                return Err(invalid(
                    "SITE_TOKEN",
                    "must not contain '/', spaces or control characters",
                ));
            }
        }
        Ok(())
    }

    /// The settings with every secret registered for redaction.
    pub fn register_secrets(&self) {
        for s in [&self.http.bearer_token, &self.site_token]
            .into_iter()
            .flatten()
        {
            crate::redact::register(s);
        }
        crate::redact::register_url(&self.http.backend_url);
        // The HTTP client takes a proxy, with its credentials, from these.
        for var in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            if let Ok(proxy) = std::env::var(var) {
                crate::redact::register_url(&proxy);
            }
        }
    }
}

fn whole(n: f64, min: f64, max: f64, name: &str) -> Result<f64, SettingsError> {
    if n.fract() != 0.0 || n < min || n > max {
        return Err(invalid(
            name,
            format!("must be a whole number from {min} to {max}, got {n}"),
        ));
    }
    Ok(n)
}

/// The device id: `DEVICE_ID`, else the file's `device_id`, else derived from the machine
/// id ([`crate::device_id`]); an empty one was refused by [`reject_empty`].
/// `RELAIS_MACHINE_ID_FILE` replaces the machine id's path (tests, image builds).
fn parse_device_id(src: &Source) -> Result<(String, String), SettingsError> {
    let explicit = match src.env("DEVICE_ID") {
        Some(v) => Some((v, "DEVICE_ID".to_string())),
        None => src
            .file
            .string("device_id")?
            .map(|v| (v, src.file.name("device_id"))),
    };
    match explicit {
        Some(found) => Ok(found),
        None => {
            let file = src.env("RELAIS_MACHINE_ID_FILE").map(PathBuf::from);
            crate::device_id::derive(file.as_deref()).map_err(|e| invalid("DEVICE_ID", e))
        }
    }
}

fn parse_mode(src: &Source) -> Result<SyncMode, SettingsError> {
    match src
        .string("SYNC_MODE", "sync_mode")?
        .as_deref()
        .map(str::trim)
    {
        None | Some("continuous") => Ok(SyncMode::Continuous),
        Some("periodic") => Ok(SyncMode::Periodic),
        Some("once") => Ok(SyncMode::Once),
        Some(other) => Err(invalid(
            &src.origin("SYNC_MODE", "sync_mode"),
            format!("{other:?} is not one of once, periodic, continuous"),
        )),
    }
}

fn parse_interval(src: &Source) -> Result<Duration, SettingsError> {
    if let Some(s) = src.positive("SYNC_INTERVAL_SECONDS", "sync_interval_seconds")? {
        return Ok(seconds(s));
    }
    Ok(seconds(
        src.positive("SYNC_INTERVAL_MINUTES", "sync_interval_minutes")?
            .unwrap_or(5.0)
            * 60.0,
    ))
}

fn parse_http(src: &Source) -> Result<HttpSettings, SettingsError> {
    let backend_url = src
        .string("BACKEND_URL", "backend_url")?
        .unwrap_or_else(|| "http://backend:8000".into());
    let backend_url = backend_url.trim().trim_end_matches('/').to_string();
    crate::backend_url::check(&backend_url)
        .map_err(|problem| invalid(&src.origin("BACKEND_URL", "backend_url"), problem))?;
    let http = src.file.section("http")?;
    let ca_file = src
        .env("RELAIS_CA_FILE")
        .or(http.string("ca_file")?)
        .map(PathBuf::from);
    if let Some(ca) = &ca_file {
        if !ca.is_file() {
            return Err(invalid(
                "http.ca_file",
                format!("{} is not a readable file", ca.display()),
            ));
        }
    }
    Ok(HttpSettings {
        backend_url,
        connect_timeout: http.seconds("connect_timeout_s", 10.0)?,
        io_timeout: http.seconds("io_timeout_s", 30.0)?,
        response_timeout: http.seconds("response_timeout_s", 120.0)?,
        bearer_token: src
            .env("RELAIS_BEARER_TOKEN")
            .or(http.string("bearer_token")?),
        ca_file,
        in_flight: parse_in_flight(src, &http)?,
        batches: parse_offered(src, &http, "RELAIS_BATCHES", "batches")?,
        uploads: parse_offered(src, &http, "RELAIS_UPLOADS", "uploads")?,
    })
}

/// A use of something the backend may offer: `auto` (the default) or `off` in `var`,
/// true or false as `key` in the file.
fn parse_offered(src: &Source, http: &Fields, var: &str, key: &str) -> Result<bool, SettingsError> {
    match src.env(var).as_deref().map(str::trim) {
        Some("auto") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(invalid(var, format!("must be auto or off, got {other:?}"))),
        None => Ok(http.boolean(key)?.unwrap_or(true)),
    }
}

fn parse_heartbeat(src: &Source) -> Result<bool, SettingsError> {
    match src.env("RELAIS_HEARTBEAT").as_deref().map(str::trim) {
        Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => Err(invalid(
            "RELAIS_HEARTBEAT",
            format!("must be 1 or 0, got {other:?}"),
        )),
        None => Ok(src.file.boolean("heartbeat")?.unwrap_or(true)),
    }
}

/// Default of `in_flight`: 16 requests cover a 150 ms round trip at 100 rows/s, ten times
/// the service relais replaces, while a fleet's server sees at most 16 connections from a
/// device that catches up (and one from a device that keeps up).
const IN_FLIGHT: f64 = 16.0;

fn parse_in_flight(src: &Source, http: &Fields) -> Result<usize, SettingsError> {
    let n = whole_setting(src, "RELAIS_IN_FLIGHT", http, "in_flight", (1.0, 64.0))?;
    Ok(n.unwrap_or(IN_FLIGHT) as usize)
}

/// A whole number from the variable `var`, else from the file's `key` in `fields`,
/// within `range`.
fn whole_setting(
    src: &Source,
    var: &str,
    fields: &Fields,
    key: &str,
    (min, max): (f64, f64),
) -> Result<Option<f64>, SettingsError> {
    match src.env(var) {
        Some(v) => {
            let n = v
                .trim()
                .parse::<f64>()
                .map_err(|_| invalid(var, format!("{v:?} is not a number")))?;
            whole(n, min, max, var).map(Some)
        }
        None => fields
            .number(key)?
            .map(|n| whole(n, min, max, &fields.name(key)))
            .transpose(),
    }
}

/// The media lane's cap and windows (`media_lane`; the cap also `RELAIS_MEDIA_MAX_BYTES_PER_SEC`).
fn parse_media_lane(src: &Source) -> Result<MediaPolicy, SettingsError> {
    const RATE: (f64, f64) = (1024.0, 1e10);
    let lane = src.file.section("media_lane")?;
    let cap = whole_setting(
        src,
        "RELAIS_MEDIA_MAX_BYTES_PER_SEC",
        &lane,
        "max_bytes_per_sec",
        RATE,
    )?;
    let mut windows = Vec::new();
    match lane.get("windows") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let prefix = lane.name(&format!("windows[{i}]"));
                let Value::Object(obj) = item else {
                    return Err(invalid(&prefix, "must be an object"));
                };
                let w = Fields {
                    prefix,
                    map: obj_map(obj),
                };
                let time = |key: &str| {
                    let text = w
                        .string(key)?
                        .ok_or_else(|| invalid(&w.name(key), "is required"))?;
                    media_window::parse_time_of_day(&text).ok_or_else(|| {
                        invalid(
                            &w.name(key),
                            format!("{text:?} must be a local time of day, HH:MM"),
                        )
                    })
                };
                let bytes = |key: &str, range: (f64, f64)| {
                    w.number(key)?
                        .map(|n| whole(n, range.0, range.1, &w.name(key)).map(|n| n as u64))
                        .transpose()
                };
                windows.push(Window {
                    from: time("from")?,
                    to: time("to")?,
                    max_bytes_per_sec: bytes("max_bytes_per_sec", RATE)?,
                    max_media_bytes: bytes("max_media_bytes", (1.0, 1e15))?,
                });
            }
        }
        Some(_) => {
            return Err(invalid(
                &lane.name("windows"),
                "must be an array of objects",
            ));
        }
    }
    Ok(MediaPolicy {
        max_bytes_per_sec: cap.map(|n| n as u64),
        windows,
        override_windows: false,
    })
}

fn parse_retry(file: &Fields) -> Result<RetryPolicy, SettingsError> {
    let retry = file.section("retry")?;
    let policy = RetryPolicy {
        initial_backoff: retry.seconds("initial_backoff_s", 5.0)?,
        max_backoff: retry.seconds("max_backoff_s", 300.0)?,
        permanent_retry: retry.seconds("permanent_retry_s", 3600.0)?,
    };
    if policy.max_backoff < policy.initial_backoff {
        return Err(invalid(
            "retry.max_backoff_s",
            "must not be smaller than retry.initial_backoff_s",
        ));
    }
    Ok(policy)
}

fn parse_tables(file: &Fields) -> Result<Vec<TableSpec>, SettingsError> {
    let Some(value) = file.get("tables") else {
        return Ok(default_tables());
    };
    let Value::Array(items) = value else {
        return Err(invalid("tables", "must be an array of objects"));
    };
    if items.is_empty() {
        return Err(invalid("tables", "must name at least one table"));
    }
    let mut tables: Vec<TableSpec> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("tables[{i}]");
        let Value::Object(obj) = item else {
            return Err(invalid(&prefix, "must be an object"));
        };
        let t = Fields {
            prefix,
            map: obj_map(obj),
        };
        let table = parse_table(&t)?;
        if tables.iter().any(|o| o.name == table.name) {
            return Err(invalid(
                &t.name("name"),
                format!("{:?} appears twice", table.name),
            ));
        }
        tables.push(table);
    }
    Ok(tables)
}

fn parse_table(t: &Fields) -> Result<TableSpec, SettingsError> {
    let required = |key: &str| {
        t.string(key)?
            .ok_or_else(|| invalid(&t.name(key), "is required"))
    };
    let name = required("name")?;
    if !is_identifier(&name) {
        return Err(invalid(
            &t.name("name"),
            format!("{name:?} must be letters, digits and '_'"),
        ));
    }
    let query = required("query")?;
    let head = query
        .trim_start()
        .get(..6)
        .unwrap_or("")
        .to_ascii_uppercase();
    if head != "SELECT" && !head.starts_with("WITH") {
        return Err(invalid(&t.name("query"), "must be a SELECT statement"));
    }
    let endpoint = required("endpoint")?;
    if !endpoint.starts_with('/') || endpoint.contains(char::is_whitespace) {
        return Err(invalid(
            &t.name("endpoint"),
            format!("{endpoint:?} must be a path starting with '/'"),
        ));
    }
    let blob = match t.object("blob")? {
        None => None,
        Some(b) => {
            let req = |key: &str| {
                b.string(key)?
                    .ok_or_else(|| invalid(&b.name(key), "is required"))
            };
            let spec = BlobSpec {
                table: req("table")?,
                column: req("column")?,
                field: req("field")?,
            };
            for (key, v) in [
                ("table", &spec.table),
                ("column", &spec.column),
                ("field", &spec.field),
            ] {
                if !is_identifier(v) {
                    return Err(invalid(
                        &b.name(key),
                        format!("{v:?} must be letters, digits and '_'"),
                    ));
                }
            }
            Some(spec)
        }
    };
    Ok(TableSpec {
        name,
        query,
        endpoint,
        blob,
    })
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn dir_setting(
    src: &Source,
    var: &str,
    key: &str,
    systemd_var: &str,
    default: &str,
) -> Result<PathBuf, SettingsError> {
    let explicit = src.string(var, key)?;
    let dir = explicit
        .or_else(|| src.env(systemd_var).map(|v| first_path(&v)))
        .unwrap_or_else(|| default.into());
    Ok(PathBuf::from(dir))
}

/// systemd may list several directories separated by ':'; relais uses the first.
fn first_path(v: &str) -> String {
    v.split(':').next().unwrap_or(v).to_string()
}

fn parse_log(src: &Source) -> Result<LogSettings, SettingsError> {
    let level = match src.string("RELAIS_LOG_LEVEL", "log_level")?.as_deref() {
        None => LevelFilter::Info,
        Some(l) => l.parse().map_err(|_| {
            invalid(
                &src.origin("RELAIS_LOG_LEVEL", "log_level"),
                format!("{l:?} is not one of error, warn, info, debug, trace"),
            )
        })?,
    };
    let dir = dir_setting(
        src,
        "RELAIS_LOG_DIR",
        "log_dir",
        "LOGS_DIRECTORY",
        "/var/log/relais",
    )?;
    let max_bytes = src
        .file
        .number("log_max_bytes")?
        .map_or(Ok(2.0 * 1024.0 * 1024.0), |n| {
            whole(n, 8192.0, 1e12, "log_max_bytes")
        })?;
    let dir = if dir.as_os_str() == "-" {
        None
    } else {
        Some(dir)
    };
    Ok(LogSettings {
        level,
        dir,
        max_bytes: max_bytes as u64,
    })
}

fn parse_hook(file: &Fields) -> Result<Option<HookSpec>, SettingsError> {
    let Some(hook) = file.object("on_config_change")? else {
        return Ok(None);
    };
    let command = match hook.get("command") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(invalid(
                    &hook.name("command"),
                    "must be an array of strings",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => {
            return Err(invalid(
                &hook.name("command"),
                "is required: an array of strings, program first",
            ));
        }
    };
    let timeout = hook.seconds("timeout_s", 30.0)?;
    Ok(Some(HookSpec { command, timeout }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MACHINE_ID: &str = "3d1219c7c4c5404aaa1f6d2a48adfda4";

    /// A file of its own per call: tests run in parallel threads of one process.
    fn temp_file(name: &str, text: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "relais-settings-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The settings from `vars` and the file `file`; the machine id is a fixed test one,
    /// never the host's, unless `vars` names another file.
    fn load(vars: &[(&str, &str)], file: Option<&str>) -> Result<Settings, SettingsError> {
        let machine_id = temp_file("machine-id", &format!("{MACHINE_ID}\n"));
        let mut vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        vars.push((
            "RELAIS_MACHINE_ID_FILE".into(),
            machine_id.display().to_string(),
        ));
        let env = move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let path = file.map(|text| temp_file("config.json", text));
        let loaded = Settings::load(&env, path.as_deref());
        for p in path.iter().chain([&machine_id]) {
            let _ = std::fs::remove_file(p);
        }
        loaded
    }

    #[test]
    fn seed_defaults() {
        let s = load(&[], None).unwrap();
        assert_eq!(s.local_db_path, "/data/surveillance.db");
        assert_eq!(s.http.backend_url, "http://backend:8000");
        assert_eq!(s.interval, Duration::from_secs(300));
        assert_eq!(s.device_id, crate::device_id::from_machine_id(MACHINE_ID));
        assert!(s.device_id_origin.starts_with("derived from "));
        assert_eq!(s.mode, SyncMode::Continuous);
        assert_eq!(s.tables, default_tables());
        assert_eq!(s.config_interval, Duration::from_secs(300));
        assert_eq!(s.config_pull_timeout, Duration::from_secs(60));
        assert!(s.site_token.is_none());
    }

    #[test]
    fn environment_overrides_file() {
        let s = load(
            &[("DEVICE_ID", "pi-7"), ("SYNC_INTERVAL_SECONDS", "2")],
            Some(r#"{"device_id": "file", "batch_size": 7}"#),
        )
        .unwrap();
        assert_eq!(s.device_id, "pi-7");
        assert_eq!(s.batch_size, 7);
        assert_eq!(s.interval, Duration::from_secs(2));
    }

    #[test]
    fn in_flight_defaults_to_16_and_is_a_whole_number_from_1_to_64() {
        assert_eq!(load(&[], None).unwrap().http.in_flight, 16);
        let file = Some(r#"{"http": {"in_flight": 4}}"#);
        assert_eq!(load(&[], file).unwrap().http.in_flight, 4);
        let s = load(&[("RELAIS_IN_FLIGHT", "2")], file).unwrap();
        assert_eq!(s.http.in_flight, 2, "the environment wins");
        for bad in ["0", "65", "1.5", "many"] {
            let e = load(&[("RELAIS_IN_FLIGHT", bad)], None).unwrap_err();
            assert_eq!(e.setting, "RELAIS_IN_FLIGHT", "{e}");
        }
        let e = load(&[], Some(r#"{"http": {"in_flight": 0}}"#)).unwrap_err();
        assert_eq!(e.setting, "http.in_flight", "{e}");
    }

    #[test]
    fn heartbeats_are_on_unless_turned_off() {
        assert!(load(&[], None).unwrap().heartbeat);
        assert!(!load(&[("RELAIS_HEARTBEAT", "0")], None).unwrap().heartbeat);
        assert!(
            !load(&[], Some(r#"{"heartbeat": false}"#))
                .unwrap()
                .heartbeat
        );
        let e = load(&[("RELAIS_HEARTBEAT", "no")], None).unwrap_err();
        assert_eq!(e.setting, "RELAIS_HEARTBEAT", "{e}");
    }

    #[test]
    fn uploads_are_on_unless_turned_off() {
        assert!(load(&[], None).unwrap().http.uploads);
        let off = load(&[("RELAIS_UPLOADS", "off")], None).unwrap();
        assert!(!off.http.uploads && off.http.batches);
        let file = Some(r#"{"http": {"uploads": false}}"#);
        assert!(!load(&[], file).unwrap().http.uploads);
        let e = load(&[("RELAIS_UPLOADS", "yes")], None).unwrap_err();
        assert_eq!(e.setting, "RELAIS_UPLOADS", "{e}");
    }

    #[test]
    fn batches_are_on_unless_turned_off() {
        assert!(load(&[], None).unwrap().http.batches);
        assert!(
            !load(&[("RELAIS_BATCHES", "off")], None)
                .unwrap()
                .http
                .batches
        );
        assert!(
            !load(&[], Some(r#"{"http": {"batches": false}}"#))
                .unwrap()
                .http
                .batches
        );
        let e = load(&[("RELAIS_BATCHES", "no")], None).unwrap_err();
        assert_eq!(e.setting, "RELAIS_BATCHES", "{e}");
    }

    #[test]
    fn device_id_is_never_empty_nor_shared_by_default() {
        for (vars, file) in [
            (&[("DEVICE_ID", "")][..], None),
            (&[("DEVICE_ID", "  ")][..], None),
            (&[][..], Some(r#"{"device_id": ""}"#)),
        ] {
            let e = load(vars, file).unwrap_err();
            assert!(
                e.setting.contains("DEVICE_ID") || e.setting == "device_id",
                "{e}"
            );
            assert!(e.problem.starts_with("is empty"), "{e}");
        }
        let s = load(&[("DEVICE_ID", "pi-7")], None).unwrap();
        assert_eq!(
            (s.device_id.as_str(), s.device_id_origin.as_str()),
            ("pi-7", "DEVICE_ID")
        );
        for text in ["uninitialized\n", "", "00000000000000000000000000000000\n"] {
            let f = temp_file("bad-machine-id", text);
            let e = load(
                &[("RELAIS_MACHINE_ID_FILE", &f.display().to_string())],
                None,
            );
            std::fs::remove_file(&f).unwrap();
            assert_eq!(e.unwrap_err().setting, "DEVICE_ID", "{text:?}");
        }
        let e = load(
            &[("RELAIS_MACHINE_ID_FILE", "/nonexistent/machine-id")],
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("set DEVICE_ID"), "{e}");
    }

    #[test]
    fn errors_name_the_setting() {
        let e = load(&[("SYNC_MODE", "sometimes")], None).unwrap_err();
        assert_eq!(e.setting, "SYNC_MODE");
        let e = load(&[("SYNC_INTERVAL_MINUTES", "-1")], None).unwrap_err();
        assert_eq!(e.setting, "SYNC_INTERVAL_MINUTES");
        let e = load(&[("BACKEND_URL", "ftp://x")], None).unwrap_err();
        assert_eq!(e.setting, "BACKEND_URL");
        let e = load(&[], Some(r#"{"http": {"io_timeout_s": "soon"}}"#)).unwrap_err();
        assert_eq!(e.to_string(), "setting http.io_timeout_s: must be a number");
        let e = load(
            &[],
            Some(r#"{"tables": [{"name": "t", "query": "DELETE FROM t", "endpoint": "/x"}]}"#),
        )
        .unwrap_err();
        assert_eq!(e.setting, "tables[0].query");
        let e = load(&[], Some("{not json")).unwrap_err();
        assert_eq!(e.setting, "RELAIS_CONFIG");
    }

    #[test]
    fn the_backend_url_is_checked_whole() {
        for bad in [
            "http://[::1",
            "http://host:65536",
            "http://host/?x=1",
            "http://host#x",
        ] {
            let e = load(&[("BACKEND_URL", bad)], None).unwrap_err();
            assert_eq!(e.setting, "BACKEND_URL", "{bad}: {e}");
        }
        let e = load(&[], Some(r#"{"backend_url": "http://host:0"}"#)).unwrap_err();
        assert_eq!(e.setting, "backend_url", "{e}");
        // A path prefix is kept (the endpoints are appended to it); a trailing '/' is not.
        let s = load(&[("BACKEND_URL", "https://host:8443/sync/")], None).unwrap();
        assert_eq!(s.http.backend_url, "https://host:8443/sync");
        let s = load(&[("BACKEND_URL", "http://user:pw@[::1]:8000")], None).unwrap();
        assert_eq!(s.http.backend_url, "http://user:pw@[::1]:8000");
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        for (text, setting, hint) in [
            (r#"{"tabels": []}"#, "tabels", r#"did you mean "tables"?"#),
            (
                r#"{"http": {"io_timout_s": 1}}"#,
                "http.io_timout_s",
                r#"did you mean "io_timeout_s"?"#,
            ),
            (
                r#"{"tables": [{"name": "m", "query": "SELECT 1 AS local_id", "endpoint": "/m",
                    "blob": {"table": "m", "colum": "v", "field": "f"}}]}"#,
                "tables[0].blob.colum",
                r#"did you mean "column"?"#,
            ),
            (
                r#"{"retry": {"backoff": 1}}"#,
                "retry.backoff",
                "(known here: initial_backoff_s, max_backoff_s, permanent_retry_s)",
            ),
        ] {
            let e = load(&[], Some(text)).unwrap_err();
            assert_eq!(e.setting, setting, "{e}");
            assert!(e.problem.starts_with("unknown key in "), "{e}");
            assert!(e.problem.ends_with(hint), "{e}");
        }
        assert_eq!(edit_distance("tabels", "tables"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("colum", "column"), 1);
    }

    #[test]
    fn the_documented_and_packaged_files_use_known_keys_only() {
        let readme = include_str!("../README.md");
        let section = &readme[readme.find("### The configuration file").unwrap()..];
        let start = section.find("```json\n").unwrap() + 8;
        let example = &section[start..start + section[start..].find("```").unwrap()];
        let Ok(Value::Object(obj)) = miniserde::json::from_str::<Value>(example) else {
            panic!("the README's example is not a JSON object");
        };
        assert_eq!(check_keys(obj_map(&obj), FILE_KEYS, ""), Ok(()));
        load(&[], Some(include_str!("../packaging/relais.json"))).unwrap();
    }

    #[test]
    fn media_windows_parse_and_a_bad_time_is_named() {
        let s = load(
            &[("RELAIS_MEDIA_MAX_BYTES_PER_SEC", "50000")],
            Some(
                r#"{"media_lane": {"windows": [{"from": "22:00", "to": "06:00"},
                    {"from": "06:00", "to": "22:00", "max_bytes_per_sec": 2048, "max_media_bytes": 1000}]}}"#,
            ),
        )
        .unwrap();
        assert_eq!(s.media.max_bytes_per_sec, Some(50_000));
        assert_eq!(s.media.windows.len(), 2);
        assert_eq!(
            (s.media.windows[0].from, s.media.windows[0].to),
            (79_200, 21_600)
        );
        assert_eq!(s.media.windows[1].max_bytes_per_sec, Some(2048));
        assert_eq!(s.media.windows[1].max_media_bytes, Some(1000));
        assert!(s.media.windows[0].max_bytes_per_sec.is_none());
        let e = load(
            &[],
            Some(r#"{"media_lane": {"windows": [{"from": "22h", "to": "06:00"}]}}"#),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"setting media_lane.windows[0].from: "22h" must be a local time of day, HH:MM"#
        );
        let e = load(
            &[],
            Some(r#"{"media_lane": {"windows": [{"from": "22:00"}]}}"#),
        )
        .unwrap_err();
        assert_eq!(e.setting, "media_lane.windows[0].to");
    }

    #[test]
    fn an_empty_setting_is_an_error_never_the_default() {
        for (var, _, _) in NOT_EMPTY {
            for value in ["", "  "] {
                let e = load(&[(var, value)], None).unwrap_err();
                assert_eq!(e.setting, *var, "{var}={value:?}: {e}");
                assert!(e.problem.starts_with("is empty: "), "{e}");
            }
        }
        let e = load(&[], Some(r#"{"state_dir": ""}"#)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "setting state_dir: is empty: leave it unset for $STATE_DIRECTORY, else /var/lib/relais"
        );
        // Empty means unset where unset turns a feature off.
        let s = load(
            &[
                ("SITE_TOKEN", ""),
                ("RELAIS_BEARER_TOKEN", ""),
                ("RELAIS_CA_FILE", ""),
                ("RELAIS_CONFIG", ""),
            ],
            None,
        )
        .unwrap();
        assert!(s.site_token.is_none() && s.http.bearer_token.is_none());
        assert!(s.http.ca_file.is_none());
    }

    #[test]
    fn custom_table_with_blob() {
        let s = load(
            &[],
            Some(r#"{"tables": [{"name": "photo", "query": "SELECT id AS local_id FROM photo", "endpoint": "/api/photos",
                 "blob": {"table": "photo", "column": "data", "field": "image"}}]}"#),
        )
        .unwrap();
        assert_eq!(s.tables.len(), 1);
        assert_eq!(s.tables[0].blob.as_ref().unwrap().field, "image");
    }
}
