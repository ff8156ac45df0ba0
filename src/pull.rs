//! The configuration pull (seed 001, contract section 3): fetches
//! `GET {BACKEND_URL}/config/{SITE_TOKEN}`, and when the served `config_hash` differs
//! from the hash of the file on disk, validates the body and replaces `AGENT_CONFIG`
//! atomically (mode 0600, previous version kept as `<name>.prev`), then runs the
//! optional `on_config_change` hook. Every pull ends with the contract's sync status
//! written atomically to `state_dir/config_status.json`. The whole exchange with the
//! backend is cut after `config_pull_timeout_s`, so a server that trickles its answer
//! cannot hold a pull (or `relais once`) for longer.
//!
//! The hook is owed until it succeeds: "hook due" is recorded in the status file before
//! the file is replaced, so a failed hook or a power cut before it leaves it due, and it
//! runs again at every pull (the configuration unchanged or not) and, in `run`, with
//! backoff in between. While it is due, `last_sync_ok` is false and `last_sync_error`
//! says why: the sync is the device running the backend's configuration, and a consumer
//! of the contract's fields alone must not read "OK" while the collector still runs the
//! old one. `hook_due` and `hook_error` tell a hook failure from a failed fetch.
//!
//! This module owns the puller, its loop ([`run_loop`], on its own thread with its own
//! [`Transport`], so a hanging config endpoint never holds up the push), the status
//! file and the hook. Nothing here can stop the push: every failure keeps the current
//! file and becomes a logged, recorded error.
//!
//! The hash held is derived from the file on disk before every pull, never trusted
//! from memory: the file's `config_hash` member counts only if the file is intact,
//! i.e. its bytes are the ones this agent last wrote (MD5 recorded in the status file)
//! or its content still hashes to its `config_hash` (as the backend computes it). A
//! hand-edited, truncated or missing file therefore holds no hash, and the next pull
//! restores it. The byte check matters with backends whose hash covers a projection
//! of the configuration rather than the served object (the seed's does): without it
//! such a file would look edited and be rewritten at every pull.
//!
//! The site token is a secret: the request path holds it, so no log line or error is
//! built from the path or the URL.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use miniserde::json::{Object, Value};

use crate::backoff::Backoff;
use crate::config_hash::{self, HASH_MEMBER, md5_hex};
use crate::settings::{HookSpec, Settings};
use crate::transport::{Transport, server_detail};
use crate::{atomic_file, clock, json, redact};

/// The seed's delay between start and the first pull.
pub const FIRST_PULL_DELAY: Duration = Duration::from_secs(10);
/// Name of the status file in the state directory.
pub const STATUS_FILE: &str = "config_status.json";
/// The configuration holds device passwords.
const CONFIG_MODE: u32 = 0o600;
/// The status holds hashes and redacted errors only; `relais status` may run as
/// another user.
const STATUS_MODE: u32 = 0o644;
/// Longest `config_hash` accepted; it travels back in `If-None-Match`.
const MAX_HASH_LEN: usize = 128;

/// Why a pull failed. The configuration file is untouched in every case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullError {
    /// No answer: connection refused, DNS, timeout, connection reset.
    Network(String),
    Unauthorized,
    NotFound,
    /// Any other unexpected status, with the server's explanation when it gave one.
    Status {
        status: u16,
        detail: String,
    },
    TooLarge {
        max_bytes: u64,
    },
    NotJson,
    /// `offset`: where the first invalid byte is.
    NotUtf8 {
        offset: usize,
    },
    /// JSON, but not a configuration (the message names the member, never a value).
    Shape(String),
    /// The answer was fine but the file could not be replaced.
    Write(String),
    /// The puller cannot be built (no token, bad CA file).
    Setup(String),
}

