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
//! A durable queue keeps a journal in the store (what it holds, in order, and
//! what was delivered) and, past a short in-memory head, keeps only the
//! message's place and disk id: bodies are read back as consumers catch up, so
//! memory does not grow with the bytes queued.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use amq_protocol::types::{FieldTable, ShortString};
use parking_lot::{Mutex, MutexGuard};

use super::dead_letter::Reason;
use super::message::Message;
use super::queue_args::{Overflow, QueueArgs};
use super::ready::Ready;
use super::timers::{now_ms, Timed, Timers};
use super::vhost::VHost;
use crate::error::{AmqpError, AmqpResult};
use crate::store::{IndexEntry, RecoveredMessage, Store, StoredRef};

/// Ready messages of a durable queue beyond this many wait on disk only.
const IN_MEMORY_READY: usize = 1024;

/// A message in a queue. `seq` is its position at enqueue time, so requeued
/// messages go back where they were, as in RabbitMQ.
pub struct QueuedMessage {
    pub seq: u64,
    pub redelivered: bool,
    /// Its priority level in a priority queue.
    pub priority: u8,
    /// Body size, counted against `x-max-length-bytes` even while paged out.
    pub size: u32,
    /// When it expires, in ms since the epoch; 0 = never.
    pub expires_at: u64,
    /// The message itself; `None` while it is paged out to the store.
    pub message: Option<Arc<Message>>,
    /// Its copy on disk, for persistent messages in durable queues.
    pub stored: Option<StoredRef>,
}

impl QueuedMessage {
    /// The message, read back from the store if it was paged out.
    pub fn load(&mut self) -> Option<Arc<Message>> {
        if self.message.is_none() {
            self.message = self.stored.as_ref()?.load().map(Arc::new);
        }
        self.message.clone()
    }

    fn index_entry(&self, delivered: bool) -> Option<IndexEntry> {
        Some(IndexEntry {
            message_id: self.stored.as_ref()?.id,
            delivered,
            expires_at: self.expires_at,
            priority: self.priority,
            size: self.size,
        })
    }
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
    /// By reason: rejected, expired, maxlen.
    pub dead_lettered: [u64; 3],
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

/// A durable queue's record in the store.
pub struct Journal {
    pub store: Arc<Store>,
    pub queue_id: u64,
}

impl Journal {
    fn added(&self, m: &QueuedMessage) {
        if let Some(entry) = m.index_entry(m.redelivered) {
            self.store.index_add(self.queue_id, m.seq, &entry);
        }
    }

    /// Remembered so a restart marks it redelivered.
    fn delivered(&self, m: &QueuedMessage) {
        if !m.redelivered {
            if let Some(entry) = m.index_entry(true) {
                self.store.index_add(self.queue_id, m.seq, &entry);
            }
        }
    }

