//! Streaming a BLOB out of the application's database as base64, in bounded memory and
//! without stalling the application's writes.
//!
//! SQLite reaches offset k of a BLOB by walking its overflow-page chain from the start,
//! so reopening a handle for every small chunk is quadratic, and each walk holds the
//! read lock. How the lock is held depends on the journal mode:
//!
//! - **Rollback journal** (SQLite's default): any open handle holds a SHARED lock that
//!   keeps the application from committing. relais reads one large chunk per handle
//!   and closes it before the chunk goes to the network, so the lock is held for one
//!   walk plus one chunk read, never across network I/O. The longest hold is recorded.
//! - **WAL**: readers never block writers, so one handle is read through and renewed
//!   every [`WAL_RENEW_BYTES`] or [`WAL_RENEW_AFTER`] so that checkpoints can progress.
//!
//! A row that changes or disappears during the upload is detected (a size or first-bytes
//! change on reopen, an expired handle in WAL mode) and the upload is abandoned.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use rusqlite::blob::Blob;
use rusqlite::{Connection, MAIN_DB};

use crate::settings::BlobSpec;

/// Bytes read through one WAL-mode handle before it is renewed.
pub const WAL_RENEW_BYTES: u64 = 64 * 1024 * 1024;
/// Age after which a WAL-mode handle is renewed.
pub const WAL_RENEW_AFTER: Duration = Duration::from_secs(2);
/// First bytes compared on every reopen to notice a BLOB replaced by one of the same size.
const HEAD_LEN: usize = 64;

/// Why a BLOB could not be streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobError {
    /// The row was modified while it was being uploaded.
    Changed(String),
    /// The row was deleted while it was being uploaded.
    Vanished,
    /// SQLite failed to read (locked for too long, I/O error, corruption).
    Read(String),
    /// The agent is shutting down; the row stays pending and is sent again later.
    Stopped,
    /// The media window closed mid-upload, or the open one does not take a BLOB this
    /// large ([`crate::media_window`]): the row stays pending until a window that does.
    Waiting,
}

impl std::fmt::Display for BlobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobError::Changed(why) => write!(
                f,
                "blob: the row changed during the upload ({why}); upload abandoned"
            ),
            BlobError::Vanished => write!(
                f,
                "blob: the row was deleted during the upload; upload abandoned"
            ),
            BlobError::Read(e) => write!(f, "blob: cannot read: {e}"),
            BlobError::Stopped => write!(f, "blob: upload interrupted by shutdown"),
            BlobError::Waiting => write!(f, "blob: waits for a media window that takes it"),
        }
    }
}

/// An open BLOB handle: while it lives, the database's read lock is held.
struct Handle<'c> {
    blob: Blob<'c>,
    /// When the lock was obtained.
    opened: Instant,
    bytes_read: u64,
}

/// Reads a BLOB's raw bytes chunk by chunk. Implements [`Read`]; wrap it in
/// [`Base64Encoder`] to produce the request body.
pub struct BlobReader<'c> {
    conn: &'c Connection,
    spec: &'c BlobSpec,
    rowid: i64,
    len: u64,
    head: Vec<u8>,
    wal: bool,
    chunk: Vec<u8>,
    start: usize,
    end: usize,
    offset: u64,
    /// The handle kept open between chunks, in WAL mode only.
    handle: Option<Handle<'c>>,
    stop: &'c AtomicBool,
    failure: Option<BlobError>,
    max_hold: Duration,
}