impl fmt::Display for PullError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PullError::Network(why) => write!(f, "config pull: {why}"),
            PullError::Unauthorized => write!(
                f,
                "config pull: the backend does not know this site token (401): check SITE_TOKEN"
            ),
            PullError::NotFound => write!(
                f,
                "config pull: the backend has no configuration endpoint or site for this token (404)"
            ),
            PullError::Status { status, detail } => {
                write!(f, "config pull: the backend answered {status}{detail}")
            }
            PullError::TooLarge { max_bytes } => write!(
                f,
                "config pull: the configuration is larger than config_max_bytes ({max_bytes} bytes)"
            ),
            PullError::NotJson => write!(f, "config pull: the answer is not JSON"),
            PullError::NotUtf8 { offset } => write!(
                f,
                "config pull: the answer is not UTF-8 (invalid byte at offset {offset})"
            ),
            PullError::Shape(why) => write!(f, "config pull: invalid configuration: {why}"),
            PullError::Write(why) => {
                write!(
                    f,
                    "config pull: cannot replace the configuration file: {why}"
                )
            }
            PullError::Setup(why) => write!(f, "config pull: {why}"),
        }
    }
}

impl std::error::Error for PullError {}

/// What one pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullOutcome {
    /// The file on disk already is the backend's configuration (304, or 200 with the
    /// same hash); nothing was written.
    Unchanged {
        hash: String,
    },
    /// The file was replaced. `old_hash` is `None` when the previous file was missing,
    /// unreadable or edited by hand.
    Updated {
        old_hash: Option<String>,
        new_hash: String,
        devices: usize,
    },
    Failed(PullError),
}

/// The contract's sync status, as kept in `state_dir/config_status.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    pub last_sync_at: Option<String>,
    pub last_sync_ok: bool,
    pub last_sync_error: Option<String>,
    /// Hash of the intact file on disk after the pull; `None` when there is none.
    pub current_hash: Option<String>,
    /// The hash the backend last served.
    pub backend_hash: Option<String>,
    /// When this agent last replaced the file.
    pub config_updated_at: Option<String>,
    /// MD5 of the bytes this agent last wrote (relais's addition, see the module doc).
    pub file_md5: Option<String>,
    /// The hash of the configuration whose `on_config_change` hook has not succeeded yet.
    pub hook_due: Option<String>,
    /// Why the due hook's last run failed; `None` when it has not run yet.
    pub hook_error: Option<String>,
}

impl SyncStatus {
    /// The status as a JSON object: the contract's members, then `file_md5`.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        json::push_key(&mut out, "last_sync_at", true);
        json::push_opt_str(&mut out, self.last_sync_at.as_deref());
        json::push_key(&mut out, "last_sync_ok", false);
        out.push_str(if self.last_sync_ok { "true" } else { "false" });
        let strings = [
            ("last_sync_error", &self.last_sync_error),
            ("current_hash", &self.current_hash),
            ("backend_hash", &self.backend_hash),
            ("config_updated_at", &self.config_updated_at),
            ("file_md5", &self.file_md5),
            ("hook_due", &self.hook_due),
            ("hook_error", &self.hook_error),
        ];
        for (key, value) in strings {
            json::push_key(&mut out, key, false);
            json::push_opt_str(&mut out, value.as_deref());
        }
        out.push('}');
        out
    }

    /// Parses a status file; `None` when it is not one.
    pub fn from_json(text: &str) -> Option<SyncStatus> {
        let Ok(Value::Object(obj)) = miniserde::json::from_str::<Value>(text) else {
            return None;
        };
        let string = |key: &str| match obj.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Some(SyncStatus {
            last_sync_at: string("last_sync_at"),
            last_sync_ok: matches!(obj.get("last_sync_ok"), Some(Value::Bool(true))),
            last_sync_error: string("last_sync_error"),
            current_hash: string("current_hash"),
            backend_hash: string("backend_hash"),
            config_updated_at: string("config_updated_at"),
            file_md5: string("file_md5"),
            hook_due: string("hook_due"),
            hook_error: string("hook_error"),
        })
    }
}

