//! A queue: its ready messages, its consumers, and the count of deliveries
//! awaiting acknowledgement, with RabbitMQ's queue arguments applied
//! (TTLs, length limits, dead-lettering, priorities, single active consumer).
//!
//! Each queue has its own short-held lock; nothing on the publish or deliver path
//! takes a broker-wide lock. Lock order is queue → channel → connection outbox,
//! and the acknowledgement path releases the channel before it takes a queue.
//! Messages that die under the lock (rejected, expired, over a limit) are
//! dead-lettered after it is released, since a dead-letter exchange may route
//! them back to this very queue.
//!
//! A durable queue writes its persistent messages to the store and, past a
//! short in-memory head, keeps further ready messages on disk only (see
//! [`super::queue_disk`]). Disk writes are decided under the lock and done
//! after it is released, under the queue's separate I/O lock, which is taken
//! before the state lock is let go so writes reach the store in the order
//! they were decided; reading the tail back happens without the state lock.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use amq_protocol::types::{FieldTable, ShortString};
use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use super::dead_letter::Reason;
use super::message::Message;
use super::queue_args::{Overflow, QueueArgs, QueueType};
use super::queue_disk::{QueueDisk, Refill, IN_MEMORY_READY, REFILL_CHUNK};
use super::ready::Ready;
use super::records;
use super::timers::{now_ms, Timed, Timers};
use super::vhost::VHost;
use crate::error::{AmqpError, AmqpResult};
use crate::store::{QueueStore, RecoveredQueue, StoredEntry};

/// A message in a queue. `seq` is its position at enqueue time, so requeued
/// messages go back where they were, as in RabbitMQ.
pub struct QueuedMessage {
    pub seq: u64,
    pub redelivered: bool,
    /// How often it came back unsettled (requeued by the client, or its
    /// channel or consumer went away): quorum queues' `x-delivery-count`.
    pub delivery_count: u32,
    /// Its priority level in a priority queue.
    pub priority: u8,
    /// Body size, counted against `x-max-length-bytes` even while paged out.
    pub size: u32,
    /// When it expires, in ms since the epoch; 0 = never.
    pub expires_at: u64,
    pub message: Arc<Message>,
    /// Its copy is in the queue's store at position `seq`.
    pub on_disk: bool,
}

/// One delivery handed to a consumer's channel.
pub struct Delivery<'a> {
    pub consumer_tag: &'a ShortString,
    pub consumer_id: u64,
    pub no_ack: bool,
    pub content: Arc<Message>,
    pub message: QueuedMessage,
}

/// Where a consumer's deliveries go: implemented by the protocol layer's channel,
/// so queues never see sockets.
pub trait DeliverySink: Send + Sync {
    /// False while the channel is closed, over its channel-wide
    /// prefetch, or its connection's outbox is backed up.
    fn can_accept(&self) -> bool;
    /// Writes the delivery; gives the message back if the channel closed meanwhile.
    fn deliver(&self, queue: &Arc<Queue>, delivery: Delivery<'_>) -> Result<(), QueuedMessage>;
    /// The queue went away under the consumer (basic.cancel from the server).
    /// The id tells apart a consumer whose tag was meanwhile reused.
    fn cancelled_by_server(&self, consumer_tag: &ShortString, consumer_id: u64);
}

/// A consumer as the queue sees it.
pub struct Consumer {
    pub id: u64,
    pub tag: ShortString,
    pub no_ack: bool,
    pub exclusive: bool,
    /// Per-consumer prefetch (basic.qos global=false); 0 = unlimited.
    pub prefetch: u32,
    /// The `x-priority` consume argument: higher goes first while it has credit.
    pub priority: i64,
    pub sink: Arc<dyn DeliverySink>,
    in_flight: u32,
}

impl Consumer {
    pub fn new(
        id: u64,
        tag: ShortString,
        no_ack: bool,
        exclusive: bool,
        prefetch: u32,
        sink: Arc<dyn DeliverySink>,
    ) -> Self {
        Consumer {
            id,
            tag,
            no_ack,
            exclusive,
            prefetch,
            priority: 0,
            sink,
            in_flight: 0,
        }
    }

    pub fn with_priority(mut self, priority: i64) -> Self {
        self.priority = priority;
        self
    }

    fn has_credit(&self) -> bool {
        (self.no_ack || self.prefetch == 0 || self.in_flight < self.prefetch)
            && self.sink.can_accept()
    }
}

/// Running totals of what went through a queue, for metrics. Plain numbers
/// kept under the queue's own lock, which every counted event already holds,
/// so counting costs an add; exporters read them when scraped.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueTotals {
    pub published: u64,
    pub delivered: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub expired: u64,
    /// Indexed by `Reason`.
    pub dead_lettered: [u64; Reason::ALL.len()],
}

