//! Durable file replacement: write a temporary file in the same directory, fsync it,
//! rename it over the target, fsync the directory. A power cut at any instant leaves
//! either the old file or the new one, whole.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Replaces `path` with `contents`, creating it with `mode` (e.g. `0o600` for files
/// holding secrets). Errors name the step that failed.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let tmp = temp_path(path);
    let result = write_synced(&tmp, contents, mode)
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| context("rename", &tmp, e)))
        .and_then(|()| sync_dir(&dir));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies `path` to `dest` durably (used to keep the previous version of a file).
pub fn copy(path: &Path, dest: &Path, mode: u32) -> io::Result<()> {
    let contents = fs::read(path).map_err(|e| context("read", path, e))?;
    replace(dest, &contents, mode)
}

fn write_synced(tmp: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)
        .map_err(|e| context("create", tmp, e))?;
    // The mode given to open() is filtered by the umask; secrets must not depend on it.
    fs::set_permissions(tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| context("chmod", tmp, e))?;
    f.write_all(contents)
        .map_err(|e| context("write", tmp, e))?;
    f.sync_all().map_err(|e| context("fsync", tmp, e))
}

/// Creates an empty file next to `path` under a name no other process or call uses
/// (`relais.db.new-<pid>-<n>`), exclusively: for a file that must be built whole before
/// it gets its real name with [`install_new`].
pub fn create_unique(path: &Path, mode: u32) -> io::Result<PathBuf> {
    static N: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tmp = with_suffix(path, &format!(".new-{}-{n}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(_) => return Ok(tmp),
            // A leftover of an earlier process with the same pid (after a reboot).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(context("create", &tmp, e)),
        }
    }
}

/// Gives the finished file `tmp` the name `path` unless `path` exists already: fsyncs
/// it, links it (a link never replaces, unlike a rename, so a file another process
/// installed meanwhile is never clobbered), removes `tmp` and fsyncs the directory.
/// Returns false when `path` was there first (`tmp` is removed all the same).
pub fn install_new(tmp: &Path, path: &Path) -> io::Result<bool> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| context("fsync", tmp, e))?;
    let installed = match fs::hard_link(tmp, path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(context("link", path, e)),
    };
    fs::remove_file(tmp).map_err(|e| context("remove", tmp, e))?;
    sync_dir(&parent_dir(path))?;
    Ok(installed)
}

/// Makes the directory's entries (a rename, a new file) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| context("fsync directory", dir, e))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A fixed temporary name per target: a leftover from a power cut is simply
/// overwritten by the next replacement instead of accumulating.
fn temp_path(path: &Path) -> PathBuf {
    with_suffix(path, ".tmp")
}

/// The sibling of `path` whose name is `path`'s name plus `suffix` (`config.json.prev`).
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn context(step: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{step} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_with_mode_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("relais-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("config.json");
        replace(&target, b"one", 0o600).unwrap();
        replace(&target, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!temp_path(&target).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn install_new_never_replaces() {
        let dir = std::env::temp_dir().join(format!("relais-atomic-new-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("relais.db");
        let (a, b) = (
            create_unique(&target, 0o600).unwrap(),
            create_unique(&target, 0o600).unwrap(),
        );
        assert_ne!(a, b);
        fs::write(&a, b"first").unwrap();
        fs::write(&b, b"second").unwrap();
        assert!(install_new(&a, &target).unwrap());
        assert!(!install_new(&b, &target).unwrap());
        assert_eq!(fs::read(&target).unwrap(), b"first");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary files left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reports_the_failing_step() {
        let err = replace(Path::new("/nonexistent-dir/x.json"), b"x", 0o600).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("create /nonexistent-dir/x.json.tmp"),
            "{err}"
        );
    }
}