/// For `relais status`: a few lines for people.
impl fmt::Display for SyncStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        let outcome = match (&self.last_sync_error, self.last_sync_ok) {
            (_, true) => "OK".to_string(),
            (Some(e), false) => format!("failed: {e}"),
            (None, false) => "failed".to_string(),
        };
        writeln!(
            f,
            "config sync: last at {}: {outcome}",
            or_none(&self.last_sync_at)
        )?;
        writeln!(f, "  current hash:      {}", or_none(&self.current_hash))?;
        writeln!(f, "  backend hash:      {}", or_none(&self.backend_hash))?;
        writeln!(
            f,
            "  config updated at: {}",
            or_none(&self.config_updated_at)
        )?;
        match (&self.hook_due, &self.hook_error) {
            (None, _) => Ok(()),
            (Some(hash), Some(e)) => writeln!(
                f,
                "  on_config_change:  due for hash {}, last run failed: {e}",
                short(Some(hash))
            ),
            (Some(hash), None) => writeln!(
                f,
                "  on_config_change:  due for hash {}, not run yet (the agent stopped first)",
                short(Some(hash))
            ),
        }
    }
}

/// The last sync status recorded in `state_dir`, for `relais status`; `None` when no
/// pull has completed there (or the file is unreadable).
pub fn read_status(state_dir: &Path) -> Option<SyncStatus> {
    let text = std::fs::read_to_string(state_dir.join(STATUS_FILE)).ok()?;
    SyncStatus::from_json(&text)
}

/// What the configuration file on disk is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LocalFile {
    Missing,
    /// Unreadable, not JSON, not an object, or without a usable `config_hash`.
    Unusable(String),
    /// Parses, but neither its bytes nor its content match its `config_hash`.
    Modified,
    Intact {
        hash: String,
        devices: usize,
    },
}

impl LocalFile {
    fn hash(&self) -> Option<String> {
        match self {
            LocalFile::Intact { hash, .. } => Some(hash.clone()),
            _ => None,
        }
    }
}

/// Examines the file at `path`; `written_md5` is the MD5 of the bytes last written.
fn inspect(path: &Path, written_md5: Option<&str>) -> LocalFile {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return LocalFile::Missing,
        Err(e) => return LocalFile::Unusable(format!("cannot be read ({e})")),
    };
    let (obj, hash) = match parse_served(&bytes) {
        Ok(parsed) => parsed,
        Err(PullError::NotJson) => return LocalFile::Unusable("is not JSON".into()),
        Err(PullError::NotUtf8 { offset }) => {
            return LocalFile::Unusable(format!("is not UTF-8 (invalid byte at offset {offset})"));
        }
        Err(e) => return LocalFile::Unusable(format!("is not a configuration ({e})")),
    };
    let devices = match obj.get("devices") {
        Some(Value::Array(items)) => items.len(),
        _ => 0,
    };
    let written_by_us = written_md5 == Some(md5_hex(&bytes).as_str());
    let intact =
        written_by_us || config_hash::config_hash(&Value::Object(obj)).is_ok_and(|h| h == hash);
    if intact {
        LocalFile::Intact { hash, devices }
    } else {
        LocalFile::Modified
    }
}

/// Parses a served body (or the file) into its object and `config_hash`.
fn parse_served(body: &[u8]) -> Result<(Object, String), PullError> {
    let text = std::str::from_utf8(body).map_err(|e| PullError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let obj = match miniserde::json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => obj,
        Ok(_) => return Err(PullError::Shape("the body is not a JSON object".into())),
        Err(_) => return Err(PullError::NotJson),
    };
    let hash = match obj.get(HASH_MEMBER) {
        Some(Value::String(h)) if usable_hash(h) => h.clone(),
        Some(Value::String(_)) => {
            return Err(PullError::Shape(format!(
                "{HASH_MEMBER} must be 1 to {MAX_HASH_LEN} visible ASCII characters without quotes"
            )));
        }
        _ => {
            return Err(PullError::Shape(format!(
                "{HASH_MEMBER} is missing or not a string"
            )));
        }
    };
    Ok((obj, hash))
}

