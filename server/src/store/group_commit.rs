//! Group commit: pushes that arrive together share one transaction, so one commit (one
//! fsync, one WAL flush) answers many requests. Both stores use it for their pushes;
//! each brings its [`Flush`], how one batch is stored.
//!
//! A push is queued with a oneshot for its answer; one driver task takes what is queued
//! (up to [`MAX_BATCH_PUSHES`] or [`MAX_BATCH_BYTES`]) and hands it to a flush task;
//! each request is answered once its batch's transaction committed, so a 201 still
//! means the row is durable. There is no timer: a lone push is flushed at once (the
//! latency at one client does not grow); batches form from the pushes that arrive while
//! earlier flushes are in flight, and at most `in_flight` flushes run at once.
//!
//! A flush task that panics, or a driver that is gone, drops the oneshots of its pushes:
//! their callers get a [`StoreError`], never a request that hangs.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{NewPush, StoreError, Stored};

/// Pushes in one flush at most. Beyond a few hundred rows a commit costs no less per
/// row (the fsync is already shared), while the statement's arrays and the answers
/// waiting on it grow; 256 covers a burst of every device of a large site at once.
pub const MAX_BATCH_PUSHES: usize = 256;

/// Body bytes in one flush at most (a push larger than this is flushed alone): bounds
/// the memory of one statement's arrays whatever the bodies' size (the JSON part of a
/// push may be large; its media is already on disk).
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Pushes queued for the driver at most; a push beyond it waits for room (the request's
/// own task waits, holding its body, as it would for a connection). Four full batches:
/// a burst of 500 devices queues without waiting, and the queue's memory is that of the
/// requests it holds, already received.
const QUEUE_PUSHES: usize = 1024;

/// How a store writes one batch.
pub trait Flush: Clone + Send + Sync + 'static {
    /// Stores `batch`: one answer per push, in order, each `Ok` only once its row is
    /// committed.
    fn flush(&self, batch: Vec<NewPush>) -> impl Future<Output = Flushed> + Send;
}

/// What one flush did.
#[derive(Debug)]
pub struct Flushed {
    /// One per push of the batch, in order.
    pub answers: Vec<Result<Stored, StoreError>>,
    /// Transactions committed: 1, or one per row when a failed batch was stored row by
    /// row.
    pub commits: u64,
}

impl Flushed {
    /// Every push of a batch of `n` answered with `error`, nothing committed.
    pub fn failed(n: usize, error: StoreError) -> Flushed {
        Flushed {
            answers: vec![Err(error); n],
            commits: 0,
        }
    }
}

/// The counters behind `relais_server_store_commits_total` and
/// `relais_server_store_committed_pushes_total`: their ratio is the mean batch size.
#[derive(Debug, Default)]
pub struct Counts {
    commits: AtomicU64,
    pushes: AtomicU64,
}

impl Counts {
    /// Transactions committed by flushes.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Pushes answered by those transactions (new rows, replays and mismatches).
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }
}

struct Job {
    push: NewPush,
    answer: oneshot::Sender<Result<Stored, StoreError>>,
}

/// The queue of one store's pushes and its driver.
pub struct GroupCommit {
    in_flight: usize,
    /// Set, and the driver spawned, by the first push: a store is opened before the
    /// runtime it serves on exists (the in-process server), and a store that never
    /// takes a push (`relais-server token`) needs no driver.
    queue: OnceLock<mpsc::Sender<Job>>,
    counts: Arc<Counts>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("in_flight", &self.in_flight)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// At most `in_flight` (at least 1) flushes at once.
    pub fn new(in_flight: usize) -> GroupCommit {
        GroupCommit {
            in_flight: in_flight.max(1),
            queue: OnceLock::new(),
            counts: Arc::default(),
        }
    }

    pub fn counts(&self) -> Arc<Counts> {
        Arc::clone(&self.counts)
    }

