//! Where a published message goes: routing through an exchange (falling back
//! to its alternate exchange when nothing matches) and the hand-off to each
//! queue, which writes its own copy when it is durable. Clients'
//! publishes, dead letters and delayed messages all take this path; the
//! keys of `CC` and `BCC` headers route too (see [`sender_selected`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use amq_protocol::types::FieldTable;

use super::delayed;
use super::direct_reply;
use super::exchange::{Exchange, Route};
use super::message::Message;
use super::queue::{Enqueued, Queue};
use super::sender_selected;
use super::vhost::VHost;

/// What publishing one message did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Published {
    /// Some queue took it (or refused it for being full).
    pub routed: bool,
    /// It was written to disk, so its confirm waits for a flush.
    pub stored: bool,
    /// A full queue with `x-overflow: reject-publish` refused it: nack.
    pub rejected: bool,
}

impl VHost {
    /// Routes `message` (its own routing key and headers) and enqueues it,
    /// or holds it first when a delayed exchange is asked to delay it.
    pub fn publish(&self, exchange: Option<&Arc<Exchange>>, message: Arc<Message>) -> Published {
        if let Some(exchange) = exchange.filter(|e| e.options.delayed) {
            if let Some(delay) = delayed::delay_of(&message) {
                return self.delayed().hold(self, exchange, message, delay);
            }
        }
        self.publish_now(exchange, message)
    }

    /// Routes and enqueues without delay (also for held messages come due).
    pub fn publish_now(
        &self,
        exchange: Option<&Arc<Exchange>>,
        message: Arc<Message>,
    ) -> Published {
        if exchange.is_none() && direct_reply::is_reserved(message.routing_key.as_str()) {
            return self.publish_reply(message);
        }
        let mut route = self.route(exchange, message.routing_key.as_str(), message.headers());
        for key in sender_selected::extra_keys(message.headers()) {
            self.route_into(exchange, key, message.headers(), &mut route);
        }
        let message = sender_selected::without_bcc(message);
        // One relaxed add per publish; "published in" is their sum.
        let totals = &exchange.unwrap_or(self.default_exchange()).totals;
        let counter = if route.queues.is_empty() {
            &totals.unroutable
        } else {
            &totals.published_out
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.enqueue(&route.queues, message)
    }

    /// A reply to a direct reply-to name goes straight to the requesting
    /// channel, or nowhere when it is gone. Either way no queue took it, so
    /// it is not `routed`: as in RabbitMQ 3.10, a `mandatory` reply is
    /// returned to its publisher even when it was delivered. (The metrics
    /// still count a delivered reply as published out.)
    fn publish_reply(&self, message: Arc<Message>) -> Published {
        let delivered = self
            .replies()
            .deliver(message.routing_key.as_str(), &message);
        let totals = &self.default_exchange().totals;
        let counter = if delivered {
            &totals.published_out
        } else {
            &totals.unroutable
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Published::default()
    }

    /// The queues a message reaches. `None` is the default exchange, which
    /// routes by queue name. An exchange that routes nowhere passes the
    /// message to its `alternate-exchange`, and so on down the chain.
    pub fn route(
        &self,
        exchange: Option<&Arc<Exchange>>,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> Route {
        let mut route = Route::default();
        self.route_into(exchange, routing_key, headers, &mut route);
        route
    }

    /// Adds the queues `routing_key` reaches to `route` (each queue once).
    pub(super) fn route_into(
        &self,
        exchange: Option<&Arc<Exchange>>,
        routing_key: &str,
        headers: Option<&FieldTable>,
        route: &mut Route,
    ) {
        match exchange {
            None => {
                if let Some(queue) = self.queue_for_publish(routing_key) {
                    route.add(&queue);
                }
            }
            Some(x) => x.route(routing_key, headers, route, &|name| {
                self.exchange(name).ok()
            }),
        }
    }

    /// Hands a routed message to its queues; each durable one writes its own
    /// copy of a persistent message (so no copy outlives its queue's entry).
    pub fn enqueue(&self, queues: &[Arc<Queue>], message: Arc<Message>) -> Published {
        if queues.is_empty() {
            return Published::default();
        }
        let persistent = message.is_persistent();
        let mut outcome = Published {
            routed: true,
            ..Published::default()
        };
        for queue in queues {
            let enqueued = queue.publish(message.clone());
            outcome.rejected |= enqueued == Enqueued::Rejected;
            outcome.stored |= persistent && queue.is_durable_store();
        }
        outcome
    }
}