/// The hash goes back to the backend in `If-None-Match`, so it must be a valid tag.
fn usable_hash(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= MAX_HASH_LEN
        && h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// Checks `devices` (an array of objects with string `ip` and `name`); returns its length.
fn validate_devices(obj: &Object) -> Result<usize, PullError> {
    let Some(Value::Array(devices)) = obj.get("devices") else {
        return Err(PullError::Shape(
            "devices is missing or not an array".into(),
        ));
    };
    for (i, device) in devices.iter().enumerate() {
        let Value::Object(d) = device else {
            return Err(PullError::Shape(format!("devices[{i}] is not an object")));
        };
        for key in ["ip", "name"] {
            if !matches!(d.get(key), Some(Value::String(_))) {
                return Err(PullError::Shape(format!(
                    "devices[{i}].{key} is missing or not a string"
                )));
            }
        }
    }
    Ok(devices.len())
}

/// The first characters of a hash, for log lines.
fn short(hash: Option<&str>) -> String {
    match hash {
        Some(h) if h.chars().count() > 12 => format!("{}…", h.chars().take(12).collect::<String>()),
        Some(h) => h.to_string(),
        None => "none".to_string(),
    }
}

/// Pulls the configuration; one per agent, used from one thread.
pub struct Puller {
    transport: Transport,
    backend_url: String,
    /// `/config/<token>`: holds the secret, so it is never logged.
    path: String,
    target: PathBuf,
    prev: PathBuf,
    status_path: PathBuf,
    max_bytes: u64,
    timeout: Duration,
    interval: Duration,
    /// `relais once`: nothing is retried, the exit code says it failed.
    once: bool,
    hook: Option<HookSpec>,
    /// Spaces the retries of a failing hook between pulls.
    hook_backoff: Backoff,
    hook_retry_at: Option<Instant>,
    /// The last fetch's error: `last_sync_error` when the hook is not to blame.
    fetch_error: Option<String>,
    status: SyncStatus,
}

impl Puller {
    /// Builds the puller for `relais run` and reports (one log line) the state of the
    /// file on disk. Fails only when `SITE_TOKEN` is unset or the transport cannot be built.
    pub fn new(settings: &Settings) -> Result<Puller, String> {
        Puller::build(settings, false).map_err(|e| e.to_string())
    }

    /// The puller of `relais once`, which pulls once and never retries.
    pub fn for_once(settings: &Settings) -> Result<Puller, String> {
        Puller::build(settings, true).map_err(|e| e.to_string())
    }

    fn build(settings: &Settings, once: bool) -> Result<Puller, PullError> {
        let Some(token) = settings.site_token.as_deref() else {
            return Err(PullError::Setup("SITE_TOKEN is not set".into()));
        };
        // The daemon registers it too; doing it here keeps the pull safe on its own.
        redact::register(token);
        let transport =
            Transport::new(&settings.http).map_err(|e| PullError::Setup(e.to_string()))?;
        if let Err(e) = std::fs::create_dir_all(&settings.state_dir) {
            log::warn!(
                "config pull: cannot create {}: {e}; the sync status will not be saved",
                settings.state_dir.display()
            );
        }
        let status_path = settings.state_dir.join(STATUS_FILE);
        let status = std::fs::read_to_string(&status_path)
            .ok()
            .and_then(|t| SyncStatus::from_json(&t))
            .unwrap_or_default();
        let target = settings.agent_config.clone();
        let puller = Puller {
            transport,
            backend_url: settings.http.backend_url.clone(),
            path: format!("/config/{token}"),
            prev: atomic_file::with_suffix(&target, ".prev"),
            target,
            status_path,
            max_bytes: settings.config_max_bytes,
            timeout: settings.config_pull_timeout,
            interval: settings.config_interval,
            once,
            hook: settings.on_config_change.clone(),
            hook_backoff: Backoff::new(&settings.retry),
            hook_retry_at: None,
            fetch_error: None,
            status,
        };
        puller.report_local_file();
        Ok(puller)
    }

    fn report_local_file(&self) {
        let path = self.target.display();
        match inspect(&self.target, self.status.file_md5.as_deref()) {
            LocalFile::Missing => {
                log::info!("config file {path} does not exist yet; the next pull writes it")
            }
            LocalFile::Unusable(why) => {
                log::warn!("config file {path} {why}; the next pull replaces it")
            }
            LocalFile::Modified => log::warn!(
                "config file {path} does not match its {HASH_MEMBER} (edited by hand?); \
                 the next pull restores it"
            ),
            LocalFile::Intact { hash, devices } => log::info!(
                "config file {path}: hash {}, {devices} devices",
                short(Some(&hash))
            ),
        }
        if let Some(hash) = &self.status.hook_due {
            log::warn!(
                "config hook: due for hash {} since an earlier run (failed or cut short); the next pull runs it",
                short(Some(hash))
            );
        }
    }

    /// The sync status as last recorded: `last_sync_ok` is false after a failed fetch
    /// and while the hook is due.
    pub fn status(&self) -> &SyncStatus {
        &self.status
    }

    /// When the loop should run the failing hook again between pulls, if it should.
    pub fn hook_retry_at(&self) -> Option<Instant> {
        self.hook_retry_at
    }

    /// Pulls once: fetch, compare, maybe replace, run the hook if it is due (replaced
    /// now or owed from before), record the status. Never panics, never leaves the
    /// file half-written.
    pub fn pull_once(&mut self) -> PullOutcome {
        let held = inspect(&self.target, self.status.file_md5.as_deref()).hash();
        log::debug!(
            "fetching config from {}/config/*** (holding {})",
            self.backend_url,
            short(held.as_deref())
        );
        let outcome = match self.fetch_and_apply(held.clone()) {
            Ok(outcome) => outcome,
            Err(e) => PullOutcome::Failed(e),
        };
        self.record(&outcome, held);
        self.log_outcome(&outcome);
        self.run_due_hook();
        self.save_status();
        outcome
    }

    /// Runs the due hook again, without a pull (the loop's backoff wake-up).
    pub fn retry_hook(&mut self) {
        self.run_due_hook();
        self.save_status();
    }

    fn fetch_and_apply(&mut self, held: Option<String>) -> Result<PullOutcome, PullError> {
        let fetched = self
            .transport
            .get(&self.path, held.as_deref(), self.max_bytes, self.timeout)
            .map_err(|e| PullError::Network(redact::redact(&e)))?;
        match (fetched.status, &held) {
            (200, _) => {}
            (304, Some(hash)) => {
                self.status.backend_hash = Some(hash.clone());
                return Ok(PullOutcome::Unchanged { hash: hash.clone() });
            }
            (401, _) => return Err(PullError::Unauthorized),
            (404, _) => return Err(PullError::NotFound),
            (status, _) => {
                return Err(PullError::Status {
                    status,
                    detail: server_detail(fetched.body.as_deref().unwrap_or_default()),
                });
            }
        }
        let body = fetched.body.ok_or(PullError::TooLarge {
            max_bytes: self.max_bytes,
        })?;
        let (obj, served) = parse_served(&body)?;
        self.status.backend_hash = Some(served.clone());
        if held.as_deref() == Some(served.as_str()) {
            return Ok(PullOutcome::Unchanged { hash: served });
        }
        let devices = validate_devices(&obj)?;
        self.replace(&body, &served)?;
        Ok(PullOutcome::Updated {
            old_hash: held,
            new_hash: served,
            devices,
        })
    }

    /// Keeps the current file as `.prev`, then replaces it; both durably, mode 0600.
    /// With a hook, "hook due" is saved first: a power cut after the replacement then
    /// leaves it due, and the next start runs it.
    fn replace(&mut self, body: &[u8], hash: &str) -> Result<(), PullError> {
        let write_err = |e: std::io::Error| PullError::Write(e.to_string());
        if let Some(dir) = self.target.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                PullError::Write(format!(
                    "cannot create {}, the directory of AGENT_CONFIG: {e}",
                    dir.display()
                ))
            })?;
        }
        if self.target.is_file() {
            atomic_file::copy(&self.target, &self.prev, CONFIG_MODE).map_err(write_err)?;
        }
        let owed = (self.status.hook_due.clone(), self.status.hook_error.clone());
        if self.hook.is_some() {
            self.status.hook_due = Some(hash.to_string());
            self.status.hook_error = None;
            self.save_status();
        }
        if let Err(e) = atomic_file::replace(&self.target, body, CONFIG_MODE) {
            // The file on disk is the old one: only what was owed before is owed.
            (self.status.hook_due, self.status.hook_error) = owed;
            return Err(write_err(e));
        }
        self.status.file_md5 = Some(md5_hex(body));
        self.status.config_updated_at = Some(clock::now_iso8601());
        if self.hook.is_some() {
            // Saved before the hook runs: a power cut during the hook must not leave
            // the file we wrote unrecognised (a backend hash that is not the body's,
            // as relais-server's, only matches through `file_md5`).
            self.save_status();
        }
        Ok(())
    }

    fn record(&mut self, outcome: &PullOutcome, held: Option<String>) {
        self.status.last_sync_at = Some(clock::now_iso8601());
        match outcome {
            PullOutcome::Failed(e) => {
                self.fetch_error = Some(redact::redact(&e.to_string()));
                self.status.current_hash = held;
            }
            PullOutcome::Unchanged { .. } | PullOutcome::Updated { .. } => {
                self.fetch_error = None;
                // Read back: the hash held is the one of the file actually on disk.
                self.status.current_hash =
                    inspect(&self.target, self.status.file_md5.as_deref()).hash();
            }
        }
        self.settle();
    }

    /// `last_sync_ok` and `last_sync_error` from the fetch and the hook (module doc).
    fn settle(&mut self) {
        let hook = self.status.hook_due.as_ref().map(|hash| {
            self.status.hook_error.clone().unwrap_or_else(|| {
                format!(
                    "config hook: due for hash {}, not run yet",
                    short(Some(hash))
                )
            })
        });
        self.status.last_sync_error = self.fetch_error.clone().or(hook);
        self.status.last_sync_ok = self.status.last_sync_error.is_none();
    }

    fn log_outcome(&self, outcome: &PullOutcome) {
        match outcome {
            PullOutcome::Unchanged { hash } => {
                log::info!("config up to date (hash {})", short(Some(hash)))
            }
            PullOutcome::Updated {
                old_hash,
                new_hash,
                devices,
            } => log::info!(
                "config changed: old hash {}, new hash {}; {} updated, {devices} devices",
                short(old_hash.as_deref()),
                short(Some(new_hash)),
                self.target.display()
            ),
            PullOutcome::Failed(e) if self.once => log::warn!(
                "{e}; keeping the current configuration (relais once does not retry: it exits 1)"
            ),
            PullOutcome::Failed(e) => log::warn!(
                "{e}; keeping the current configuration, next try in {}",
                clock::human_duration(self.interval)
            ),
        }
    }

    /// Runs the hook if it is due; records the result and, on failure, when to retry.
    fn run_due_hook(&mut self) {
        self.hook_retry_at = None;
        let Some(due) = self.status.hook_due.clone() else {
            return;
        };
        // The hook is owed for the file on disk, which a power cut may have left older.
        let hash = self.status.current_hash.clone().unwrap_or(due);
        let Some(hook) = &self.hook else {
            log::info!("config hook: no longer configured; the run owed is dropped");
            self.status.hook_due = None;
            self.status.hook_error = None;
            return self.settle();
        };
        match run_hook(hook, &self.target, &hash) {
            Ok(()) => {
                self.status.hook_due = None;
                self.status.hook_error = None;
                self.hook_backoff.reset();
            }
            Err(e) => {
                let e = redact::redact(&e);
                if self.once {
                    log::warn!(
                        "{e}; it stays due: the next relais once or relais run runs it again (exit 1)"
                    );
                } else {
                    let delay = self.hook_backoff.next_delay(None);
                    self.hook_retry_at = Some(Instant::now() + delay);
                    log::warn!(
                        "{e}; it stays due: next try in {}",
                        clock::human_duration(delay)
                    );
                }
                self.status.hook_error = Some(e);
            }
        }
        self.settle();
    }

    fn save_status(&self) {
        let text = self.status.to_json();
        if let Err(e) = atomic_file::replace(&self.status_path, text.as_bytes(), STATUS_MODE) {
            log::warn!("config pull: cannot save the sync status: {e}");
        }
    }
}

