//! Delayed messages: the `x-delayed-message` exchange type of RabbitMQ's
//! delayed-message-exchange plugin.
//!
//! Such an exchange routes by the rules of its `x-delayed-type` (direct,
//! fanout, topic or headers). A message published to it with a positive
//! `x-delay` header (milliseconds) is not routed at once: it waits here, in
//! its vhost's holding area, and is routed when the delay has passed, against
//! the bindings that exist then. Messages without the header, or with a delay
//! of zero or less, route at once like any other.
//!
//! The holding area is one ordered map per vhost (due time, then arrival), so
//! the timer thread needs a single wake-up for the earliest message rather
//! than one per message. Persistent messages held for a durable exchange are
//! also written to the store's `delayed` tree, so they outlive a restart (the
//! publisher confirm waits for that write to reach disk); everything else is
//! held in memory only, as in the plugin.
//!
//! As in the plugin, a held message counts as routed: `mandatory` returns are
//! not sent for it, whatever happens when it comes due.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;

use super::args;
use super::exchange::{Exchange, ExchangeKind};
use super::message::Message;
use super::publish::Published;
use super::records;
use super::timers::{deadline_after, Timed, Timers};
use super::vhost::VHost;
use crate::error::{AmqpError, AmqpResult};
use crate::store::StoreError;

/// The declared exchange type.
pub const EXCHANGE_TYPE: &str = "x-delayed-message";
/// The declare argument naming the routing rules.
const TYPE_ARGUMENT: &str = "x-delayed-type";
/// The message header holding the delay in milliseconds.
const DELAY_HEADER: &str = "x-delay";

/// The routing kind a delayed exchange's arguments ask for; anything but one
/// of the four built-in types is refused (406), with the plugin's text.
pub fn routing_kind(arguments: &FieldTable) -> AmqpResult<ExchangeKind> {
    arguments
        .inner()
        .get(TYPE_ARGUMENT)
        .and_then(args::text)
        .and_then(|name| ExchangeKind::parse(&name))
        .ok_or_else(|| {
            AmqpError::precondition(
                "Invalid argument, 'x-delayed-type' must be an existing exchange type",
            )
        })
}

/// The message's positive `x-delay` in milliseconds (any integer width);
/// `None` when it should route at once.
pub fn delay_of(message: &Message) -> Option<u64> {
    let delay = args::integer(message.headers()?.inner().get(DELAY_HEADER)?)?;
    (delay > 0).then(|| u64::try_from(delay).unwrap_or(u64::MAX))
}

/// A delayed message found on disk, with the key it is stored under.
pub struct DelayedRecord {
    pub vhost: String,
    pub exchange: String,
    pub due_ms: u64,
    pub id: u64,
    pub message: Message,
}

impl DelayedRecord {
    /// Every held message in the store, in due order.
    pub fn read_all(store: &crate::store::Store) -> Result<Vec<DelayedRecord>, StoreError> {
        let mut out = Vec::new();
        for (due_ms, id, record) in store.delayed_records()? {
            let (vhost, exchange, message) =
                records::decode_delayed(record).ok_or_else(|| StoreError::Corrupt {
                    dir: "(data dir)".into(),
                    detail: "malformed delayed message".into(),
                })?;
            out.push(DelayedRecord {
                vhost,
                exchange,
                due_ms,
                id,
                message,
            });
        }
        Ok(out)
    }
}

/// A held message is gone from memory; its copy on disk goes too. If that
/// fails it is routed again after a restart: a duplicate, never a loss.
fn release(store: &crate::store::Store, due_ms: u64, id: u64) {
    if let Err(error) = store.release_delayed(due_ms, id) {
        tracing::warn!(%error, "could not forget a delivered delayed message");
    }
}

/// A message waiting for its due time.
struct Held {
    /// The exchange it was published to; if that is deleted meanwhile, the
    /// message goes with it.
    exchange: Arc<Exchange>,
    message: Arc<Message>,
    /// Its id in the store's `delayed` tree, when it was written there.
    disk: Option<u64>,
}

#[derive(Default)]
struct State {
    /// (due ms, arrival) → message: due order, publish order among equals.
    pending: BTreeMap<(u64, u64), Held>,
    next_arrival: u64,
    /// The earliest wake-up registered with the timer thread that has not
    /// fired yet. Later ones may also be registered (they fire harmlessly).
    armed: Option<u64>,
}

