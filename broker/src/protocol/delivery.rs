//! The part of a channel that queues reach into: it numbers deliveries, keeps
//! them until they are acknowledged, and applies the channel-wide limits
//! (a closed channel, channel prefetch, a backed-up socket) before a queue hands it more.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{basic, AMQPClass};
use amq_protocol::types::ShortString;
use bytes::Bytes;
use metrics::Histogram;
use parking_lot::Mutex;

use super::outbox::Outbox;
use crate::error::{AmqpError, AmqpResult};
use crate::model::direct_reply::ReplySink;
use crate::model::message::Message;
use crate::model::queue::{Delivery, DeliverySink, Queue, QueuedMessage};
use crate::store::{FlushWaiter, Store};

/// A delivery awaiting basic.ack / nack / reject.
pub struct Unacked {
    pub tag: u64,
    pub queue: Arc<Queue>,
    /// `None` for basic.get, which no consumer's prefetch counts.
    pub consumer: Option<u64>,
    pub message: QueuedMessage,
    /// When it was sent, for the consumer timeout. Deliveries are kept in
    /// order, so the oldest is at the front.
    pub delivered_at: Instant,
}

/// A consumer registered on this channel.
#[derive(Clone)]
pub struct ConsumerRef {
    pub id: u64,
    pub queue: Arc<Queue>,
}

/// The channel's direct reply-to consumer: no queue behind it, only the
/// private reply name that routes replies here.
#[derive(Clone)]
pub struct ReplyConsumer {
    pub tag: ShortString,
    pub name: String,
}

#[derive(Default)]
struct DeliveryState {
    next_tag: u64,
    unacked: VecDeque<Unacked>,
    consumers: HashMap<ShortString, ConsumerRef>,
    reply: Option<ReplyConsumer>,
}

impl DeliveryState {
    /// Numbers a delivery and queues its frames: the one path for consumers
    /// of queues and the reply consumer alike.
    fn send_deliver(
        &mut self,
        outbox: &Outbox,
        channel: u16,
        consumer_tag: &ShortString,
        redelivered: bool,
        content: &Message,
        header: &Bytes,
    ) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: consumer_tag.clone(),
            delivery_tag: tag,
            redelivered,
            exchange: content.exchange.clone(),
            routing_key: content.routing_key.clone(),
        }));
        outbox.send_content(channel, method, header, &content.body);
        tag
    }
}

pub struct ChannelShared {
    pub id: u16,
    outbox: Arc<Outbox>,
    state: Mutex<DeliveryState>,
    closed: AtomicBool,
    /// basic.qos global=true: limit across all consumers of the channel; 0 = none.
    channel_prefetch: AtomicU32,
    channel_in_flight: AtomicU32,
    /// The client asked to hear about server-side cancels (consumer_cancel_notify).
    cancel_notify: bool,
    /// Publisher confirms sent so far; shared with the store's flusher thread.
    confirms: Mutex<ConfirmProgress>,
    confirm_latency: Histogram,
}

/// How far publisher confirms have gone: acks are cumulative (`multiple`), so
/// one number says it, plus how far the store has been asked to cover.
#[derive(Default)]
struct ConfirmProgress {
    acked: u64,
    waiting_for_disk: u64,
    /// Publishes refused by a full queue (reject-publish), in order: each
    /// gets a nack in its place in the sequence.
    rejected: VecDeque<u64>,
    /// Batches waiting for a flush: (last publish, when the first was complete).
    batches: VecDeque<(u64, Instant)>,
}

