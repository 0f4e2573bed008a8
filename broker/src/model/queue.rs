//! A queue: its ready messages, its consumers, and the count of deliveries
//! awaiting acknowledgement.
//!
//! Each queue has its own short-held lock; nothing on the publish or deliver path
//! takes a broker-wide lock. Lock order is queue → channel → connection outbox,
//! and the acknowledgement path releases the channel before it takes a queue.
//!
//! A durable queue keeps a journal in the store (what it holds, in order, and
//! what was delivered) and, past a short in-memory head, keeps only the
//! message's place and disk id: bodies are read back as consumers catch up, so
//! memory does not grow with the bytes queued.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use amq_protocol::types::{FieldTable, ShortString};
use parking_lot::Mutex;

use super::message::Message;
use crate::error::{AmqpError, AmqpResult};
use crate::store::{RecoveredMessage, Store, StoredRef};

/// Ready messages of a durable queue beyond this many wait on disk only.
const IN_MEMORY_READY: usize = 1024;

/// A message in a queue. `seq` is its position at enqueue time, so requeued
/// messages go back where they were, as in RabbitMQ.
pub struct QueuedMessage {
    pub seq: u64,
    pub redelivered: bool,
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
            sink,
            in_flight: 0,
        }
    }

    fn has_credit(&self) -> bool {
        (self.no_ack || self.prefetch == 0 || self.in_flight < self.prefetch)
            && self.sink.can_accept()
    }
}

/// What a queue was declared with; compared on redeclare.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueOptions {
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

impl QueueOptions {
    /// The queue's `x-consumer-timeout` argument (integer milliseconds > 0):
    /// how long its manual-ack deliveries may stay unacknowledged.
    pub fn consumer_timeout(&self) -> Option<std::time::Duration> {
        let value = self.arguments.inner().get("x-consumer-timeout")?;
        let ms = super::args::integer(value)?;
        (ms > 0).then(|| std::time::Duration::from_millis(ms.min(u64::MAX as i128) as u64))
    }
}

/// A durable queue's record in the store.
pub struct Journal {
    pub store: Arc<Store>,
    pub queue_id: u64,
}

impl Journal {
    fn added(&self, m: &QueuedMessage) {
        if let Some(stored) = &m.stored {
            self.store
                .index_add(self.queue_id, m.seq, stored.id, m.redelivered);
        }
    }

    /// Remembered so a restart marks it redelivered.
    fn delivered(&self, m: &QueuedMessage) {
        if !m.redelivered {
            if let Some(stored) = &m.stored {
                self.store.index_add(self.queue_id, m.seq, stored.id, true);
            }
        }
    }

    fn removed(&self, m: &QueuedMessage) {
        if m.stored.is_some() {
            self.store.index_remove(self.queue_id, m.seq);
        }
    }
}

pub struct Queue {
    pub name: String,
    pub vhost: String,
    pub options: QueueOptions,
    /// Connection that owns an exclusive queue.
    pub owner: Option<u64>,
    /// Present for durable, non-exclusive queues.
    pub journal: Option<Journal>,
    state: Mutex<QueueState>,
    deleted: AtomicBool,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<QueuedMessage>,
    next_seq: u64,
    consumers: Vec<Consumer>,
    /// Round-robin position among consumers.
    cursor: usize,
    unacked: u32,
    had_consumer: bool,
}

impl QueueState {
    /// Next consumer with credit, round robin from the cursor.
    fn pick_consumer(&mut self) -> Option<usize> {
        let n = self.consumers.len();
        (0..n)
            .map(|i| (self.cursor + i) % n)
            .find(|&i| self.consumers[i].has_credit())
    }

    /// Hands `message` to consumer `idx`. If that channel refused it (closed or
    /// at its channel-wide limit meanwhile), the message is back at the head
    /// and the consumer no longer has credit, so dispatch moves on.
    fn hand_over(&mut self, queue: &Arc<Queue>, idx: usize, mut message: QueuedMessage) -> bool {
        let Some(content) = message.load() else {
            tracing::error!(queue = %queue.name, "a stored message could not be read back; dropped");
            return true;
        };
        let consumer = &mut self.consumers[idx];
        let (seq, on_disk) = (message.seq, message.stored.is_some());
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
        while !self.ready.is_empty() && refusals <= self.consumers.len() {
            let Some(idx) = self.pick_consumer() else {
                break;
            };
            let message = self.ready.pop_front().expect("checked non-empty");
            if !self.hand_over(queue, idx, message) {
                refusals += 1;
            }
        }
        self.shrink_if_sparse();
    }

