//! A durable queue's side of the store: which of its messages are on disk,
//! the tail of ready messages that lives only there, and the writes its
//! decisions call for.
//!
//! The queue decides under its lock and records here what to write
//! ([`DiskOp`]); the writes happen after the lock is released, in the order
//! they were decided (see `Queue::finish`). Nothing here touches the disk.
//!
//! Past [`IN_MEMORY_READY`] ready messages, a paging queue stops keeping
//! messages in memory: they go to disk only, forming a contiguous run of
//! positions (the tail). As consumers catch up, the tail is read back in
//! chunks, outside the lock. A restart reads the messages before the tail
//! and only the tail's two ends, so it costs the same for ten messages
//! queued as for ten million.

use std::sync::Arc;

use super::message::Message;
use super::records;
use crate::store::{EntryMeta, QueueStore, RecoveredQueue, StoreError, Tail};

/// Ready messages a paging queue keeps in memory before the rest wait on disk.
pub const IN_MEMORY_READY: usize = 1024;
/// Below this many ready messages in memory, the next chunk is read back.
pub const REFILL_BELOW: usize = IN_MEMORY_READY / 2;
/// Messages read back per chunk.
pub const REFILL_CHUNK: usize = IN_MEMORY_READY / 2;

/// A chunk of the tail to read back: positions `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refill {
    pub start: u64,
    pub end: u64,
}

/// A write a queue decided on.
pub enum DiskOp {
    Push {
        position: u64,
        meta: EntryMeta,
        message: Arc<Message>,
    },
    Remove(u64),
    /// A transient message of the tail is in memory now.
    Unmark(u64),
    Delivered {
        level: u8,
        position: u64,
    },
    TailStart(Option<u64>),
    Purge {
        positions: Vec<u64>,
        dead: Option<(u64, u64)>,
    },
}

impl DiskOp {
    pub fn apply(&self, store: &QueueStore) -> Result<(), StoreError> {
        match self {
            DiskOp::Push {
                position,
                meta,
                message,
            } => {
                let prefix = records::MessagePrefix::of(message);
                store.push(
                    *position,
                    meta,
                    &[prefix.as_slice(), &message.raw_header, &message.body],
                )
            }
            DiskOp::Remove(position) => store.remove(*position),
            DiskOp::Unmark(position) => store.unmark_transient(*position),
            DiskOp::Delivered { level, position } => store.set_delivered(*level, *position),
            DiskOp::TailStart(start) => store.set_tail_start(*start),
            DiskOp::Purge { positions, dead } => store.purge(positions, *dead),
        }
    }
}

/// A durable queue's disk bookkeeping, kept under the queue's lock.
pub struct QueueDisk {
    /// Whether ready messages may wait on disk only. Priority queues and
    /// queues with length limits keep every ready message in memory: their
    /// order and limits need all of them at hand.
    pub pages: bool,
    pub tail: Option<Tail>,
    /// Body bytes of every message written so far.
    cum_bytes: u64,
    /// Per priority level, the highest position delivered so far.
    delivered: Vec<Option<u64>>,
    /// Levels whose delivered position changed since the last writes.
    delivered_dirty: bool,
    /// A chunk of the tail is being read back.
    pub refilling: bool,
    /// Positions below this were written before the last restart: transient
    /// ones among them are gone.
    pub boot_position: u64,
    ops: Vec<DiskOp>,
}

impl QueueDisk {
    pub fn new(pages: bool, levels: usize) -> Self {
        QueueDisk {
            pages,
            tail: None,
            cum_bytes: 0,
            delivered: vec![None; levels],
            delivered_dirty: false,
            refilling: false,
            boot_position: 0,
            ops: Vec::new(),
        }
    }

    /// The bookkeeping a restart found.
    pub fn recovered(pages: bool, levels: usize, r: &RecoveredQueue) -> Self {
        let mut disk = QueueDisk::new(pages, levels);
        disk.cum_bytes = r.cum_bytes;
        disk.boot_position = r.next_position;
        for &(level, position) in &r.delivered {
            if let Some(slot) = disk.delivered.get_mut(usize::from(level)) {
                *slot = Some(position);
            }
        }
        disk.tail = r.tail;
        disk
    }

    /// Whether a message at `position` and `level` was delivered before the restart.
    pub fn was_delivered(&self, level: usize, position: u64) -> bool {
        self.delivered
            .get(level)
            .copied()
            .flatten()
            .is_some_and(|upto| position <= upto)
    }

    fn meta(&mut self, size: u32, expires_at: u64, priority: u8, transient: bool) -> EntryMeta {
        self.cum_bytes += u64::from(size);
        EntryMeta {
            transient,
            expires_at,
            priority,
            size,
            cum_bytes: self.cum_bytes,
        }
    }