/// One vhost's held messages.
pub struct Delayed {
    vhost: Weak<VHost>,
    timers: Arc<Timers>,
    me: Weak<Delayed>,
    state: Mutex<State>,
}

impl Delayed {
    pub fn new(vhost: Weak<VHost>, timers: Arc<Timers>) -> Arc<Delayed> {
        Arc::new_cyclic(|me| Delayed {
            vhost,
            timers,
            me: me.clone(),
            state: Mutex::new(State::default()),
        })
    }

    /// Holds `message`, published to the delayed `exchange`, for `delay_ms`.
    pub fn hold(
        &self,
        vhost: &VHost,
        exchange: &Arc<Exchange>,
        message: Arc<Message>,
        delay_ms: u64,
    ) -> Published {
        let due = deadline_after(delay_ms);
        let disk = match vhost.store() {
            Some(store) if exchange.options.durable && message.is_persistent() => {
                let record = records::encode_delayed(&vhost.name, &exchange.name, &message);
                match store.hold_delayed(due, &record) {
                    Ok(id) => Some(id),
                    // Not held: the publisher gets a nack.
                    Err(_) => {
                        return Published {
                            routed: true,
                            stored: false,
                            rejected: true,
                        }
                    }
                }
            }
            _ => None,
        };
        self.insert(due, exchange.clone(), message, disk);
        Published {
            routed: true,
            stored: disk.is_some(),
            rejected: false,
        }
    }

    fn insert(&self, due: u64, exchange: Arc<Exchange>, message: Arc<Message>, disk: Option<u64>) {
        let mut state = self.state.lock();
        let arrival = state.next_arrival;
        state.next_arrival += 1;
        state.pending.insert(
            (due, arrival),
            Held {
                exchange,
                message,
                disk,
            },
        );
        if state.armed.is_none_or(|at| due < at) {
            state.armed = Some(due);
            self.timers.schedule(due, self.me.clone());
        }
    }

    /// Drops what `exchange` holds (it is being deleted), from disk too.
    pub fn drop_exchange(&self, vhost: &VHost, exchange: &Arc<Exchange>) {
        let mut dropped = Vec::new();
        self.state.lock().pending.retain(|&(due, _), held| {
            let mine = Arc::ptr_eq(&held.exchange, exchange);
            if mine {
                dropped.extend(held.disk.map(|id| (due, id)));
            }
            !mine
        });
        if let Some(store) = vhost.store() {
            for (due, id) in dropped {
                release(store, due, id);
            }
        }
    }

    /// Takes back what a restart found on disk. Runs after bindings are
    /// restored, so messages already due route correctly at the first tick.
    /// Records of exchanges that no longer exist (or are no longer delayed)
    /// are deleted.
    pub fn restore(&self, vhost: &VHost, records: Vec<DelayedRecord>) {
        for record in records {
            match vhost.exchange(&record.exchange) {
                Ok(exchange) if exchange.options.delayed => self.insert(
                    record.due_ms,
                    exchange,
                    Arc::new(record.message),
                    Some(record.id),
                ),
                _ => {
                    tracing::warn!(exchange = %record.exchange, "dropping a delayed message whose exchange is gone");
                    if let Some(store) = vhost.store() {
                        release(store, record.due_ms, record.id);
                    }
                }
            }
        }
    }

    /// How many messages are waiting.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().pending.len()
    }
}