/// Runs the hook (argv, no shell) and waits for it at most its timeout, then kills it.
/// The new hash and the file path are passed as `RELAIS_CONFIG_HASH` and `AGENT_CONFIG`.
/// The error is the line saying why it failed.
fn run_hook(hook: &HookSpec, target: &Path, hash: &str) -> Result<(), String> {
    let Some((program, args)) = hook.command.split_first() else {
        return Ok(());
    };
    let spawned = Command::new(program)
        .args(args)
        .env("RELAIS_CONFIG_HASH", hash)
        .env("AGENT_CONFIG", target)
        .stdin(Stdio::null())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return Err(format!("config hook {program}: cannot start: {e}")),
    };
    let deadline = Instant::now() + hook.timeout;
    // std has no wait-with-timeout: poll, starting fast so a quick hook costs little.
    let mut pause = Duration::from_millis(5);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => {
                log::info!("config hook {program} finished: {status}");
                return Ok(());
            }
            Ok(Some(status)) => return Err(format!("config hook {program} failed: {status}")),
            Ok(None) if Instant::now() >= deadline => {
                // Only the hook itself is killed; a hook that forks should exec its last step.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "config hook {program} killed after its {} timeout",
                    clock::human_duration(hook.timeout)
                ));
            }
            Ok(None) => {
                std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("config hook {program}: cannot wait for it: {e}"));
            }
        }
    }
}

