//! Dead-lettering: a message a queue lets go of (rejected, expired, over a
//! length limit) is republished to the queue's dead-letter exchange, carrying
//! its history in the `x-death` header exactly as RabbitMQ writes it, so
//! clients that inspect it (retry counters in worker frameworks) work unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use super::message::{encode_header, Message};
use super::queue::{Queue, QueuedMessage};
use super::sender_selected;
use super::timers::now_ms;
use super::vhost::VHost;

/// Why a message was dead-lettered, named as in `x-death`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// basic.reject or basic.nack with requeue=false.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// Dropped or refused by `x-max-length` / `x-max-length-bytes`.
    MaxLen,
    /// Returned to a quorum queue more often than its `x-delivery-limit`.
    DeliveryLimit,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Rejected,
        Reason::Expired,
        Reason::MaxLen,
        Reason::DeliveryLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

impl VHost {
    /// Republishes what `from` let go of to its dead-letter exchange. A missing
    /// exchange, or no queue bound, drops the messages, as in RabbitMQ.
    pub(crate) fn dead_letter(&self, from: &Queue, dead: Vec<(QueuedMessage, Reason)>) {
        // Whatever happens to each dead letter, the source's entry on disk
        // goes last: after the copy is enqueued (a crash in between yields
        // a duplicate, never a loss), or when it is dropped.
        let forget = |queued: &QueuedMessage| from.forget(queued);
        let Some(dlx) = from.args.dead_letter_exchange.as_deref() else {
            dead.iter().for_each(|(queued, _)| forget(queued));
            return;
        };
        let exchange = match dlx {
            "" => None,
            name => match self.exchange(name) {
                Ok(exchange) => Some(exchange),
                Err(_) => {
                    dead.iter().for_each(|(queued, _)| forget(queued));
                    return;
                }
            },
        };
        let now_secs = now_ms() / 1000;
        for (queued, reason) in dead {
            let content = queued.message.clone();
            // Without its own routing key the dead letter goes where the
            // message's keys (its `CC` ones included) lead; with one, only
            // there, and `CC` is dropped, as in RabbitMQ.
            let own_key = from.args.dead_letter_routing_key.as_deref();
            let routing_key = own_key.unwrap_or(content.routing_key.as_str());
            let message = Arc::new(dead_lettered(
                &content,
                &from.name,
                reason,
                dlx,
                routing_key,
                own_key.is_none(),
                now_secs,
            ));
            let mut route = self.route(exchange.as_ref(), routing_key, message.headers());
            if own_key.is_none() {
                for key in sender_selected::extra_keys(message.headers()) {
                    self.route_into(exchange.as_ref(), key, message.headers(), &mut route);
                }
            }
            if reason != Reason::Rejected {
                let deaths = x_deaths(message.headers());
                route.queues.retain(|q| !is_cycle(&q.name, deaths));
            }
            self.enqueue(&route.queues, message);
            forget(&queued);
        }
    }
}

/// The message as it leaves for the dead-letter exchange: new exchange and
/// routing key, `x-death` updated, `expiration` removed (so it does not
/// expire again where it lands; its value is kept as `original-expiration`).
fn dead_lettered(
    content: &Message,
    queue: &str,
    reason: Reason,
    dlx: &str,
    routing_key: &str,
    keep_cc: bool,
    now_secs: u64,
) -> Message {
    let props = &content.properties;
    let mut headers: BTreeMap<ShortString, AMQPValue> = props
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let mut event: BTreeMap<ShortString, AMQPValue> = BTreeMap::new();
    event.insert("count".into(), AMQPValue::LongLongInt(1));
    event.insert("reason".into(), text(reason.as_str()));
    event.insert("queue".into(), text(queue));
    event.insert("time".into(), AMQPValue::Timestamp(now_secs));
    event.insert("exchange".into(), text(content.exchange.as_str()));
    event.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(original_routing_keys(content))),
    );
    if let Some(expiration) = props.expiration() {
        event.insert("original-expiration".into(), text(expiration.as_str()));
    }
    let deaths = match headers.get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => {
            // The same queue and reason again: that entry counts up and moves first.
            let (mut same, mut others): (Vec<AMQPValue>, Vec<AMQPValue>) = deaths
                .as_slice()
                .iter()
                .cloned()
                .partition(|d| death_is(d, queue, reason));
            let first = match same.first_mut() {
                Some(AMQPValue::FieldTable(old)) => {
                    let mut old = old.inner().clone();
                    let count = old.get("count").and_then(super::args::integer).unwrap_or(0);
                    old.insert("count".into(), AMQPValue::LongLongInt(count as i64 + 1));
                    AMQPValue::FieldTable(FieldTable::from(old))
                }
                _ => AMQPValue::FieldTable(FieldTable::from(event)),
            };
            others.insert(0, first);
            others
        }
        _ => {
            headers.insert("x-first-death-reason".into(), text(reason.as_str()));
            headers.insert("x-first-death-queue".into(), text(queue));
            headers.insert(
                "x-first-death-exchange".into(),
                text(content.exchange.as_str()),
            );
            vec![AMQPValue::FieldTable(FieldTable::from(event))]
        }
    };
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    if !keep_cc {
        headers.remove("CC");
    }
    let properties = without_expiration(props).with_headers(FieldTable::from(headers));
    Message {
        exchange: dlx.into(),
        routing_key: routing_key.into(),
        raw_header: encode_header(&properties, content.body.len() as u64),
        properties,
        body: content.body.clone(),
    }
}

/// The routing key the message was published with, plus its `CC` keys.
fn original_routing_keys(content: &Message) -> Vec<AMQPValue> {
    let mut keys = vec![AMQPValue::LongString(LongString::from(
        content.routing_key.as_str().as_bytes().to_vec(),
    ))];
    if let Some(AMQPValue::FieldArray(cc)) = content.headers().and_then(|h| h.inner().get("CC")) {
        keys.extend(cc.as_slice().iter().cloned());
    }
    keys
}

fn death_field(death: &AMQPValue, key: &str) -> Option<String> {
    match death {
        AMQPValue::FieldTable(t) => t.inner().get(key).and_then(super::args::text),
        _ => None,
    }
}

fn death_is(death: &AMQPValue, queue: &str, reason: Reason) -> bool {
    death_field(death, "queue").as_deref() == Some(queue)
        && death_field(death, "reason").as_deref() == Some(reason.as_str())
}

fn x_deaths(headers: Option<&FieldTable>) -> &[AMQPValue] {
    match headers.and_then(|h| h.inner().get("x-death")) {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice(),
        _ => &[],
    }
}

/// RabbitMQ's rule: a dead letter heading for a queue it already died in is a
/// cycle, and is dropped unless a client rejected it somewhere on the way
/// (only then can the loop end).
fn is_cycle(queue: &str, deaths: &[AMQPValue]) -> bool {
    let Some(pos) = deaths
        .iter()
        .position(|d| death_field(d, "queue").as_deref() == Some(queue))
    else {
        return false;
    };
    deaths[..=pos]
        .iter()
        .all(|d| death_field(d, "reason").as_deref() != Some(Reason::Rejected.as_str()))
}

/// The same properties minus `expiration` (amq-protocol has no way to unset one).
fn without_expiration(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}