    /// A persistent message joins the queue in memory; its copy goes to disk.
    pub fn write(&mut self, position: u64, message: &Arc<Message>, expires_at: u64) {
        let size = message.body.len() as u32;
        let priority = message.properties.priority().unwrap_or(0);
        let meta = self.meta(size, expires_at, priority, false);
        self.ops.push(DiskOp::Push {
            position,
            meta,
            message: message.clone(),
        });
    }

    /// Whether a new ready message must go to the tail instead of memory.
    pub fn spills(&self, ready_in_memory: usize) -> bool {
        self.pages && (self.tail.is_some() || ready_in_memory >= IN_MEMORY_READY)
    }

    /// A message joins the tail: on disk only (transient ones too, flagged
    /// so a restart drops them).
    pub fn spill(&mut self, position: u64, message: Arc<Message>, expires_at: u64) {
        let size = message.body.len() as u32;
        let priority = message.properties.priority().unwrap_or(0);
        let meta = self.meta(size, expires_at, priority, !message.is_persistent());
        match &mut self.tail {
            Some(tail) => {
                tail.count += 1;
                tail.end = position + 1;
                tail.bytes += u64::from(size);
            }
            None => {
                self.tail = Some(Tail {
                    start: position,
                    end: position + 1,
                    count: 1,
                    bytes: u64::from(size),
                });
                self.ops.push(DiskOp::TailStart(Some(position)));
            }
        }
        self.ops.push(DiskOp::Push {
            position,
            meta,
            message,
        });
    }

    pub fn remove(&mut self, position: u64) {
        self.ops.push(DiskOp::Remove(position));
    }

    /// A transient message read back from the tail no longer needs its mark.
    pub fn unmark(&mut self, position: u64) {
        self.ops.push(DiskOp::Unmark(position));
    }

    /// Takes back a removal decided just now (a no-ack delivery its channel refused).
    pub fn cancel_remove(&mut self, position: u64) {
        if matches!(self.ops.last(), Some(DiskOp::Remove(p)) if *p == position) {
            self.ops.pop();
        }
    }

    pub fn delivered(&mut self, level: usize, position: u64) {
        if let Some(slot) = self.delivered.get_mut(level) {
            if slot.is_none_or(|p| p < position) {
                *slot = Some(position);
                self.delivered_dirty = true;
            }
        }
    }

    /// The ready messages go: `positions` (in memory, on disk) and the tail.
    pub fn purge(&mut self, positions: Vec<u64>, next_position: u64) {
        let dead = self.tail.take().map(|t| (t.start, next_position));
        self.ops.push(DiskOp::Purge { positions, dead });
    }

    /// The next chunk of the tail to read, when one should be read now.
    pub fn wants_refill(&mut self, ready_in_memory: usize) -> Option<Refill> {
        let tail = self.tail?;
        if self.refilling || ready_in_memory >= REFILL_BELOW {
            return None;
        }
        self.refilling = true;
        Some(self.refill_of(tail))
    }

    /// The next chunk of the tail, for a reader that cannot wait (basic.get).
    pub fn next_refill(&self) -> Option<Refill> {
        self.tail.map(|t| self.refill_of(t))
    }

    fn refill_of(&self, tail: Tail) -> Refill {
        Refill {
            start: tail.start,
            end: tail.end,
        }
    }

    /// A chunk was read: `last` is the last position read (if any),
    /// `counted` how many of the messages read the tail counted (not those
    /// a restart dropped) with `bytes` of body, `whole` whether the read
    /// reached the chunk's end. Returns whether it still applies (a purge
    /// may have dropped the tail meanwhile, or another reader got there
    /// first) and moves the tail on. Positions with nothing on disk (a write
    /// that failed) simply no longer count.
    pub fn refilled(
        &mut self,
        chunk: Refill,
        last: Option<u64>,
        counted: u64,
        bytes: u64,
        whole: bool,
    ) -> bool {
        self.refilling = false;
        let Some(tail) = self.tail.as_mut().filter(|t| t.start == chunk.start) else {
            return false;
        };
        let next = match (whole, last) {
            (true, _) => chunk.end,
            (false, Some(last)) => last + 1,
            (false, None) => chunk.start,
        };
        tail.count = tail.count.saturating_sub(counted);
        tail.bytes = tail.bytes.saturating_sub(bytes);
        tail.start = next;
        if tail.start >= tail.end {
            self.tail = None;
            self.ops.push(DiskOp::TailStart(None));
        } else {
            self.ops.push(DiskOp::TailStart(Some(next)));
        }
        true
    }

    /// The writes decided since the last call, in order.
    pub fn take_ops(&mut self) -> Vec<DiskOp> {
        if self.delivered_dirty {
            self.delivered_dirty = false;
            for (level, position) in self.delivered.iter().enumerate() {
                if let Some(position) = *position {
                    self.ops.push(DiskOp::Delivered {
                        level: level as u8,
                        position,
                    });
                }
            }
        }
        std::mem::take(&mut self.ops)
    }

    pub fn has_ops(&self) -> bool {
        !self.ops.is_empty() || self.delivered_dirty
    }
}
