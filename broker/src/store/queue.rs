//! One durable queue's storage: its messages in a log of segment files
//! ([`super::segments`]), plus, in sled, the little bookkeeping a restart
//! needs to rebuild the queue without reading every message (where the
//! paged-out tail starts, how far deliveries got, what a purge dropped).
//!
//! The queue decides; this only writes and reads. An enqueue is an append to
//! a buffer and an ack a note in another; both reach the disk with the next
//! group commit.

use std::sync::Arc;

use bytes::Bytes;

use std::collections::HashSet;

use super::keys::{self, DEAD, META, PURGED, TRANSIENT};
use super::segments::{QueueLog, Removed};
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
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.transient));
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.push(self.priority);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.cum_bytes.to_be_bytes());
    }

    pub(super) fn decode(value: &[u8]) -> Option<EntryMeta> {
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
    /// The record as the model wrote it.
    pub record: Bytes,
}

/// A run of ready messages that lives only on disk, at positions
/// `start..end`: `count` of them with `bytes` of body. Not every position
/// need hold one the queue counts (a transient message from before a
/// restart is gone), so the run ends at `end`, not at `start + count`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tail {
    pub start: u64,
    pub end: u64,
    pub count: u64,
    pub bytes: u64,
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
    log: Arc<QueueLog>,
}

impl QueueStore {
    pub(super) fn new(store: Arc<Store>, id: u64, log: Arc<QueueLog>) -> Self {
        QueueStore { store, id, log }
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
        if self.store.is_closed() {
            return Ok(());
        }
        if self.store.is_failed() {
            return Err(self.store.failed_error());
        }
        self.log
            .append(position, meta, record)
            .map_err(|e| self.store.fail(&e))?;
        self.store.log_dirty(&self.log);
        if meta.transient {
            // A transient message in the tail is marked, so a restart neither
            // counts nor keeps it.
            self.store.insert(
                &keys::queue_key(self.id, TRANSIENT, position),
                u64::from(meta.size).to_be_bytes().to_vec(),
            )?;
        }
        Ok(())
    }

    /// A transient message of the tail was read back into memory: its mark goes.
    pub fn unmark_transient(&self, position: u64) -> Result<(), StoreError> {
        self.store
            .remove(&keys::queue_key(self.id, TRANSIENT, position))
    }

    /// The message at `position` is gone: acknowledged, expired, dropped.
    pub fn remove(&self, position: u64) -> Result<(), StoreError> {
        if self.store.is_closed() {
            return Ok(());
        }
        self.log.remove(position);
        self.store.log_dirty(&self.log);
        Ok(())
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
        self.log
            .read(from, to, limit)
            .map_err(|e| StoreError::Io(format!("reading queue {}: {e}", self.id)))
    }

    /// Drops the ready messages: those at `positions`, and the tail `dead`
    /// (start, end). One atomic write in sled, so a crash leaves all of them
    /// or none; their segments are deleted once that write is on disk.
    pub fn purge(&self, positions: &[u64], dead: Option<(u64, u64)>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for &p in positions {
            batch.insert(&keys::queue_key(self.id, PURGED, p), &[]);
        }
        let dead = dead.filter(|(s, e)| s < e);
        if let Some((start, end)) = dead {
            batch.insert(&keys::queue_key(self.id, DEAD, start), &end.to_be_bytes());
            batch.remove(&keys::queue_key(self.id, META, TAIL_SLOT));
        }
        self.store.apply(batch)?;
        for &p in positions {
            self.log.remove(p);
        }
        if let Some((start, end)) = dead {
            self.log.remove_from(start);
            self.store.reaper.clear_range(self.id, start, end);
        }
        self.store.log_dirty(&self.log);
        Ok(())
    }

