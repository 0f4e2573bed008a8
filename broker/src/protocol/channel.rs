//! One AMQP channel as its connection task sees it: reassembling published
//! content, answering methods, and keeping publisher-confirm and transaction
//! state. What other tasks must reach (deliveries, unacked messages, consumers)
//! lives in [`ChannelShared`].

use std::sync::Arc;

use metrics::Histogram;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{
    basic, channel, confirm, exchange, queue, tx, AMQPClass, BasicProperties,
};
use amq_protocol::types::ShortString;
use bytes::{Bytes, BytesMut};

use super::delivery::{
    with_own_cancels_deferred, ChannelShared, ConsumerRef, ReplyConsumer, Unacked,
};
use super::outbox::Outbox;
use crate::config::Config;
use crate::error::{code, AmqpError, AmqpResult};
use crate::model::direct_reply::{self, PSEUDO_QUEUE};
use crate::model::exchange::Exchange;
use crate::model::message::{encode_header, Message};
use crate::model::publish::Published;
use crate::model::queue::{Consumer, Queue, QueueOptions};
use crate::model::vhost::{generated_name, ExchangeDeclare, QueueDeclare, VHost};
use crate::model::Broker;
use crate::model::{queue_args, sender_selected};
use crate::store::Store;

mod reply_to;

/// What a channel needs from its connection to handle a method.
pub struct Context<'a> {
    pub broker: &'a Broker,
    pub vhost: &'a Arc<VHost>,
    pub connection_id: u64,
    pub config: &'a Config,
    /// The authenticated user, which a message's user_id must match.
    pub user: &'a str,
}

/// A publish whose header and body frames are still arriving.
struct Incoming {
    publish: basic::Publish,
    header: Option<(Box<BasicProperties>, Bytes, u64)>,
    body: Body,
}

enum Body {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Empty => 0,
            Body::One(b) => b.len(),
            Body::Many(b) => b.len(),
        }
    }

    /// Single-frame bodies (the common case) stay the frame's own bytes.
    fn push(&mut self, chunk: Bytes, expected: u64) {
        *self = match std::mem::replace(self, Body::Empty) {
            Body::Empty => Body::One(chunk),
            Body::One(first) => {
                // Grown as frames arrive: the announced size is only a claim.
                let mut all = BytesMut::with_capacity((expected as usize).min(1 << 20));
                all.extend_from_slice(&first);
                all.extend_from_slice(&chunk);
                Body::Many(all)
            }
            Body::Many(mut all) => {
                all.extend_from_slice(&chunk);
                Body::Many(all)
            }
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            Body::Empty => Bytes::new(),
            Body::One(b) => b,
            Body::Many(b) => b.freeze(),
        }
    }
}

/// Publisher confirms, counted here and reported once per read batch; the
/// channel's shared part sends the (cumulative) acks, after a disk flush when
/// a persistent message reached a durable queue.
#[derive(Default)]
struct Confirms {
    published: u64,
    /// Highest publish handed to `confirm_upto` so far.
    reported: u64,
    /// Some publish since the last report went to disk and must wait for a flush.
    needs_disk: bool,
    /// When the first publish since the last report was complete (for the
    /// confirm latency metric: one clock read per batch, not per message).
    since: Option<Instant>,
}

/// tx.select: publishes and settlements wait for tx.commit.
#[derive(Default)]
struct Transaction {
    /// Each with the exchange resolved at publish time, as RabbitMQ does, so a
    /// commit cannot fail half-way.
    publishes: Vec<(basic::Publish, Arc<Message>, Option<Arc<Exchange>>)>,
    settlements: Vec<(Vec<Unacked>, Settle)>,
}

#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Discard,
    Requeue,
}

