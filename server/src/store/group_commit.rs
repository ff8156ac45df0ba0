//! Group commit: pushes that arrive together share one transaction, so one commit (one
//! fsync, one WAL flush) answers many requests. Both stores use it for their pushes;
//! each brings its [`Flush`], how one batch is stored.
//!
//! A push is queued with a oneshot for its answer; one driver task takes what is queued
//! (up to [`MAX_BATCH_PUSHES`] or [`MAX_BATCH_BYTES`]) and hands it to a flush task;
//! each request is answered once its batch's transaction committed, so a 201 still
//! means the row is durable. There is no timer: batches form from the pushes that
//! arrive while earlier flushes are in flight, and at most `in_flight` flushes run at
//! once. A push that finds the store idle (no flush running, nothing queued) is a batch
//! of one flushed by its caller's own task: the hops to the driver, to a flush task and
//! back were two thirds of the server's latency at one client.
//!
//! A flush task that panics, or a driver that is gone, drops the oneshots of its pushes:
//! their callers get a [`StoreError`], never a request that hangs.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

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
    /// One permit per flush that may run: the driver's flush tasks and the callers'
    /// flushes of a lone push take them alike.
    slots: Arc<Semaphore>,
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
        let in_flight = in_flight.max(1);
        GroupCommit {
            in_flight,
            slots: Arc::new(Semaphore::new(in_flight)),
            queue: OnceLock::new(),
            counts: Arc::default(),
        }
    }

    pub fn counts(&self) -> Arc<Counts> {
        Arc::clone(&self.counts)
    }

    /// Stores `push` in the next batch `flusher` writes (the flusher of the first push
    /// serves them all); answers once that batch committed. The caller must not be
    /// cancelled (push.rs stores from a task of its own): a lone push is flushed by this
    /// future, and dropped midway its row might be committed with no one to answer.
    pub async fn push<F: Flush>(&self, flusher: &F, push: NewPush) -> Result<Stored, StoreError> {
        let queue = self.queue.get_or_init(|| {
            let (queue, queued) = mpsc::channel(QUEUE_PUSHES);
            tokio::spawn(drive(
                flusher.clone(),
                queued,
                Arc::clone(&self.slots),
                self.counts(),
            ));
            queue
        });
        if let Some(slot) = self.idle_slot(queue) {
            let _slot = slot;
            let mut answers = flush(flusher, vec![push], &self.counts).await;
            return answers.pop().unwrap_or_else(|| Err(no_answer()));
        }
        let (answer, answered) = oneshot::channel();
        queue.send(Job { push, answer }).await.map_err(|_| {
            StoreError::Failed("group commit: the driver task stopped; restart the server".into())
        })?;
        answered.await.map_err(|_| no_answer())?
    }

    /// A flush slot, when no flush runs and nothing is queued: under load the pushes go
    /// to the queue, so that they share commits.
    fn idle_slot(&self, queue: &mpsc::Sender<Job>) -> Option<OwnedSemaphorePermit> {
        let idle = self.slots.available_permits() == self.in_flight
            && queue.capacity() == queue.max_capacity();
        idle.then(|| Arc::clone(&self.slots).try_acquire_owned().ok())
            .flatten()
    }
}

fn no_answer() -> StoreError {
    StoreError::Failed(
        "group commit: the flush of this push ended without an answer (its panic is in the \
         log)"
            .into(),
    )
}

/// Stores `batch` with `flusher` and counts what it committed: one answer per push.
async fn flush<F: Flush>(
    flusher: &F,
    batch: Vec<NewPush>,
    counts: &Counts,
) -> Vec<Result<Stored, StoreError>> {
    let flushed = flusher.flush(batch).await;
    let stored = flushed.answers.iter().filter(|a| a.is_ok()).count();
    counts.commits.fetch_add(flushed.commits, Ordering::Relaxed);
    counts.pushes.fetch_add(stored as u64, Ordering::Relaxed);
    flushed.answers
}