    pub(crate) fn removed(&self, m: &QueuedMessage) {
        if m.stored.is_some() {
            self.store.index_remove(self.queue_id, m.seq);
        }
    }
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
    pub journal: Option<Journal>,
    /// Where dead letters are published and who deletes an expired queue.
    home: Weak<VHost>,
    timers: Arc<Timers>,
    me: Weak<Queue>,
    state: Mutex<QueueState>,
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
}

impl QueueState {
    fn new(args: &QueueArgs) -> Self {
        QueueState {
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
    /// journal, and dead-lettered when the queue has somewhere to send it.
    ///
    /// A dead letter keeps its journal entry until its copy is enqueued
    /// where the dead-letter exchange routes it (see `VHost::dead_letter`):
    /// a crash in between then yields a duplicate, never a loss.
    fn discard(&mut self, queue: &Queue, message: QueuedMessage, reason: Reason) {
        if reason == Reason::Expired {
            self.totals.expired += 1;
        }
        if queue.args.dead_letter_exchange.is_some() {
            self.totals.dead_lettered[reason as usize] += 1;
            self.dead.push((message, reason));
        } else if let Some(journal) = &queue.journal {
            journal.removed(&message);
        }
    }

    /// Hands `message` to consumer `idx`. If that channel refused it (closed or
    /// at its channel-wide limit meanwhile), the message is back at the head
    /// and the consumer no longer has credit, so dispatch moves on.
    fn hand_over(&mut self, queue: &Arc<Queue>, idx: usize, mut message: QueuedMessage) -> bool {
        let Some(content) = message.load() else {
            tracing::error!(queue = %queue.name, "a stored message could not be read back; dropped");
            if let Some(journal) = &queue.journal {
                journal.removed(&message);
            }
            return true;
        };
        let consumer = &mut self.consumers[idx];
        let (seq, on_disk, redelivered) =
            (message.seq, message.stored.is_some(), message.redelivered);
        if let (Some(journal), false) = (&queue.journal, consumer.no_ack) {
            journal.delivered(&message);
        }
        let delivery = Delivery {
            consumer_tag: &consumer.tag,
            consumer_id: consumer.id,
            no_ack: consumer.no_ack,
            content,
            message,
        };
        match consumer.sink.deliver(queue, delivery) {
            Ok(()) => {
                self.totals.delivered += 1;
                self.totals.redelivered += u64::from(redelivered);
                if !consumer.no_ack {
                    consumer.in_flight += 1;
                    self.unacked += 1;
                } else if let (Some(journal), true) = (&queue.journal, on_disk) {
                    // A no-ack delivery is done the moment it is handed over.
                    journal.store.index_remove(journal.queue_id, seq);
                }
                self.cursor = (idx + 1) % self.consumers.len();
                true
            }
            Err(message) => {
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
    pub journal: Option<Journal>,
}

impl Queue {
    pub fn new(spec: QueueSpec, home: &Arc<VHost>, timers: Arc<Timers>) -> Arc<Self> {
        let queue = Arc::new_cyclic(|me| Queue {
            name: spec.name,
            vhost: home.name.clone(),
            state: Mutex::new(QueueState::new(&spec.args)),
            options: spec.options,
            args: spec.args,
            owner: spec.owner,
            journal: spec.journal,
            home: Arc::downgrade(home),
            timers,
            me: me.clone(),
            deleted: AtomicBool::new(false),
        });
        queue.state.lock().arm_timer(&queue);
        queue
    }

    /// A durable queue as a restart finds it: everything ready, in order,
    /// bodies left on disk until delivery. Its `x-expires` clock starts again.
    pub fn recovered(
        spec: QueueSpec,
        home: &Arc<VHost>,
        timers: Arc<Timers>,
        entries: Vec<RecoveredMessage>,
    ) -> Arc<Self> {
        let queue = Self::new(spec, home, timers);
        {
            let mut st = queue.state.lock();
            st.next_seq = entries.last().map_or(0, |e| e.position + 1);
            for e in entries {
                st.expiring |= e.entry.expires_at != 0;
                st.ready.push_back(QueuedMessage {
                    seq: e.position,
                    redelivered: e.entry.delivered,
                    priority: e.entry.priority,
                    size: e.entry.size,
                    expires_at: e.entry.expires_at,
                    message: None,
                    stored: Some(StoredRef::from_arc(e.stored)),
                });
            }
            st.arm_timer(&queue);
        }
        queue
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Whether persistent messages routed here must be written to disk.
    pub fn is_durable_store(&self) -> bool {
        self.journal.is_some()
    }

    /// Releases the lock, then dead-letters what died under it.
    ///
    /// Dead letters can make more dead letters (a chain of queues each
    /// over its limit), so the work is a loop, not a recursion: a nested
    /// call on the same thread hands its batch to the outermost one, and the
    /// stack stays flat however long the chain.
    fn finish(&self, mut st: MutexGuard<'_, QueueState>) {
        if st.dead.is_empty() {
            return;
        }
        let dead = std::mem::take(&mut st.dead);
        drop(st);
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

    /// Enqueues a routed message, handing it straight to a consumer when one has credit.
    pub fn publish(self: &Arc<Self>, message: Arc<Message>, stored: Option<StoredRef>) -> Enqueued {
        let ttl = match (self.args.message_ttl, message.expiration_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
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
                    priority,
                    size,
                    expires_at: 0,
                    message: Some(message),
                    stored: None,
                };
                st.discard(self, refused, Reason::MaxLen);
            }
            self.finish(st);
            return Enqueued::Rejected;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.totals.published += 1;
        let mut queued = QueuedMessage {
            seq,
            redelivered: false,
            priority,
            size,
            expires_at: ttl.map_or(0, |t| now.saturating_add(t)),
            message: Some(message),
            stored: stored.filter(|_| self.journal.is_some()),
        };
        if let Some(journal) = &self.journal {
            journal.added(&queued);
        }
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
        if queued.stored.is_some() && st.ready.len() >= IN_MEMORY_READY {
            queued.message = None;
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
            messages: st.ready.len() as u32,
            consumers: st.consumers.len() as u32,
        }
    }

    pub fn stats(&self) -> QueueStats {
        let st = self.state.lock();
        QueueStats {
            ready: st.ready.len() as u64,
            ready_bytes: st.ready.bytes(),
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

    /// basic.get: the head message, loaded, and how many remain.
    pub fn get(self: &Arc<Self>, no_ack: bool) -> Option<(QueuedMessage, Arc<Message>, u32)> {
        let mut st = self.state.lock();
        st.last_used = now_ms();
        let now = st.last_used;
        let found = loop {
            let Some(mut message) = st.ready.pop_front() else {
                break None;
            };
            st.ready.shrink_if_sparse(IN_MEMORY_READY);
            if message.expires_at != 0 && message.expires_at <= now {
                st.discard(self, message, Reason::Expired);
                continue;
            }
            let Some(content) = message.load() else {
                tracing::error!(queue = %self.name, "a stored message could not be read back; dropped");
                if let Some(journal) = &self.journal {
                    journal.removed(&message);
                }
                continue;
            };
            if let Some(journal) = &self.journal {
                if no_ack {
                    journal.removed(&message);
                } else {
                    journal.delivered(&message);
                }
            }
            if !no_ack {
                st.unacked += 1;
            }
            st.totals.delivered += 1;
            st.totals.redelivered += u64::from(message.redelivered);
            let remaining = st.ready.len() as u32;
            break Some((message, content, remaining));
        };
        st.arm_timer(self);
        self.finish(st);
        found
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
                if let Some(journal) = &self.journal {
                    journal.removed(&message);
                }
            }
        }
        st.dispatch(self);
        self.finish(st);
    }

    /// Puts deliveries back at their original positions, marked redelivered;
    /// with drop-head, whatever is then over the length limit goes from the head.
    pub fn requeue(self: &Arc<Self>, items: Vec<(Option<u64>, QueuedMessage)>) {
        let mut st = self.state.lock();
        let mut messages = Vec::with_capacity(items.len());
        for (consumer, mut message) in items {
            st.settle_one(consumer);
            message.redelivered = true;
            messages.push(message);
        }
        if self.is_deleted() {
            return;
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

    /// queue.purge: drops ready messages (not unacked ones), returns how many.
    pub fn purge(&self) -> u32 {
        let mut st = self.state.lock();
        let all = st.ready.take_all();
        if let Some(journal) = &self.journal {
            let on_disk = all.iter().filter(|m| m.stored.is_some()).map(|m| m.seq);
            journal.store.index_remove_all(journal.queue_id, on_disk);
        }
        all.len() as u32
    }

    /// Marks the queue deleted, drops its messages, tells consumers' channels.
    pub fn delete(&self) -> u32 {
        let (count, consumers) = {
            let mut st = self.state.lock();
            self.deleted.store(true, Ordering::Release);
            let count = st.ready.take_all().len() as u32;
            (count, std::mem::take(&mut st.consumers))
        };
        for consumer in consumers {
            consumer
                .sink
                .cancelled_by_server(&consumer.tag, consumer.id);
        }
        count
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