pub struct Channel {
    pub shared: Arc<ChannelShared>,
    /// We sent channel.close and wait for close-ok; everything else is dropped.
    pub closing: bool,
    incoming: Option<Incoming>,
    confirms: Option<Confirms>,
    tx: Option<Transaction>,
    /// basic.qos global=false: the prefetch given to consumers created from now on.
    consumer_prefetch: u32,
    /// The last exchange published to, so the hot path skips the vhost lookup.
    last_exchange: Option<Arc<Exchange>>,
    /// Queue name that an empty queue name refers to (AMQP's "current queue").
    last_queue: Option<String>,
    /// The shortest consumer timeout among this channel's manual-ack
    /// consumers and gets so far; `None` while nothing needs watching.
    pub ack_timeout_floor: Option<Duration>,
    /// Replies that promise durability (declare-ok of a durable queue,
    /// commit-ok…): the connection sends them after the store's next flush.
    pub held: Vec<AMQPClass>,
}

/// What the consumer-timeout check found on a channel.
pub enum AckWatch {
    /// Nothing to watch: no consumers and no outstanding deliveries.
    Idle,
    /// Keep checking; no timeout is shorter than this.
    Watching(Duration),
    /// A delivery is overdue; the channel must close with this error.
    Overdue(AmqpError),
}

/// How long a manual-ack delivery from `queue` may stay unacknowledged: the
/// queue's `x-consumer-timeout`, else the broker's `consumer_timeout`.
pub fn consumer_timeout(queue: &Queue, config: &Config) -> Option<Duration> {
    let own = queue.args.consumer_timeout.filter(|&ms| ms > 0);
    own.map(Duration::from_millis).or(config.consumer_timeout)
}

const EXPECTED_HEADER: &str =
    "expected content header for class 60, got non content header frame instead";
const EXPECTED_BODY: &str = "expected content body, got non content body frame instead";

/// A broken content sequence ends the connection with 505, as in RabbitMQ.
fn unexpected(detail: impl std::fmt::Display) -> AmqpError {
    AmqpError::connection(code::UNEXPECTED_FRAME, detail)
}

/// Content frames where a method was due.
pub fn no_content_expected() -> AmqpError {
    unexpected("expected method frame, got non method frame instead")
}

/// Errors of an unfinished publish are reported against basic.publish.
fn in_publish(error: AmqpError) -> AmqpError {
    error.in_method(60, 40)
}

impl Channel {
    pub fn new(
        id: u16,
        outbox: Arc<Outbox>,
        cancel_notify: bool,
        confirm_latency: Histogram,
    ) -> Self {
        Channel {
            shared: ChannelShared::new(id, outbox, cancel_notify, confirm_latency),
            closing: false,
            incoming: None,
            confirms: None,
            tx: None,
            consumer_prefetch: 0,
            last_exchange: None,
            last_queue: None,
            ack_timeout_floor: None,
            held: Vec::new(),
        }
    }

    fn watch_ack_timeout(&mut self, queue: &Queue, config: &Config) {
        if let Some(timeout) = consumer_timeout(queue, config) {
            self.ack_timeout_floor =
                Some(self.ack_timeout_floor.map_or(timeout, |f| f.min(timeout)));
        }
    }

    /// The consumer timeout check (on the connection's coarse tick): is a
    /// delivery of this channel unacknowledged for longer than its timeout?
    pub fn check_ack_timeout(&mut self, now: Instant, config: &Config) -> AckWatch {
        let Some(floor) = self.ack_timeout_floor else {
            return AckWatch::Idle;
        };
        if self.closing {
            return AckWatch::Idle;
        }
        let overdue = self
            .shared
            .overdue(now, floor, |queue| consumer_timeout(queue, config));
        match overdue {
            Some(timeout) => AckWatch::Overdue(AmqpError::precondition(format!(
                "delivery acknowledgement on channel {} timed out. Timeout value used: {} ms. \
                 This timeout value can be configured, see consumers doc guide to learn more",
                self.id(),
                timeout.as_millis()
            ))),
            None if self.shared.may_have_deliveries() => AckWatch::Watching(floor),
            None => {
                self.ack_timeout_floor = None;
                AckWatch::Idle
            }
        }
    }

    fn id(&self) -> u16 {
        self.shared.id
    }

    fn reply(&self, method: AMQPClass) {
        self.shared.outbox().send_method(self.id(), method);
    }

    /// A reply that promises a change survives a crash: held until the
    /// store has flushed it (when there is a store and the change is durable).
    fn reply_after_flush(&mut self, ctx: &Context<'_>, durable: bool, method: AMQPClass) {
        if durable && ctx.broker.store().is_some() {
            self.held.push(method);
        } else {
            self.reply(method);
        }
    }