    /// Stores `push` in the next batch `flusher` writes (the flusher of the first push
    /// serves them all); answers once that batch committed.
    pub async fn push<F: Flush>(&self, flusher: &F, push: NewPush) -> Result<Stored, StoreError> {
        let queue = self.queue.get_or_init(|| {
            let (queue, queued) = mpsc::channel(QUEUE_PUSHES);
            tokio::spawn(drive(
                flusher.clone(),
                queued,
                self.in_flight,
                self.counts(),
            ));
            queue
        });
        let (answer, answered) = oneshot::channel();
        queue.send(Job { push, answer }).await.map_err(|_| {
            StoreError::Failed("group commit: the driver task stopped; restart the server".into())
        })?;
        answered.await.map_err(|_| {
            StoreError::Failed(
                "group commit: the flush of this push ended without an answer (its panic is \
                 in the log)"
                    .into(),
            )
        })?
    }
}

/// Takes a free flush slot, then everything queued that fits one batch, and flushes it
/// in its own task; forever, until the queue closes.
async fn drive<F: Flush>(
    flusher: F,
    mut queued: mpsc::Receiver<Job>,
    in_flight: usize,
    counts: Arc<Counts>,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    // A push taken from the queue that did not fit the byte budget: it opens the next
    // batch.
    let mut carried: Option<Job> = None;
    loop {
        // The slot first: while every slot is busy the pushes pile up in the queue, and
        // the next batch takes them all.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(job) => job,
            None => match queued.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut bytes = first.push.body.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_PUSHES {
            let Ok(job) = queued.try_recv() else {
                break;
            };
            bytes += job.push.body.len();
            if bytes > MAX_BATCH_BYTES {
                carried = Some(job);
                break;
            }
            batch.push(job);
        }
        let (flusher, counts) = (flusher.clone(), Arc::clone(&counts));
        tokio::spawn(async move {
            let _slot = slot;
            let (pushes, answers): (Vec<NewPush>, Vec<_>) =
                batch.into_iter().map(|job| (job.push, job.answer)).unzip();
            let flushed = flusher.flush(pushes).await;
            let stored = flushed.answers.iter().filter(|a| a.is_ok()).count();
            counts.commits.fetch_add(flushed.commits, Ordering::Relaxed);
            counts.pushes.fetch_add(stored as u64, Ordering::Relaxed);
            // A caller that went away no longer needs its answer.
            for (answer, result) in answers.into_iter().zip(flushed.answers) {
                let _ = answer.send(result);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers each push with its position in the batch, or panics on a push for
    /// device `panic`.
    #[derive(Clone)]
    struct Numbering;

    impl Flush for Numbering {
        async fn flush(&self, batch: Vec<NewPush>) -> Flushed {
            assert!(batch.iter().all(|p| p.device_id != "panic"), "bad push");
            Flushed {
                answers: (0..batch.len())
                    .map(|i| Ok(Stored::New(i as i64)))
                    .collect(),
                commits: 1,
            }
        }
    }

    fn push(device: &str) -> NewPush {
        NewPush {
            device_id: device.into(),
            endpoint: "/api/x".into(),
            idempotency_key: Some("k".into()),
            local_id: None,
            body: "{}".into(),
            body_sha256: String::new(),
            media: None,
        }
    }

    #[tokio::test]
    async fn a_lone_push_is_answered_and_a_panicking_flush_answers_an_error() {
        let group = GroupCommit::new(1);
        assert_eq!(group.push(&Numbering, push("d")).await, Ok(Stored::New(0)));
        let failed = group.push(&Numbering, push("panic")).await;
        assert!(
            matches!(&failed, Err(StoreError::Failed(d)) if d.contains("without an answer")),
            "{failed:?}"
        );
        // The slot of the panicked flush is free again.
        assert_eq!(group.push(&Numbering, push("d")).await, Ok(Stored::New(0)));
        assert_eq!((group.counts().commits(), group.counts().pushes()), (2, 2));
    }
}
