//! Exchanges and their routing tables.
//!
//! Bindings change rarely and publishes are constant, so each exchange keeps its
//! bindings precompiled for its type: a hash index for direct, compiled patterns
//! for topic, parsed rules for headers. Routing takes only this exchange's read lock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use amq_protocol::types::FieldTable;
use parking_lot::RwLock;

use super::headers::HeadersRule;
use super::queue::Queue;
use super::topic::{split_key, TopicPattern};
use crate::error::AmqpResult;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// What a binding points at: a queue, or another exchange (exchange.bind).
#[derive(Clone)]
pub enum Destination {
    Queue(Arc<Queue>),
    Exchange(Arc<Exchange>),
}

impl Destination {
    /// Whether the destination outlives a restart, so bindings to it are stored.
    pub fn is_durable(&self) -> bool {
        match self {
            Destination::Queue(q) => q.is_durable_store(),
            Destination::Exchange(e) => e.options.durable,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(q) => &q.name,
            Destination::Exchange(e) => &e.name,
        }
    }

    pub fn same_as(&self, other: &Destination) -> bool {
        match (self, other) {
            (Destination::Queue(a), Destination::Queue(b)) => Arc::ptr_eq(a, b),
            (Destination::Exchange(a), Destination::Exchange(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// How a binding decides, compiled from its key and arguments.
#[derive(Clone)]
enum Matcher {
    Exact,
    Everything,
    Topic(TopicPattern),
    Headers(HeadersRule),
}

#[derive(Clone)]
struct Binding {
    destination: Destination,
    key: String,
    arguments: FieldTable,
    matcher: Matcher,
}

#[derive(Default)]
struct BindingTable {
    all: Vec<Binding>,
    /// Direct exchanges only: routing key → destinations.
    by_key: HashMap<String, Vec<Destination>>,
}

/// Declared properties of an exchange, compared on redeclare.
#[derive(Clone, Debug, PartialEq)]
pub struct ExchangeOptions {
    /// How it routes. For a delayed exchange this is its `x-delayed-type`.
    pub kind: ExchangeKind,
    /// Declared as `x-delayed-message`: messages with a positive `x-delay`
    /// wait in the vhost's holding area before being routed by `kind`.
    pub delayed: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

pub struct Exchange {
    pub name: String,
    pub options: ExchangeOptions,
    bindings: RwLock<BindingTable>,
    deleted: AtomicBool,
    pub totals: ExchangeTotals,
}

/// Messages through an exchange, for metrics (relaxed counters: exact
/// totals, no ordering needed). Messages published in = out + unroutable.
#[derive(Default)]
pub struct ExchangeTotals {
    /// Routed on to at least one queue.
    pub published_out: AtomicU64,
    /// Routed nowhere.
    pub unroutable: AtomicU64,
}

/// Queues a message reaches, each once, however many bindings lead there.
#[derive(Default)]
pub struct Route {
    pub queues: Vec<Arc<Queue>>,
}

impl Route {
    pub fn add(&mut self, queue: &Arc<Queue>) {
        if !self.queues.iter().any(|q| Arc::ptr_eq(q, queue)) {
            self.queues.push(queue.clone());
        }
    }
}

impl ExchangeOptions {
    /// The type the client declared (what redeclares compare and the store keeps).
    pub fn type_name(&self) -> &'static str {
        if self.delayed {
            super::delayed::EXCHANGE_TYPE
        } else {
            self.kind.as_str()
        }
    }
}

impl Exchange {
    pub fn new(name: String, options: ExchangeOptions) -> Self {
        Exchange {
            name,
            options,
            bindings: RwLock::new(BindingTable::default()),
            deleted: AtomicBool::new(false),
            totals: ExchangeTotals::default(),
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
    }

    fn compile(&self, key: &str, arguments: &FieldTable) -> AmqpResult<Matcher> {
        Ok(match self.options.kind {
            ExchangeKind::Direct => Matcher::Exact,
            ExchangeKind::Fanout => Matcher::Everything,
            ExchangeKind::Topic => Matcher::Topic(TopicPattern::compile(key)),
            ExchangeKind::Headers => Matcher::Headers(HeadersRule::compile(arguments)?),
        })
    }

    /// Adds a binding; binding the same (destination, key, arguments) twice is a no-op.
    pub fn bind(
        &self,
        destination: Destination,
        key: &str,
        arguments: &FieldTable,
    ) -> AmqpResult<()> {
        let matcher = self.compile(key, arguments)?;
        let mut table = self.bindings.write();
        if table.all.iter().any(|b| {
            b.destination.same_as(&destination) && b.key == key && &b.arguments == arguments
        }) {
            return Ok(());
        }
        if self.options.kind == ExchangeKind::Direct {
            table
                .by_key
                .entry(key.to_owned())
                .or_default()
                .push(destination.clone());
        }
        table.all.push(Binding {
            destination,
            key: key.to_owned(),
            arguments: arguments.clone(),
            matcher,
        });
        Ok(())
    }

    /// Removes matching bindings; `arguments: None` removes every key match
    /// (used when the destination itself goes away). Returns whether any existed.
    pub fn unbind(
        &self,
        destination: &Destination,
        key: Option<&str>,
        arguments: Option<&FieldTable>,
    ) -> bool {
        let mut table = self.bindings.write();
        let before = table.all.len();
        table.all.retain(|b| {
            !(b.destination.same_as(destination)
                && key.is_none_or(|k| b.key == k)
                && arguments.is_none_or(|a| &b.arguments == a))
        });
        let removed = table.all.len() != before;
        if removed && self.options.kind == ExchangeKind::Direct {
            let mut by_key: HashMap<String, Vec<Destination>> = HashMap::new();
            for b in &table.all {
                by_key
                    .entry(b.key.clone())
                    .or_default()
                    .push(b.destination.clone());
            }
            table.by_key = by_key;
        }
        removed
    }

    /// Every binding of this exchange: (destination, routing key, arguments).
    pub fn bindings(&self) -> Vec<(Destination, String, FieldTable)> {
        self.bindings
            .read()
            .all
            .iter()
            .map(|b| (b.destination.clone(), b.key.clone(), b.arguments.clone()))
            .collect()
    }

    pub fn has_bindings(&self) -> bool {
        !self.bindings.read().all.is_empty()
    }

    /// Collects the queues a message with this key and these headers reaches.
    /// Every exchange on the way whose own bindings match nothing passes the
    /// message to its `alternate-exchange` (looked up with `alternates`), as
    /// in RabbitMQ: one that forwarded it to another exchange did route it,
    /// even if nothing downstream takes it.
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        route: &mut Route,
        alternates: &dyn Fn(&str) -> Option<Arc<Exchange>>,
    ) {
        let hop = Hop {
            routing_key,
            headers,
            alternates,
        };
        let mut onward: VecDeque<Arc<Exchange>> = self.route_hop(&hop, route).into();
        if onward.is_empty() {
            return;
        }
        // Each exchange routes a message once, however many paths lead to it
        // (cycles included), and at any depth: a walk, not a recursion, so a
        // chain of thousands of exchanges cannot exhaust the stack.
        let mut visited: HashSet<*const Exchange> = HashSet::from([self as *const Exchange]);
        while let Some(exchange) = onward.pop_front() {
            if exchange.is_deleted() || !visited.insert(Arc::as_ptr(&exchange)) {
                continue;
            }
            onward.extend(exchange.route_hop(&hop, route));
        }
    }

    /// The `alternate-exchange` argument, read only when nothing matched.
    fn alternate(&self) -> Option<String> {
        self.options
            .arguments
            .inner()
            .get("alternate-exchange")
            .and_then(super::args::text)
    }

    /// Routes by this exchange's own bindings; returns the exchanges the
    /// message goes on to (bound ones, or the alternate when nothing matched).
    fn route_hop(&self, hop: &Hop<'_>, route: &mut Route) -> Vec<Arc<Exchange>> {
        let (routing_key, headers) = (hop.routing_key, hop.headers);
        let mut onward: Vec<Arc<Exchange>> = Vec::new();
        let mut matched = false;
        {
            let table = self.bindings.read();
            let mut take = |d: &Destination| {
                matched = true;
                match d {
                    Destination::Queue(q) => route.add(q),
                    Destination::Exchange(e) => onward.push(e.clone()),
                }
            };
            match self.options.kind {
                ExchangeKind::Direct => {
                    if let Some(dests) = table.by_key.get(routing_key) {
                        dests.iter().for_each(&mut take);
                    }
                }
                ExchangeKind::Fanout => table.all.iter().for_each(|b| take(&b.destination)),
                ExchangeKind::Topic => {
                    let words = split_key(routing_key);
                    for b in &table.all {
                        if let Matcher::Topic(p) = &b.matcher {
                            if p.matches(&words) {
                                take(&b.destination);
                            }
                        }
                    }
                }
                ExchangeKind::Headers => {
                    for b in &table.all {
                        if let Matcher::Headers(rule) = &b.matcher {
                            if rule.matches(headers) {
                                take(&b.destination);
                            }
                        }
                    }
                }
            }
        }
        if !matched {
            onward.extend(self.alternate().and_then(|name| (hop.alternates)(&name)));
        }
        onward
    }
}

/// What stays the same across one message's hops.
struct Hop<'a> {
    routing_key: &'a str,
    headers: Option<&'a FieldTable>,
    alternates: &'a dyn Fn(&str) -> Option<Arc<Exchange>>,
}