    /// Gives back the buffer of a backlog that has drained: once under a
    /// quarter full, shrink to twice the length (amortised O(1) per pop).
    fn shrink_if_sparse(&mut self) {
        let (len, cap) = (self.ready.len(), self.ready.capacity());
        if cap > 4 * IN_MEMORY_READY && len < cap / 4 {
            self.ready.shrink_to((2 * len).max(IN_MEMORY_READY));
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

/// Counts reported by queue.declare-ok, purge-ok and delete-ok.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueCounts {
    pub messages: u32,
    pub consumers: u32,
}

impl Queue {
    pub fn new(
        name: String,
        vhost: String,
        options: QueueOptions,
        owner: Option<u64>,
        journal: Option<Journal>,
    ) -> Self {
        Queue {
            name,
            vhost,
            options,
            owner,
            journal,
            state: Mutex::new(QueueState::default()),
            deleted: AtomicBool::new(false),
        }
    }

    /// A durable queue as a restart finds it: everything ready, in order,
    /// bodies left on disk until delivery.
    pub fn recovered(
        name: String,
        vhost: String,
        options: QueueOptions,
        journal: Journal,
        entries: Vec<RecoveredMessage>,
    ) -> Self {
        let queue = Queue::new(name, vhost, options, None, Some(journal));
        {
            let mut st = queue.state.lock();
            st.next_seq = entries.last().map_or(0, |e| e.position + 1);
            st.ready = entries
                .into_iter()
                .map(|e| QueuedMessage {
                    seq: e.position,
                    redelivered: e.delivered,
                    message: None,
                    stored: Some(StoredRef::from_arc(e.stored)),
                })
                .collect();
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

    /// Enqueues a routed message, handing it straight to a consumer when one has credit.
    pub fn publish(self: &Arc<Self>, message: Arc<Message>, stored: Option<StoredRef>) {
        let mut st = self.state.lock();
        if self.is_deleted() {
            return;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let mut queued = QueuedMessage {
            seq,
            redelivered: false,
            message: Some(message),
            stored: stored.filter(|_| self.journal.is_some()),
        };
        if let Some(journal) = &self.journal {
            journal.added(&queued);
        }
        if st.ready.is_empty() {
            if let Some(idx) = st.pick_consumer() {
                if !st.hand_over(self, idx, queued) {
                    st.dispatch(self);
                }
                return;
            }
        }
        if queued.stored.is_some() && st.ready.len() >= IN_MEMORY_READY {
            queued.message = None;
        }
        st.ready.push_back(queued);
        if st.ready.len() == 1 {
            // Nobody took it directly; a refusal race may have left credit unused.
            st.dispatch(self);
        }
    }

    pub fn counts(&self) -> QueueCounts {
        let st = self.state.lock();
        QueueCounts {
            messages: st.ready.len() as u32,
            consumers: st.consumers.len() as u32,
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
        st.consumers.push(consumer);
        st.had_consumer = true;
        st.dispatch(self);
        Ok(())
    }

    /// Removes a consumer; true when an auto-delete queue just lost its last one
    /// and should now be deleted.
    pub fn remove_consumer(&self, id: u64) -> bool {
        let mut st = self.state.lock();
        st.consumers.retain(|c| c.id != id);
        if st.cursor >= st.consumers.len() {
            st.cursor = 0;
        }
        self.options.auto_delete && st.had_consumer && st.consumers.is_empty()
    }

    /// basic.get: the head message, loaded, and how many remain.
    pub fn get(&self, no_ack: bool) -> Option<(QueuedMessage, Arc<Message>, u32)> {
        let mut st = self.state.lock();
        loop {
            let mut message = st.ready.pop_front()?;
            st.shrink_if_sparse();
            let Some(content) = message.load() else {
                tracing::error!(queue = %self.name, "a stored message could not be read back; dropped");
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
            return Some((message, content, st.ready.len() as u32));
        }
    }

    /// Acknowledged (or discarded) deliveries: forgets them and frees the
    /// consumers' credit.
    pub fn settle(self: &Arc<Self>, items: impl IntoIterator<Item = (Option<u64>, QueuedMessage)>) {
        let mut st = self.state.lock();
        for (consumer, message) in items {
            st.settle_one(consumer);
            if let Some(journal) = &self.journal {
                journal.removed(&message);
            }
        }
        st.dispatch(self);
    }

    /// Puts deliveries back at their original positions, marked redelivered.
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
        let all_before_head = match (messages.last(), st.ready.front()) {
            (Some(last), Some(head)) => last.seq < head.seq,
            _ => true,
        };
        if all_before_head {
            for message in messages.into_iter().rev() {
                st.ready.push_front(message);
            }
        } else {
            let old = std::mem::take(&mut st.ready);
            let mut merged = VecDeque::with_capacity(old.len() + messages.len());
            let mut old = old.into_iter().peekable();
            let mut new = messages.into_iter().peekable();
            loop {
                let take_new = match (new.peek(), old.peek()) {
                    (Some(n), Some(o)) => n.seq < o.seq,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                let next = if take_new { new.next() } else { old.next() };
                merged.push_back(next.expect("peeked"));
            }
            st.ready = merged;
        }
        st.dispatch(self);
    }

    /// Tries to hand ready messages to consumers whose channels regained capacity.
    pub fn dispatch(self: &Arc<Self>) {
        self.state.lock().dispatch(self);
    }

    /// queue.purge: drops ready messages (not unacked ones), returns how many.
    pub fn purge(&self) -> u32 {
        let mut st = self.state.lock();
        let n = st.ready.len() as u32;
        if let Some(journal) = &self.journal {
            let on_disk = st
                .ready
                .iter()
                .filter(|m| m.stored.is_some())
                .map(|m| m.seq);
            journal.store.index_remove_all(journal.queue_id, on_disk);
        }
        st.ready = VecDeque::new();
        n
    }

    /// Marks the queue deleted, drops its messages, tells consumers' channels.
    pub fn delete(&self) -> u32 {
        let (count, consumers) = {
            let mut st = self.state.lock();
            self.deleted.store(true, Ordering::Release);
            let count = st.ready.len() as u32;
            st.ready.clear();
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
