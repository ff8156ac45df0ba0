//! Streaming split of a JSON request body into a small in-memory JSON text and at most
//! one large decoded BLOB in a temporary file, fed chunk by chunk.
//!
//! A tiny tokenizer that only tracks "inside a string or not". Text outside
//! strings and short strings are copied to the JSON buffer; a string whose raw content
//! exceeds [`INLINE_STRING_MAX`] is replaced there by `"<blob>"` and base64-decoded on
//! the fly into a temporary file, hashed with SHA-256 as it is written and fsynced at its
//! end. Memory is bounded by the chunk size, [`INLINE_STRING_MAX`] and [`JSON_MAX`].
//!
//! Validation of the JSON structure is left to the caller (miniserde parses the small
//! buffer); this module only reports what it alone can see.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use relais_wire::hex;
use sha2::{Digest, Sha256};

/// Strings whose raw content is longer than this are diverted to disk.
pub const INLINE_STRING_MAX: usize = 64 * 1024;
/// Cap on the in-memory JSON text (everything but the diverted string), so a body made
/// of many short strings cannot grow memory without bound either.
pub const JSON_MAX: usize = 16 * 1024 * 1024;
/// Placeholder written into the JSON text in place of a diverted string.
pub const BLOB_PLACEHOLDER: &[u8] = b"<blob>";

/// Base64 text is decoded in blocks of this many characters (a multiple of 4).
const DECODE_BLOCK: usize = 48 * 1024;
const WRITE_BUFFER: usize = 64 * 1024;

/// Creates uniquely named temporary files in one directory, which several servers may
/// share (one media directory mounted on every server of a fleet).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    /// This process's part of every name: a pid alone repeats across containers (each
    /// server pid 1) sharing the directory.
    instance: String,
    counter: AtomicU64,
    stale_after: Duration,
}

impl Spool {
    /// Uses `dir` (created if missing) for files named after `instance`, and removes the
    /// leftovers of interrupted requests: see [`Spool::sweep`].
    pub fn new(dir: PathBuf, instance: String, stale_after: Duration) -> io::Result<Spool> {
        fs::create_dir_all(&dir)?;
        let spool = Spool {
            dir,
            instance,
            counter: AtomicU64::new(0),
            stale_after,
        };
        spool.sweep()?;
        Ok(spool)
    }

    /// Removes the partial files not written to for `stale_after`: those of requests
    /// that can no longer be running (a killed server's, which no destructor removed).
    /// A younger one may be another server's upload in flight, and is kept.
    pub fn sweep(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "part") {
                continue;
            }
            let idle = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default());
            // Best effort: a leftover that cannot be removed is harmless.
            if idle.is_ok_and(|idle| idle > self.stale_after) && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub(super) fn create(&self) -> io::Result<(TempPath, File)> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{n}.part", self.instance));
        // create_new: never write through a file someone else left under that name.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((TempPath { path: Some(path) }, file))
    }
}

/// A temporary file that is deleted on drop unless [`TempPath::persist`] moved it to its
/// final place, so failed or cut requests leave nothing behind.
#[derive(Debug)]
pub struct TempPath {
    path: Option<PathBuf>,
}

impl TempPath {
    /// Takes charge of an existing file: deleted on drop unless persisted.
    pub(super) fn adopt(path: PathBuf) -> TempPath {
        TempPath { path: Some(path) }
    }

