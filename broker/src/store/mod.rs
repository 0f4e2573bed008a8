//! Durable state in sled: the only module that touches disk.
//!
//! Four trees: `defs` (exchanges, queues, bindings, format version),
//! `messages` (message id → exchange, routing key, content header, body; one
//! copy however many queues hold it), `index` (queue id + position →
//! message id, delivered flag, expiry, priority and size; its key order is
//! the queue order) and `delayed` (due ms + id → vhost, exchange and the
//! whole message: persistent messages a durable delayed exchange holds until
//! they are due; its key order is the due order).
//!
//! Writes go into sled as they happen; durability comes from [`flusher`], which
//! fsyncs once for everything written since the last flush (group commit) and
//! then releases the publisher confirms that waited for it.

mod codec;
mod compact;
pub mod flusher;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use amq_protocol::types::FieldTable;
use bytes::Bytes;

use crate::model::exchange::ExchangeOptions;
use crate::model::message::Message;
use crate::model::queue::QueueOptions;
pub use codec::{BindingRecord, ExchangeRecord, QueueRecord};
pub use flusher::{FlushWaiter, Flusher};

/// Written once into a new data dir; a data dir with another value is refused.
const FORMAT: &[u8] = b"hare-store-1";
const FORMAT_KEY: &[u8] = b"format";
/// File in the data dir that records the format outside the database.
const MARKER_FILE: &str = "FORMAT";

#[derive(Debug, thiserror::Error)]
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
}

pub struct Store {
    db: sled::Db,
    defs: sled::Tree,
    messages: sled::Tree,
    index: sled::Tree,
    delayed: sled::Tree,
    flusher: Flusher,
    next_message_id: AtomicU64,
    next_delayed_id: AtomicU64,
    next_queue_id: AtomicU64,
    /// Set at shutdown so dropping in-memory queues does not delete what they hold.
    closing: AtomicBool,
}

/// What a restart finds on disk.
#[derive(Default)]
pub struct Recovered {
    pub exchanges: Vec<ExchangeRecord>,
    pub queues: Vec<(QueueRecord, Vec<RecoveredMessage>)>,
    pub bindings: Vec<BindingRecord>,
    /// Held delayed messages, in due order.
    pub delayed: Vec<DelayedRecord>,
}

/// A delayed message found on disk, with the key it is stored under.
pub struct DelayedRecord {
    pub vhost: String,
    pub exchange: String,
    pub due_ms: u64,
    pub id: u64,
    pub message: Message,
}

/// One entry of a recovered queue, in queue order.
pub struct RecoveredMessage {
    pub position: u64,
    pub entry: IndexEntry,
    pub stored: Arc<StoredMessage>,
}

/// A persistent message's copy on disk. Queues share it; when the last holder
/// drops it (every queue acked or discarded it) its bytes are deleted.
pub struct StoredMessage {
    pub id: u64,
    store: Arc<Store>,
}

/// A queue's hold on a stored message: owned inline when one queue holds it
/// (the common case: no separate allocation), shared when several do.
pub enum StoredRef {
    Sole(StoredMessage),
    Shared(Arc<StoredMessage>),
}

impl StoredRef {
    /// Owned inline if nobody else holds it.
    pub fn from_arc(stored: Arc<StoredMessage>) -> StoredRef {
        match Arc::try_unwrap(stored) {
            Ok(sole) => StoredRef::Sole(sole),
            Err(shared) => StoredRef::Shared(shared),
        }
    }
}

impl std::ops::Deref for StoredRef {
    type Target = StoredMessage;
    fn deref(&self) -> &StoredMessage {
        match self {
            StoredRef::Sole(m) => m,
            StoredRef::Shared(m) => m,
        }
    }
}

impl Drop for StoredMessage {
    fn drop(&mut self) {
        if !self.store.closing.load(Ordering::Acquire) {
            let _ = self.store.messages.remove(self.id.to_be_bytes());
        }
    }
}

impl StoredMessage {
    /// Reads the message back (bodies of paged-out messages live only here).
    pub fn load(&self) -> Option<Message> {
        let bytes = self.store.messages.get(self.id.to_be_bytes()).ok()??;
        codec::decode_message(Bytes::from(bytes.to_vec()))
    }
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
        sled::Error::Corruption { .. } => StoreError::Corrupt {
            dir: dir.to_owned(),
            detail: error.to_string(),
        },
        other => StoreError::Corrupt {
            dir: dir.to_owned(),
            detail: other.to_string(),
        },
    }
}