    /// Reads what a restart needs: the bookkeeping, the messages before the
    /// tail, and the tail's two ends; the tail itself stays on disk.
    pub fn recover(&self) -> Result<RecoveredQueue, StoreError> {
        let mut recovered = RecoveredQueue::default();
        let mut tail_start = None;
        let mut next = 0u64;
        let mut dead = Vec::new();
        let mut purged = HashSet::new();
        let mut transient = Vec::new();
        {
            let tree = self.store.tree()?;
            for item in tree.scan_prefix(keys::queue_kind_prefix(self.id, META)) {
                let (key, value) = item?;
                let slot = key_number(&key)?;
                let n = u64_value(&value)?;
                if slot == TAIL_SLOT {
                    tail_start = Some(n);
                    next = next.max(n);
                } else {
                    let level = u8::try_from(slot - 1).map_err(|_| malformed())?;
                    recovered.delivered.push((level, n));
                    next = next.max(n.saturating_add(1));
                }
            }
            for item in tree.scan_prefix(keys::queue_kind_prefix(self.id, DEAD)) {
                let (key, value) = item?;
                let (start, end) = (key_number(&key)?, u64_value(&value)?);
                dead.push((start, end));
                next = next.max(end);
            }
            for item in tree.scan_prefix(keys::queue_kind_prefix(self.id, PURGED)) {
                purged.insert(key_number(&item?.0)?);
            }
            for item in tree.scan_prefix(keys::queue_kind_prefix(self.id, TRANSIENT)) {
                let (key, size) = item?;
                transient.push((key_number(&key)?, u64_value(&size)?));
            }
        }
        let gone = Removed {
            positions: &purged,
            ranges: &dead,
        };
        let log = self
            .log
            .recover(tail_start, &gone)
            .map_err(|e| StoreError::Io(format!("recovering queue {}: {e}", self.id)))?;
        recovered.head = log.head;
        if let Some((last, meta)) = log.last {
            next = next.max(last + 1);
            recovered.cum_bytes = meta.cum_bytes;
        }
        if let (Some(start), Some((first, fm)), Some((last, lm))) =
            (tail_start, log.tail_first, log.last)
        {
            let mut tail = Tail {
                start: first,
                end: last + 1,
                count: (last - first + 1).saturating_sub(log.tail_removed),
                bytes: lm.cum_bytes - fm.cum_bytes + u64::from(fm.size),
            };
            // Transient messages in the tail did not survive the restart.
            for &(position, size) in transient.iter().filter(|(p, _)| *p >= start) {
                if position >= first {
                    tail.count = tail.count.saturating_sub(1);
                    tail.bytes = tail.bytes.saturating_sub(size);
                }
            }
            recovered.tail = (tail.count > 0).then_some(tail);
        }
        recovered.next_position = next;
        self.forget_stale_marks(&dead, &purged, &transient)?;
        if self.log.has_unwritten() {
            self.store.log_dirty(&self.log);
        }
        Ok(recovered)
    }

    /// Marks in sled that no longer point into a segment on disk: their
    /// messages are deleted, so the marks have done their work.
    fn forget_stale_marks(
        &self,
        dead: &[(u64, u64)],
        purged: &HashSet<u64>,
        transient: &[(u64, u64)],
    ) -> Result<(), StoreError> {
        let ranges = self.log.segment_ranges();
        let on_disk = |p: u64| ranges.iter().any(|&(f, l)| f <= p && p <= l);
        let overlaps = |s: u64, e: u64| ranges.iter().any(|&(f, l)| f < e && s <= l);
        let mut batch = sled::Batch::default();
        let mut any = false;
        for &(start, _) in dead.iter().filter(|&&(s, e)| !overlaps(s, e)) {
            batch.remove(&keys::queue_key(self.id, DEAD, start));
            any = true;
        }
        for &p in purged.iter().filter(|&&p| !on_disk(p)) {
            batch.remove(&keys::queue_key(self.id, PURGED, p));
            any = true;
        }
        for &(p, _) in transient.iter().filter(|&&(p, _)| !on_disk(p)) {
            batch.remove(&keys::queue_key(self.id, TRANSIENT, p));
            any = true;
        }
        if any {
            self.store.apply(batch)?;
        }
        Ok(())
    }
}

fn malformed() -> StoreError {
    StoreError::Corrupt {
        dir: "(data dir)".into(),
        detail: "malformed queue bookkeeping".into(),
    }
}

fn key_number(key: &[u8]) -> Result<u64, StoreError> {
    keys::parse_queue_key(key)
        .map(|(_, _, n)| n)
        .ok_or_else(malformed)
}

fn u64_value(value: &[u8]) -> Result<u64, StoreError> {
    (value.len() == 8)
        .then(|| keys::u64_at(value, 0))
        .ok_or_else(malformed)
}