/// Takes the next push, then a free flush slot, then everything else queued that fits
/// one batch, and flushes it in its own task; forever, until the queue closes.
async fn drive<F: Flush>(
    flusher: F,
    mut queued: mpsc::Receiver<Job>,
    slots: Arc<Semaphore>,
    counts: Arc<Counts>,
) {
    // A push taken from the queue that did not fit the byte budget: it opens the next
    // batch.
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match queued.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        // While every slot is busy the pushes pile up in the queue, and the batch takes
        // them all once one frees.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
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
            let results = flush(&flusher, pushes, &counts).await;
            // A caller that went away no longer needs its answer.
            for (answer, result) in answers.into_iter().zip(results) {
                let _ = answer.send(result);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers each push with its position in the batch; a batch with a push for device
    /// `hold` first waits for a permit of `release`, one with a push for `panic` panics.
    #[derive(Clone)]
    struct Numbering {
        release: Arc<Semaphore>,
    }

    impl Flush for Numbering {
        async fn flush(&self, batch: Vec<NewPush>) -> Flushed {
            if batch.iter().any(|p| p.device_id == "hold") {
                let _ = self.release.acquire().await.map(|p| p.forget());
            }
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

    /// A group commit with one flush slot, and a flusher that holds it on "hold".
    fn one_slot() -> (Arc<GroupCommit>, Numbering) {
        let flusher = Numbering {
            release: Arc::new(Semaphore::new(0)),
        };
        (Arc::new(GroupCommit::new(1)), flusher)
    }

    /// A push for "hold" from its own task, once it holds the only slot.
    async fn holding(
        group: &Arc<GroupCommit>,
        flusher: &Numbering,
    ) -> tokio::task::JoinHandle<Result<Stored, StoreError>> {
        let hold = {
            let (group, flusher) = (Arc::clone(group), flusher.clone());
            tokio::spawn(async move { group.push(&flusher, push("hold")).await })
        };
        while group.slots.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        hold
    }

    /// `n` pushes for `device` sent from their own tasks, queued once this returns.
    async fn queued(
        group: &Arc<GroupCommit>,
        flusher: &Numbering,
        device: &'static str,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<Stored, StoreError>>> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (group, flusher) = (Arc::clone(group), flusher.clone());
                tokio::spawn(async move { group.push(&flusher, push(device)).await })
            })
            .collect();
        // On the test's current-thread runtime a yield runs every spawned task up to its
        // first wait: each saw the slot busy and went to the queue.
        tokio::task::yield_now().await;
        tasks
    }

    #[tokio::test]
    async fn pushes_queued_behind_a_busy_flush_share_one_and_a_lone_one_is_flushed_at_once() {
        let (group, flusher) = one_slot();
        assert_eq!(group.push(&flusher, push("d")).await, Ok(Stored::New(0)));
        // "hold" takes the only slot; the three after it wait in the queue.
        let hold = holding(&group, &flusher).await;
        let waiting = queued(&group, &flusher, "d", 3).await;
        flusher.release.add_permits(1);
        assert_eq!(hold.await.ok(), Some(Ok(Stored::New(0))));
        let mut answers = Vec::new();
        for task in waiting {
            answers.push(task.await.ok());
        }
        answers.sort_by_key(|a| format!("{a:?}"));
        let expected: Vec<_> = (0..3).map(|i| Some(Ok(Stored::New(i)))).collect();
        assert_eq!(answers, expected, "one batch of three");
        assert_eq!((group.counts().commits(), group.counts().pushes()), (3, 5));
    }

    #[tokio::test]
    async fn a_panicking_flush_answers_its_queued_pushes_with_an_error_and_frees_its_slot() {
        let (group, flusher) = one_slot();
        let hold = holding(&group, &flusher).await;
        let panicking = queued(&group, &flusher, "panic", 1).await;
        flusher.release.add_permits(1);
        assert!(hold.await.is_ok_and(|a| a.is_ok()));
        for task in panicking {
            let failed = task.await.ok();
            assert!(
                matches!(&failed, Some(Err(StoreError::Failed(d))) if d.contains("without an answer")),
                "{failed:?}"
            );
        }
        // A lone push panics in its caller's task, as any handler's panic does.
        let (lone, f) = (Arc::clone(&group), flusher.clone());
        let lone = tokio::spawn(async move { lone.push(&f, push("panic")).await });
        assert!(lone.await.is_err_and(|e| e.is_panic()));
        // Both slots of the panicked flushes are free again.
        assert_eq!(group.push(&flusher, push("d")).await, Ok(Stored::New(0)));
    }
}