/// A queue's figures at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueStats {
    pub ready: u64,
    pub ready_bytes: u64,
    pub unacked: u64,
    pub consumers: u64,
    pub totals: QueueTotals,
}

/// What a queue was declared with; compared on redeclare.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueOptions {
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

/// What became of a message routed to a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    Accepted,
    /// Refused by a full queue with `x-overflow: reject-publish(-dlx)`: the
    /// publisher gets a nack.
    Rejected,
}

pub struct Queue {
    pub name: String,
    pub vhost: String,
    pub options: QueueOptions,
    /// The arguments, parsed and checked at declare time.
    pub args: QueueArgs,
    /// Connection that owns an exclusive queue.
    pub owner: Option<u64>,
    /// Present for durable, non-exclusive queues.
    pub store: Option<QueueStore>,
    /// Where dead letters are published and who deletes an expired queue.
    home: Weak<VHost>,
    timers: Arc<Timers>,
    me: Weak<Queue>,
    state: Mutex<QueueState>,
    /// Held while this queue's decided writes go to the store; taken before
    /// the state lock is released, so writes keep the order of decisions.
    io: Mutex<()>,
    deleted: AtomicBool,
}

struct QueueState {
    ready: Ready,
    next_seq: u64,
    consumers: Vec<Consumer>,
    /// Round-robin position among consumers.
    cursor: usize,
    /// Some consumer has a non-zero `x-priority`.
    prioritized: bool,
    unacked: u32,
    had_consumer: bool,
    /// Messages that died under the lock, dead-lettered once it is released.
    dead: Vec<(QueuedMessage, Reason)>,
    /// Some message ever carried an expiry, so heads need watching.
    expiring: bool,
    /// The wake-up registered with the timers (0 = none).
    timer_at: u64,
    /// Last consumer, get or declare, for `x-expires`.
    last_used: u64,
    totals: QueueTotals,
    /// Durable queues: what is on disk and what to write.
    disk: Option<QueueDisk>,
}

impl QueueState {
    fn new(args: &QueueArgs, durable: bool) -> Self {
        let levels = usize::from(args.max_priority.unwrap_or(0)) + 1;
        let pages = args.max_priority.is_none()
            && args.max_length.is_none()
            && args.max_length_bytes.is_none();
        QueueState {
            disk: durable.then(|| QueueDisk::new(pages, levels)),
            ready: Ready::new(args.max_priority.unwrap_or(0)),
            next_seq: 0,
            consumers: Vec::new(),
            cursor: 0,
            prioritized: false,
            unacked: 0,
            had_consumer: false,
            dead: Vec::new(),
            expiring: args.message_ttl.is_some(),
            timer_at: 0,
            last_used: now_ms(),
            totals: QueueTotals::default(),
        }
    }

    /// Next consumer with credit: the single active one, or round robin
    /// among those of the highest priority that can take a message.
    fn pick_consumer(&mut self, single_active: bool) -> Option<usize> {
        let n = self.consumers.len();
        if single_active {
            return self.consumers.first()?.has_credit().then_some(0);
        }
        let order = (0..n).map(|i| (self.cursor + i) % n);
        if !self.prioritized {
            return order.clone().find(|&i| self.consumers[i].has_credit());
        }
        let best = self
            .consumers
            .iter()
            .filter(|c| c.has_credit())
            .map(|c| c.priority)
            .max()?;
        order
            .clone()
            .find(|&i| self.consumers[i].priority == best && self.consumers[i].has_credit())
    }

    /// A message leaves the queue without being delivered: gone from the
    /// store, and dead-lettered when the queue has somewhere to send it.
    ///
    /// A dead letter keeps its entry on disk until its copy is enqueued
    /// where the dead-letter exchange routes it (see `VHost::dead_letter`):
    /// a crash in between then yields a duplicate, never a loss.
    fn discard(&mut self, queue: &Queue, message: QueuedMessage, reason: Reason) {
        if reason == Reason::Expired {
            self.totals.expired += 1;
        }
        if queue.args.dead_letter_exchange.is_some() {
            self.totals.dead_lettered[reason as usize] += 1;
            self.dead.push((message, reason));
        } else {
            self.forget(&message);
        }
    }

    /// The message's copy on disk is no longer needed.
    fn forget(&mut self, message: &QueuedMessage) {
        if let (Some(disk), true) = (self.disk.as_mut(), message.on_disk) {
            disk.remove(message.seq);
        }
    }