impl ChannelShared {
    pub fn new(
        id: u16,
        outbox: Arc<Outbox>,
        cancel_notify: bool,
        confirm_latency: Histogram,
    ) -> Arc<Self> {
        Arc::new(ChannelShared {
            id,
            outbox,
            state: Mutex::new(DeliveryState {
                next_tag: 1,
                ..Default::default()
            }),
            closed: AtomicBool::new(false),
            channel_prefetch: AtomicU32::new(0),
            channel_in_flight: AtomicU32::new(0),
            cancel_notify,
            confirms: Mutex::new(ConfirmProgress::default()),
            confirm_latency,
        })
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn set_channel_prefetch(&self, prefetch: u32) {
        self.channel_prefetch.store(prefetch, Ordering::Relaxed);
    }

    /// Confirms every publish up to `upto`: at once when nothing of it needs
    /// the disk, otherwise after the store's next flush. Later publishes wait
    /// behind earlier ones so acks stay cumulative.
    /// `since` is when the first of these publishes was complete.
    pub fn confirm_upto(
        self: &Arc<Self>,
        upto: u64,
        needs_disk: bool,
        store: Option<&Arc<Store>>,
        since: Instant,
    ) {
        let mut progress = self.confirms.lock();
        if upto <= progress.acked {
            return;
        }
        match store {
            Some(store) if needs_disk || progress.waiting_for_disk > progress.acked => {
                progress.waiting_for_disk = upto;
                progress.batches.push_back((upto, since));
                drop(progress);
                store.after_flush(self.clone(), upto);
            }
            _ => {
                self.send_confirm(&mut progress, upto, true);
                self.confirm_latency.record(since.elapsed().as_secs_f64());
            }
        }
    }

    /// A publish a queue refused: its confirm will be a nack.
    pub fn reject_publish(&self, seq: u64) {
        self.confirms.lock().rejected.push_back(seq);
    }

    /// Confirms everything up to `upto`, as acks (or nacks when `ok` is false)
    /// interrupted by a nack for each rejected publish.
    fn send_confirm(&self, progress: &mut ConfirmProgress, upto: u64, ok: bool) {
        while let Some(&rejected) = progress.rejected.front() {
            if rejected > upto {
                break;
            }
            progress.rejected.pop_front();
            if rejected > progress.acked + 1 {
                self.send_one_confirm(progress, rejected - 1, ok);
            }
            if rejected > progress.acked {
                self.send_one_confirm(progress, rejected, false);
            }
        }
        if upto > progress.acked {
            self.send_one_confirm(progress, upto, ok);
        }
    }

    fn send_one_confirm(&self, progress: &mut ConfirmProgress, upto: u64, ok: bool) {
        let multiple = upto - progress.acked > 1;
        progress.acked = upto;
        let method = if ok {
            basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: upto,
                multiple,
            })
        } else {
            basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: upto,
                multiple,
                requeue: false,
            })
        };
        self.outbox.send_method(self.id, AMQPClass::Basic(method));
    }

    pub fn has_channel_prefetch(&self) -> bool {
        self.channel_prefetch.load(Ordering::Relaxed) != 0
    }

    /// tx.rollback: acknowledgements taken in the transaction become outstanding again.
    pub fn restore(&self, taken: Vec<Unacked>) {
        let mut st = self.state.lock();
        let counted = taken.iter().filter(|u| u.consumer.is_some()).count() as u32;
        self.channel_in_flight.fetch_add(counted, Ordering::Relaxed);
        for u in taken {
            let pos = st.unacked.partition_point(|x| x.tag < u.tag);
            st.unacked.insert(pos, u);
        }
    }

    pub fn add_consumer(&self, tag: ShortString, consumer: ConsumerRef) {
        self.state.lock().consumers.insert(tag, consumer);
    }

    /// Whether `tag` names a consumer of this channel, the reply consumer included.
    pub fn has_consumer(&self, tag: &ShortString) -> bool {
        let st = self.state.lock();
        st.consumers.contains_key(tag) || st.reply.as_ref().is_some_and(|r| &r.tag == tag)
    }

    /// The direct reply-to consumer, if one is set.
    pub fn reply_consumer(&self) -> Option<ReplyConsumer> {
        self.state.lock().reply.clone()
    }

    pub fn set_reply_consumer(&self, reply: ReplyConsumer) {
        self.state.lock().reply = Some(reply);
    }

    /// Removes the reply consumer: all of it, or only when `tag` is its tag.
    pub fn take_reply_consumer(&self, tag: Option<&ShortString>) -> Option<ReplyConsumer> {
        let mut st = self.state.lock();
        match (&st.reply, tag) {
            (Some(r), Some(tag)) if &r.tag != tag => None,
            _ => st.reply.take(),
        }
    }

    pub fn remove_consumer(&self, tag: &ShortString) -> Option<ConsumerRef> {
        self.state.lock().consumers.remove(tag)
    }

    pub fn consumers(&self) -> Vec<ConsumerRef> {
        self.state.lock().consumers.values().cloned().collect()
    }

    /// Stops further deliveries and hands back what was delivered but not acked.
    pub fn close(&self) -> (Vec<Unacked>, Vec<ConsumerRef>) {
        let mut st = self.state.lock();
        self.closed.store(true, Ordering::Release);
        let unacked = st.unacked.drain(..).collect();
        let consumers = st.consumers.drain().map(|(_, c)| c).collect();
        (unacked, consumers)
    }

    /// Removes the acknowledged deliveries. `multiple` covers every tag up to
    /// `tag` (all of them when `tag` is 0); the named tag must be outstanding.
    pub fn take_acked(&self, tag: u64, multiple: bool) -> AmqpResult<Vec<Unacked>> {
        let mut st = self.state.lock();
        let taken: Vec<Unacked> = if multiple && tag == 0 {
            st.unacked.drain(..).collect()
        } else {
            let pos = st
                .unacked
                .binary_search_by_key(&tag, |u| u.tag)
                .map_err(|_| AmqpError::precondition(format!("unknown delivery tag {tag}")))?;
            if multiple {
                st.unacked.drain(..=pos).collect()
            } else {
                st.unacked.remove(pos).into_iter().collect()
            }
        };
        let counted = taken.iter().filter(|u| u.consumer.is_some()).count() as u32;
        self.channel_in_flight.fetch_sub(counted, Ordering::Relaxed);
        Ok(taken)
    }

    /// Whether the channel has consumers or outstanding deliveries, i.e.
    /// whether the consumer timeout still needs watching.
    pub fn may_have_deliveries(&self) -> bool {
        let st = self.state.lock();
        !st.unacked.is_empty() || !st.consumers.is_empty()
    }

    /// The timeout of the first outstanding delivery older than its timeout,
    /// if any. Every timeout is at least `floor`, so the scan stops at the
    /// first delivery younger than that: usually the front one.
    pub fn overdue(
        &self,
        now: Instant,
        floor: Duration,
        timeout_of: impl Fn(&Queue) -> Option<Duration>,
    ) -> Option<Duration> {
        let st = self.state.lock();
        for u in &st.unacked {
            let age = now.saturating_duration_since(u.delivered_at);
            if age <= floor {
                break;
            }
            match timeout_of(&u.queue) {
                Some(timeout) if age > timeout => return Some(timeout),
                _ => {}
            }
        }
        None
    }

    /// Every outstanding delivery (basic.recover).
    pub fn take_all(&self) -> Vec<Unacked> {
        let mut st = self.state.lock();
        let taken: Vec<Unacked> = st.unacked.drain(..).collect();
        // Under the lock, so a concurrent delivery's count is not wiped out.
        let counted = taken.iter().filter(|u| u.consumer.is_some()).count() as u32;
        self.channel_in_flight.fetch_sub(counted, Ordering::Relaxed);
        taken
    }

    /// basic.get-ok: numbered like deliveries, tracked unless no_ack.
    pub fn send_get_ok(
        &self,
        queue: &Arc<Queue>,
        message: QueuedMessage,
        content: Arc<Message>,
        remaining: u32,
        no_ack: bool,
    ) {
        let mut st = self.state.lock();
        let tag = st.next_tag;
        st.next_tag += 1;
        let m = &content;
        let method = AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
            delivery_tag: tag,
            redelivered: message.redelivered,
            exchange: m.exchange.clone(),
            routing_key: m.routing_key.clone(),
            message_count: remaining,
        }));
        let header = queue.delivery_header(&message, true);
        self.outbox.send_content(self.id, method, &header, &m.body);
        if !no_ack {
            st.unacked.push_back(Unacked {
                tag,
                queue: queue.clone(),
                consumer: None,
                message,
                delivered_at: Instant::now(),
            });
        }
    }
}

