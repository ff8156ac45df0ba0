//! Media files: the request body is streamed through the splitter ([`split`]) in a
//! blocking thread, so the base64 string of a BLOB goes straight into a temporary file
//! under `<media-dir>/.incoming/` (decoded, SHA-256 computed while writing, fsynced)
//! and memory never holds the whole body. [`MediaDir::place`] renames the file into
//! `<media-dir>/` before the row that names it is committed; a body cut midway never
//! gets there and its temporary file is deleted.
//!
//! A resumable upload (README, "Resumable media uploads") grows its partial file
//! `<media-dir>/.uploads/<id>.part` one checked chunk at a time ([`MediaDir::append`]);
//! once complete it is placed like a push's BLOB ([`MediaDir::place_upload`]).
//!
//! Rows name files relative to the media directory, so the directory can move, or be
//! shared by several servers, or be replaced by an object store implementing the same
//! place and remove steps.

mod split;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt as _;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

pub use split::{BLOB_PLACEHOLDER, INLINE_STRING_MAX, SplitBody, SpooledBlob};

/// Chunks in flight between the connection and the splitter thread: with hyper's reads
/// of at most a few hundred KiB, this bounds the body bytes held in memory.
const CHANNEL_DEPTH: usize = 4;

/// Where temporary files live, inside the media directory so the rename stays on one
/// filesystem; hidden so a listing of the media shows only complete files.
const INCOMING: &str = ".incoming";

/// Where uploads' partial files live: apart from [`INCOMING`], whose sweep removes files
/// idle for longer than a request, as an upload between two PATCHes is.
const UPLOADS: &str = ".uploads";

/// Read size when a complete upload is hashed.
const READ_BUFFER: usize = 64 * 1024;

/// A complete body, split: the JSON text, the decoded BLOB if any, and the SHA-256 of
/// the body exactly as sent.
#[derive(Debug)]
pub struct Received {
    pub split: SplitBody,
    pub body_sha256: String,
}

/// Why a body could not be received.
#[derive(Debug)]
pub enum ReceiveError {
    /// The body ended early or the connection failed; `limit` when the body outgrew the
    /// size limit.
    Body { limit: bool, detail: String },
    /// The splitter thread could not run.
    Worker(String),
}

/// The body of one PATCH of an upload, in a temporary file (deleted on drop), not yet
/// appended.
#[derive(Debug)]
pub struct Chunk {
    file: split::TempPath,
    /// The body's length: more than the `max_len` given to [`MediaDir::receive_chunk`]
    /// means only that much was kept.
    pub len: u64,
    pub sha256: [u8; 32],
}

/// A media file in its final place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Relative to the media directory.
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct MediaDir {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    spool: split::Spool,
    /// See [`instance_tag`].
    instance: String,
    counter: AtomicU64,
}