    /// Remembers a delivery so a restart marks the message redelivered.
    fn note_delivered(&mut self, message: &QueuedMessage) {
        let level = self.ready.level_of(message.priority);
        if let (Some(disk), true) = (self.disk.as_mut(), message.on_disk) {
            disk.delivered(level, message.seq);
        }
    }

    /// Hands `message` to consumer `idx`. If that channel refused it (closed or
    /// at its channel-wide limit meanwhile), the message is back at the head
    /// and the consumer no longer has credit, so dispatch moves on.
    fn hand_over(&mut self, queue: &Arc<Queue>, idx: usize, message: QueuedMessage) -> bool {
        let no_ack = self.consumers[idx].no_ack;
        let redelivered = message.redelivered;
        if no_ack {
            // A no-ack delivery is done the moment it is handed over.
            self.forget(&message);
        } else {
            self.note_delivered(&message);
        }
        let consumer = &mut self.consumers[idx];
        let delivery = Delivery {
            consumer_tag: &consumer.tag,
            consumer_id: consumer.id,
            no_ack,
            content: message.message.clone(),
            message,
        };
        match consumer.sink.deliver(queue, delivery) {
            Ok(()) => {
                self.totals.delivered += 1;
                self.totals.redelivered += u64::from(redelivered);
                if !consumer.no_ack {
                    consumer.in_flight += 1;
                    self.unacked += 1;
                }
                self.cursor = (idx + 1) % self.consumers.len();
                true
            }
            Err(message) => {
                // Not delivered after all: its entry must stay (a no-ack
                // removal decided above is dropped again).
                if no_ack && message.on_disk {
                    if let Some(disk) = self.disk.as_mut() {
                        disk.cancel_remove(message.seq);
                    }
                }
                self.ready.push_front(message);
                false
            }
        }
    }

    fn dispatch(&mut self, queue: &Arc<Queue>) {
        // Bounded: each refusal puts the message back, so allow every consumer
        // one refusal before giving up until the next event.
        let mut refusals = 0;
        let mut now = 0;
        let single_active = queue.args.single_active_consumer;
        while !self.ready.is_empty() && refusals <= self.consumers.len() {
            let Some(idx) = self.pick_consumer(single_active) else {
                break;
            };
            let message = self.ready.pop_front().expect("checked non-empty");
            if message.expires_at != 0 {
                if now == 0 {
                    now = now_ms();
                }
                // Expired messages are never delivered.
                if message.expires_at <= now {
                    self.discard(queue, message, Reason::Expired);
                    continue;
                }
            }
            if !self.hand_over(queue, idx, message) {
                refusals += 1;
            }
        }
        self.ready.shrink_if_sparse(IN_MEMORY_READY);
        if self.expiring {
            self.arm_timer(queue);
        }
    }

    /// Ready messages, in memory and in the tail on disk.
    fn ready_count(&self) -> u64 {
        let tail = self
            .disk
            .as_ref()
            .and_then(|d| d.tail)
            .map_or(0, |t| t.count);
        self.ready.len() as u64 + tail
    }

    /// Whether one more message of `size` bytes would exceed a length limit.
    fn would_overflow(&self, args: &QueueArgs, size: u32) -> bool {
        args.max_length
            .is_some_and(|max| self.ready.len() as u64 + 1 > max)
            || args
                .max_length_bytes
                .is_some_and(|max| self.ready.bytes() + u64::from(size) > max)
    }

    /// drop-head: the oldest ready messages make room for the new ones (and
    /// for requeued ones, which go back to the head and so are dropped first,
    /// as in RabbitMQ). True when some were dropped. With reject-publish the
    /// limit only refuses publishes: requeues may take the queue over it.
    fn drop_over_limit(&mut self, queue: &Queue) -> bool {
        let before = self.ready.len();
        let args = &queue.args;
        if args.overflow != Overflow::DropHead {
            return false;
        }
        while args
            .max_length
            .is_some_and(|max| self.ready.len() as u64 > max)
            || args
                .max_length_bytes
                .is_some_and(|max| self.ready.bytes() > max)
        {
            let Some(head) = self.ready.pop_front() else {
                break;
            };
            self.discard(queue, head, Reason::MaxLen);
        }
        self.ready.len() < before
    }

    fn expire_heads(&mut self, queue: &Queue, now: u64) {
        let mut expired = Vec::new();
        self.ready.take_expired_heads(now, &mut expired);
        for m in expired {
            self.discard(queue, m, Reason::Expired);
        }
    }

