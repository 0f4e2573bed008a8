//! One durable queue's storage: its messages by position, in queue order,
//! plus the little bookkeeping a restart needs to rebuild the queue without
//! reading every message (where the paged-out tail starts, how far
//! deliveries got).
//!
//! The queue decides; this only writes and reads. Each message is one key
//! whose value holds everything the queue needs (its size, expiry, priority)
//! and the message record itself, so an enqueue is one insert and an ack
//! one remove, and no body can outlive the entry that owns it.

use std::sync::Arc;

use bytes::Bytes;

use super::keys::{self, DEAD, ENTRY, META, TRANSIENT};
use super::{Store, StoreError};

/// What the queue keeps with a message on disk besides its record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryMeta {
    /// Written only because the queue pages to disk; gone after a restart,
    /// like any transient message.
    pub transient: bool,
    /// Ms since the epoch; 0 = never.
    pub expires_at: u64,
    pub priority: u8,
    /// Body bytes.
    pub size: u32,
    /// Body bytes of every message this queue wrote, up to and including
    /// this one: the bytes of a contiguous run of entries are the difference
    /// of its ends' totals, so a restart knows them without reading the run.
    pub cum_bytes: u64,
}

impl EntryMeta {
    pub const LEN: usize = 22;

    /// `[flags u8][expires_at u64][priority u8][size u32][cum_bytes u64]`
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.transient));
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.push(self.priority);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.cum_bytes.to_be_bytes());
    }

    fn decode(value: &[u8]) -> Option<EntryMeta> {
        if value.len() < Self::LEN {
            return None;
        }
        Some(EntryMeta {
            transient: value[0] & 1 != 0,
            expires_at: keys::u64_at(value, 1),
            priority: value[9],
            size: u32::from_be_bytes(value[10..14].try_into().ok()?),
            cum_bytes: keys::u64_at(value, 14),
        })
    }
}

/// A message read back from disk.
pub struct StoredEntry {
    pub position: u64,
    pub meta: EntryMeta,
    /// The record as the model wrote it (shares the database's buffer).
    pub record: Bytes,
}

/// A run of ready messages that lives only on disk: every position in
/// `start..start + count` holds one, with `bytes` of body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tail {
    pub start: u64,
    pub count: u64,
    pub bytes: u64,
}

impl Tail {
    pub fn end(&self) -> u64 {
        self.start + self.count
    }
}

/// A queue as a restart finds it.
#[derive(Default)]
pub struct RecoveredQueue {
    /// The messages before the tail, in position order: the ones the queue
    /// held in memory (ready, requeued, delivered but unacknowledged).
    pub head: Vec<StoredEntry>,
    pub tail: Option<Tail>,
    /// Past every position this queue ever used.
    pub next_position: u64,
    pub cum_bytes: u64,
    /// Per priority level, the highest position delivered.
    pub delivered: Vec<(u8, u64)>,
}

/// Bookkeeping slots under [`META`].
const TAIL_SLOT: u64 = 0;
fn delivered_slot(level: u8) -> u64 {
    1 + u64::from(level)
}

/// A durable queue's handle on the store.
#[derive(Clone)]
pub struct QueueStore {
    store: Arc<Store>,
    id: u64,
}

