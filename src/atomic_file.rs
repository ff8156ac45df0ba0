//! Durable file replacement: write a temporary file in the same directory, fsync it,
//! rename it over the target, fsync the directory. A power cut at any instant leaves
//! either the old file or the new one, whole.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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

fn sync_dir(dir: &Path) -> io::Result<()> {
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
    fn reports_the_failing_step() {
        let err = replace(Path::new("/nonexistent-dir/x.json"), b"x", 0o600).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("create /nonexistent-dir/x.json.tmp"),
            "{err}"
        );
    }
}
