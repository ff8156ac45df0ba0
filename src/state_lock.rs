//! One process per state directory. Two agents on one state directory send rows twice:
//! `relais once` run by hand beside `relais run` found the media row `run` was uploading
//! (`pending`, hence due) and uploaded it too, and a backend that ignores idempotency
//! keys stored it twice. So the commands that push or change the state (`run`, `once`,
//! the bare command, `state reset`; future mutating commands: call [`acquire`]) hold an
//! advisory lock, flock(2) on `<state_dir>/relais.lock`, for the life of the process.
//! `status` and `retry-failed` do not take it: SQLite serialises their reads and
//! one-statement writes with the agent's transactions.
//!
//! The kernel drops the lock when the process dies, SIGKILL and power cut included, so
//! no stale lock is ever left to clean up. The file holds the holder's pid and command
//! for the message a second process prints.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const LOCK_FILE_NAME: &str = "relais.lock";

/// How often a waiting process tries the lock again.
const POLL: Duration = Duration::from_millis(100);

/// The lock, held until dropped (the process's life). The file is never removed: a
/// process that unlinked it on exit could do so after a second one opened it and before
/// that one locked it, and a third would then lock a new file while the second held
/// the old one: two owners.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// The process holding the lock, as it wrote itself into the lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// `relais run`, `relais once`, `relais state reset`.
    pub command: String,
}

#[derive(Debug)]
pub enum LockError {
    /// Another process still held the lock when the wait ended; `holder` is `None` when
    /// its lock file could not be read (it may be writing it at that instant).
    Busy {
        dir: PathBuf,
        holder: Option<Holder>,
    },
    Io(PathBuf, io::Error),
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Busy { dir, holder } => {
                write!(f, "state directory {} is in use by ", dir.display())?;
                match holder {
                    Some(h) => write!(f, "{} (pid {})", h.command, h.pid),
                    None => write!(f, "another relais process"),
                }
            }
            // "state database": what an operator looks for, as in the other state errors.
            LockError::Io(path, e) => write!(
                f,
                "state database lock {}: {e} (is the state directory writable and the disk not full?)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for LockError {}

impl LockError {
    /// The one line `command` (e.g. `relais once`) prints when it cannot have the lock:
    /// what holds it and what to do about it.
    pub fn explain(&self, command: &str) -> String {
        let LockError::Busy { holder, .. } = self else {
            return self.to_string();
        };
        let advice = match holder {
            Some(h) if h.command == "relais run" && command == "relais once" => format!(
                ": it will push at its next pass; to push now: kill -USR1 {}",
                h.pid
            ),
            _ if command == "relais run" => "; only one agent may use a state directory: stop \
                 the other one, or give this one its own RELAIS_STATE_DIR"
                .to_string(),
            Some(h) if h.command == "relais run" => {
                "; stop it first (systemctl stop relais)".to_string()
            }
            _ => "; try again when it has finished".to_string(),
        };
        format!("{self}{advice}")
    }
}

/// Takes the lock of `state_dir` (creating both if needed) for `command`, waiting up to
/// `wait` for another process to release it.
pub fn acquire(state_dir: &Path, command: &str, wait: Duration) -> Result<StateLock, LockError> {
    let path = state_dir.join(LOCK_FILE_NAME);
    let io_err = |e| LockError::Io(path.clone(), e);
    crate::tracking::create_state_dir(state_dir).map_err(io_err)?;
    // std opens with O_CLOEXEC: a hook the agent runs must not inherit the lock and
    // keep it after the agent is gone.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err)?;
    let deadline = Instant::now() + wait;
    while !try_lock(&file).map_err(io_err)? {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LockError::Busy {
                dir: state_dir.to_path_buf(),
                holder: read_holder(&path),
            });
        }
        std::thread::sleep(left.min(POLL));
    }
    // Information for the next process, not state: no fsync (a stale pid after a power
    // cut is harmless, the lock itself lives in the kernel).
    let line = format!("{} {command}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all_at(line.as_bytes(), 0))
        .map_err(io_err)?;
    Ok(StateLock { _file: file })
}

/// [`acquire`], tried once without waiting first so that `on_wait` can say who holds
/// the lock before the wait begins.
pub fn acquire_waiting(
    state_dir: &Path,
    command: &str,
    wait: Duration,
    on_wait: impl FnOnce(&LockError),
) -> Result<StateLock, LockError> {
    match acquire(state_dir, command, Duration::ZERO) {
        Err(busy @ LockError::Busy { .. }) if !wait.is_zero() => {
            on_wait(&busy);
            acquire(state_dir, command, wait)
        }
        other => other,
    }
}

fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock only reads the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => Ok(false),
        _ => Err(e),
    }
}

fn read_holder(path: &Path) -> Option<Holder> {
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(4096)
        .read_to_string(&mut text)
        .ok()?;
    let (pid, command) = text.trim().split_once(' ')?;
    Some(Holder {
        pid: pid.parse().ok()?,
        command: command.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_it_names_itself() {
        let dir = std::env::temp_dir().join(format!("relais-state-lock-{}", std::process::id()));
        let held = acquire(&dir, "relais run", Duration::ZERO).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts
        // just as another process would.
        let e = acquire(&dir, "relais once", Duration::from_millis(150)).unwrap_err();
        let pid = std::process::id();
        assert_eq!(
            e.explain("relais once"),
            format!(
                "state directory {} is in use by relais run (pid {pid}): it will push at its next pass; to push now: kill -USR1 {pid}",
                dir.display()
            )
        );
        drop(held);
        acquire(&dir, "relais once", Duration::ZERO).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