impl QueueStore {
    pub(super) fn new(store: Arc<Store>, id: u64) -> Self {
        QueueStore { store, id }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Writes the message at `position`; `record` is its parts, concatenated.
    pub fn push(
        &self,
        position: u64,
        meta: &EntryMeta,
        record: &[&[u8]],
    ) -> Result<(), StoreError> {
        let len = EntryMeta::LEN + record.iter().map(|p| p.len()).sum::<usize>();
        let mut value = Vec::with_capacity(len);
        meta.encode(&mut value);
        for part in record {
            value.extend_from_slice(part);
        }
        let key = keys::queue_key(self.id, ENTRY, position);
        if !meta.transient {
            return self.store.insert(&key, value);
        }
        // A transient message in the tail is marked apart, in the same
        // write: a restart drops it and must not count it.
        let mut batch = sled::Batch::default();
        batch.insert(&key, value);
        batch.insert(
            &keys::queue_key(self.id, TRANSIENT, position),
            &u64::from(meta.size).to_be_bytes(),
        );
        self.store.apply(batch)
    }

    /// A transient message of the tail was read back into memory: its mark goes.
    pub fn unmark_transient(&self, position: u64) -> Result<(), StoreError> {
        self.store
            .remove(&keys::queue_key(self.id, TRANSIENT, position))
    }

    /// The message at `position` is gone: acknowledged, expired, dropped.
    pub fn remove(&self, position: u64) -> Result<(), StoreError> {
        self.store
            .remove(&keys::queue_key(self.id, ENTRY, position))
    }

    /// Where the paged-out tail starts (`None`: the queue holds everything in memory).
    pub fn set_tail_start(&self, start: Option<u64>) -> Result<(), StoreError> {
        let key = keys::queue_key(self.id, META, TAIL_SLOT);
        match start {
            Some(start) => self.store.insert(&key, start.to_be_bytes().to_vec()),
            None => self.store.remove(&key),
        }
    }

    /// Everything up to `position` at priority `level` has been delivered,
    /// so a restart marks what is left of it redelivered. Written with the
    /// next flush, not now: only the latest value matters, and a busy
    /// consumer moves it thousands of times between two flushes.
    pub fn set_delivered(&self, level: u8, position: u64) -> Result<(), StoreError> {
        let key = keys::queue_key(self.id, META, delivered_slot(level));
        self.store.write_before_flush(key, position);
        Ok(())
    }

    /// Up to `limit` messages at positions `from..to`, in order.
    pub fn read(&self, from: u64, to: u64, limit: usize) -> Result<Vec<StoredEntry>, StoreError> {
        let tree = self.store.tree()?;
        let start = keys::queue_key(self.id, ENTRY, from);
        let end = keys::queue_key(self.id, ENTRY, to);
        let mut out = Vec::with_capacity(limit.min(1024));
        for item in tree.range(start..end).take(limit) {
            let (key, value) = item.map_err(StoreError::from)?;
            out.push(entry(&key, value)?);
        }
        Ok(out)
    }

    /// Drops the ready messages: those at `positions` at once, and the run
    /// `dead` (start, end) marked dead and removed in the background. One
    /// atomic write, so a crash leaves all of them or none.
    pub fn purge(&self, positions: &[u64], dead: Option<(u64, u64)>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for &p in positions {
            batch.remove(&keys::queue_key(self.id, ENTRY, p));
        }
        if let Some((start, end)) = dead.filter(|(s, e)| s < e) {
            batch.insert(&keys::queue_key(self.id, DEAD, start), &end.to_be_bytes());
            batch.remove(&keys::queue_key(self.id, META, TAIL_SLOT));
        }
        self.store.apply(batch)?;
        if let Some((start, end)) = dead.filter(|(s, e)| s < e) {
            self.store.reaper.clear_range(self.id, start, end);
        }
        Ok(())
    }

    /// Reads what a restart needs: the bookkeeping, the messages before the
    /// tail, and the tail's two ends; the tail itself stays on disk.
    pub fn recover(&self) -> Result<RecoveredQueue, StoreError> {
        let tree = self.store.tree()?;
        let mut recovered = RecoveredQueue::default();
        let mut tail_start = None;
        let mut next = 0u64;
        for item in tree.scan_prefix(keys::queue_kind_prefix(self.id, META)) {
            let (key, value) = item.map_err(StoreError::from)?;
            let (_, _, slot) = keys::parse_queue_key(&key).ok_or_else(malformed)?;
            let n = (value.len() == 8)
                .then(|| keys::u64_at(&value, 0))
                .ok_or_else(malformed)?;
            if slot == TAIL_SLOT {
                tail_start = Some(n);
                next = next.max(n);
            } else {
                let level = u8::try_from(slot - 1).map_err(|_| malformed())?;
                recovered.delivered.push((level, n));
                next = next.max(n.saturating_add(1));
            }
        }
        let mut dead = Vec::new();
        for item in tree.scan_prefix(keys::queue_kind_prefix(self.id, DEAD)) {
            let (key, value) = item.map_err(StoreError::from)?;
            let (_, _, start) = keys::parse_queue_key(&key).ok_or_else(malformed)?;
            let end = (value.len() == 8)
                .then(|| keys::u64_at(&value, 0))
                .ok_or_else(malformed)?;
            // Whatever a crash left of the removal is finished in the
            // background (see `Store::forget_queues_except`).
            dead.push((start, end));
            next = next.max(end);
        }
        let is_dead = |p: u64| dead.iter().any(|&(s, e)| s <= p && p < e);
        let head_end = tail_start.unwrap_or(u64::MAX);
        let mut stale = Vec::new();
        let range = keys::queue_key(self.id, ENTRY, 0)..keys::queue_key(self.id, ENTRY, head_end);
        for item in tree.range(range) {
            let (key, value) = item.map_err(StoreError::from)?;
            let e = entry(&key, value)?;
            next = next.max(e.position + 1);
            recovered.cum_bytes = recovered.cum_bytes.max(e.meta.cum_bytes);
            if is_dead(e.position) {
                continue;
            }
            if e.meta.transient {
                stale.push(e.position);
                continue;
            }
            recovered.head.push(e);
        }
        if let Some(start) = tail_start {
            let range =
                keys::queue_key(self.id, ENTRY, start)..keys::queue_key(self.id, ENTRY, u64::MAX);
            let first = tree.range(range.clone()).next().transpose()?;
            let last = tree.range(range).next_back().transpose()?;
            if let (Some((fk, fv)), Some((lk, lv))) = (first, last) {
                let (first, last) = (entry(&fk, fv)?, entry(&lk, lv)?);
                next = next.max(last.position + 1);
                recovered.cum_bytes = recovered.cum_bytes.max(last.meta.cum_bytes);
                let mut tail = Tail {
                    start: first.position,
                    count: last.position - first.position + 1,
                    bytes: last.meta.cum_bytes - first.meta.cum_bytes + u64::from(first.meta.size),
                };
                // Transient messages in the tail did not survive the restart.
                let marks = keys::queue_key(self.id, TRANSIENT, first.position)
                    ..keys::queue_key(self.id, TRANSIENT, u64::MAX);
                for item in tree.range(marks) {
                    let (_, size) = item?;
                    let size = (size.len() == 8)
                        .then(|| keys::u64_at(&size, 0))
                        .ok_or_else(malformed)?;
                    tail.count = tail.count.saturating_sub(1);
                    tail.bytes = tail.bytes.saturating_sub(size);
                }
                recovered.tail = (tail.count > 0).then_some(tail);
            }
        }
        recovered.next_position = next;
        if !stale.is_empty() {
            let mut batch = sled::Batch::default();
            for p in stale {
                batch.remove(&keys::queue_key(self.id, ENTRY, p));
            }
            self.store.apply(batch)?;
        }
        Ok(recovered)
    }
}

fn malformed() -> StoreError {
    StoreError::Corrupt {
        dir: "(data dir)".into(),
        detail: "malformed queue entry".into(),
    }
}

fn entry(key: &[u8], value: sled::IVec) -> Result<StoredEntry, StoreError> {
    let (_, _, position) = keys::parse_queue_key(key).ok_or_else(malformed)?;
    let meta = EntryMeta::decode(&value).ok_or_else(malformed)?;
    let record = Bytes::from_owner(value).slice(EntryMeta::LEN..);
    Ok(StoredEntry {
        position,
        meta,
        record,
    })
}
