//! Durable state: the only module that touches disk. It knows keys, values,
//! files and flushes, nothing of exchanges, messages or frames; the model
//! encodes its records and hands them over as bytes.
//!
//! Definitions, each durable queue's bookkeeping and the messages delayed
//! exchanges hold live in one sled tree (see [`keys`]); each durable queue's
//! messages live in its own log of segment files ([`segments`], under
//! `queues/<id>/`). Durability comes from [`flusher`], which for everything
//! written since the last flush writes and fsyncs the logs, then flushes
//! sled (group commit), and then releases the replies that waited for it.
//! Garbage (deleted queues, drained segments) is removed after the flush
//! that made it garbage, or by [`reaper`] in the background.
//!
//! A write error (a full disk) puts the store in a failed state: writes are
//! refused with an error, and the flusher reopens the database once it can,
//! which brings it back to its last flushed state.

mod compact;
pub mod flusher;
mod keys;
pub mod queue;
mod reaper;
mod segments;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

pub use flusher::{FlushSignal, FlushWaiter, Flusher};
pub use queue::{EntryMeta, QueueStore, RecoveredQueue, StoredEntry, Tail};
use segments::QueueLog;

/// Written once into a new data dir; a data dir with another value is refused.
const FORMAT: &[u8] = b"hare-store-3";
/// Where the queues' segment logs live, one directory per queue id.
const QUEUES_DIR: &str = "queues";
/// File in the data dir that records the format outside the database.
const MARKER_FILE: &str = "FORMAT";
/// After a write error, how often the database is reopened to see whether
/// the disk has room again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("data dir {0} is in use by another broker (its lock is held); stop that broker or choose another --data-dir")]
    Locked(PathBuf),
    #[error(
        "data dir {dir} was written by an incompatible version ({found}); expected {expected}"
    )]
    Incompatible {
        dir: PathBuf,
        found: String,
        expected: String,
    },
    #[error("data dir {dir} is corrupt or unreadable: {detail}")]
    Corrupt { dir: PathBuf, detail: String },
    #[error("storage error: {0}")]
    Io(String),
    /// A write failed (typically a full disk); writes are refused until the
    /// store has reopened its database.
    #[error("the data dir cannot be written ({0}); writes are refused until it can")]
    Failed(String),
}

impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        StoreError::Io(error.to_string())
    }
}

/// The open database; swapped out when the store reopens it after a failure
/// or compacts it.
struct Engine {
    db: sled::Db,
    tree: sled::Tree,
}

/// The tree, borrowed for one operation.
struct TreeGuard<'a>(parking_lot::RwLockReadGuard<'a, Option<Engine>>);

impl std::ops::Deref for TreeGuard<'_> {
    type Target = sled::Tree;
    fn deref(&self) -> &sled::Tree {
        &self
            .0
            .as_ref()
            .expect("checked when the guard was made")
            .tree
    }
}

pub struct Store {
    dir: PathBuf,
    cache_bytes: u64,
    /// `None` while the database is being reopened after a write error.
    engine: RwLock<Option<Engine>>,
    flusher: Flusher,
    reaper: reaper::Reaper,
    next_delayed_id: AtomicU64,
    next_queue_id: AtomicU64,
    /// Set at shutdown: nothing changes on disk after it.
    closing: AtomicBool,
    /// A write or flush failed; what failed and when the last reopen was tried.
    failure: Mutex<Option<(String, Instant)>>,
    failed: AtomicBool,
    /// Values written just before the next flush (latest per key).
    before_flush: Mutex<HashMap<[u8; keys::QUEUE_KEY_LEN], u64>>,
    /// Every durable queue's log, by queue id.
    logs: Mutex<HashMap<u64, Arc<QueueLog>>>,
    /// Logs written to since the last flush.
    dirty_logs: Mutex<Vec<Arc<QueueLog>>>,
}

fn open_sled(path: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .flush_every_ms(None)
        .mode(sled::Mode::HighThroughput)
        .open()
}