    /// When the queue next needs a look without any client doing anything:
    /// a head message expires, or the unused queue itself does.
    fn next_deadline(&self, args: &QueueArgs) -> u64 {
        let head = self.ready.earliest_head_expiry();
        let unused = match args.expires {
            Some(ms) if self.consumers.is_empty() => self.last_used.saturating_add(ms),
            _ => 0,
        };
        match (head, unused) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        }
    }

    fn arm_timer(&mut self, queue: &Queue) {
        let at = self.next_deadline(&queue.args);
        if at != 0 && (self.timer_at == 0 || at < self.timer_at) {
            self.timer_at = at;
            let me: Weak<dyn Timed> = queue.me.clone();
            queue.timers.schedule(at, me);
        }
    }

    fn settle_one(&mut self, consumer: Option<u64>) {
        self.unacked = self.unacked.saturating_sub(1);
        if let Some(id) = consumer {
            if let Some(c) = self.consumers.iter_mut().find(|c| c.id == id) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
        }
    }
}

type DeadBatch = (Arc<Queue>, Vec<(QueuedMessage, Reason)>);

thread_local! {
    /// Dead-letter batches produced while this thread was already
    /// dead-lettering; `None` when it is not.
    static PENDING_DEAD_LETTERS: RefCell<Option<VecDeque<DeadBatch>>> = const { RefCell::new(None) };
}

/// Ends the dead-letter loop of this thread, even if it unwinds.
struct EndDeadLetterLoop;

impl Drop for EndDeadLetterLoop {
    fn drop(&mut self) {
        PENDING_DEAD_LETTERS.with(|pending| *pending.borrow_mut() = None);
    }
}

/// Counts reported by queue.declare-ok, purge-ok and delete-ok.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueCounts {
    pub messages: u32,
    pub consumers: u32,
}

/// Everything a queue is made from.
pub struct QueueSpec {
    pub name: String,
    pub options: QueueOptions,
    pub args: QueueArgs,
    pub owner: Option<u64>,
    pub store: Option<QueueStore>,
}

impl Queue {
    pub fn new(spec: QueueSpec, home: &Arc<VHost>, timers: Arc<Timers>) -> Arc<Self> {
        let queue = Self::build(spec, home, timers, None);
        queue.state.lock().arm_timer(&queue);
        queue
    }

    fn build(
        spec: QueueSpec,
        home: &Arc<VHost>,
        timers: Arc<Timers>,
        recovered: Option<&RecoveredQueue>,
    ) -> Arc<Self> {
        let mut state = QueueState::new(&spec.args, spec.store.is_some());
        if let (Some(r), Some(disk)) = (recovered, state.disk.as_mut()) {
            *disk = QueueDisk::recovered(disk.pages, state.ready.levels(), r);
        }
        Arc::new_cyclic(|me| Queue {
            name: spec.name,
            vhost: home.name.clone(),
            state: Mutex::new(state),
            options: spec.options,
            args: spec.args,
            owner: spec.owner,
            store: spec.store,
            home: Arc::downgrade(home),
            timers,
            me: me.clone(),
            io: Mutex::new(()),
            deleted: AtomicBool::new(false),
        })
    }