impl<'c> BlobReader<'c> {
    /// Prepares to stream the BLOB of row `rowid`; `Ok(None)` when the BLOB is NULL.
    pub fn open(
        conn: &'c Connection,
        spec: &'c BlobSpec,
        rowid: i64,
        chunk_bytes: usize,
        wal: bool,
        stop: &'c AtomicBool,
    ) -> Result<Option<BlobReader<'c>>, BlobError> {
        let sql = format!(
            "SELECT length(\"{}\") FROM \"{}\" WHERE rowid = ?1",
            spec.column, spec.table
        );
        let len: Option<Option<i64>> = match conn.query_row(&sql, [rowid], |r| r.get(0)) {
            Ok(v) => Some(v),
            Err(rusqlite::Error::QueryReturnedNoRows) => None,
            Err(e) => return Err(BlobError::Read(e.to_string())),
        };
        let len = match len {
            None => return Err(BlobError::Vanished),
            Some(None) => return Ok(None),
            Some(Some(n)) => n as u64,
        };
        Ok(Some(BlobReader {
            conn,
            spec,
            rowid,
            len,
            head: Vec::new(),
            wal,
            // As large as the chunk, but never larger than the BLOB itself.
            chunk: vec![0; chunk_bytes.min(len as usize).max(1)],
            start: 0,
            end: 0,
            offset: 0,
            handle: None,
            stop,
            failure: None,
            max_hold: Duration::ZERO,
        }))
    }

    /// The BLOB's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Why reading stopped early, if it did.
    pub fn failure(&self) -> Option<&BlobError> {
        self.failure.as_ref()
    }

    /// The longest time one SQLite access held the database's read lock.
    pub fn max_hold(&self) -> Duration {
        self.max_hold
    }

    /// Goes on from byte `offset` (a resumed upload): the next read starts there.
    pub fn skip_to(&mut self, offset: u64) {
        self.offset = offset.min(self.len);
        self.start = 0;
        self.end = 0;
    }

    /// The next chunk of at most `max` bytes (and `chunk_bytes`), straight from the
    /// reader's own buffer (an upload hashes it before sending it: one buffer, not two);
    /// empty at the end. SQLite is still read `chunk_bytes` at a time.
    pub fn next_chunk(&mut self, max: usize) -> Result<&[u8], BlobError> {
        if self.start == self.end && self.offset < self.len {
            if let Err(e) = self.refill() {
                self.failure = Some(e.clone());
                self.handle = None;
                return Err(e);
            }
        }
        let end = self.end.min(self.start.saturating_add(max));
        let chunk = &self.chunk[self.start..end];
        self.start = end;
        Ok(chunk)
    }

    fn refill(&mut self) -> Result<(), BlobError> {
        crate::notify::keepalive();
        if self.stop.load(Ordering::Relaxed) {
            return Err(BlobError::Stopped);
        }
        let want = (self.len - self.offset).min(self.chunk.len() as u64) as usize;
        let expired = self.handle.as_ref().is_some_and(|h| {
            h.opened.elapsed() >= WAL_RENEW_AFTER || h.bytes_read >= WAL_RENEW_BYTES
        });
        if expired {
            self.handle = None;
        }
        // The hold is timed from the moment the lock is held: time spent in `blob_open`
        // waiting for the application's own commit to finish is not relais holding it.
        let (mut handle, began) = match self.handle.take() {
            Some(h) => (h, Instant::now()),
            None => {
                let h = self.open_handle()?;
                let locked_at = h.opened;
                (h, locked_at)
            }
        };
        handle
            .blob
            .read_at_exact(&mut self.chunk[..want], self.offset as usize)
            .map_err(classify)?;
        handle.bytes_read += want as u64;
        // In rollback-journal mode the handle, and the lock, end with this function,
        // before the chunk goes to the network.
        if self.wal {
            self.handle = Some(handle);
        }
        self.max_hold = self.max_hold.max(began.elapsed());
        self.offset += want as u64;
        self.start = 0;
        self.end = want;
        Ok(())
    }

    /// Opens a handle and checks the row is still the one being sent.
    fn open_handle(&mut self) -> Result<Handle<'c>, BlobError> {
        let blob = self
            .conn
            .blob_open(
                MAIN_DB,
                self.spec.table.as_str(),
                self.spec.column.as_str(),
                self.rowid,
                true,
            )
            .map_err(classify)?;
        let locked_at = Instant::now();
        let now = blob.len() as u64;
        if now != self.len {
            return Err(BlobError::Changed(format!(
                "size went from {} to {now} bytes",
                self.len
            )));
        }
        let mut head = vec![0; HEAD_LEN.min(self.len as usize)];
        blob.read_at_exact(&mut head, 0).map_err(classify)?;
        if self.head.is_empty() {
            self.head = head;
        } else if head != self.head {
            return Err(BlobError::Changed("its first bytes differ".into()));
        }
        Ok(Handle {
            blob,
            opened: locked_at,
            bytes_read: 0,
        })
    }
}

fn classify(e: rusqlite::Error) -> BlobError {
    let text = e.to_string();
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::OperationAborted) => {
            BlobError::Changed("the row was modified".into())
        }
        _ if text.contains("no such rowid") => BlobError::Vanished,
        _ if text.contains("cannot open value of type null") => {
            BlobError::Changed("the BLOB became NULL".into())
        }
        _ => BlobError::Read(text),
    }
}

impl Read for BlobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if self.offset == self.len {
                return Ok(0);
            }
            if let Err(e) = self.refill() {
                let err = io::Error::other(e.to_string());
                self.failure = Some(e);
                self.handle = None;
                return Err(err);
            }
        }
        let n = buf.len().min(self.end - self.start);
        buf[..n].copy_from_slice(&self.chunk[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

/// Raw bytes per encoding step: a multiple of 3, so only the last step has padding.
const RAW_STEP: usize = 48 * 1024;

/// Encodes a byte stream as standard padded base64, in bounded memory.
pub struct Base64Encoder<R> {
    inner: R,
    raw: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
    done: bool,
}

impl<R: Read> Base64Encoder<R> {
    pub fn new(inner: R) -> Self {
        Base64Encoder {
            inner,
            raw: vec![0; RAW_STEP],
            out: Vec::new(),
            pos: 0,
            done: false,
        }
    }

    /// Fills `raw` completely unless the input ends, so every step but the last is a
    /// multiple of 3 bytes.
    fn step(&mut self) -> io::Result<()> {
        let mut filled = 0;
        while filled < self.raw.len() {
            match self.inner.read(&mut self.raw[filled..])? {
                0 => {
                    self.done = true;
                    break;
                }
                n => filled += n,
            }
        }
        self.out.resize(base64_len(filled as u64) as usize, 0);
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(&self.raw[..filled], &mut self.out)
            .map_err(io::Error::other)?;
        self.out.truncate(written);
        self.pos = 0;
        Ok(())
    }
}

impl<R: Read> Read for Base64Encoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.out.len() {
            if self.done {
                return Ok(0);
            }
            self.step()?;
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Length of the padded base64 encoding of `n` bytes.
pub fn base64_len(n: u64) -> u64 {
    n.div_ceil(3) * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_matches_one_shot_base64() {
        for n in [
            0usize,
            1,
            2,
            3,
            RAW_STEP - 1,
            RAW_STEP,
            RAW_STEP + 1,
            3 * RAW_STEP + 2,
        ] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            // A reader returning short reads, as a socket-sized consumer would see.
            let mut enc = Base64Encoder::new(io::Cursor::new(data.clone()).take(n as u64));
            let mut out = Vec::new();
            let mut buf = [0u8; 1000];
            loop {
                let k = enc.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..k]);
            }
            assert_eq!(
                out,
                base64::engine::general_purpose::STANDARD
                    .encode(&data)
                    .into_bytes(),
                "n = {n}"
            );
            assert_eq!(out.len() as u64, base64_len(n as u64));
        }
    }
}