fn queue_key(vhost: &str, name: &str) -> Vec<u8> {
    [b"q\0", vhost.as_bytes(), b"\0", name.as_bytes()].concat()
}

fn exchange_key(vhost: &str, name: &str) -> Vec<u8> {
    [b"e\0", vhost.as_bytes(), b"\0", name.as_bytes()].concat()
}

fn delayed_key(due_ms: u64, id: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&due_ms.to_be_bytes());
    key[8..].copy_from_slice(&id.to_be_bytes());
    key
}

fn index_key(queue_id: u64, position: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&queue_id.to_be_bytes());
    key[8..].copy_from_slice(&position.to_be_bytes());
    key
}

/// A queue's index entry: what the queue needs of a message without reading
/// its body (recovery keeps bodies on disk until delivery).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexEntry {
    pub message_id: u64,
    /// Delivered at least once, so a restart marks it redelivered.
    pub delivered: bool,
    /// Ms since the epoch; 0 = never.
    pub expires_at: u64,
    pub priority: u8,
    pub size: u32,
}

impl IndexEntry {
    const LEN: usize = 22;

    /// `[message id u64][delivered u8][expires_at u64][priority u8][size u32]`
    fn encode(&self) -> [u8; Self::LEN] {
        let mut value = [0u8; Self::LEN];
        value[..8].copy_from_slice(&self.message_id.to_be_bytes());
        value[8] = self.delivered as u8;
        value[9..17].copy_from_slice(&self.expires_at.to_be_bytes());
        value[17] = self.priority;
        value[18..].copy_from_slice(&self.size.to_be_bytes());
        value
    }

    /// Also reads the first format's 9-byte entries (id and delivered flag).
    fn decode(value: &[u8]) -> Option<IndexEntry> {
        let mut entry = IndexEntry {
            message_id: u64_from(value.get(..8)?),
            delivered: *value.get(8)? != 0,
            ..IndexEntry::default()
        };
        match value.len() {
            9 => {}
            Self::LEN => {
                entry.expires_at = u64_from(&value[9..17]);
                entry.priority = value[17];
                entry.size = u32::from_be_bytes(value[18..22].try_into().ok()?);
            }
            _ => return None,
        }
        Some(entry)
    }
}