fn sled_error(dir: &Path, error: sled::Error) -> StoreError {
    match error {
        sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
            StoreError::Locked(dir.to_owned())
        }
        other => StoreError::Corrupt {
            dir: dir.to_owned(),
            detail: other.to_string(),
        },
    }
}

/// Opens sled on `dir`, turning a panic inside it (unreadable files) into an error.
fn open_engine(dir: &Path, cache_bytes: u64) -> Result<Engine, StoreError> {
    let db = std::panic::catch_unwind(|| open_sled(&dir.join("sled"), cache_bytes))
        .map_err(|_| StoreError::Corrupt {
            dir: dir.to_owned(),
            detail: "the storage engine could not read its files".into(),
        })?
        .map_err(|e| sled_error(dir, e))?;
    let tree = db.open_tree("hare").map_err(|e| sled_error(dir, e))?;
    Ok(Engine { db, tree })
}

impl Store {
    /// Opens (or creates) the data dir, refusing one that is locked, from an
    /// incompatible version, or corrupt.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Arc<Store>, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        compact::finish_interrupted(dir)?;
        let engine = open_engine(dir, cache_bytes)?;
        check_format(dir, &engine)?;
        let mut next_delayed_id = 1;
        for key in engine.tree.scan_prefix([keys::DELAYED]).keys() {
            let key = key.map_err(|e| sled_error(dir, e))?;
            if let Some((_, id)) = keys::parse_delayed(&key) {
                next_delayed_id = next_delayed_id.max(id + 1);
            }
        }
        // Queue ids are never reused, so data of a queue a crash orphaned can
        // never be mistaken for a new queue's.
        let in_db = match engine.tree.scan_prefix([keys::QUEUE]).keys().next_back() {
            Some(key) => keys::u64_at(&key.map_err(|e| sled_error(dir, e))?, 1) + 1,
            None => 1,
        };
        let queues = dir.join(QUEUES_DIR);
        std::fs::create_dir_all(&queues)
            .map_err(|e| StoreError::Io(format!("{}: {e}", queues.display())))?;
        let on_disk = queue_dirs(&queues)?
            .into_iter()
            .max()
            .map_or(1, |id| id + 1);
        let next_queue_id = in_db.max(on_disk);
        let store = Arc::new_cyclic(|me: &Weak<Store>| {
            let flush_me = me.clone();
            Store {
                dir: dir.to_owned(),
                cache_bytes,
                engine: RwLock::new(Some(engine)),
                flusher: Flusher::start(Box::new(move || match flush_me.upgrade() {
                    Some(store) => store.flush_now(),
                    None => true,
                })),
                reaper: reaper::Reaper::new(),
                next_delayed_id: AtomicU64::new(next_delayed_id),
                next_queue_id: AtomicU64::new(next_queue_id),
                closing: AtomicBool::new(false),
                failure: Mutex::new(None),
                failed: AtomicBool::new(false),
                before_flush: Mutex::new(HashMap::new()),
                logs: Mutex::new(HashMap::new()),
                dirty_logs: Mutex::new(Vec::new()),
            }
        });
        store.reaper.start(Arc::downgrade(&store));
        Ok(store)
    }

    /// The tree, or the reason it cannot be used now. The guard keeps the
    /// database from being swapped (reopened, compacted) while it is used,
    /// so no write can land in a database that is being replaced.
    fn tree(&self) -> Result<TreeGuard<'_>, StoreError> {
        let engine = self.engine.read_recursive();
        match engine.as_ref() {
            Some(_) if !self.failed.load(Ordering::Acquire) => Ok(TreeGuard(engine)),
            _ => Err(self.failed_error()),
        }
    }

    fn failed_error(&self) -> StoreError {
        let reason = self.failure.lock().as_ref().map(|(r, _)| r.clone());
        StoreError::Failed(reason.unwrap_or_else(|| "reopening".into()))
    }

    /// Records a write error: from now on writes are refused until a reopen.
    fn fail(&self, error: &dyn std::fmt::Display) -> StoreError {
        let reason = error.to_string();
        let mut failure = self.failure.lock();
        if failure.is_none() {
            tracing::error!(%reason, "the data dir cannot be written; refusing durable changes until it can");
            *failure = Some((reason.clone(), Instant::now()));
        }
        self.failed.store(true, Ordering::Release);
        StoreError::Failed(reason)
    }

    /// Whether writes are refused now (a write failed and the store has not recovered).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn write(&self, op: impl FnOnce(&sled::Tree) -> sled::Result<()>) -> Result<(), StoreError> {
        if self.is_closed() {
            return Ok(());
        }
        let tree = self.tree()?;
        op(&tree).map_err(|e| self.fail(&e))?;
        self.flusher.mark_dirty();
        Ok(())
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> Result<(), StoreError> {
        self.write(|t| t.insert(key, value).map(drop))
    }

    fn remove(&self, key: &[u8]) -> Result<(), StoreError> {
        self.write(|t| t.remove(key).map(drop))
    }

    fn apply(&self, batch: sled::Batch) -> Result<(), StoreError> {
        self.write(|t| t.apply_batch(batch))
    }

    /// Sets `key` to `value` with the next flush (a later value for the same
    /// key replaces this one): for bookkeeping that only needs to be as
    /// fresh as the last flush.
    fn write_before_flush(&self, key: [u8; keys::QUEUE_KEY_LEN], value: u64) {
        self.before_flush.lock().insert(key, value);
        self.flusher.mark_dirty();
    }

    /// For garbage removal: an error is not the store's failure, only a retry later.
    fn apply_quietly(&self, batch: sled::Batch) -> Result<(), StoreError> {
        let tree = self.tree()?;
        tree.apply_batch(batch)?;
        self.flusher.mark_dirty();
        Ok(())
    }

    // ---- definitions ----------------------------------------------------------

    /// Every definition, as (key, value) in key order.
    pub fn definitions(&self) -> Result<Vec<(Vec<u8>, Bytes)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree()?.scan_prefix([keys::DEFINITION]) {
            let (key, value) = item?;
            out.push((key[1..].to_vec(), Bytes::from_owner(value)));
        }
        Ok(out)
    }

    pub fn put_definition(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.insert(&keys::definition(key), value.to_vec())
    }

    pub fn remove_definition(&self, key: &[u8]) -> Result<(), StoreError> {
        self.remove(&keys::definition(key))
    }

    /// Several definition changes as one atomic write: `puts` then `removes`.
    pub fn change_definitions(
        &self,
        puts: &[(&[u8], &[u8])],
        removes: &[&[u8]],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in puts {
            batch.insert(keys::definition(key), *value);
        }
        for key in removes {
            batch.remove(keys::definition(key));
        }
        self.apply(batch)
    }

    // ---- queues -----------------------------------------------------------------

    /// A fresh queue id, never used before in this data dir.
    pub fn new_queue_id(&self) -> u64 {
        self.next_queue_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The storage of queue `id`.
    pub fn queue(self: &Arc<Self>, id: u64) -> QueueStore {
        let log = self
            .logs
            .lock()
            .entry(id)
            .or_insert_with(|| Arc::new(QueueLog::new(self.queue_dir(id))))
            .clone();
        QueueStore::new(self.clone(), id, log)
    }

    fn queue_dir(&self, id: u64) -> PathBuf {
        self.dir.join(QUEUES_DIR).join(id.to_string())
    }

    /// `log` has something for the next flush.
    fn log_dirty(&self, log: &Arc<QueueLog>) {
        if !log.dirty.swap(true, Ordering::AcqRel) {
            self.dirty_logs.lock().push(log.clone());
        }
        self.flusher.mark_dirty();
    }

    /// A queue's definition goes (one atomic write); its messages follow in
    /// the background.
    pub fn delete_queue(&self, definition_key: &[u8], id: u64) -> Result<(), StoreError> {
        self.remove_definition(definition_key)?;
        if let Some(log) = self.logs.lock().remove(&id) {
            log.mark_deleted();
        }
        self.reaper.clear_queue(id);
        Ok(())
    }

    /// Deletes a deleted queue's segment files, one at a time with `pause`
    /// in between: freeing gigabytes at once would hold up everyone's fsync.
    fn remove_queue_files(&self, id: u64, pause: Duration) -> Result<(), StoreError> {
        let dir = self.queue_dir(id);
        let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", dir.display()));
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        for entry in entries {
            match std::fs::remove_file(entry.map_err(io)?.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => std::thread::sleep(pause),
            }
        }
        match std::fs::remove_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        }
    }

    /// At start-up: the data of every queue id not in `live` is left over
    /// from a queue deleted just before a crash, and dead ranges are left
    /// over from purges; both are removed in the background.
    pub fn forget_queues_except(&self, live: &HashSet<u64>) -> Result<(), StoreError> {
        let tree = self.tree()?;
        let max_live = live.iter().copied().max().unwrap_or(0);
        self.next_queue_id
            .fetch_max(max_live + 1, Ordering::Relaxed);
        for id in queue_dirs(&self.dir.join(QUEUES_DIR))? {
            if !live.contains(&id) {
                self.reaper.clear_queue(id);
            }
        }
        let mut from = keys::queue_prefix(0).to_vec();
        while let Some(item) = tree.range(from.as_slice()..).keys().next() {
            let key = item?;
            if key.first() != Some(&keys::QUEUE) || key.len() < keys::QUEUE_PREFIX_LEN {
                break;
            }
            let id = keys::u64_at(&key, 1);
            if !live.contains(&id) {
                self.reaper.clear_queue(id);
            } else {
                // The transient marks of purges a crash interrupted go too.
                for item in tree.scan_prefix(keys::queue_kind_prefix(id, keys::DEAD)) {
                    let (key, end) = item?;
                    if let (Some((_, _, start)), 8) = (keys::parse_queue_key(&key), end.len()) {
                        self.reaper.clear_range(id, start, keys::u64_at(&end, 0));
                    }
                }
            }
            match id.checked_add(1) {
                Some(next) => from = keys::queue_prefix(next).to_vec(),
                None => break,
            }
        }
        Ok(())
    }

    /// Waits up to `limit` for the background removals so far; true when done.
    pub fn wait_reaped_for(&self, limit: Duration) -> bool {
        self.reaper.wait_idle_for(limit)
    }

    // ---- delayed messages ---------------------------------------------------------

    /// Writes a record a delayed exchange holds until `due_ms`; returns its id.
    pub fn hold_delayed(&self, due_ms: u64, record: &[u8]) -> Result<u64, StoreError> {
        let id = self.next_delayed_id.fetch_add(1, Ordering::Relaxed);
        self.insert(&keys::delayed(due_ms, id), record.to_vec())?;
        Ok(id)
    }

    /// Forgets a held delayed message (routed, or its exchange deleted).
    pub fn release_delayed(&self, due_ms: u64, id: u64) -> Result<(), StoreError> {
        self.remove(&keys::delayed(due_ms, id))
    }

    /// Every held delayed message: (due ms, id, record), in due order.
    pub fn delayed_records(&self) -> Result<Vec<(u64, u64, Bytes)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree()?.scan_prefix([keys::DELAYED]) {
            let (key, value) = item?;
            let (due, id) = keys::parse_delayed(&key).ok_or_else(|| StoreError::Corrupt {
                dir: self.dir.clone(),
                detail: "malformed delayed message key".into(),
            })?;
            out.push((due, id, Bytes::from_owner(value)));
        }
        Ok(out)
    }

    /// How many delayed messages are on disk.
    #[cfg(test)]
    pub(crate) fn delayed_len(&self) -> usize {
        self.tree()
            .map(|t| t.scan_prefix([keys::DELAYED]).count())
            .unwrap_or(0)
    }

    // ---- durability ---------------------------------------------------------------

    /// Reports flush durations and batch sizes from now on.
    pub fn observe_flushes(&self, metrics: flusher::FlushMetrics) {
        self.flusher.observe(metrics);
    }

    /// Calls `waiter` after the next fsync that covers everything written so far.
    pub fn after_flush(&self, waiter: Arc<dyn FlushWaiter>, token: u64) {
        self.flusher.wait(waiter, token);
    }

    /// Resolves once everything written so far is on disk (true) or the
    /// flush failed (false).
    pub fn flushed(&self) -> impl std::future::Future<Output = bool> {
        let (signal, done) = FlushSignal::new();
        self.flusher.wait(signal, 0);
        async move { done.await.unwrap_or(false) }
    }

    /// Flushes on the flusher thread; after a failure, first tries to reopen.
    fn flush_now(&self) -> bool {
        if self.is_failed() && !self.try_reopen() {
            return false;
        }
        // The logs first: sled's bookkeeping may point into them.
        let logs = std::mem::take(&mut *self.dirty_logs.lock());
        let mut drained = Vec::with_capacity(logs.len());
        let mut logs = logs.into_iter();
        while let Some(log) = logs.next() {
            log.dirty.store(false, Ordering::Release);
            match log.sync() {
                Ok(doomed) => drained.push((log, doomed)),
                Err(error) => {
                    // The logs not reached yet are tried again with the next flush.
                    for rest in logs {
                        rest.dirty.store(false, Ordering::Release);
                        self.log_dirty(&rest);
                    }
                    self.fail(&error);
                    return false;
                }
            }
        }
        let engine = self.engine.read_recursive();
        let Some(engine) = engine.as_ref() else {
            return false;
        };
        let deferred = std::mem::take(&mut *self.before_flush.lock());
        if !deferred.is_empty() {
            let mut batch = sled::Batch::default();
            for (key, value) in deferred {
                batch.insert(&key, &value.to_be_bytes());
            }
            if let Err(error) = engine.tree.apply_batch(batch) {
                self.fail(&error);
                return false;
            }
        }
        match engine.db.flush() {
            Ok(_) => {
                // What made these segments garbage is on disk now.
                for (log, doomed) in drained.into_iter().filter(|(_, d)| !d.is_empty()) {
                    self.reaper.unlink_segments(log, doomed);
                }
                true
            }
            Err(error) => {
                self.fail(&error);
                false
            }
        }
    }

    /// Reopens the database after a write error (at most once a second):
    /// sled keeps refusing writes once one failed, and a reopen brings it
    /// back to its last flushed state. True when the store works again.
    fn try_reopen(&self) -> bool {
        {
            let mut failure = self.failure.lock();
            match failure.as_mut() {
                Some((_, tried)) if tried.elapsed() < REOPEN_EVERY => return false,
                Some((_, tried)) => *tried = Instant::now(),
                None => {}
            }
        }
        if self.is_closed() {
            return false;
        }
        drop(self.engine.write().take());
        match open_engine(&self.dir, self.cache_bytes) {
            Ok(engine) => match engine.db.flush() {
                Ok(_) => {
                    *self.engine.write() = Some(engine);
                    *self.failure.lock() = None;
                    self.failed.store(false, Ordering::Release);
                    tracing::info!("the data dir can be written again; durable changes resume");
                    true
                }
                Err(_) => false,
            },
            Err(error) => {
                tracing::debug!(%error, "the data dir still cannot be reopened");
                false
            }
        }
    }

    /// After [`close`](Self::close) nothing changes on disk any more: what is
    /// still running while the broker stops (connections being dropped,
    /// queues being freed) must not edit the state it is leaving behind.
    fn is_closed(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The broker is stopping: background removals stop where they are
    /// (the next start finishes them), and what was written is flushed.
    pub fn close(&self) {
        // A little time to finish, so a restart rarely finds garbage.
        self.reaper.wait_idle_for(Duration::from_secs(3));
        self.reaper.stop();
        self.flusher.stop();
        self.flush_now();
        self.closing.store(true, Ordering::Release);
    }

    /// Replaces a database that is large but nearly empty with a compact
    /// copy (see [`compact`]): at start-up, and while running whenever the
    /// background removals are idle. Store operations wait meanwhile, which
    /// is brief exactly because there is little left to copy.
    pub fn compact_if_mostly_empty(&self) -> Result<(), StoreError> {
        if self.is_closed() || self.is_failed() {
            return Ok(());
        }
        {
            let engine = self.engine.read_recursive();
            let Some(engine) = engine.as_ref() else {
                return Ok(());
            };
            if !compact::worth_it(&engine.db, &engine.tree) {
                return Ok(());
            }
        }
        let mut engine = self.engine.write();
        let Some(current) = engine.take() else {
            return Ok(());
        };
        let Engine { db, tree } = current;
        drop(tree);
        let compacted =
            compact::compact_if_mostly_empty(&self.dir, db, self.cache_bytes).and_then(|db| {
                let tree = db.open_tree("hare").map_err(|e| sled_error(&self.dir, e))?;
                Ok(Engine { db, tree })
            });
        match compacted {
            Ok(compacted) => {
                *engine = Some(compacted);
                Ok(())
            }
            Err(error) => {
                // Left without a database: the reopen path takes over.
                drop(engine);
                self.fail(&error);
                Err(error)
            }
        }
    }
}