impl MediaDir {
    /// Creates the directory if needed and removes the temporary files of requests that
    /// cannot be running any more: idle for longer than `stale_after`, which must exceed
    /// the longest request of every server sharing the directory.
    pub fn open(root: &Path, stale_after: Duration) -> std::io::Result<MediaDir> {
        std::fs::create_dir_all(root.join(UPLOADS))?;
        let instance = instance_tag();
        let spool = split::Spool::new(root.join(INCOMING), instance.clone(), stale_after)?;
        Ok(MediaDir {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                spool,
                instance,
                counter: AtomicU64::new(0),
            }),
        })
    }

    /// Sweeps the stale temporary files every `period`, forever: a server killed
    /// mid-upload leaves its partial file for whichever server sweeps next.
    pub async fn sweep_every(self, period: Duration) {
        // The first sweep is the one `open` did.
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let inner = Arc::clone(&self.inner);
            match tokio::task::spawn_blocking(move || inner.spool.sweep()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(
                    "media: removed {n} partial upload file(s) of requests that ended without a \
                     body (a server killed mid-upload)"
                ),
                Ok(Err(e)) => tracing::warn!(
                    "media: cannot sweep {}: {e}",
                    self.inner.root.join(INCOMING).display()
                ),
                Err(e) => tracing::warn!("media: the sweep failed: {e}"),
            }
        }
    }

    /// Streams `body` through the splitter in a blocking thread.
    pub async fn receive(&self, body: Body) -> Result<Received, ReceiveError> {
        if axum::body::HttpBody::size_hint(&body)
            .upper()
            .is_some_and(|n| n <= split::INLINE_STRING_MAX as u64)
        {
            return self.receive_small(body).await;
        }
        let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let inner = Arc::clone(&self.inner);
        let worker = tokio::task::spawn_blocking(move || {
            let mut splitter = split::Splitter::new(&inner.spool);
            let mut sha256 = Sha256::new();
            while let Some(chunk) = rx.blocking_recv() {
                sha256.update(&chunk);
                splitter.feed(&chunk);
            }
            (splitter.finish(), relais_wire::hex(&sha256.finalize()))
        });
        let streamed = forward(body, &tx).await;
        // Closing the channel ends the worker, whether the body was complete or not; a
        // cut body's temporary file is deleted when its split result is dropped.
        drop(tx);
        let (split, body_sha256) = worker
            .await
            .map_err(|e| ReceiveError::Worker(format!("media: the body reader failed: {e}")))?;
        streamed?;
        Ok(Received { split, body_sha256 })
    }

    /// A body too small to hold a string the splitter diverts to a file (most pushes:
    /// events) is split here: no file I/O, so no hop to a blocking thread and back.
    async fn receive_small(&self, body: Body) -> Result<Received, ReceiveError> {
        let bytes = body.collect().await.map_err(body_error)?.to_bytes();
        let mut splitter = split::Splitter::new(&self.inner.spool);
        splitter.feed(&bytes);
        Ok(Received {
            split: splitter.finish(),
            body_sha256: relais_wire::hex(&Sha256::digest(&bytes)),
        })
    }

    /// Moves `blob` into the media directory under a new unique name (fsyncing the
    /// directory, so the name survives a power cut once the row is committed).
    pub async fn place(&self, blob: SpooledBlob) -> std::io::Result<Placed> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.place(blob)).await
    }

    /// Streams the body of a PATCH into a temporary file, its SHA-256 computed as it is
    /// written; keeps at most `max_len` bytes (the rest is counted).
    pub async fn receive_chunk(&self, body: Body, max_len: u64) -> Result<Chunk, ReceiveError> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_DEPTH);
        let inner = Arc::clone(&self.inner);
        let worker = tokio::task::spawn_blocking(move || -> std::io::Result<Chunk> {
            use std::io::Write as _;
            let (file, out) = inner.spool.create()?;
            let mut out = std::io::BufWriter::with_capacity(READ_BUFFER, out);
            let (mut sha256, mut len) = (Sha256::new(), 0u64);
            while let Some(bytes) = rx.blocking_recv() {
                let keep = max_len.saturating_sub(len).min(bytes.len() as u64) as usize;
                out.write_all(&bytes[..keep])?;
                sha256.update(&bytes);
                len += bytes.len() as u64;
            }
            // No fsync: this file is only read back by the append, whose fsync of the
            // partial file is the one the answered offset needs.
            out.flush()?;
            Ok(Chunk {
                file,
                len,
                sha256: sha256.finalize().into(),
            })
        });
        let streamed = forward(body, &tx).await;
        drop(tx);
        let chunk = worker
            .await
            .map_err(|e| ReceiveError::Worker(format!("media: the body reader failed: {e}")))?
            .map_err(|e| ReceiveError::Worker(format!("media: cannot write the chunk: {e}")))?;
        streamed?;
        Ok(chunk)
    }

    /// Writes `chunk` into upload `id`'s partial file from `offset` (cutting off
    /// whatever an interrupted append left beyond it) and fsyncs the file, and the
    /// directory for a new file: the offset answered must survive a power cut.
    pub async fn append(&self, id: &str, offset: u64, chunk: Chunk) -> std::io::Result<()> {
        let path = self.upload_path(id);
        blocking(move || {
            use std::io::{Seek as _, SeekFrom};
            // Created by the first chunk only: past offset 0 a missing file is an
            // upload whose bytes are gone (placed already, or removed), not a new one.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(offset == 0)
                .truncate(false)
                .open(&path)?;
            file.set_len(offset)?;
            file.seek(SeekFrom::Start(offset))?;
            let written = chunk.file.path().ok_or_else(|| {
                std::io::Error::other("media: the chunk's temporary file was moved")
            })?;
            let mut from = std::fs::File::open(written)?;
            std::io::copy(&mut from, &mut file)?;
            file.sync_all()?;
            if offset == 0 {
                if let Some(dir) = path.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
            }
            Ok(())
        })
        .await
    }

    /// SHA-256 (hex) of upload `id`'s partial file, read back in bounded memory: the
    /// hash of earlier PATCHes cannot be carried over (a resumed upload may reach
    /// another server, or this one restarted).
    pub async fn upload_sha256(&self, id: &str) -> std::io::Result<String> {
        let path = self.upload_path(id);
        blocking(move || {
            use std::io::Read as _;
            let mut file = std::fs::File::open(&path)?;
            let mut sha256 = Sha256::new();
            let mut buf = vec![0; READ_BUFFER];
            loop {
                match file.read(&mut buf)? {
                    0 => break,
                    n => sha256.update(&buf[..n]),
                }
            }
            Ok(relais_wire::hex(&sha256.finalize()))
        })
        .await
    }

    /// Moves upload `id`'s complete file into the media directory, as [`Self::place`]
    /// does a push's BLOB.
    pub async fn place_upload(
        &self,
        id: &str,
        size: u64,
        sha256: String,
    ) -> std::io::Result<Placed> {
        let blob = SpooledBlob {
            file: split::TempPath::adopt(self.upload_path(id)),
            len: size,
            sha256,
        };
        self.place(blob).await
    }

    /// Removes upload `id`'s partial file, if any.
    pub async fn remove_upload(&self, id: &str) {
        let path = self.upload_path(id);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("media: cannot remove {}: {e}", path.display());
            }
            _ => {}
        }
    }

    /// Upload ids are the server's own (hex), never a client's path.
    fn upload_path(&self, id: &str) -> PathBuf {
        self.inner.root.join(UPLOADS).join(format!("{id}.part"))
    }

    /// Removes a placed file whose row was not stored (a replay, a store failure).
    pub async fn remove(&self, placed: &Placed) {
        let path = self.inner.root.join(&placed.name);
        if let Err(e) = tokio::fs::remove_file(&path).await {
            tracing::warn!("media: cannot remove unused {}: {e}", path.display());
        }
    }
}