    pub(super) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Renames the file to `dest`; on failure it stays armed for deletion.
    pub fn persist(&mut self, dest: &Path) -> io::Result<()> {
        if let Some(path) = &self.path {
            fs::rename(path, dest)?;
            self.path = None;
        }
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// The decoded bytes of the one large string of a body, already on stable storage.
#[derive(Debug)]
pub struct SpooledBlob {
    pub file: TempPath,
    pub len: u64,
    /// SHA-256 of the decoded bytes, lowercase hex.
    pub sha256: String,
}

/// What a body split into.
#[derive(Debug, Default)]
pub struct SplitBody {
    /// The body text with the large string replaced by `"<blob>"`. Incomplete when
    /// `json_overflow` is set.
    pub json: Vec<u8>,
    pub blob: Option<SpooledBlob>,
    /// Where in `json` the placeholder string of `blob` starts (its opening quote).
    pub blob_at: Option<usize>,
    /// The JSON text outside large strings exceeded [`JSON_MAX`].
    pub json_overflow: bool,
    /// The large string(s) could not be accepted: not base64, or more than one.
    pub blob_problem: Option<String>,
    /// The temporary file could not be written: a server-side failure.
    pub storage_problem: Option<String>,
}

/// The tokenizer: only string boundaries (and escapes, so that `\"` does not end a
/// string) matter; everything else is copied through untouched.
pub struct Splitter<'a> {
    spool: &'a Spool,
    out: SplitBody,
    in_string: bool,
    /// The previous byte inside the current string was an unescaped `\`.
    escape: bool,
    /// Raw content of the current string while it is still short enough.
    pending: Vec<u8>,
    /// Decoder of the current string once it has been diverted.
    diverted: Option<Base64Sink>,
}

impl<'a> Splitter<'a> {
    pub fn new(spool: &'a Spool) -> Self {
        Splitter {
            spool,
            out: SplitBody::default(),
            in_string: false,
            escape: false,
            pending: Vec::new(),
            diverted: None,
        }
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if !self.in_string {
                match chunk.iter().position(|&b| b == b'"') {
                    Some(i) => {
                        self.push_json(&chunk[..=i]);
                        self.in_string = true;
                        chunk = &chunk[i + 1..];
                    }
                    None => {
                        self.push_json(chunk);
                        return;
                    }
                }
            } else {
                let (content_len, ended) = self.scan_string(chunk);
                self.push_content(&chunk[..content_len]);
                if !ended {
                    return;
                }
                self.end_string();
                chunk = &chunk[content_len + 1..];
            }
        }
    }

    /// Finds the closing quote of the current string in `chunk`. Returns the length of
    /// the content before it and whether it was found.
    fn scan_string(&mut self, chunk: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < chunk.len() {
            if self.escape {
                self.escape = false;
                i += 1;
                continue;
            }
            match chunk[i..].iter().position(|&b| b == b'"' || b == b'\\') {
                None => return (chunk.len(), false),
                Some(p) if chunk[i + p] == b'\\' => {
                    self.escape = true;
                    i += p + 1;
                }
                Some(p) => return (i + p, true),
            }
        }
        (chunk.len(), false)
    }

    fn push_content(&mut self, content: &[u8]) {
        if let Some(sink) = &mut self.diverted {
            sink.write(content);
        } else if self.pending.len() + content.len() > INLINE_STRING_MAX {
            let mut sink = self.open_sink();
            sink.write(&self.pending);
            sink.write(content);
            self.pending = Vec::new();
            self.diverted = Some(sink);
        } else {
            self.pending.extend_from_slice(content);
        }
    }

    /// A decoder for a string that just became too long. Only the first such string of
    /// a body becomes the row's BLOB; later ones are still consumed but make the body
    /// unacceptable.
    fn open_sink(&mut self) -> Base64Sink {
        if self.out.blob.is_some() || self.out.blob_problem.is_some() {
            self.out
                .blob_problem
                .get_or_insert_with(|| "more than one string longer than 64 KiB".to_string());
            return Base64Sink::discarding();
        }
        match self.spool.create() {
            Ok((path, file)) => Base64Sink::new(path, file),
            Err(e) => {
                self.out
                    .storage_problem
                    .get_or_insert_with(|| format!("cannot create temporary file: {e}"));
                Base64Sink::discarding()
            }
        }
    }

    fn end_string(&mut self) {
        self.in_string = false;
        if let Some(sink) = self.diverted.take() {
            match sink.finish() {
                Ok(Some(blob)) => {
                    self.out.blob = Some(blob);
                    self.out.blob_at = self.out.json.len().checked_sub(1);
                }
                Ok(None) => {}
                Err(SinkError::Invalid(msg)) => {
                    self.out.blob_problem.get_or_insert(msg);
                }
                Err(SinkError::Storage(msg)) => {
                    self.out.storage_problem.get_or_insert(msg);
                }
            }
            self.push_json(BLOB_PLACEHOLDER);
        } else {
            let content = std::mem::take(&mut self.pending);
            self.push_json(&content);
        }
        self.push_json(b"\"");
    }