impl Timed for Delayed {
    fn fire(&self, now_ms: u64) {
        let due = {
            let mut state = self.state.lock();
            let later = state.pending.split_off(&(now_ms.saturating_add(1), 0));
            let due = std::mem::replace(&mut state.pending, later);
            // A wake-up for a later deadline still pending covers the rest;
            // otherwise this was it and the next one is registered now.
            if state.armed.is_none_or(|at| at <= now_ms) {
                state.armed = state.pending.keys().next().map(|&(at, _)| at);
                if let Some(at) = state.armed {
                    self.timers.schedule(at, self.me.clone());
                }
            }
            due
        };
        if due.is_empty() {
            return;
        }
        let Some(vhost) = self.vhost.upgrade() else {
            return;
        };
        for ((due_ms, _), held) in due {
            if !held.exchange.is_deleted() {
                vhost.publish_now(Some(&held.exchange), held.message);
            }
            // After the enqueue wrote its own copy: a crash in between
            // delivers twice rather than never.
            if let (Some(id), Some(store)) = (held.disk, vhost.store()) {
                release(store, due_ms, id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::timers::now_ms;
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol::types::AMQPValue;

    fn message_with(headers: Option<FieldTable>) -> Message {
        let mut properties = BasicProperties::default();
        if let Some(h) = headers {
            properties = properties.with_headers(h);
        }
        Message {
            exchange: "x".into(),
            routing_key: "k".into(),
            properties,
            raw_header: Default::default(),
            body: Default::default(),
        }
    }

    fn delay(value: AMQPValue) -> Option<u64> {
        let mut headers = FieldTable::default();
        headers.insert(DELAY_HEADER.into(), value);
        delay_of(&message_with(Some(headers)))
    }

    #[test]
    fn delay_header_of_any_integer_width() {
        assert_eq!(delay(AMQPValue::ShortShortInt(5)), Some(5));
        assert_eq!(delay(AMQPValue::ShortUInt(500)), Some(500));
        assert_eq!(delay(AMQPValue::LongInt(1500)), Some(1500));
        assert_eq!(delay(AMQPValue::LongLongInt(1 << 40)), Some(1 << 40));
        assert_eq!(delay(AMQPValue::LongInt(0)), None);
        assert_eq!(delay(AMQPValue::LongInt(-10)), None);
        assert_eq!(delay(AMQPValue::LongString("500".into())), None);
        assert_eq!(delay_of(&message_with(None)), None);
    }

    #[test]
    fn delayed_type_must_be_a_builtin_type() {
        let with = |value: &str| {
            let mut arguments = FieldTable::default();
            arguments.insert(TYPE_ARGUMENT.into(), AMQPValue::LongString(value.into()));
            routing_kind(&arguments)
        };
        assert_eq!(with("topic").ok(), Some(ExchangeKind::Topic));
        assert!(with("x-delayed-message").is_err());
        assert!(with("bogus").is_err());
        assert!(routing_kind(&FieldTable::default()).is_err());
    }

    #[test]
    fn one_wake_up_for_many_messages() {
        let timers = Timers::start();
        let delayed = Delayed::new(Weak::new(), timers);
        let exchange = Arc::new(Exchange::new(
            "x".into(),
            crate::model::exchange::ExchangeOptions {
                kind: ExchangeKind::Direct,
                delayed: true,
                durable: false,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::default(),
            },
        ));
        let far = now_ms() + 60_000;
        for i in 0..100 {
            delayed.insert(
                far + i,
                exchange.clone(),
                Arc::new(message_with(None)),
                None,
            );
        }
        assert_eq!(delayed.state.lock().armed, Some(far));
        // A stale fire before the deadline delivers nothing and keeps the arm.
        delayed.fire(far - 1);
        assert_eq!(delayed.len(), 100);
        assert_eq!(delayed.state.lock().armed, Some(far));
        // Firing at the deadline takes the due ones and arms the next.
        delayed.fire(far + 9);
        assert_eq!(delayed.len(), 90);
        assert_eq!(delayed.state.lock().armed, Some(far + 10));
    }

    #[test]
    fn deleting_the_exchange_forgets_its_messages_on_disk() {
        use crate::model::vhost::ExchangeDeclare;
        use crate::store::Store;
        let dir = std::env::temp_dir().join(format!(
            "hare-delayed-unit-{}-{}",
            std::process::id(),
            now_ms()
        ));
        let store = Store::open(&dir, 1 << 20).expect("open a store");
        let vhost = VHost::new("/", Some(store.clone()), Timers::start());
        let mut arguments = FieldTable::default();
        arguments.insert(TYPE_ARGUMENT.into(), AMQPValue::LongString("direct".into()));
        vhost
            .declare_exchange(&ExchangeDeclare {
                name: "dx",
                kind: EXCHANGE_TYPE,
                passive: false,
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: &arguments,
            })
            .expect("declare");
        let exchange = vhost.exchange("dx").expect("declared");
        let mut headers = FieldTable::default();
        headers.insert(DELAY_HEADER.into(), AMQPValue::LongInt(60_000));
        let mut message = message_with(Some(headers));
        message.properties = message.properties.with_delivery_mode(2);
        let published = vhost.publish(Some(&exchange), Arc::new(message));
        assert!(published.routed && published.stored);
        assert_eq!(store.delayed_len(), 1);
        assert_eq!(vhost.delayed().len(), 1);
        vhost.delete_exchange("dx", false).expect("delete");
        assert_eq!(store.delayed_len(), 0);
        assert_eq!(vhost.delayed().len(), 0);
        store.close();
        drop((vhost, store));
        let _ = std::fs::remove_dir_all(dir);
    }
}