impl Inner {
    fn place(&self, mut blob: SpooledBlob) -> std::io::Result<Placed> {
        let name = self.unique_name();
        blob.file.persist(&self.root.join(&name))?;
        std::fs::File::open(&self.root)?.sync_all()?;
        Ok(Placed {
            name,
            size: blob.len,
            sha256: blob.sha256,
        })
    }

    /// Unique across restarts (time), across the servers sharing the directory
    /// (instance) and within a run (counter), since the rename into place would replace
    /// a file of the same name; says nothing about the row, which is found through the
    /// row's `media_path`.
    fn unique_name(&self) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{nanos:x}-{}-{n}.bin", self.instance)
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

/// 64 random bits naming this process's files: a pid repeats across the containers of a
/// fleet sharing one media directory (each server pid 1). std's `RandomState` is keyed
/// from the operating system's random source.
fn instance_tag() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

/// Sends the body's data frames to the splitter; stops at the first body error.
async fn forward(mut body: Body, tx: &mpsc::Sender<Bytes>) -> Result<(), ReceiveError> {
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(body_error)?;
        if let Ok(data) = frame.into_data() {
            if tx.send(data).await.is_err() {
                return Err(ReceiveError::Worker(
                    "media: the body reader stopped early".into(),
                ));
            }
        }
    }
    Ok(())
}

/// A body that could not be read: cut, failed, or over the size limit.
fn body_error(e: axum::Error) -> ReceiveError {
    let limit =
        std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
    ReceiveError::Body {
        limit,
        detail: e.to_string(),
    }
}