    fn push_json(&mut self, bytes: &[u8]) {
        if self.out.json_overflow {
            return;
        }
        if self.out.json.len() + bytes.len() > JSON_MAX {
            self.out.json_overflow = true;
            self.out.json = Vec::new();
            return;
        }
        self.out.json.extend_from_slice(bytes);
    }

    /// An unterminated string at the end of the body is copied as is, which leaves the
    /// JSON text invalid for the caller to reject; a diverted one is dropped together
    /// with its temporary file.
    pub fn finish(mut self) -> SplitBody {
        if self.in_string && self.diverted.take().is_none() {
            let content = std::mem::take(&mut self.pending);
            self.push_json(&content);
        }
        self.out
    }
}

enum SinkError {
    /// The string is not standard padded base64: the client's fault.
    Invalid(String),
    /// Writing the decoded bytes failed: the server's fault.
    Storage(String),
}

/// Decodes the raw content of a JSON string (base64, possibly with `\/` escapes, which
/// some JSON encoders emit) into a file as it arrives.
struct Base64Sink {
    /// `None` when the content is only consumed, not kept.
    out: Option<(TempPath, BufWriter<File>)>,
    sha256: Sha256,
    /// Base64 characters not yet decoded.
    chars: Vec<u8>,
    decoded: Vec<u8>,
    escape: bool,
    /// A block ending in `=` was decoded: any further character is invalid.
    padded: bool,
    len: u64,
    error: Option<SinkError>,
}

impl Base64Sink {
    fn new(path: TempPath, file: File) -> Self {
        let mut sink = Base64Sink::discarding();
        sink.out = Some((path, BufWriter::with_capacity(WRITE_BUFFER, file)));
        sink
    }

    fn discarding() -> Self {
        Base64Sink {
            out: None,
            sha256: Sha256::new(),
            chars: Vec::new(),
            decoded: Vec::new(),
            escape: false,
            padded: false,
            len: 0,
            error: None,
        }
    }

    fn active(&self) -> bool {
        self.out.is_some() && self.error.is_none()
    }

    /// Accepts raw string content (still JSON-escaped).
    fn write(&mut self, mut raw: &[u8]) {
        while self.active() && !raw.is_empty() {
            if self.escape {
                self.escape = false;
                if raw[0] == b'/' {
                    self.push_chars(b"/");
                } else {
                    self.fail_invalid("escape sequence in base64 string");
                }
                raw = &raw[1..];
                continue;
            }
            match raw.iter().position(|&b| b == b'\\') {
                Some(p) => {
                    self.push_chars(&raw[..p]);
                    self.escape = true;
                    raw = &raw[p + 1..];
                }
                None => {
                    self.push_chars(raw);
                    raw = &[];
                }
            }
        }
    }

    fn push_chars(&mut self, chars: &[u8]) {
        self.chars.extend_from_slice(chars);
        if self.chars.len() >= DECODE_BLOCK {
            let whole = self.chars.len() / 4 * 4;
            self.decode(whole);
        }
    }

    /// Decodes and writes the first `n` pending characters (a multiple of 4).
    fn decode(&mut self, n: usize) {
        if n == 0 || !self.active() {
            return;
        }
        if self.padded {
            return self.fail_invalid("data after base64 padding");
        }
        self.decoded.clear();
        if let Err(e) = STANDARD.decode_vec(&self.chars[..n], &mut self.decoded) {
            return self.fail_invalid(&format!("invalid base64: {e}"));
        }
        self.padded = self.chars[n - 1] == b'=';
        self.chars.drain(..n);
        if let Some((_, writer)) = &mut self.out {
            if let Err(e) = writer.write_all(&self.decoded) {
                self.error = Some(SinkError::Storage(format!("cannot write media: {e}")));
                return;
            }
            self.sha256.update(&self.decoded);
            self.len += self.decoded.len() as u64;
        }
    }

