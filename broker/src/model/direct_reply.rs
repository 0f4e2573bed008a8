//! Direct reply-to (RabbitMQ's `amq.rabbitmq.reply-to`): replies that reach
//! a requesting channel without any queue.
//!
//! A requester consumes the pseudo-queue [`PSEUDO_QUEUE`]; the protocol layer
//! then registers the channel here and gets back a private reply name,
//! `amq.rabbitmq.reply-to.<token>`, which it writes into the `reply_to` of the
//! requests that channel publishes. A reply published to the default exchange
//! with that name as routing key is handed straight to the channel's sink.
//!
//! The token is random (132 bits), so a name can only be learnt from a
//! request, never guessed; it names one registration, so it dies with the
//! reply consumer (cancel, channel or connection close) and is never reused.
//!
//! The routes are per vhost and sharded by token: replies to different
//! requesters take different locks, and publishes to ordinary queues never
//! look here at all.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use super::message::Message;
use super::vhost::generated_name;

/// The queue name a requester consumes from, and the `reply_to` value that
/// asks the broker for a private reply name.
pub const PSEUDO_QUEUE: &str = "amq.rabbitmq.reply-to";

/// What every private reply name starts with.
const NAME_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// Power of two, so a token's first byte picks its shard with a mask.
const SHARDS: usize = 16;

/// Where replies for one requester go: the protocol layer's channel.
pub trait ReplySink: Send + Sync {
    /// Hands one reply to the reply consumer. Called on the replying
    /// publisher's task, so it must queue the delivery and return, never wait
    /// for the requester's socket. A reply the sink cannot take (its consumer
    /// just went away) is dropped, as RabbitMQ drops it.
    fn deliver_reply(&self, message: &Arc<Message>);
}

/// Tokens to their requesters. Weak, so a route never keeps a closed
/// channel alive, whatever happens to its unregistering.
type Shard = RwLock<HashMap<Box<str>, Weak<dyn ReplySink>>>;

/// The live reply names of one vhost.
pub struct ReplyRoutes {
    shards: [Shard; SHARDS],
}

impl Default for ReplyRoutes {
    fn default() -> Self {
        ReplyRoutes {
            shards: std::array::from_fn(|_| RwLock::new(HashMap::new())),
        }
    }
}

/// Whether a queue name belongs to direct reply-to: the pseudo-queue itself
/// or anything under it (a private name, live or not). Such names are never
/// real queues.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(PSEUDO_QUEUE)
}

/// The token of a private reply name, if `name` has the shape of one.
fn token_of(name: &str) -> Option<&str> {
    name.strip_prefix(NAME_PREFIX).filter(|t| !t.is_empty())
}

impl ReplyRoutes {
    fn shard(&self, token: &str) -> &Shard {
        // Tokens are random, so their first byte spreads them evenly; a name
        // made up by a client only picks which shard reports it unknown.
        &self.shards[token.as_bytes()[0] as usize & (SHARDS - 1)]
    }

    /// Registers a requester and returns its private reply name.
    pub fn register(&self, sink: Weak<dyn ReplySink>) -> String {
        loop {
            let token = generated_name("");
            let mut shard = self.shard(&token).write();
            if !shard.contains_key(token.as_str()) {
                shard.insert(token.as_str().into(), sink);
                return format!("{NAME_PREFIX}{token}");
            }
        }
    }

    /// Forgets a reply name: replies to it are dropped from now on.
    pub fn unregister(&self, name: &str) {
        if let Some(token) = token_of(name) {
            self.shard(token).write().remove(token);
        }
    }

    /// Whether `name` is a private reply name whose requester still listens.
    pub fn is_live(&self, name: &str) -> bool {
        self.sink(name).is_some()
    }

    fn sink(&self, name: &str) -> Option<Arc<dyn ReplySink>> {
        let token = token_of(name)?;
        self.shard(token).read().get(token)?.upgrade()
    }

    /// Delivers a reply published to the default exchange with a private
    /// reply name as routing key. Returns false when nobody listens on it
    /// (it never did, or its requester is gone); the reply is then dropped.
    pub fn deliver(&self, name: &str, message: &Arc<Message>) -> bool {
        // The shard lock is released before the sink runs.
        match self.sink(name) {
            Some(sink) => {
                sink.deliver_reply(message);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Inbox(Mutex<Vec<String>>);

    impl ReplySink for Inbox {
        fn deliver_reply(&self, message: &Arc<Message>) {
            self.0.lock().push(message.routing_key.to_string());
        }
    }

    fn reply(to: &str) -> Arc<Message> {
        Arc::new(Message {
            exchange: "".into(),
            routing_key: to.into(),
            properties: Default::default(),
            raw_header: Default::default(),
            body: Default::default(),
        })
    }

    #[test]
    fn a_name_reaches_its_sink_until_unregistered() {
        let routes = ReplyRoutes::default();
        let inbox = Arc::new(Inbox::default());
        let weak = Arc::downgrade(&inbox);
        let name = routes.register(weak);
        assert!(name.starts_with(NAME_PREFIX) && name.len() > NAME_PREFIX.len() + 16);
        assert!(routes.is_live(&name) && is_reserved(&name));
        assert!(routes.deliver(&name, &reply(&name)));
        routes.unregister(&name);
        assert!(!routes.is_live(&name));
        assert!(!routes.deliver(&name, &reply(&name)));
        assert_eq!(inbox.0.lock().len(), 1);
    }

    #[test]
    fn names_are_distinct_and_made_up_ones_are_unknown() {
        let routes = ReplyRoutes::default();
        let inbox = Arc::new(Inbox::default());
        let a = routes.register(Arc::downgrade(&inbox) as Weak<dyn ReplySink>);
        let b = routes.register(Arc::downgrade(&inbox) as Weak<dyn ReplySink>);
        assert_ne!(a, b);
        for made_up in [PSEUDO_QUEUE, NAME_PREFIX, "amq.rabbitmq.reply-to.x", "q"] {
            assert!(!routes.is_live(made_up), "{made_up}");
            assert!(!routes.deliver(made_up, &reply(made_up)));
        }
    }

    #[test]
    fn a_dropped_sink_is_not_live() {
        let routes = ReplyRoutes::default();
        let inbox = Arc::new(Inbox::default());
        let name = routes.register(Arc::downgrade(&inbox) as Weak<dyn ReplySink>);
        drop(inbox);
        assert!(!routes.is_live(&name));
    }
}