/// The format is recorded twice: inside sled and in a marker file beside it.
/// The file is what tells a new data dir from one whose database lost its
/// contents (sled reads a garbage log as an empty one), so that case is an
/// error instead of a silent fresh start.
fn check_format(dir: &Path, engine: &Engine) -> Result<(), StoreError> {
    let marker = dir.join(MARKER_FILE);
    let expected = String::from_utf8_lossy(FORMAT).into_owned();
    let tree = &engine.tree;
    let in_db = tree.get(keys::FORMAT).map_err(|e| sled_error(dir, e))?;
    match std::fs::read(&marker) {
        Ok(found) if found.trim_ascii() != FORMAT => Err(StoreError::Incompatible {
            dir: dir.to_owned(),
            found: String::from_utf8_lossy(&found).trim().to_owned(),
            expected,
        }),
        Ok(_) if in_db.as_deref() != Some(FORMAT) => Err(StoreError::Corrupt {
            dir: dir.to_owned(),
            detail: "the database files no longer hold the data this dir was created with".into(),
        }),
        Ok(_) => Ok(()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StoreError::Io(format!("{}: {e}", marker.display())))
        }
        Err(_) => {
            let only_marker = tree.len() <= usize::from(in_db.is_some());
            let other_trees = engine.db.tree_names().len() > 2;
            if !only_marker || other_trees {
                return Err(StoreError::Incompatible {
                    dir: dir.to_owned(),
                    found: "no format marker".into(),
                    expected,
                });
            }
            // A new data dir: the marker goes into the database first, then the file.
            tree.insert(keys::FORMAT, FORMAT)
                .map_err(|e| sled_error(dir, e))?;
            engine.db.flush().map_err(|e| sled_error(dir, e))?;
            let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", marker.display()));
            let mut file = std::fs::File::create(&marker).map_err(io)?;
            std::io::Write::write_all(&mut file, FORMAT).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(())
        }
    }
}

/// The queue ids that have a directory of segment files.
fn queue_dirs(queues: &Path) -> Result<Vec<u64>, StoreError> {
    let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", queues.display()));
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(queues).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.parse::<u64>().ok()) {
            ids.push(id);
        }
    }
    Ok(ids)
}