    /// True when this channel has publishes to confirm at the end of a read batch.
    pub fn has_unsent_confirms(&self) -> bool {
        self.confirms
            .as_ref()
            .is_some_and(|c| c.reported < c.published)
    }

    /// Acks everything published since the last flush in one basic.ack.
    pub fn flush_confirms(&mut self, store: Option<&Arc<Store>>) {
        let Some(c) = self.confirms.as_mut() else {
            return;
        };
        if c.reported == c.published {
            return;
        }
        c.reported = c.published;
        let needs_disk = std::mem::take(&mut c.needs_disk);
        let since = c.since.take().unwrap_or_else(Instant::now);
        self.shared
            .confirm_upto(c.published, needs_disk, store, since);
    }

    // ---- content frames ----------------------------------------------------

    pub fn on_header(
        &mut self,
        ctx: &Context<'_>,
        class_id: u16,
        body_size: u64,
        properties: Box<BasicProperties>,
        raw: Bytes,
    ) -> AmqpResult<()> {
        let Some(incoming) = self.incoming.as_mut() else {
            return Err(no_content_expected());
        };
        if incoming.header.is_some() {
            return Err(in_publish(unexpected(EXPECTED_BODY)));
        }
        if class_id != 60 {
            return Err(in_publish(unexpected(EXPECTED_HEADER)));
        }
        if body_size > ctx.config.max_message_size {
            self.incoming = None;
            return Err(AmqpError::precondition(format!(
                "message size {body_size} is larger than configured max size {}",
                ctx.config.max_message_size
            ))
            .in_method(60, 40));
        }
        incoming.header = Some((properties, raw, body_size));
        if body_size == 0 {
            return self.complete_publish(ctx);
        }
        Ok(())
    }

    pub fn on_body(&mut self, ctx: &Context<'_>, chunk: Bytes) -> AmqpResult<()> {
        let Some(incoming) = self.incoming.as_mut() else {
            return Err(no_content_expected());
        };
        let Some((_, _, expected)) = incoming.header.as_ref() else {
            return Err(in_publish(unexpected(EXPECTED_HEADER)));
        };
        let expected = *expected;
        if (incoming.body.len() + chunk.len()) as u64 > expected {
            // RabbitMQ drops a body frame that overshoots the announced size and
            // keeps waiting; the next method then fails with 505. We do the same.
            return Ok(());
        }
        incoming.body.push(chunk, expected);
        if incoming.body.len() as u64 == expected {
            return self.complete_publish(ctx);
        }
        Ok(())
    }

    /// A method may not interrupt content: RabbitMQ closes the connection with 505.
    pub fn check_not_in_content(&self) -> AmqpResult<()> {
        match &self.incoming {
            None => Ok(()),
            Some(i) if i.header.is_none() => Err(in_publish(unexpected(EXPECTED_HEADER))),
            Some(_) => Err(in_publish(unexpected(EXPECTED_BODY))),
        }
    }

    fn complete_publish(&mut self, ctx: &Context<'_>) -> AmqpResult<()> {
        let incoming = self.incoming.take().expect("content in progress");
        let (mut properties, mut raw_header, body_size) = incoming.header.expect("header received");
        let publish = incoming.publish;
        // RabbitMQ's order of checks: immediate, the exchange, direct
        // reply-to, user_id, expiration.
        if publish.immediate {
            // RabbitMQ raises this once the content is complete, not at the method.
            return Err(in_publish(AmqpError::connection(
                code::NOT_IMPLEMENTED,
                "immediate=true",
            )));
        }
        let exchange = self.resolve_exchange(ctx, publish.exchange.as_str())?;
        if self.fill_in_reply_to(&mut properties).map_err(in_publish)? {
            raw_header = encode_header(&properties, body_size);
        }
        if let Some(claimed) = properties.user_id() {
            if claimed.as_str() != ctx.user {
                return Err(in_publish(AmqpError::precondition(format!(
                    "user_id property set to '{claimed}' but authenticated user was '{}'",
                    ctx.user
                ))));
            }
        }
        queue_args::message_expiration(&properties).map_err(in_publish)?;
        let message = Arc::new(Message {
            exchange: publish.exchange.clone(),
            routing_key: publish.routing_key.clone(),
            properties: *properties,
            raw_header: unpin(raw_header),
            body: unpin(incoming.body.freeze()),
        });
        sender_selected::check(&message).map_err(in_publish)?;
        if let Some(tx) = self.tx.as_mut() {
            tx.publishes.push((publish, message, exchange));
            return Ok(());
        }
        let outcome = self.route(ctx, exchange.as_ref(), &publish, message);
        if let Some(c) = self.confirms.as_mut() {
            if c.since.is_none() {
                c.since = Some(Instant::now());
            }
            c.published += 1;
            c.needs_disk |= outcome.stored;
            if outcome.rejected {
                self.shared.reject_publish(c.published);
            }
        }
        Ok(())
    }

