//! Durable file replacement: write a temporary file in the same directory, fsync it,
//! rename it over the target, fsync the directory. A power cut at any instant leaves
//! either the old file or the new one, whole.
//!
//! Temporary files are created exclusively (`O_EXCL`, `O_NOFOLLOW`) under a name unique
//! to the process and the call: a symbolic link planted at a predictable name
//! (`config.json.tmp`) would otherwise have the agent overwrite and chmod its target.
//! Those a power cut left behind are removed by the next call for the same target, once
//! the process that made them is gone.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Replaces `path` with `contents`, creating it with `mode` (e.g. `0o600` for files
/// holding secrets). Errors name the step that failed.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path);
    let (tmp, file) = create_exclusive(path, mode)?;
    let result = write_synced(file, &tmp, contents, mode)
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

fn write_synced(mut f: File, tmp: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    // The mode given to open() is filtered by the umask; secrets must not depend on it.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| context("chmod", tmp, e))?;
    f.write_all(contents)
        .map_err(|e| context("write", tmp, e))?;
    f.sync_all().map_err(|e| context("fsync", tmp, e))
}

/// Creates an empty file next to `path` under a name no other process or call uses
/// (`relais.db.new-<pid>-<n>`), exclusively: for a file that must be built whole before
/// it gets its real name with [`install_new`].
pub fn create_unique(path: &Path, mode: u32) -> io::Result<PathBuf> {
    create_exclusive(path, mode).map(|(tmp, _)| tmp)
}

fn create_exclusive(path: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    static N: AtomicU32 = AtomicU32::new(0);
    remove_stale(path);
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tmp = with_suffix(path, &format!("{TEMP_MARK}{}-{n}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            // Planted, or a leftover of an earlier process with the same pid.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(context("create", &tmp, e)),
        }
    }
}

/// What a temporary file's name adds to its target's, before `<pid>-<n>`.
const TEMP_MARK: &str = ".new-";

/// Removes the temporary files of `path` whose process is gone (a power cut, a kill).
fn remove_stale(path: &Path) {
    let Some(name) = path.file_name() else {
        return;
    };
    let prefix = format!("{}{TEMP_MARK}", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(parent_dir(path)) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let file = entry.file_name();
        let pid = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = fs::remove_file(entry.path());
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
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "temporary files left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_planted_link_is_not_followed_and_stale_temps_go() {
        let dir = std::env::temp_dir().join(format!("relais-atomic-link-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (target, victim) = (dir.join("config.json"), dir.join("victim"));
        fs::write(&victim, b"precious").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o644)).unwrap();
        for name in [
            "config.json.tmp",
            &format!("config.json.new-{}-0", std::process::id()),
        ] {
            std::os::unix::fs::symlink(&victim, dir.join(name)).unwrap();
        }
        // Left by a process that is gone (pid 0 is never a user process's).
        let stale = dir.join("config.json.new-0-7");
        fs::write(&stale, b"half").unwrap();
        replace(&target, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(
            !fs::symlink_metadata(&target)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert!(!stale.exists(), "the stale temporary file was removed");
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
                .starts_with("create /nonexistent-dir/x.json.new-"),
            "{err}"
        );
    }
}