impl FlushWaiter for ChannelShared {
    fn flushed(&self, token: u64, ok: bool) {
        let mut progress = self.confirms.lock();
        // A closed channel's number may already belong to a new channel.
        if token > progress.acked && !self.closed.load(Ordering::Acquire) {
            self.send_confirm(&mut progress, token, ok);
        }
        while progress
            .batches
            .front()
            .is_some_and(|&(upto, _)| upto <= token)
        {
            let (_, since) = progress.batches.pop_front().expect("checked");
            self.confirm_latency.record(since.elapsed().as_secs_f64());
        }
    }
}

impl ReplySink for ChannelShared {
    /// A reply is a no-ack delivery to the reply consumer. It does not wait
    /// for room in the outbox: the replying publisher must not be held up by
    /// a slow requester (RabbitMQ, too, queues replies to the channel).
    fn deliver_reply(&self, message: &Arc<Message>) {
        let mut st = self.state.lock();
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let Some(reply) = st.reply.as_ref() else {
            return;
        };
        let consumer_tag = reply.tag.clone();
        st.send_deliver(
            &self.outbox,
            self.id,
            &consumer_tag,
            false,
            message,
            &message.raw_header,
        );
    }
}

impl DeliverySink for ChannelShared {
    fn can_accept(&self) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        let limit = self.channel_prefetch.load(Ordering::Relaxed);
        (limit == 0 || self.channel_in_flight.load(Ordering::Relaxed) < limit)
            && self.outbox.has_room()
    }

    fn deliver(&self, queue: &Arc<Queue>, delivery: Delivery<'_>) -> Result<(), QueuedMessage> {
        let mut st = self.state.lock();
        if self.closed.load(Ordering::Acquire) {
            return Err(delivery.message);
        }
        // can_accept ran without this lock; two queues may both have passed it.
        let limit = self.channel_prefetch.load(Ordering::Relaxed);
        if !delivery.no_ack && limit != 0 && self.channel_in_flight.load(Ordering::Relaxed) >= limit
        {
            return Err(delivery.message);
        }
        let header = queue.delivery_header(&delivery.message, false);
        let tag = st.send_deliver(
            &self.outbox,
            self.id,
            delivery.consumer_tag,
            delivery.message.redelivered,
            &delivery.content,
            &header,
        );
        if !delivery.no_ack {
            self.channel_in_flight.fetch_add(1, Ordering::Relaxed);
            st.unacked.push_back(Unacked {
                tag,
                queue: queue.clone(),
                consumer: Some(delivery.consumer_id),
                message: delivery.message,
                delivered_at: Instant::now(),
            });
        }
        Ok(())
    }

    fn cancelled_by_server(&self, consumer_tag: &ShortString, consumer_id: u64) {
        let removed = {
            let mut st = self.state.lock();
            match st.consumers.get(consumer_tag) {
                Some(c) if c.id == consumer_id => st.consumers.remove(consumer_tag).is_some(),
                _ => false,
            }
        };
        if removed && self.cancel_notify && !self.closed.load(Ordering::Relaxed) {
            let cancel = AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: consumer_tag.clone(),
                nowait: true,
            }));
            let me = self as *const ChannelShared as usize;
            let deferred = DEFERRED_CANCELS.with(|d| match d.borrow_mut().as_mut() {
                Some((channel, cancels)) if *channel == me => {
                    cancels.push(cancel.clone());
                    true
                }
                _ => false,
            });
            if !deferred {
                self.outbox.send_method(self.id, cancel);
            }
        }
    }
}

thread_local! {
    /// While a channel deletes a queue: that channel, and the cancels of its
    /// own consumers of the queue, held back to follow the delete-ok.
    static DEFERRED_CANCELS: std::cell::RefCell<Option<(usize, Vec<AMQPClass>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` (a queue deletion by `channel`) and returns, besides its result,
/// the `basic.cancel`s of `channel`'s own consumers it caused, to send after
/// the delete-ok: RabbitMQ answers in that order, and a client that takes
/// the cancel as the end of the channel's work (amqplib's tests) must not
/// find the delete-ok still missing.
pub fn with_own_cancels_deferred<R>(
    channel: &ChannelShared,
    f: impl FnOnce() -> R,
) -> (R, Vec<AMQPClass>) {
    let me = channel as *const ChannelShared as usize;
    DEFERRED_CANCELS.with(|d| *d.borrow_mut() = Some((me, Vec::new())));
    let result = f();
    let cancels = DEFERRED_CANCELS
        .with(|d| d.borrow_mut().take())
        .map(|(_, cancels)| cancels)
        .unwrap_or_default();
    (result, cancels)
}