    /// A durable queue as a restart finds it: the messages it held in
    /// memory back as ready (those delivered before marked redelivered), the
    /// tail still on disk. Its `x-expires` clock starts again.
    pub fn recovered(
        spec: QueueSpec,
        home: &Arc<VHost>,
        timers: Arc<Timers>,
        recovered: RecoveredQueue,
    ) -> Arc<Self> {
        let queue = Self::build(spec, home, timers, Some(&recovered));
        {
            let mut st = queue.state.lock();
            st.next_seq = recovered.next_position;
            let mut unreadable = Vec::new();
            for e in recovered.head {
                let Some(message) = records::decode_message(e.record) else {
                    unreadable.push(e.position);
                    continue;
                };
                let level = st.ready.level_of(e.meta.priority);
                let redelivered = st
                    .disk
                    .as_ref()
                    .is_some_and(|d| d.was_delivered(level, e.position));
                st.expiring |= e.meta.expires_at != 0;
                st.ready.push_back(QueuedMessage {
                    seq: e.position,
                    redelivered,
                    // The count itself is not stored: a message delivered
                    // before the restart counts as returned once.
                    delivery_count: u32::from(redelivered),
                    priority: e.meta.priority,
                    size: e.meta.size,
                    expires_at: e.meta.expires_at,
                    message: Arc::new(message),
                    on_disk: true,
                });
            }
            if !unreadable.is_empty() {
                tracing::error!(queue = %queue.name, count = unreadable.len(), "stored messages could not be decoded; dropped");
                for position in unreadable {
                    if let Some(disk) = st.disk.as_mut() {
                        disk.remove(position);
                    }
                }
            }
            st.arm_timer(&queue);
            queue.finish(st);
        }
        queue
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Whether persistent messages routed here are written to disk.
    pub fn is_durable_store(&self) -> bool {
        self.store.is_some()
    }

    /// Releases the lock, writes what was decided under it, reads the next
    /// chunk of the tail if the in-memory head ran low, then dead-letters
    /// what died under it.
    ///
    /// Dead letters can make more dead letters (a chain of queues each
    /// over its limit), so the work is a loop, not a recursion: a nested
    /// call on the same thread hands its batch to the outermost one, and the
    /// stack stays flat however long the chain.
    fn finish<'a>(&'a self, mut st: MutexGuard<'a, QueueState>) {
        let mut dead = Vec::new();
        loop {
            let mut ops = Vec::new();
            let mut refill = None;
            let ready_in_memory = st.ready.len();
            if let Some(disk) = st.disk.as_mut() {
                if disk.has_ops() {
                    ops = disk.take_ops();
                }
                if !self.is_deleted() {
                    refill = disk.wants_refill(ready_in_memory);
                }
            }
            if dead.is_empty() {
                dead = std::mem::take(&mut st.dead);
            } else {
                dead.append(&mut st.dead);
            }
            if ops.is_empty() {
                drop(st);
            } else {
                // Taken before the state lock goes, so the next decisions'
                // writes queue up behind these.
                let io = self.io.lock();
                drop(st);
                self.write(&ops);
                drop(io);
            }
            // A loop, not a recursion: consumers may empty each chunk at once.
            match refill.and_then(|chunk| self.refill(chunk)) {
                Some(guard) => st = guard,
                None => break,
            }
        }
        if dead.is_empty() {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let mut batch = Some((me, dead));
        let outermost = PENDING_DEAD_LETTERS.with(|pending| {
            let mut pending = pending.borrow_mut();
            match pending.as_mut() {
                Some(queued) => {
                    queued.push_back(batch.take().expect("set above"));
                    false
                }
                None => {
                    *pending = Some(VecDeque::new());
                    true
                }
            }
        });
        if !outermost {
            return;
        }
        let _done = EndDeadLetterLoop;
        while let Some((queue, dead)) = batch {
            if let Some(vhost) = queue.home.upgrade() {
                vhost.dead_letter(&queue, dead);
            }
            batch = PENDING_DEAD_LETTERS
                .with(|pending| pending.borrow_mut().as_mut().and_then(VecDeque::pop_front));
        }
    }

    /// Applies decided writes; the caller holds `io`. A failed write leaves
    /// the store failed, which the flush behind every promise reports.
    fn write(&self, ops: &[super::queue_disk::DiskOp]) {
        let Some(store) = &self.store else {
            return;
        };
        for op in ops {
            if let Err(error) = op.apply(store) {
                tracing::debug!(queue = %self.name, %error, "queue write failed");
            }
        }
    }

    /// Reads a chunk of the tail (outside the state lock, behind every
    /// write decided so far) and puts it behind the in-memory head; returns
    /// the locked state for the caller to finish.
    fn refill(&self, chunk: Refill) -> Option<MutexGuard<'_, QueueState>> {
        let store = self.store.as_ref()?;
        let read = {
            let _io = self.io.lock();
            store.read(chunk.start, chunk.end, REFILL_CHUNK)
        };
        let mut st = self.state.lock();
        let entries = match read {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(queue = %self.name, %error, "could not read queued messages back; retried at the next event");
                if let Some(disk) = st.disk.as_mut() {
                    disk.refilling = false;
                }
                return None;
            }
        };
        let whole = entries.len() < REFILL_CHUNK;
        let last = entries.last().map(|e| e.position);
        let disk = st.disk.as_mut()?;
        let boot = disk.boot_position;
        // Transient messages written before a restart did not survive it,
        // and the tail never counted them.
        let survived = |e: &&StoredEntry| !(e.meta.transient && e.position < boot);
        let counted = entries.iter().filter(survived).count() as u64;
        let bytes = entries
            .iter()
            .filter(survived)
            .map(|e| u64::from(e.meta.size))
            .sum();
        if !disk.refilled(chunk, last, counted, bytes, whole) {
            return Some(st);
        }
        let mut stale = Vec::new();
        let mut marked = Vec::new();
        for e in entries {
            if e.meta.transient {
                marked.push(e.position);
            }
            let decoded = survived(&&e)
                .then(|| records::decode_message(e.record))
                .flatten();
            let Some(message) = decoded else {
                stale.push(e.position);
                continue;
            };
            st.expiring |= e.meta.expires_at != 0;
            st.ready.push_back(QueuedMessage {
                seq: e.position,
                redelivered: false,
                delivery_count: 0,
                priority: e.meta.priority,
                size: e.meta.size,
                expires_at: e.meta.expires_at,
                message: Arc::new(message),
                on_disk: true,
            });
        }
        if let Some(disk) = st.disk.as_mut() {
            for position in marked {
                disk.unmark(position);
            }
            for position in stale {
                disk.remove(position);
            }
        }
        if let Some(me) = self.me.upgrade() {
            st.dispatch(&me);
        }
        st.arm_timer(self);
        Some(st)
    }

    /// Enqueues a routed message, handing it straight to a consumer when one has credit.
    pub fn publish(self: &Arc<Self>, message: Arc<Message>) -> Enqueued {
        let ttl = match (self.args.message_ttl, message.expiration_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let persist = self.store.is_some() && message.is_persistent();
        // A store that cannot write refuses the message outright: nacked,
        // and not queued, so the publisher's retry is no duplicate.
        let store_failed = self.store.as_ref().is_some_and(|s| s.store().is_failed());
        if persist && store_failed {
            return Enqueued::Rejected;
        }
        let now = if ttl.is_some() { now_ms() } else { 0 };
        let size = message.body.len() as u32;
        let priority = message.properties.priority().unwrap_or(0);
        let mut st = self.state.lock();
        if self.is_deleted() {
            return Enqueued::Accepted;
        }
        if self.args.overflow != Overflow::DropHead && st.would_overflow(&self.args, size) {
            if self.args.overflow == Overflow::RejectPublishDlx {
                let refused = QueuedMessage {
                    seq: 0,
                    redelivered: false,
                    delivery_count: 0,
                    priority,
                    size,
                    expires_at: 0,
                    message,
                    on_disk: false,
                };
                st.discard(self, refused, Reason::MaxLen);
            }
            self.finish(st);
            return Enqueued::Rejected;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.totals.published += 1;
        let expires_at = ttl.map_or(0, |t| now.saturating_add(t));
        let ready_in_memory = st.ready.len();
        if let Some(disk) = st.disk.as_mut() {
            if disk.spills(ready_in_memory) && !store_failed {
                // Behind the tail: on disk only, read back in order later.
                disk.spill(seq, message, expires_at);
                self.finish(st);
                return Enqueued::Accepted;
            }
            if persist {
                disk.write(seq, &message, expires_at);
            }
        }
        let queued = QueuedMessage {
            seq,
            redelivered: false,
            delivery_count: 0,
            priority,
            size,
            expires_at,
            message,
            on_disk: persist,
        };
        // A refused hand-over puts it in `ready`, where its expiry needs the timer.
        st.expiring |= queued.expires_at != 0;
        if st.ready.is_empty() {
            // Even a message with TTL 0 goes to a consumer that can take it now.
            if let Some(idx) = st.pick_consumer(self.args.single_active_consumer) {
                if !st.hand_over(self, idx, queued) {
                    st.dispatch(self);
                }
                self.finish(st);
                return Enqueued::Accepted;
            }
        }
        // Nobody took it: a TTL 0 message expires now if it is the head.
        // Behind other messages it waits, like any expired message, until it
        // reaches the head (RabbitMQ counts it until then).
        if ttl == Some(0) && st.ready.is_empty() {
            st.discard(self, queued, Reason::Expired);
            self.finish(st);
            return Enqueued::Accepted;
        }
        let expires = queued.expires_at != 0;
        st.ready.push_back(queued);
        st.expiring |= expires;
        // Dropping the head uncovers a new one, which may expire sooner.
        let dropped = st.drop_over_limit(self);
        if expires || (dropped && st.expiring) {
            st.arm_timer(self);
        }
        if st.ready.len() == 1 {
            // Nobody took it directly; a refusal race may have left credit unused.
            st.dispatch(self);
        }
        self.finish(st);
        Enqueued::Accepted
    }

    pub fn counts(&self) -> QueueCounts {
        let st = self.state.lock();
        QueueCounts {
            messages: st.ready_count().min(u64::from(u32::MAX)) as u32,
            consumers: st.consumers.len() as u32,
        }
    }

    pub fn stats(&self) -> QueueStats {
        let st = self.state.lock();
        let tail = st.disk.as_ref().and_then(|d| d.tail);
        QueueStats {
            ready: st.ready_count(),
            ready_bytes: st.ready.bytes() + tail.map_or(0, |t| t.bytes),
            unacked: u64::from(st.unacked),
            consumers: st.consumers.len() as u64,
            totals: st.totals,
        }
    }

    /// A declare (passive or not) counts as use for `x-expires`.
    pub fn touch(&self) {
        if self.args.expires.is_some() {
            let mut st = self.state.lock();
            st.last_used = now_ms();
        }
    }

    /// Adds a consumer; `on_accept` runs once the checks pass and before the
    /// first delivery, so consume-ok always precedes the consumer's messages.
    pub fn add_consumer(
        self: &Arc<Self>,
        consumer: Consumer,
        on_accept: impl FnOnce(),
    ) -> AmqpResult<()> {
        let mut st = self.state.lock();
        if self.is_deleted() {
            return Err(AmqpError::not_found(format!(
                "no queue '{}' in vhost '{}'",
                self.name, self.vhost
            )));
        }
        if st.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !st.consumers.is_empty())
        {
            return Err(AmqpError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name, self.vhost
            )));
        }
        on_accept();
        st.prioritized |= consumer.priority != 0;
        st.consumers.push(consumer);
        st.had_consumer = true;
        st.dispatch(self);
        self.finish(st);
        Ok(())
    }

    /// Removes a consumer; true when an auto-delete queue just lost its last one
    /// and should now be deleted.
    pub fn remove_consumer(self: &Arc<Self>, id: u64) -> bool {
        let mut st = self.state.lock();
        let was_active = st.consumers.first().is_some_and(|c| c.id == id);
        st.consumers.retain(|c| c.id != id);
        if st.cursor >= st.consumers.len() {
            st.cursor = 0;
        }
        st.prioritized = st.consumers.iter().any(|c| c.priority != 0);
        if st.consumers.is_empty() {
            st.last_used = now_ms();
            st.arm_timer(self);
        } else if was_active && self.args.single_active_consumer {
            // The next consumer in line takes over.
            st.dispatch(self);
        }
        let auto_delete = self.options.auto_delete && st.had_consumer && st.consumers.is_empty();
        self.finish(st);
        auto_delete
    }

    /// basic.get: the head message and how many remain. When the in-memory
    /// head is empty but the tail is not, the tail is read first (outside
    /// the lock).
    pub fn get(self: &Arc<Self>, no_ack: bool) -> Option<(QueuedMessage, Arc<Message>, u32)> {
        loop {
            let mut st = self.state.lock();
            if st.ready.is_empty() {
                let chunk = st.disk.as_ref().and_then(|d| d.next_refill());
                if let (Some(chunk), false) = (chunk, self.is_deleted()) {
                    drop(st);
                    if let Some(st) = self.refill(chunk) {
                        self.finish(st);
                    }
                    continue;
                }
            }
            st.last_used = now_ms();
            let now = st.last_used;
            let found = loop {
                let Some(message) = st.ready.pop_front() else {
                    break None;
                };
                st.ready.shrink_if_sparse(IN_MEMORY_READY);
                if message.expires_at != 0 && message.expires_at <= now {
                    st.discard(self, message, Reason::Expired);
                    continue;
                }
                if no_ack {
                    st.forget(&message);
                } else {
                    st.note_delivered(&message);
                    st.unacked += 1;
                }
                st.totals.delivered += 1;
                st.totals.redelivered += u64::from(message.redelivered);
                let remaining = st.ready_count().min(u64::from(u32::MAX)) as u32;
                let content = message.message.clone();
                break Some((message, content, remaining));
            };
            st.arm_timer(self);
            self.finish(st);
            return found;
        }
    }

    /// Acknowledged deliveries, or (with `reject`) deliveries the client
    /// refused without requeueing, which are dead-lettered when the queue has
    /// a dead-letter exchange. Frees the consumers' credit.
    pub fn settle(
        self: &Arc<Self>,
        items: impl IntoIterator<Item = (Option<u64>, QueuedMessage)>,
        reject: bool,
    ) {
        let mut st = self.state.lock();
        for (consumer, message) in items {
            st.settle_one(consumer);
            if reject {
                st.discard(self, message, Reason::Rejected);
            } else {
                st.totals.acked += 1;
                st.forget(&message);
            }
        }
        st.dispatch(self);
        self.finish(st);
    }

    /// The content header `message` goes out with: a quorum queue adds
    /// `x-delivery-count` (see `message::quorum_header`).
    pub fn delivery_header(&self, message: &QueuedMessage, for_get: bool) -> Bytes {
        match self.args.queue_type {
            QueueType::Quorum => {
                super::message::quorum_header(&message.message, message.delivery_count, for_get)
            }
            QueueType::Classic => message.message.raw_header.clone(),
        }
    }

    /// Puts deliveries back at their original positions, marked redelivered;
    /// with drop-head, whatever is then over the length limit goes from the head.
    /// Each return counts as a failed delivery; past a quorum queue's
    /// `x-delivery-limit` the message is dead-lettered instead (or dropped),
    /// so a message every consumer fails on cannot loop forever.
    pub fn requeue(self: &Arc<Self>, items: Vec<(Option<u64>, QueuedMessage)>) {
        let mut st = self.state.lock();
        let mut messages = Vec::with_capacity(items.len());
        let mut over_limit = Vec::new();
        for (consumer, mut message) in items {
            st.settle_one(consumer);
            message.redelivered = true;
            message.delivery_count = message.delivery_count.saturating_add(1);
            match self.args.delivery_limit {
                Some(limit) if u64::from(message.delivery_count) > limit => {
                    over_limit.push(message)
                }
                _ => messages.push(message),
            }
        }
        if self.is_deleted() {
            return;
        }
        for message in over_limit {
            st.discard(self, message, Reason::DeliveryLimit);
        }
        messages.sort_unstable_by_key(|m| m.seq);
        st.ready.restore(messages);
        // Requeued messages count against the length limit like new ones.
        st.drop_over_limit(self);
        st.dispatch(self);
        self.finish(st);
    }

    /// Tries to hand ready messages to consumers whose channels regained capacity.
    pub fn dispatch(self: &Arc<Self>) {
        let mut st = self.state.lock();
        st.dispatch(self);
        self.finish(st);
    }

    /// queue.purge: drops ready messages (not unacked ones), returns how
    /// many. One atomic write however many there are: those in memory by
    /// position, the tail as a dead range the store clears in the background.
    /// The messages themselves are freed after the lock is released.
    pub fn purge(&self) -> u32 {
        let mut st = self.state.lock();
        let count = st.ready_count();
        let all = st.ready.take_all();
        let next_seq = st.next_seq;
        if let Some(disk) = st.disk.as_mut() {
            let positions = all.iter().filter(|m| m.on_disk).map(|m| m.seq).collect();
            disk.purge(positions, next_seq);
        }
        self.finish(st);
        drop(all);
        count.min(u64::from(u32::MAX)) as u32
    }

    /// Marks the queue deleted, drops its messages, tells consumers' channels.
    /// What it held on disk goes with its definition (see `VHost::remove_queue`).
    pub fn delete(&self) -> u32 {
        let mut st = self.state.lock();
        self.deleted.store(true, Ordering::Release);
        let count = st.ready_count();
        let all = st.ready.take_all();
        let consumers = std::mem::take(&mut st.consumers);
        // Writes decided before the delete still go out (and are removed
        // with the rest); nothing new is decided after it.
        let ops = match st.disk.as_mut() {
            Some(disk) => {
                disk.tail = None;
                disk.take_ops()
            }
            None => Vec::new(),
        };
        let io = self.io.lock();
        drop(st);
        self.write(&ops);
        drop(io);
        drop(all);
        for consumer in consumers {
            consumer
                .sink
                .cancelled_by_server(&consumer.tag, consumer.id);
        }
        count.min(u64::from(u32::MAX)) as u32
    }

    /// A dead letter's copy was enqueued (or dropped): the source's entry goes.
    pub(crate) fn forget(&self, message: &QueuedMessage) {
        if let (Some(store), true) = (&self.store, message.on_disk) {
            let _io = self.io.lock();
            if let Err(error) = store.remove(message.seq) {
                tracing::debug!(queue = %self.name, %error, "queue write failed");
            }
        }
    }

    /// Runs `f` while no write of this queue is in flight (the queue's
    /// definition is removed this way, after its last writes).
    pub(crate) fn with_writes_quiet<T>(&self, f: impl FnOnce() -> T) -> T {
        let _io = self.io.lock();
        f()
    }
}

impl Timed for Queue {
    fn fire(&self, now: u64) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let mut st = self.state.lock();
        if self.is_deleted() {
            return;
        }
        st.timer_at = 0;
        st.expire_heads(self, now);
        let unused = match self.args.expires {
            Some(ms) => st.consumers.is_empty() && now >= st.last_used.saturating_add(ms),
            None => false,
        };
        if unused {
            // Decided under the lock: a consumer arriving from now on finds
            // the queue gone (404) rather than being cancelled right after.
            self.deleted.store(true, Ordering::Release);
        }
        if !unused {
            st.dispatch(&me);
            st.arm_timer(self);
        }
        self.finish(st);
        if unused {
            if let Some(vhost) = self.home.upgrade() {
                vhost.remove_queue(&me);
            }
        }
    }
}
