//! Removing what is already logically gone, in the background: the messages
//! of a deleted queue, the dead range of a purge, the leftovers of queues a
//! crash orphaned. The operation that made them garbage was one atomic write
//! (a definition removed, a dead-range marker written), so its reply does not
//! wait for this, and nobody else waits either: the work goes in bounded
//! batches with pauses in between.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::keys::{self, TRANSIENT};
use super::segments::QueueLog;
use super::Store;

/// Keys removed per batch.
const CHUNK: usize = 2048;
/// Pause between batches, so a big removal never hogs the disk or a core.
const PAUSE: Duration = Duration::from_millis(2);
/// How often an idle reaper looks whether the database is worth compacting.
const IDLE_CHECK: Duration = Duration::from_secs(5);

#[derive(Clone)]
enum Job {
    /// Drained segments of a queue's log, after the flush that made them garbage.
    Segments(Arc<QueueLog>, Vec<u64>),
    /// Everything under a queue id (its definition is gone).
    Queue(u64),
    /// The transient marks in `start..end` of a queue (a purged tail; its
    /// segments go with the flush after the purge).
    Range { queue: u64, start: u64, end: u64 },
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    stop: bool,
    /// A job is being worked on (for tests that wait until all is reaped).
    busy: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    idle: Condvar,
}

pub struct Reaper {
    shared: std::sync::Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Reaper {
    pub fn new() -> Self {
        Reaper {
            shared: Default::default(),
            thread: Mutex::new(None),
        }
    }

    /// Starts the thread; it holds the store weakly so the store can close.
    pub fn start(&self, store: Weak<Store>) {
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("hare-reaper".into())
            .spawn(move || run(&store, &shared))
            .expect("spawn the reaper thread");
        *self.thread.lock() = Some(thread);
    }

    fn push(&self, job: Job) {
        self.shared.state.lock().jobs.push_back(job);
        self.shared.wake.notify_one();
    }

    pub fn clear_queue(&self, queue: u64) {
        self.push(Job::Queue(queue));
    }

    /// Deletes segment files; deleting big files takes the file system a
    /// while, which no flush (and no reply waiting on one) should wait for.
    pub fn unlink_segments(&self, log: Arc<QueueLog>, doomed: Vec<u64>) {
        self.push(Job::Segments(log, doomed));
    }

    pub fn clear_range(&self, queue: u64, start: u64, end: u64) {
        self.push(Job::Range { queue, start, end });
    }

    /// Waits up to `limit` until every job so far is done; true if they are.
    pub fn wait_idle_for(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut state = self.shared.state.lock();
        while !state.jobs.is_empty() || state.busy {
            if self
                .shared
                .idle
                .wait_until(&mut state, deadline)
                .timed_out()
            {
                return state.jobs.is_empty() && !state.busy;
            }
        }
        true
    }

    pub fn stop(&self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

fn run(store: &Weak<Store>, shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.state.lock();
            state.busy = false;
            shared.idle.notify_all();
            loop {
                if state.stop {
                    return;
                }
                if let Some(job) = state.jobs.pop_front() {
                    state.busy = true;
                    break Some(job);
                }
                if shared.wake.wait_for(&mut state, IDLE_CHECK).timed_out() {
                    break None;
                }
            }
        };
        let Some(job) = job else {
            // Idle: give disk space back if the database is mostly garbage-free air.
            if let Some(store) = store.upgrade() {
                if let Err(error) = store.compact_if_mostly_empty() {
                    tracing::error!(%error, "compacting the data dir failed");
                }
            }
            continue;
        };
        let Some(store) = store.upgrade() else {
            return;
        };
        if let Err(error) = reap(&store, job, shared) {
            // Garbage left behind is found again at the next start.
            tracing::warn!(%error, "could not remove deleted messages; retried at the next start");
        }
    }
}

fn stopping(shared: &Shared) -> bool {
    shared.state.lock().stop
}

fn reap(store: &Store, job: Job, shared: &Shared) -> Result<(), super::StoreError> {
    match job {
        Job::Segments(log, doomed) => {
            // One file at a time: freeing a big purge at once would hold
            // up everyone's fsync.
            for first in doomed {
                log.unlink(&[first]);
                std::thread::sleep(PAUSE);
            }
            Ok(())
        }
        Job::Range { queue, start, end } => {
            let marks = (
                keys::queue_key(queue, TRANSIENT, start),
                keys::queue_key(queue, TRANSIENT, end),
            );
            remove_all(store, marks, shared)
        }
        Job::Queue(q) => {
            // The files first: sled's keys are what tells a restart to look.
            store.remove_queue_files(q, PAUSE)?;
            let all = (
                keys::queue_key(q, 0, 0),
                keys::queue_key(q, u8::MAX, u64::MAX),
            );
            remove_all(store, all, shared)
        }
    }
}

type Key = [u8; keys::QUEUE_KEY_LEN];

/// Removes every key in `from..to` in bounded batches.
fn remove_all(
    store: &Store,
    (from, to): (Key, Key),
    shared: &Shared,
) -> Result<(), super::StoreError> {
    loop {
        if stopping(shared) || store.is_closed() {
            return Ok(());
        }
        let chunk: Vec<sled::IVec> = store
            .tree()?
            .range(from.as_slice()..to.as_slice())
            .keys()
            .take(CHUNK)
            .collect::<Result<_, _>>()?;
        let last_chunk = chunk.len() < CHUNK;
        let mut batch = sled::Batch::default();
        for key in chunk {
            batch.remove(key);
        }
        store.apply_quietly(batch)?;
        if last_chunk {
            return Ok(());
        }
        std::thread::sleep(PAUSE);
    }
}