    fn fail_invalid(&mut self, msg: &str) {
        self.error = Some(SinkError::Invalid(msg.to_string()));
    }

    /// Decodes the tail, flushes and fsyncs the file and hands it over; `Ok(None)` for
    /// a discarding sink.
    fn finish(mut self) -> Result<Option<SpooledBlob>, SinkError> {
        if self.active() {
            if self.chars.len() % 4 != 0 {
                self.fail_invalid("invalid base64: length is not a multiple of 4");
            } else {
                self.decode(self.chars.len());
            }
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        let Some((file, writer)) = self.out else {
            return Ok(None);
        };
        // The row that will point at this file tells the device it may forget the
        // BLOB: the bytes must be on stable storage before that.
        let synced = writer
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all());
        match synced {
            Ok(()) => Ok(Some(SpooledBlob {
                file,
                len: self.len,
                sha256: hex(&self.sha256.finalize()),
            })),
            Err(e) => Err(SinkError::Storage(format!("cannot write media: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spool() -> (Spool, PathBuf) {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("relais-split-test-{}-{n}", std::process::id()));
        (
            Spool::new(dir.clone(), "test".into(), Duration::from_secs(60)).expect("spool dir"),
            dir,
        )
    }

    /// Feeds in awkward 7-byte chunks to exercise state carried across chunks.
    fn split(body: &[u8], spool: &Spool) -> SplitBody {
        let mut splitter = Splitter::new(spool);
        for chunk in body.chunks(7) {
            splitter.feed(chunk);
        }
        splitter.finish()
    }

    #[test]
    fn a_sweep_removes_only_partial_files_idle_for_longer_than_a_request_may_take() {
        let (spool, dir) = spool();
        let touch = |name: &str, idle: Duration| {
            let file = File::create(dir.join(name)).expect("create");
            let written = std::time::SystemTime::now() - idle;
            file.set_modified(written).expect("mtime");
        };
        touch("old.part", Duration::from_secs(61));
        touch("live.part", Duration::from_secs(5));
        touch("old.bin", Duration::from_secs(3600));
        assert_eq!(spool.sweep().expect("sweep"), 1);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["live.part", "old.bin"]);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn short_strings_pass_through() {
        let (spool, dir) = spool();
        let body = br#"{"a": "x\"y", "b": [1, 2]}"#;
        let out = split(body, &spool);
        assert_eq!(out.json, body.to_vec());
        assert!(out.blob.is_none());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn long_string_is_decoded_hashed_and_located() {
        let (spool, dir) = spool();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let b64 = STANDARD.encode(&data).replace('/', "\\/");
        let body = format!(r#"{{"k": 1, "video_data": "{b64}", "z": "end"}}"#);
        let out = split(body.as_bytes(), &spool);
        let json = String::from_utf8(out.json).expect("utf8");
        assert_eq!(json, r#"{"k": 1, "video_data": "<blob>", "z": "end"}"#);
        assert_eq!(out.blob_at, json.find("\"<blob>\""));
        let mut blob = out.blob.expect("blob");
        assert_eq!(blob.len, data.len() as u64);
        assert_eq!(blob.sha256, hex(&Sha256::digest(&data)));
        let dest = dir.join("final.bin");
        blob.file.persist(&dest).expect("persist");
        assert_eq!(fs::read(&dest).expect("read"), data);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn invalid_base64_is_reported_and_cleaned_up() {
        let (spool, dir) = spool();
        let body = format!(r#"{{"v": "{}!"}}"#, "A".repeat(100_000));
        let out = split(body.as_bytes(), &spool);
        assert!(out.blob.is_none());
        assert!(out.blob_problem.is_some());
        assert_eq!(fs::read_dir(&dir).expect("dir").count(), 0);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn padding_in_the_middle_is_rejected() {
        let (spool, dir) = spool();
        let body = format!(r#"{{"v": "QQ=={}"}}"#, "QUJD".repeat(30_000));
        let out = split(body.as_bytes(), &spool);
        assert!(out.blob_problem.is_some());
        let _ = fs::remove_dir_all(dir);
    }
}