    /// `None` is the default exchange, which routes by queue name.
    fn resolve_exchange(
        &mut self,
        ctx: &Context<'_>,
        name: &str,
    ) -> AmqpResult<Option<Arc<Exchange>>> {
        if name.is_empty() {
            return Ok(None);
        }
        if let Some(e) = &self.last_exchange {
            if e.name == name && !e.is_deleted() {
                return Ok(Some(e.clone()));
            }
        }
        let exchange = ctx.vhost.exchange(name).map_err(|e| e.in_method(60, 40))?;
        if exchange.options.internal {
            return Err(AmqpError::access_refused(format!(
                "cannot publish to internal exchange '{name}' in vhost '{}'",
                ctx.vhost.name
            ))
            .in_method(60, 40));
        }
        self.last_exchange = Some(exchange.clone());
        Ok(Some(exchange))
    }

    /// Routes and enqueues; returns whether the confirm must wait for the disk.
    fn route(
        &self,
        ctx: &Context<'_>,
        exchange: Option<&Arc<Exchange>>,
        publish: &basic::Publish,
        message: Arc<Message>,
    ) -> Published {
        let outcome = ctx.vhost.publish(exchange, message.clone());
        if !outcome.routed && publish.mandatory {
            let method = AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: code::NO_ROUTE,
                reply_text: "NO_ROUTE".into(),
                exchange: publish.exchange.clone(),
                routing_key: publish.routing_key.clone(),
            }));
            self.shared.outbox().send_content(
                self.id(),
                method,
                &message.raw_header,
                &message.body,
            );
        }
        outcome
    }

    // ---- methods -------------------------------------------------------------

    /// Handles one method on an open channel. Errors carry the failing method's ids.
    pub fn on_method(&mut self, ctx: &Context<'_>, method: AMQPClass) -> AmqpResult<()> {
        let (class_id, method_id) = (method.get_amqp_class_id(), method.get_amqp_method_id());
        self.dispatch(ctx, method)
            .map_err(|e| e.in_method(class_id, method_id))
    }

    fn dispatch(&mut self, ctx: &Context<'_>, method: AMQPClass) -> AmqpResult<()> {
        use basic::AMQPMethod as B;
        match method {
            AMQPClass::Basic(B::Publish(p)) => {
                self.incoming = Some(Incoming {
                    publish: p,
                    header: None,
                    body: Body::Empty,
                });
                Ok(())
            }
            AMQPClass::Basic(B::Ack(a)) => self.settle(a.delivery_tag, a.multiple, Settle::Ack),
            AMQPClass::Basic(B::Nack(n)) => {
                self.settle(n.delivery_tag, n.multiple, requeue_or_discard(n.requeue))
            }
            AMQPClass::Basic(B::Reject(r)) => {
                self.settle(r.delivery_tag, false, requeue_or_discard(r.requeue))
            }
            AMQPClass::Basic(B::Consume(c)) => self.consume(ctx, c),
            AMQPClass::Basic(B::Cancel(c)) => {
                self.cancel(ctx, &c.consumer_tag);
                if !c.nowait {
                    self.reply(AMQPClass::Basic(B::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })));
                }
                Ok(())
            }
            // Reply to our own server-initiated basic.cancel (nowait was set, but be lenient).
            AMQPClass::Basic(B::CancelOk(_)) => Ok(()),
            AMQPClass::Basic(B::Get(g)) => self.get(ctx, g),
            AMQPClass::Basic(B::Qos(q)) => self.qos(q),
            AMQPClass::Basic(B::Recover(r)) => {
                self.recover(r.requeue)?;
                self.reply(AMQPClass::Basic(B::RecoverOk(basic::RecoverOk {})));
                Ok(())
            }
            AMQPClass::Basic(B::RecoverAsync(r)) => self.recover(r.requeue),
            AMQPClass::Exchange(m) => self.exchange_method(ctx, m),
            AMQPClass::Queue(m) => self.queue_method(ctx, m),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                if self.tx.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                self.confirms.get_or_insert_with(Confirms::default);
                if !s.nowait {
                    self.reply(AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(
                        confirm::SelectOk {},
                    )));
                }
                Ok(())
            }
            AMQPClass::Tx(m) => self.tx_method(ctx, m),
            // RabbitMQ no longer lets clients pause deliveries with channel.flow;
            // prefetch does that job. flow(true) is still acknowledged.
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                if !f.active {
                    return Err(AmqpError::connection(code::NOT_IMPLEMENTED, "active=false"));
                }
                self.reply(AMQPClass::Channel(channel::AMQPMethod::FlowOk(
                    channel::FlowOk { active: true },
                )));
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Access(_) => {
                self.reply(AMQPClass::Access(
                    amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    ),
                ));
                Ok(())
            }
            other => Err(AmqpError::connection(
                code::COMMAND_INVALID,
                format!(
                    "method class {} id {} is not valid from a client on a channel",
                    other.get_amqp_class_id(),
                    other.get_amqp_method_id()
                ),
            )),
        }
    }

    fn queue_name(&self, name: &ShortString) -> AmqpResult<String> {
        if name.as_str().is_empty() {
            return self
                .last_queue
                .clone()
                .ok_or_else(|| AmqpError::not_found("no previously declared queue"));
        }
        Ok(name.as_str().to_owned())
    }

    fn exchange_method(
        &mut self,
        ctx: &Context<'_>,
        method: exchange::AMQPMethod,
    ) -> AmqpResult<()> {
        use exchange::AMQPMethod as E;
        let vhost = ctx.vhost;
        let (nowait, durable, ok) = match method {
            E::Declare(d) => {
                vhost.declare_exchange(&ExchangeDeclare {
                    name: d.exchange.as_str(),
                    kind: d.kind.as_str(),
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: &d.arguments,
                })?;
                let durable = d.durable && !d.passive;
                (d.nowait, durable, E::DeclareOk(exchange::DeclareOk {}))
            }
            E::Delete(d) => {
                vhost.delete_exchange(d.exchange.as_str(), d.if_unused)?;
                (d.nowait, true, E::DeleteOk(exchange::DeleteOk {}))
            }
            E::Bind(b) => {
                vhost.bind_exchange(
                    b.destination.as_str(),
                    b.source.as_str(),
                    b.routing_key.as_str(),
                    &b.arguments,
                )?;
                (b.nowait, true, E::BindOk(exchange::BindOk {}))
            }
            E::Unbind(u) => {
                vhost.unbind_exchange(
                    u.destination.as_str(),
                    u.source.as_str(),
                    u.routing_key.as_str(),
                    &u.arguments,
                )?;
                (u.nowait, true, E::UnbindOk(exchange::UnbindOk {}))
            }
            other => return Err(server_only(AMQPClass::Exchange(other))),
        };
        if !nowait {
            self.reply_after_flush(ctx, durable, AMQPClass::Exchange(ok));
        }
        Ok(())
    }

    fn queue_method(&mut self, ctx: &Context<'_>, method: queue::AMQPMethod) -> AmqpResult<()> {
        use queue::AMQPMethod as Q;
        let vhost = ctx.vhost;
        let conn = ctx.connection_id;
        // Sent after the reply (see `with_own_cancels_deferred`).
        let mut then = Vec::new();
        let (nowait, durable, ok) = match method {
            Q::Declare(d) if direct_reply::is_reserved(d.queue.as_str()) => {
                let ok = self.declare_reply_queue(ctx, d.queue.as_str())?;
                (d.nowait, false, Q::DeclareOk(ok))
            }
            Q::Declare(d) => {
                let (queue, counts) = vhost.declare_queue(QueueDeclare {
                    name: d.queue.as_str(),
                    passive: d.passive,
                    options: QueueOptions {
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        arguments: d.arguments.clone(),
                    },
                    connection: conn,
                })?;
                self.last_queue = Some(queue.name.clone());
                (
                    d.nowait,
                    queue.is_durable_store() && !d.passive,
                    Q::DeclareOk(queue::DeclareOk {
                        queue: queue.name.as_str().into(),
                        message_count: counts.messages,
                        consumer_count: counts.consumers,
                    }),
                )
            }
            Q::Bind(b) => {
                let name = self.queue_name(&b.queue)?;
                vhost.bind_queue(
                    &name,
                    b.exchange.as_str(),
                    b.routing_key.as_str(),
                    &b.arguments,
                    conn,
                )?;
                (b.nowait, true, Q::BindOk(queue::BindOk {}))
            }
            Q::Unbind(u) => {
                let name = self.queue_name(&u.queue)?;
                vhost.unbind_queue(
                    &name,
                    u.exchange.as_str(),
                    u.routing_key.as_str(),
                    &u.arguments,
                    conn,
                )?;
                (false, true, Q::UnbindOk(queue::UnbindOk {}))
            }
            Q::Purge(p) => {
                let name = self.queue_name(&p.queue)?;
                let queue = vhost.queue(&name, conn)?;
                let message_count = queue.purge();
                let durable = queue.is_durable_store();
                (
                    p.nowait,
                    durable,
                    Q::PurgeOk(queue::PurgeOk { message_count }),
                )
            }
            Q::Delete(d) => {
                let name = self.queue_name(&d.queue)?;
                let (deleted, cancels) = with_own_cancels_deferred(&self.shared, || {
                    vhost.delete_queue(&name, conn, d.if_unused, d.if_empty)
                });
                then = cancels;
                let message_count = deleted?;
                (
                    d.nowait,
                    true,
                    Q::DeleteOk(queue::DeleteOk { message_count }),
                )
            }
            other => return Err(server_only(AMQPClass::Queue(other))),
        };
        if !nowait {
            self.reply_after_flush(ctx, durable, AMQPClass::Queue(ok));
        }
        for method in then {
            self.reply_after_flush(ctx, durable, method);
        }
        Ok(())
    }

    fn consume(&mut self, ctx: &Context<'_>, c: basic::Consume) -> AmqpResult<()> {
        let name = self.queue_name(&c.queue)?;
        if name == PSEUDO_QUEUE {
            return self.consume_replies(ctx, &c);
        }
        let queue = ctx.vhost.queue(&name, ctx.connection_id)?;
        let tag: ShortString = if c.consumer_tag.as_str().is_empty() {
            generated_name("amq.ctag-").into()
        } else {
            c.consumer_tag.clone()
        };
        self.check_tag_unused(&tag)?;
        let priority = queue_args::consumer_priority(&c.arguments, &name, &ctx.vhost.name)?;
        let id = ctx.broker.next_id();
        self.shared.add_consumer(
            tag.clone(),
            ConsumerRef {
                id,
                queue: queue.clone(),
            },
        );
        let consumer = Consumer::new(
            id,
            tag.clone(),
            c.no_ack,
            c.exclusive,
            self.consumer_prefetch,
            self.shared.clone(),
        )
        .with_priority(priority);
        let shared = &self.shared;
        let accepted = queue.add_consumer(consumer, || {
            if !c.nowait {
                shared.outbox().send_method(
                    shared.id,
                    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: tag.clone(),
                    })),
                );
            }
        });
        if accepted.is_err() {
            self.shared.remove_consumer(&tag);
        } else if !c.no_ack {
            self.watch_ack_timeout(&queue, ctx.config);
        }
        accepted
    }

    fn check_tag_unused(&self, tag: &ShortString) -> AmqpResult<()> {
        if self.shared.has_consumer(tag) {
            return Err(AmqpError::connection(
                code::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        Ok(())
    }

    fn cancel(&mut self, ctx: &Context<'_>, tag: &ShortString) {
        if let Some(consumer) = self.shared.remove_consumer(tag) {
            release_consumer(ctx.vhost, &consumer);
        } else {
            self.cancel_replies(ctx, tag);
        }
    }

    fn get(&mut self, ctx: &Context<'_>, g: basic::Get) -> AmqpResult<()> {
        let name = self.queue_name(&g.queue)?;
        let queue = ctx.vhost.queue(&name, ctx.connection_id)?;
        match queue.get(g.no_ack) {
            Some((message, content, remaining)) => {
                if !g.no_ack {
                    self.watch_ack_timeout(&queue, ctx.config);
                }
                self.shared
                    .send_get_ok(&queue, message, content, remaining, g.no_ack)
            }
            None => self.reply(AMQPClass::Basic(basic::AMQPMethod::GetEmpty(
                basic::GetEmpty {},
            ))),
        }
        Ok(())
    }

    fn qos(&mut self, q: basic::Qos) -> AmqpResult<()> {
        if q.global {
            self.shared.set_channel_prefetch(q.prefetch_count.into());
            self.poke_consumers();
        } else {
            // RabbitMQ's quirk, kept for compatibility: a per-consumer qos also
            // lifts any channel-wide limit set before it.
            self.consumer_prefetch = q.prefetch_count.into();
            if self.shared.has_channel_prefetch() {
                self.shared.set_channel_prefetch(0);
                self.poke_consumers();
            }
        }
        self.reply(AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
        Ok(())
    }

    fn recover(&mut self, requeue: bool) -> AmqpResult<()> {
        if !requeue {
            return Err(AmqpError::connection(
                code::NOT_IMPLEMENTED,
                "requeue=false",
            ));
        }
        settle_now(self.shared.take_all(), Settle::Requeue);
        Ok(())
    }

    fn settle(&mut self, tag: u64, multiple: bool, how: Settle) -> AmqpResult<()> {
        let taken = self.shared.take_acked(tag, multiple)?;
        if let Some(tx) = self.tx.as_mut() {
            tx.settlements.push((taken, how));
            return Ok(());
        }
        settle_now(taken, how);
        self.after_settle();
        Ok(())
    }

    /// A channel-wide prefetch limit frees credit for every queue the channel consumes from.
    fn after_settle(&self) {
        if self.shared.has_channel_prefetch() {
            self.poke_consumers();
        }
    }

    /// Asks every queue this channel consumes from to deliver what it can.
    pub fn poke_consumers(&self) {
        for consumer in self.shared.consumers() {
            consumer.queue.dispatch();
        }
    }

    fn tx_method(&mut self, ctx: &Context<'_>, method: tx::AMQPMethod) -> AmqpResult<()> {
        use tx::AMQPMethod as T;
        match method {
            T::Select(_) => {
                if self.confirms.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                self.tx.get_or_insert_with(Transaction::default);
                self.reply(AMQPClass::Tx(T::SelectOk(tx::SelectOk {})));
            }
            T::Commit(_) => {
                let tx = self
                    .tx
                    .take()
                    .ok_or_else(|| AmqpError::precondition("channel is not transactional"))?;
                let durable = !tx.publishes.is_empty() || !tx.settlements.is_empty();
                for (publish, message, exchange) in tx.publishes {
                    self.route(ctx, exchange.as_ref(), &publish, message);
                }
                for (taken, how) in tx.settlements {
                    settle_now(taken, how);
                }
                self.after_settle();
                self.tx = Some(Transaction::default());
                // commit-ok promises the publishes and acks are as safe as a
                // confirm would: it goes out after the flush that holds them.
                self.reply_after_flush(ctx, durable, AMQPClass::Tx(T::CommitOk(tx::CommitOk {})));
            }
            T::Rollback(_) => {
                let tx = self
                    .tx
                    .take()
                    .ok_or_else(|| AmqpError::precondition("channel is not transactional"))?;
                for (taken, _) in tx.settlements {
                    self.shared.restore(taken);
                }
                self.tx = Some(Transaction::default());
                self.reply(AMQPClass::Tx(T::RollbackOk(tx::RollbackOk {})));
            }
            other => return Err(server_only(AMQPClass::Tx(other))),
        }
        Ok(())
    }

    /// Ends the channel: consumers are cancelled and unacked messages go back
    /// to their queues, marked redelivered.
    pub fn shutdown(&mut self, vhost: &VHost) {
        self.detach().give_back(vhost);
    }

    /// First half of [`shutdown`](Self::shutdown): stops deliveries to this
    /// channel and collects what it held. A connection detaches all its
    /// channels before giving anything back, so a requeued message cannot land
    /// on a sibling channel that is about to close too.
    pub fn detach(&mut self) -> Detached {
        let (mut unacked, consumers) = self.shared.close();
        if let Some(tx) = self.tx.take() {
            unacked.extend(tx.settlements.into_iter().flat_map(|(taken, _)| taken));
        }
        Detached {
            unacked,
            consumers,
            reply: self.shared.take_reply_consumer(None),
        }
    }
}

/// What a closed channel held, to be given back to the queues.
pub struct Detached {
    unacked: Vec<Unacked>,
    consumers: Vec<ConsumerRef>,
    /// Its direct reply-to consumer, whose name must stop working.
    reply: Option<ReplyConsumer>,
}

impl Detached {
    /// Requeues before cancelling the consumers, as RabbitMQ does: the
    /// closed channel's consumers take nothing meanwhile, and a single active
    /// consumer taking over then starts with the requeued messages, in queue
    /// order, rather than with what was ready behind them.
    pub fn give_back(self, vhost: &VHost) {
        settle_now(self.unacked, Settle::Requeue);
        for consumer in &self.consumers {
            release_consumer(vhost, consumer);
        }
        reply_to::release_reply_name(vhost, self.reply);
    }
}

/// Small buffers are copied out of the socket read buffer they were sliced
/// from: a queued 10-byte message must not keep a 64 KiB read buffer alive.
/// Larger bodies stay zero-copy: copying 1 KiB bodies measurably slowed
/// deliveries (perf scenario B), and their worst-case pinning ratio is bounded.
const UNPIN_BELOW: usize = 512;

fn unpin(bytes: Bytes) -> Bytes {
    if bytes.len() < UNPIN_BELOW {
        Bytes::copy_from_slice(&bytes)
    } else {
        bytes
    }
}

fn requeue_or_discard(requeue: bool) -> Settle {
    if requeue {
        Settle::Requeue
    } else {
        Settle::Discard
    }
}

fn server_only(method: AMQPClass) -> AmqpError {
    AmqpError::connection(
        code::COMMAND_INVALID,
        format!(
            "method class {} id {} is sent by servers only",
            method.get_amqp_class_id(),
            method.get_amqp_method_id()
        ),
    )
}

/// Cancels a consumer at its queue, deleting an auto-delete queue it leaves empty.
fn release_consumer(vhost: &VHost, consumer: &ConsumerRef) {
    if consumer.queue.remove_consumer(consumer.id) {
        vhost.remove_queue(&consumer.queue);
    }
}

/// Applies settlements queue by queue, one lock per queue.
fn settle_now(mut taken: Vec<Unacked>, how: Settle) {
    // Grouped by queue so each queue is locked once; sorting in place keeps the
    // common single ack free of allocations (requeue restores queue order itself).
    taken.sort_by_key(|u| Arc::as_ptr(&u.queue) as usize);
    let mut rest = taken.into_iter().peekable();
    while let Some(first) = rest.next() {
        let queue = first.queue.clone();
        let same_queue = std::iter::from_fn(|| rest.next_if(|u| Arc::ptr_eq(&u.queue, &queue)));
        let items = std::iter::once(first)
            .chain(same_queue)
            .map(|u| (u.consumer, u.message));
        match how {
            Settle::Ack => queue.settle(items, false),
            Settle::Discard => queue.settle(items, true),
            Settle::Requeue => queue.requeue(items.collect()),
        }
    }
}