impl Store {
    /// Opens (or creates) the data dir, refusing one that is locked, from an
    /// incompatible version, or corrupt.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Arc<Store>, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        compact::finish_interrupted(dir)?;
        let db = std::panic::catch_unwind(|| open_sled(&dir.join("sled"), cache_bytes))
            .map_err(|_| StoreError::Corrupt {
                dir: dir.to_owned(),
                detail: "the storage engine could not read its files".into(),
            })?
            .map_err(|e| sled_error(dir, e))?;
        let open_tree = |name: &str| db.open_tree(name).map_err(|e| sled_error(dir, e));
        let defs = open_tree("defs")?;
        let messages = open_tree("messages")?;
        let index = open_tree("index")?;
        check_format(dir, &db, &defs, &messages, &index)?;
        drop((defs, messages, index));
        let db = compact::compact_if_mostly_empty(dir, db, cache_bytes)?;
        let open_tree = |name: &str| db.open_tree(name).map_err(|e| sled_error(dir, e));
        let defs = open_tree("defs")?;
        let messages = open_tree("messages")?;
        let index = open_tree("index")?;
        let delayed = open_tree("delayed")?;
        let next_message_id = match messages.last().map_err(|e| sled_error(dir, e))? {
            Some((key, _)) => u64_from(&key) + 1,
            None => 1,
        };
        // Keys are due-ordered, so the highest id takes a scan (of few entries).
        let mut next_delayed_id = 1;
        for key in delayed.iter().keys() {
            let key = key.map_err(|e| sled_error(dir, e))?;
            if key.len() == 16 {
                next_delayed_id = next_delayed_id.max(u64_from(&key[8..]) + 1);
            }
        }
        let flusher = Flusher::start(db.clone());
        Ok(Arc::new(Store {
            db,
            defs,
            messages,
            index,
            delayed,
            flusher,
            next_message_id: AtomicU64::new(next_message_id),
            next_delayed_id: AtomicU64::new(next_delayed_id),
            next_queue_id: AtomicU64::new(1),
            closing: AtomicBool::new(false),
        }))
    }

    /// Reads every definition and every queue's messages, in queue order.
    pub fn recover(self: &Arc<Self>) -> Result<Recovered, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            dir: PathBuf::from("(data dir)"),
            detail,
        };
        let mut recovered = Recovered::default();
        let mut queues = Vec::new();
        let mut max_queue_id = 0;
        for item in self.defs.iter() {
            let (key, value) = item.map_err(|e| corrupt(e.to_string()))?;
            match key.first() {
                Some(b'e') => recovered
                    .exchanges
                    .push(codec::decode_json(&value).map_err(corrupt)?),
                Some(b'q') => {
                    let record: QueueRecord = codec::decode_json(&value).map_err(corrupt)?;
                    max_queue_id = max_queue_id.max(record.id);
                    queues.push(record);
                }
                Some(b'b') => recovered
                    .bindings
                    .push(codec::decode_json(&value).map_err(corrupt)?),
                _ => {}
            }
        }
        self.next_queue_id
            .store(max_queue_id + 1, Ordering::Relaxed);
        let mut shared: HashMap<u64, Arc<StoredMessage>> = HashMap::new();
        for record in queues {
            let mut entries = Vec::new();
            for item in self.index.scan_prefix(record.id.to_be_bytes()) {
                let (key, value) = item.map_err(|e| corrupt(e.to_string()))?;
                let entry = match IndexEntry::decode(&value) {
                    Some(entry) if key.len() == 16 => entry,
                    _ => return Err(corrupt("malformed queue index entry".into())),
                };
                let message_id = entry.message_id;
                let stored = shared
                    .entry(message_id)
                    .or_insert_with(|| {
                        Arc::new(StoredMessage {
                            id: message_id,
                            store: self.clone(),
                        })
                    })
                    .clone();
                entries.push(RecoveredMessage {
                    position: u64_from(&key[8..]),
                    entry,
                    stored,
                });
            }
            recovered.queues.push((record, entries));
        }
        for item in self.delayed.iter() {
            let (key, value) = item.map_err(|e| corrupt(e.to_string()))?;
            let decoded = codec::decode_delayed(Bytes::from(value.to_vec()));
            let (Some((vhost, exchange, message)), 16) = (decoded, key.len()) else {
                return Err(corrupt("malformed delayed message".into()));
            };
            recovered.delayed.push(DelayedRecord {
                vhost,
                exchange,
                due_ms: u64_from(&key[..8]),
                id: u64_from(&key[8..]),
                message,
            });
        }
        Ok(recovered)
    }

    // ---- definitions ----------------------------------------------------------

    pub fn new_queue_id(&self) -> u64 {
        self.next_queue_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn save_exchange(&self, vhost: &str, name: &str, options: &ExchangeOptions) {
        let record = ExchangeRecord::new(vhost, name, options);
        self.put_def(exchange_key(vhost, name), codec::encode_json(&record));
    }

    pub fn delete_exchange(&self, vhost: &str, name: &str) {
        self.remove_def(exchange_key(vhost, name));
    }

    pub fn save_queue(&self, vhost: &str, name: &str, id: u64, options: &QueueOptions) {
        let record = QueueRecord::new(vhost, name, id, options);
        self.put_def(queue_key(vhost, name), codec::encode_json(&record));
    }

    /// Forgets a queue and its index (message bodies go with their last holder).
    pub fn delete_queue(&self, vhost: &str, name: &str, id: u64) {
        if self.is_closed() {
            return;
        }
        self.remove_def(queue_key(vhost, name));
        for key in self.index.scan_prefix(id.to_be_bytes()).keys().flatten() {
            let _ = self.index.remove(key);
        }
    }

    pub fn save_binding(&self, record: &BindingRecord) {
        self.put_def(record.key(), codec::encode_json(record));
    }

    pub fn delete_binding(&self, record: &BindingRecord) {
        self.remove_def(record.key());
    }

    fn put_def(&self, key: Vec<u8>, value: Vec<u8>) {
        if self.is_closed() {
            return;
        }
        if let Err(error) = self.defs.insert(key, value) {
            tracing::error!(%error, "could not save a definition");
        }
    }

    fn remove_def(&self, key: Vec<u8>) {
        if self.is_closed() {
            return;
        }
        if let Err(error) = self.defs.remove(key) {
            tracing::error!(%error, "could not delete a definition");
        }
    }

    // ---- messages -----------------------------------------------------------------

    /// Writes a persistent message once, for every durable queue it reaches.
    pub fn persist_message(self: &Arc<Self>, message: &Message) -> StoredMessage {
        let id = self.next_message_id.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self
            .messages
            .insert(id.to_be_bytes(), codec::encode_message(message))
        {
            tracing::error!(%error, "could not persist a message");
        }
        StoredMessage {
            id,
            store: self.clone(),
        }
    }

    pub fn index_add(&self, queue_id: u64, position: u64, entry: &IndexEntry) {
        if self.is_closed() {
            return;
        }
        let _ = self
            .index
            .insert(index_key(queue_id, position), &entry.encode());
    }

    /// Many removals in one sled batch (purge).
    pub fn index_remove_all(&self, queue_id: u64, positions: impl Iterator<Item = u64>) {
        if self.is_closed() {
            return;
        }
        let mut batch = sled::Batch::default();
        for position in positions {
            batch.remove(&index_key(queue_id, position));
        }
        let _ = self.index.apply_batch(batch);
    }

    pub fn index_remove(&self, queue_id: u64, position: u64) {
        if self.is_closed() {
            return;
        }
        let _ = self.index.remove(index_key(queue_id, position));
    }

    // ---- delayed messages ---------------------------------------------------------

    /// Writes a message a delayed exchange holds until `due_ms`; returns its id.
    pub fn hold_delayed(&self, vhost: &str, exchange: &str, due_ms: u64, message: &Message) -> u64 {
        let id = self.next_delayed_id.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.delayed.insert(
            delayed_key(due_ms, id),
            codec::encode_delayed(vhost, exchange, message),
        ) {
            tracing::error!(%error, "could not persist a delayed message");
        }
        id
    }

    /// Forgets a held delayed message (routed, or its exchange deleted).
    pub fn release_delayed(&self, due_ms: u64, id: u64) {
        if self.is_closed() {
            return;
        }
        let _ = self.delayed.remove(delayed_key(due_ms, id));
    }

    /// How many delayed messages are on disk.
    #[cfg(test)]
    pub(crate) fn delayed_len(&self) -> usize {
        self.delayed.len()
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

    /// Flushes now and waits (transactions commit this way).
    pub fn flush_blocking(&self) -> bool {
        self.db.flush().is_ok()
    }

    /// After [`close`](Self::close) nothing changes on disk any more: what is
    /// still running while the broker stops (connections being dropped,
    /// queues being freed) must not edit the state it is leaving behind.
    fn is_closed(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// From now on dropped messages are kept on disk: the broker is stopping.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.flusher.stop();
        let _ = self.db.flush();
    }
}

/// The format is recorded twice: inside sled and in a marker file beside it.
/// The file is what tells a new data dir from one whose database lost its
/// contents (sled reads a garbage log as an empty one), so that case is an
/// error instead of a silent fresh start.
fn check_format(
    dir: &Path,
    db: &sled::Db,
    defs: &sled::Tree,
    messages: &sled::Tree,
    index: &sled::Tree,
) -> Result<(), StoreError> {
    let marker = dir.join(MARKER_FILE);
    let expected = String::from_utf8_lossy(FORMAT).into_owned();
    let in_db = defs.get(FORMAT_KEY).map_err(|e| sled_error(dir, e))?;
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
            let only_marker = defs.len() <= usize::from(in_db.is_some());
            if !(only_marker && messages.is_empty() && index.is_empty()) {
                return Err(StoreError::Incompatible {
                    dir: dir.to_owned(),
                    found: "no format marker".into(),
                    expected,
                });
            }
            // A new data dir: the marker goes into the database first, then the file.
            defs.insert(FORMAT_KEY, FORMAT)
                .map_err(|e| sled_error(dir, e))?;
            db.flush().map_err(|e| sled_error(dir, e))?;
            let io = |e: std::io::Error| StoreError::Io(format!("{}: {e}", marker.display()));
            let mut file = std::fs::File::create(&marker).map_err(io)?;
            std::io::Write::write_all(&mut file, FORMAT).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(())
        }
    }
}

fn u64_from(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(buf)
}

/// Durable bindings record their arguments too, so a restart rebuilds them exactly.
pub fn binding_record(
    vhost: &str,
    source: &str,
    destination_is_queue: bool,
    destination: &str,
    routing_key: &str,
    arguments: &FieldTable,
) -> BindingRecord {
    BindingRecord {
        vhost: vhost.to_owned(),
        source: source.to_owned(),
        destination_is_queue,
        destination: destination.to_owned(),
        routing_key: routing_key.to_owned(),
        arguments: arguments.clone(),
    }
}