/// What wakes the pull loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullWake {
    /// Pull now (SIGUSR1); the next periodic pull is one interval later.
    Now,
    Stop,
}

/// Whether the pull loop is busy, and since when: shared with whoever asks it for a
/// pull, so that a request while a pull runs says so instead of promising a pull now.
#[derive(Debug, Clone, Default)]
pub struct PullActivity(Arc<Mutex<Option<(Instant, String)>>>);

impl PullActivity {
    fn run<T>(&self, work: impl FnOnce() -> T) -> T {
        self.set(Some((Instant::now(), clock::now_iso8601())));
        let done = work();
        self.set(None);
        done
    }

    fn set(&self, value: Option<(Instant, String)>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = value;
    }

    /// What becomes of a pull requested now, to end the requester's log line.
    pub fn on_request(&self) -> String {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            None => "and a configuration pull now".to_string(),
            Some((started, at)) => format!(
                "now; config pull skipped: the previous pull is still running (since {at}, {}); \
                 one pull follows when it ends, however many requests come meanwhile",
                clock::human_duration(started.elapsed())
            ),
        }
    }
}

/// The pull loop, for its own thread: first pull [`FIRST_PULL_DELAY`] after start,
/// then every `settings.config_interval`, or at once on [`PullWake::Now`]; a failing
/// hook is run again in between, with backoff. Returns on [`PullWake::Stop`] or when
/// every sender is gone. It sleeps in `recv_timeout`, so it never wakes while idle.
/// Returns at once (one log line) without `SITE_TOKEN`. `activity` says when it is busy.
pub fn run_loop(settings: Settings, wake: Receiver<PullWake>, activity: PullActivity) {
    if settings.site_token.is_none() {
        return log::info!("config pull off: SITE_TOKEN is not set");
    }
    let mut puller = match Puller::new(&settings) {
        Ok(p) => p,
        Err(e) => return log::error!("{e}; configuration pull disabled"),
    };
    log::info!(
        "config sync loop started (interval: {}, first pull in {})",
        clock::human_duration(settings.config_interval),
        clock::human_duration(FIRST_PULL_DELAY)
    );
    // Counted from the end of the previous pull, so scheduled pulls never pile up.
    let mut next_pull = Instant::now() + FIRST_PULL_DELAY;
    loop {
        let wake_at = puller
            .hook_retry_at()
            .map_or(next_pull, |at| at.min(next_pull));
        match wake.recv_timeout(wake_at.saturating_duration_since(Instant::now())) {
            Ok(PullWake::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) if Instant::now() < next_pull => {
                activity.run(|| puller.retry_hook());
                continue;
            }
            Ok(PullWake::Now) | Err(RecvTimeoutError::Timeout) => {}
        }
        if take_queued(&wake) {
            break;
        }
        activity.run(|| puller.pull_once());
        next_pull = Instant::now() + settings.config_interval;
    }
    log::info!("config sync loop stopped");
}

