//! Which source a database file is, whatever it is called today. Rows are tracked, and
//! with a glob their idempotency keys are named, under a source key fixed when the file
//! is first seen. A respelled path (`data//x.db`), a renamed file (`today.db` becoming
//! `2026_12_01.db`) or a path reached through a symbolic link is the same source, so its
//! rows are never sent again under new keys.
//!
//! A file is recognised, in this order:
//! 1. by its identity ([`FileId`]: inode and birth time), wherever it now is;
//! 2. by its normalised path, when no file with the known identity is found (a file
//!    replaced at its path, e.g. `VACUUM INTO` then `mv`, or restored from a backup);
//! 3. by rows tracked under its path as spelled before sources were recorded (upgrades);
//! 4. otherwise it is a new source, keyed by its normalised path. A copy is a new file:
//!    next to the original it is a new source and its rows are sent again.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::source::{FileId, normalise};
use crate::tracking::{KnownSource, Tracking, TrackingError};

/// A discovered file and the key its rows are tracked by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    pub key: String,
}

static RESOLVING: Mutex<()> = Mutex::new(());

/// Resolves the files `discover` found to their source keys, recording new and moved
/// sources. Only changes are written: an unchanged pass writes nothing.
pub fn resolve(tracking: &mut Tracking, found: &[PathBuf]) -> Result<Vec<Resolved>, TrackingError> {
    // A read, then writes: the two lanes of one agent resolve at the start of their
    // passes, and the second must find what the first recorded, not announce it again.
    let _one_at_a_time = RESOLVING.lock().unwrap_or_else(PoisonError::into_inner);
    let known = tracking.known_sources()?;
    let mut out = Vec::new();
    for (resolved, now) in match_sources(tracking, &known, found)? {
        let before = known.iter().find(|k| k.key == now.key);
        if before != Some(&now) {
            announce(before, &now);
            tracking.remember_source(&now)?;
        }
        out.push(resolved);
    }
    Ok(out)
}

/// What [`resolve`] would answer, without recording anything (`relais status`).
pub fn lookup(tracking: &Tracking, found: &[PathBuf]) -> Result<Vec<Resolved>, TrackingError> {
    let known = tracking.known_sources()?;
    Ok(match_sources(tracking, &known, found)?
        .into_iter()
        .map(|(r, _)| r)
        .collect())
}

/// Each found file's source, and the record it should have now.
fn match_sources(
    tracking: &Tracking,
    known: &[KnownSource],
    found: &[PathBuf],
) -> Result<Vec<(Resolved, KnownSource)>, TrackingError> {
    let files = distinct_files(found);
    let mut claimed: HashSet<String> = HashSet::new();
    let mut keys: Vec<Option<String>> = vec![None; files.len()];
    // Identity first, for every file: a renamed file must claim its source before a new
    // file that took its old name can claim it by path.
    for (i, (_, _, id)) in files.iter().enumerate() {
        let by_id = id.and_then(|id| known.iter().find(|k| k.id == Some(id)));
        if let Some(k) = by_id.filter(|k| !claimed.contains(&k.key)) {
            claimed.insert(k.key.clone());
            keys[i] = Some(k.key.clone());
        }
    }
    let mut out = Vec::with_capacity(files.len());
    for (i, (raw, path, id)) in files.into_iter().enumerate() {
        let spelled = path.display().to_string();
        let key = match keys[i].take() {
            Some(k) => k,
            None => match known
                .iter()
                .find(|k| k.path == spelled && !claimed.contains(&k.key))
            {
                Some(k) => k.key.clone(),
                None => legacy_or_new(tracking, known, &claimed, &raw, &spelled)?,
            },
        };
        claimed.insert(key.clone());
        let now = KnownSource {
            key: key.clone(),
            path: spelled,
            id,
        };
        out.push((Resolved { path, key }, now));
    }
    Ok(out)
}

/// The found files, normalised, each file once: a symbolic link matched by the glob
/// next to its target is the same database.
fn distinct_files(found: &[PathBuf]) -> Vec<(PathBuf, PathBuf, Option<FileId>)> {
    let mut seen_ids = HashSet::new();
    let mut seen_paths = HashSet::new();
    let mut out = Vec::new();
    for raw in found {
        let path = normalise(raw);
        let id = FileId::of(&path);
        let fresh_id = id.is_none_or(|i| seen_ids.insert((i.ino, i.born)));
        if fresh_id && seen_paths.insert(path.clone()) {
            out.push((raw.clone(), path, id));
        }
    }
    out
}

/// A source key for a file known neither by identity nor by path: the key of rows
/// tracked under its old spelling, else its path, made unique if another source has it.
fn legacy_or_new(
    tracking: &Tracking,
    known: &[KnownSource],
    claimed: &HashSet<String>,
    raw: &Path,
    spelled: &str,
) -> Result<String, TrackingError> {
    let taken = |k: &str| claimed.contains(k) || known.iter().any(|s| s.key == k);
    for old in [raw.display().to_string(), spelled.to_string()] {
        if !taken(&old) && tracking.has_rows(&old, None)? {
            return Ok(old);
        }
    }
    let mut key = spelled.to_string();
    let mut n = 2;
    while taken(&key) {
        key = format!("{spelled}#{n}");
        n += 1;
    }
    Ok(key)
}

fn announce(before: Option<&KnownSource>, now: &KnownSource) {
    let Some(before) = before else {
        if now.key != now.path {
            log::warn!(
                "source {}: a new file where another source was; tracked as {}",
                now.path,
                now.key
            );
        }
        return;
    };
    if before.path != now.path {
        log::warn!(
            "source {}: the file is now {} (renamed or respelled); it keeps its key and its rows are not sent again",
            before.path,
            now.path
        );
    } else if before.id.is_some() && now.id.is_some() {
        log::warn!(
            "source {}: a different file than before is at this path (replaced or restored); taken as the same database",
            now.path
        );
    }
}

/// `relais forget SOURCE`: closes out the unsynced rows of a source whose file is gone.
/// `source` is the key `relais status` shows, or the file's path in any spelling.
/// Returns the sentence to log.
pub fn forget(state_dir: &Path, source: &str) -> Result<String, String> {
    let mut tracking = Tracking::open(state_dir).map_err(|e| e.to_string())?;
    let spelled = normalise(Path::new(source)).display().to_string();
    let known = tracking.known_sources().map_err(|e| e.to_string())?;
    let entry = known
        .iter()
        .find(|k| k.key == source || k.path == spelled || k.key == spelled);
    let key = entry.map_or(source.to_string(), |k| k.key.clone());
    let unsynced = tracking
        .unsynced_by_source()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|(k, _)| *k == key);
    if unsynced.is_none() {
        return Err(format!(
            "forget: source {source} has no unsynced rows; nothing to forget (relais status lists the sources)"
        ));
    }
    let path = entry.map_or(spelled, |k| k.path.clone());
    if Path::new(&path).exists() {
        return Err(format!(
            "forget: source {key} is still there ({path}) and its rows are pushed as usual; forget is for a source whose file is gone"
        ));
    }
    let n = tracking.forget(&key).map_err(|e| e.to_string())?;
    Ok(format!(
        "forget: closed out {n} unsynced rows of vanished source {key}; they are recorded in sync_forgotten and no longer waited for"
    ))
}
