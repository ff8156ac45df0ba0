//! The logger: every line goes to stderr (the journal under systemd) and to a local log
//! file for field diagnostics, capped in size so it can never fill the SD card. Every
//! line passes through [`crate::redact`] first.
//!
//! The file is `relais.log` plus one rotated generation `relais.log.1`; the current file
//! is rotated when it reaches half the cap, so the two together stay under the cap. A
//! file deleted or moved away (logrotate, an operator) is noticed at the next line and
//! opened anew, as it is after [`reopen`] (SIGHUP).
//!
//! Other crates' trace records are dropped whatever the level: the HTTP library dumps
//! every byte it sends at trace, 16 per line, which splits a bearer token across lines
//! where no redaction by substring can find it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::{atomic_file, clock, redact};

pub const LOG_FILE_NAME: &str = "relais.log";

/// Where and how much to log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub level: LevelFilter,
    /// Directory of the local log file; `None` logs to stderr only.
    pub dir: Option<PathBuf>,
    /// Cap of the log file and its rotated generation together, in bytes.
    pub max_bytes: u64,
}

struct FileSink {
    path: PathBuf,
    file: Option<File>,
    /// The inode `file` has, to notice the path now naming another file or none.
    inode: u64,
    size: u64,
    half_cap: u64,
    /// Set after a write error (disk full, directory gone): reported once, then the file
    /// is retried at the next rotation check instead of on every line.
    failing: bool,
}

struct Logger {
    level: LevelFilter,
    journal: bool,
    file: Option<Mutex<FileSink>>,
}

/// Installs the logger. Returns a warning to log when the file cannot be used; the agent
/// then logs to stderr only, which is better than not starting.
pub fn init(settings: &LogSettings) -> Option<String> {
    let (file, warning) = match &settings.dir {
        Some(dir) => match FileSink::open(dir, settings.max_bytes) {
            Ok(sink) => (Some(Mutex::new(sink)), None),
            Err(e) => (
                None,
                Some(format!(
                    "log file: cannot write in {}: {e}; logging to stderr only",
                    dir.display()
                )),
            ),
        },
        None => (None, None),
    };
    let logger = Logger {
        level: settings.level,
        // systemd sets JOURNAL_STREAM when stderr goes to the journal, which adds its
        // own timestamps and understands `<N>` priority prefixes.
        journal: std::env::var_os("JOURNAL_STREAM").is_some(),
        file,
    };
    log::set_max_level(settings.level);
    // A second init (tests) keeps the first logger; that is harmless.
    let _ = log::set_boxed_logger(Box::new(logger));
    warning
}

/// Set by [`reopen`]: the file is opened anew before the next line.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Opens the log file anew before the next line (SIGHUP, after a logrotate).
pub fn reopen() {
    REOPEN.store(true, Ordering::Relaxed);
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
            && (metadata.level() < Level::Trace || metadata.target().starts_with("relais"))
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = redact::redact(&record.args().to_string());
        let level = record.level();
        let stamped = format!("{} {:<5} {message}\n", clock::now_iso8601(), level);
        let stderr_line = if self.journal {
            format!("<{}>{message}\n", syslog_priority(level))
        } else {
            stamped.clone()
        };
        let _ = std::io::stderr().write_all(stderr_line.as_bytes());
        if let Some(file) = &self.file {
            file.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(&stamped);
        }
    }

    fn flush(&self) {}
}

fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl FileSink {
    fn open(dir: &Path, max_bytes: u64) -> std::io::Result<FileSink> {
        // systemd creates LogsDirectory=; run by hand, the directory may not exist yet.
        fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE_NAME);
        let file = open_append(&path)?;
        let meta = file.metadata()?;
        Ok(FileSink {
            path,
            file: Some(file),
            inode: meta.ino(),
            size: meta.len(),
            half_cap: (max_bytes / 2).max(4096),
            failing: false,
        })
    }

    fn write(&mut self, line: &str) {
        if self.size + line.len() as u64 > self.half_cap {
            self.rotate();
        } else if REOPEN.swap(false, Ordering::Relaxed) || self.file.is_none() || self.moved_away()
        {
            self.open_again();
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        match file.write_all(line.as_bytes()) {
            Ok(()) => {
                self.size += line.len() as u64;
                self.failing = false;
            }
            Err(e) => {
                if !self.failing {
                    let _ = writeln!(
                        std::io::stderr(),
                        "log file: cannot write {}: {e}; will retry after rotation",
                        self.path.display()
                    );
                }
                self.failing = true;
                // Count the line anyway so a full disk leads to a rotation, which frees space.
                self.size += line.len() as u64;
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let _ = fs::rename(&self.path, atomic_file::with_suffix(&self.path, ".1"));
        self.open_again();
    }

    /// Whether the path no longer names the open file: one `stat` per line, and an idle
    /// agent writes a few lines an hour.
    fn moved_away(&self) -> bool {
        !fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode)
    }

    fn open_again(&mut self) {
        self.file = open_append(&self.path).ok();
        let meta = self.file.as_ref().and_then(|f| f.metadata().ok());
        self.inode = meta.as_ref().map_or(0, |m| m.ino());
        self.size = meta.map_or(0, |m| m.len());
    }
}

/// Never through a symbolic link: one planted at `relais.log` would have the agent
/// append to whatever it points at.
fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stays_under_cap() {
        let dir = std::env::temp_dir().join(format!("relais-log-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut sink = FileSink::open(&dir, 10_000).unwrap();
        for i in 0..5000 {
            sink.write(&format!(
                "line {i} with some padding to fill the file quickly\n"
            ));
        }
        let total: u64 = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 10_000, "log files total {total} bytes");
        let current = fs::read_to_string(dir.join(LOG_FILE_NAME)).unwrap();
        assert!(current.ends_with("line 4999 with some padding to fill the file quickly\n"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