/// Takes the requests that arrived while the previous pull ran: the pull about to start
/// answers them all. True when a stop was among them (or every sender is gone).
fn take_queued(wake: &Receiver<PullWake>) -> bool {
    loop {
        match wake.try_recv() {
            Ok(PullWake::Now) => {}
            Ok(PullWake::Stop) | Err(TryRecvError::Disconnected) => return true,
            Err(TryRecvError::Empty) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Object {
        match miniserde::json::from_str::<Value>(text) {
            Ok(Value::Object(o)) => o,
            _ => panic!("test object"),
        }
    }

    #[test]
    fn validates_the_shape() {
        let ok = parse(r#"{"devices": [{"ip": "1.2.3.4", "name": "a", "x": 1}]}"#);
        assert_eq!(validate_devices(&ok), Ok(1));
        for (text, why) in [
            (r#"{}"#, "devices is missing or not an array"),
            (r#"{"devices": {}}"#, "devices is missing or not an array"),
            (r#"{"devices": [1]}"#, "devices[0] is not an object"),
            (
                r#"{"devices": [{"ip": "x", "name": "y"}, {"ip": 3, "name": "z"}]}"#,
                "devices[1].ip is missing or not a string",
            ),
            (
                r#"{"devices": [{"ip": "x"}]}"#,
                "devices[0].name is missing or not a string",
            ),
        ] {
            assert_eq!(
                validate_devices(&parse(text)),
                Err(PullError::Shape(why.into()))
            );
        }
        assert_eq!(parse_served(b"nope").unwrap_err(), PullError::NotJson);
        assert_eq!(
            parse_served(b"{\"a\": \"\xff\"}").unwrap_err(),
            PullError::NotUtf8 { offset: 7 }
        );
        assert!(matches!(
            parse_served(br#"{"config_hash": "a\"b"}"#),
            Err(PullError::Shape(_))
        ));
        assert!(matches!(parse_served(b"[1]"), Err(PullError::Shape(_))));
    }

    #[test]
    fn status_round_trips() {
        let status = SyncStatus {
            last_sync_at: Some("2026-01-18T10:30:00+00:00".into()),
            last_sync_ok: false,
            last_sync_error: Some("config pull: \"quoted\"".into()),
            current_hash: Some("abc".into()),
            backend_hash: None,
            config_updated_at: None,
            file_md5: Some("d41d8cd98f00b204e9800998ecf8427e".into()),
            hook_due: Some("abc".into()),
            hook_error: Some("config hook sh failed: exit status: 3".into()),
        };
        assert_eq!(SyncStatus::from_json(&status.to_json()), Some(status));
        assert!(SyncStatus::from_json("[]").is_none());
    }

    #[test]
    fn details_are_short_and_optional() {
        assert_eq!(short(Some("0123456789abcdef")), "0123456789ab…");
    }
}
