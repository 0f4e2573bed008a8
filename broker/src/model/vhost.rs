//! A virtual host: the namespace of exchanges and queues, and the rules for
//! declaring, binding and deleting them (RabbitMQ's checks and texts).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use amq_protocol::types::FieldTable;
use parking_lot::RwLock;

use super::args;
use super::delayed::{self, Delayed, DelayedRecord};
use super::direct_reply::ReplyRoutes;
use super::exchange::{Destination, Exchange, ExchangeKind, ExchangeOptions};
use super::queue::{Queue, QueueCounts, QueueOptions, QueueSpec};
use super::queue_args::{self, QueueArgs, QueueType};
use super::records::{
    self, binding_record, encode_json, BindingRecord, ExchangeRecord, QueueRecord,
};
use super::timers::Timers;
use crate::error::{code, AmqpError, AmqpResult};
use crate::store::{Store, StoreError};

/// Exchanges every vhost has, which clients may use but not delete or redefine.
const PREDECLARED: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

/// Queue arguments whose values must match on redeclare (others are
/// ignored, as in RabbitMQ), per type of the existing queue, in the order
/// RabbitMQ 3.10 compares them (which decides the one a mismatch names).
/// A quorum queue ignores classic-only arguments on a redeclare and the
/// other way round. `x-queue-type` is compared by meaning: absent and
/// `classic` are the same type.
const COMPARED_CLASSIC_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-single-active-consumer",
    "x-queue-type",
    "x-queue-master-locator",
];

const COMPARED_QUORUM_ARGS: &[&str] = &[
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-overflow",
    "x-single-active-consumer",
    "x-queue-type",
    "x-quorum-initial-group-size",
    "x-delivery-limit",
    "x-message-ttl",
    "x-queue-leader-locator",
];

/// The queue type an argument table names, for redeclare equivalence:
/// no `x-queue-type` is a classic queue; `None` for a non-text value.
fn type_name(arguments: &FieldTable) -> Option<String> {
    match arguments.inner().get("x-queue-type") {
        None => Some("classic".to_owned()),
        Some(v) => args::text(v),
    }
}

/// What a restart found on disk for one vhost.
#[derive(Default)]
pub struct RecoveredVHost {
    pub exchanges: Vec<ExchangeRecord>,
    pub queues: Vec<QueueRecord>,
    pub bindings: Vec<BindingRecord>,
    pub delayed: Vec<DelayedRecord>,
}

/// A durable change the store could not write: RabbitMQ's internal error,
/// which ends the connection. Nothing was changed.
pub fn storage_error(error: StoreError) -> AmqpError {
    AmqpError::connection(
        code::INTERNAL_ERROR,
        format!("could not write to the data dir: {error}"),
    )
}

pub struct VHost {
    pub name: String,
    exchanges: RwLock<HashMap<String, Arc<Exchange>>>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    /// Where durable definitions and messages go; `None` keeps everything in memory.
    store: Option<Arc<Store>>,
    timers: Arc<Timers>,
    /// Messages that delayed exchanges hold until they are due.
    delayed: Arc<Delayed>,
    /// Queues hold this to dead-letter into their vhost and to delete themselves.
    me: Weak<VHost>,
    /// The nameless exchange, kept at hand: most publishes go to it.
    default_exchange: Arc<Exchange>,
    /// Direct reply-to: private reply names and the channels they reach.
    replies: ReplyRoutes,
}

/// A queue.declare request.
pub struct QueueDeclare<'a> {
    pub name: &'a str,
    pub passive: bool,
    pub options: QueueOptions,
    /// The declaring connection (exclusive queues belong to it).
    pub connection: u64,
}

/// An exchange.declare request.
pub struct ExchangeDeclare<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: &'a FieldTable,
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

impl VHost {
    pub fn new(name: &str, store: Option<Arc<Store>>, timers: Arc<Timers>) -> Arc<Self> {
        let vhost = Arc::new_cyclic(|me| VHost {
            name: name.to_owned(),
            exchanges: RwLock::new(HashMap::new()),
            queues: RwLock::new(HashMap::new()),
            store,
            delayed: Delayed::new(me.clone(), timers.clone()),
            timers,
            me: me.clone(),
            default_exchange: system_exchange("", ExchangeKind::Direct),
            replies: ReplyRoutes::default(),
        });
        for (ex_name, kind) in PREDECLARED {
            let exchange = if ex_name.is_empty() {
                vhost.default_exchange.clone()
            } else {
                system_exchange(ex_name, *kind)
            };
            vhost
                .exchanges
                .write()
                .insert((*ex_name).to_owned(), exchange);
        }
        vhost
    }

    /// Direct reply-to's routes from reply names to requesting channels.
    pub fn replies(&self) -> &ReplyRoutes {
        &self.replies
    }

    pub(crate) fn default_exchange(&self) -> &Arc<Exchange> {
        &self.default_exchange
    }

    /// Every queue, at this moment (for metrics).
    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    /// Every exchange, at this moment (for metrics).
    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    pub(crate) fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    pub(crate) fn delayed(&self) -> &Arc<Delayed> {
        &self.delayed
    }

    fn no_exchange(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no exchange '{name}' in vhost '{}'", self.name))
    }

    fn no_queue(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no queue '{name}' in vhost '{}'", self.name))
    }

    pub fn exchange(&self, name: &str) -> AmqpResult<Arc<Exchange>> {
        self.exchanges
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_exchange(name))
    }

    /// Looks a queue up; exclusive queues of other connections are locked (405).
    pub fn queue(&self, name: &str, connection: u64) -> AmqpResult<Arc<Queue>> {
        let queue = self
            .queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_queue(name))?;
        self.check_owner(&queue, connection)?;
        Ok(queue)
    }

    /// Looks a queue up for publishing: the default exchange routes by queue name,
    /// and publishing to another connection's exclusive queue is allowed.
    pub fn queue_for_publish(&self, name: &str) -> Option<Arc<Queue>> {
        self.queues.read().get(name).cloned()
    }

    fn check_owner(&self, queue: &Queue, connection: u64) -> AmqpResult<()> {
        match queue.owner {
            Some(owner) if owner != connection => Err(self.locked(queue)),
            _ => Ok(()),
        }
    }

    fn locked(&self, queue: &Queue) -> AmqpError {
        AmqpError::locked(format!(
            "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            queue.name, self.name
        ))
    }

    pub fn declare_exchange(&self, req: &ExchangeDeclare<'_>) -> AmqpResult<()> {
        if req.name.is_empty() {
            // Even a passive declare of the default exchange is refused, as in RabbitMQ.
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if req.passive {
            self.exchange(req.name)?;
            return Ok(());
        }
        let (kind, delayed) = match ExchangeKind::parse(req.kind) {
            Some(kind) => (kind, false),
            // A delayed exchange routes by the type its arguments name.
            None if req.kind == delayed::EXCHANGE_TYPE => {
                (delayed::routing_kind(req.arguments)?, true)
            }
            None => {
                return Err(AmqpError::connection(
                    code::COMMAND_INVALID,
                    format!("unknown exchange type '{}'", req.kind),
                ))
            }
        };
        let wanted = ExchangeOptions {
            kind,
            delayed,
            durable: req.durable,
            auto_delete: req.auto_delete,
            internal: req.internal,
            arguments: req.arguments.clone(),
        };
        let mut exchanges = self.exchanges.write();
        if let Some(existing) = exchanges.get(req.name) {
            return self.check_exchange_equivalent(existing, &wanted);
        }
        if req.name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                req.name
            )));
        }
        queue_args::check_exchange_args(req.kind, req.arguments, req.name, &self.name)?;
        if let (Some(store), true) = (&self.store, wanted.durable) {
            let record = ExchangeRecord::new(&self.name, req.name, &wanted);
            store
                .put_definition(
                    &records::exchange_key(&self.name, req.name),
                    &encode_json(&record),
                )
                .map_err(storage_error)?;
        }
        exchanges.insert(
            req.name.to_owned(),
            Arc::new(Exchange::new(req.name.to_owned(), wanted)),
        );
        Ok(())
    }

    fn check_exchange_equivalent(
        &self,
        existing: &Exchange,
        wanted: &ExchangeOptions,
    ) -> AmqpResult<()> {
        let have = &existing.options;
        let mismatch = |arg: &str, received: &str, current: &str| {
            Err(AmqpError::precondition(format!(
                "inequivalent arg '{arg}' for exchange '{}' in vhost '{}': received '{received}' but current is '{current}'",
                existing.name, self.name
            )))
        };
        if have.type_name() != wanted.type_name() {
            return mismatch("type", wanted.type_name(), have.type_name());
        }
        if have.kind != wanted.kind {
            // Same declared type, different routing: two delayed exchanges.
            return mismatch("x-delayed-type", wanted.kind.as_str(), have.kind.as_str());
        }
        if have.durable != wanted.durable {
            return mismatch("durable", yes_no(wanted.durable), yes_no(have.durable));
        }
        if have.auto_delete != wanted.auto_delete {
            return mismatch(
                "auto_delete",
                yes_no(wanted.auto_delete),
                yes_no(have.auto_delete),
            );
        }
        if have.internal != wanted.internal {
            return mismatch("internal", yes_no(wanted.internal), yes_no(have.internal));
        }
        let (a, b) = (
            wanted.arguments.inner().get("alternate-exchange"),
            have.arguments.inner().get("alternate-exchange"),
        );
        if !args::same(a, b) {
            return Err(AmqpError::precondition(format!(
                "inequivalent arg 'alternate-exchange' for exchange '{}' in vhost '{}': {}",
                existing.name,
                self.name,
                args::describe_mismatch(a, b)
            )));
        }
        Ok(())
    }

    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<()> {
        if name.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if PREDECLARED.iter().any(|(n, _)| *n == name) {
            return Err(AmqpError::access_refused(format!(
                "deletion of system exchange '{name}' in vhost '{}' not allowed",
                self.name
            )));
        }
        let exchange = {
            let mut exchanges = self.exchanges.write();
            let Some(exchange) = exchanges.get(name).cloned() else {
                return Ok(());
            };
            if if_unused && exchange.has_bindings() {
                return Err(AmqpError::precondition(format!(
                    "exchange '{name}' in vhost '{}' in use",
                    self.name
                )));
            }
            if exchange.options.durable {
                // The exchange and its bindings go from disk in one write,
                // before anything changes in memory.
                if let Some(store) = &self.store {
                    let bindings: Vec<Vec<u8>> = exchange
                        .bindings()
                        .into_iter()
                        .map(|(destination, key, arguments)| {
                            self.binding_record(&exchange, &destination, &key, &arguments)
                                .key()
                        })
                        .collect();
                    let mut removes: Vec<&[u8]> = bindings.iter().map(Vec::as_slice).collect();
                    let own = records::exchange_key(&self.name, name);
                    removes.push(&own);
                    store
                        .change_definitions(&[], &removes)
                        .map_err(storage_error)?;
                }
            }
            exchanges.remove(name);
            exchange.mark_deleted();
            exchange
        };
        if exchange.options.delayed {
            self.delayed.drop_exchange(self, &exchange);
        }
        self.forget_destination(&Destination::Exchange(exchange));
        Ok(())
    }

    /// Removes every binding that leads to `destination`, deleting auto-delete
    /// exchanges left without bindings.
    fn forget_destination(&self, destination: &Destination) {
        let exchanges: Vec<Arc<Exchange>> = self.exchanges.read().values().cloned().collect();
        for exchange in exchanges {
            if let (Some(store), true) = (&self.store, destination.is_durable()) {
                for (to, key, arguments) in exchange.bindings() {
                    if to.same_as(destination) {
                        let record = self.binding_record(&exchange, &to, &key, &arguments);
                        // A leftover binding is dropped at the next start
                        // (its destination is gone), so a failure here is harmless.
                        let _ = store.remove_definition(&record.key());
                    }
                }
            }
            if exchange.unbind(destination, None, None) {
                self.maybe_auto_delete(&exchange);
            }
        }
    }

    fn maybe_auto_delete(&self, exchange: &Arc<Exchange>) {
        if exchange.options.auto_delete && !exchange.has_bindings() {
            let _ = self.delete_exchange(&exchange.name, true);
        }
    }

    /// Declares (or checks) a queue; returns its name (generated when empty) and counts.
    pub fn declare_queue(&self, req: QueueDeclare<'_>) -> AmqpResult<(Arc<Queue>, QueueCounts)> {
        if req.passive {
            let name = req.name;
            let queue = self.queue(name, req.connection)?;
            // Use for `x-expires` too: RabbitMQ restarts the clock on any declare.
            queue.touch();
            let counts = queue.counts();
            return Ok((queue, counts));
        }
        let name = if req.name.is_empty() {
            generated_name("amq.gen-")
        } else if req.name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                req.name
            )));
        } else {
            req.name.to_owned()
        };
        let mut queues = self.queues.write();
        if let Some(existing) = queues.get(&name).cloned() {
            drop(queues);
            self.check_owner(&existing, req.connection)?;
            if req.options.exclusive && existing.owner.is_none() {
                // Claiming a shared queue as exclusive is a lock conflict (405), not 406.
                return Err(self.locked(&existing));
            }
            self.check_queue_equivalent(&existing, &req.options)?;
            existing.touch();
            let counts = existing.counts();
            return Ok((existing, counts));
        }
        // Only a queue being created is validated; a redeclare only compares.
        let args = QueueArgs::parse(&req.options.arguments, &name, &self.name)?;
        let o = &req.options;
        queue_args::check_properties(
            args.queue_type,
            o.durable,
            o.exclusive,
            o.auto_delete,
            &name,
            &self.name,
        )?;
        let owner = req.options.exclusive.then_some(req.connection);
        // Exclusive queues die with their connection, so they never touch disk.
        let queue_store = match (&self.store, req.options.durable && !req.options.exclusive) {
            (Some(store), true) => {
                let queue_id = store.new_queue_id();
                let record = QueueRecord::new(&self.name, &name, queue_id, &req.options);
                store
                    .put_definition(
                        &records::queue_key(&self.name, &name),
                        &encode_json(&record),
                    )
                    .map_err(storage_error)?;
                Some(store.queue(queue_id))
            }
            _ => None,
        };
        let home = self.me.upgrade().expect("a vhost in use is alive");
        let spec = QueueSpec {
            name: name.clone(),
            options: req.options,
            args,
            owner,
            store: queue_store,
        };
        let queue = Queue::new(spec, &home, self.timers.clone());
        queues.insert(name, queue.clone());
        drop(queues);
        // Every queue is bound to the default exchange under its own name; that
        // binding is implicit (the default exchange looks queues up by name).
        Ok((queue, QueueCounts::default()))
    }

    fn check_queue_equivalent(&self, existing: &Queue, wanted: &QueueOptions) -> AmqpResult<()> {
        let have = &existing.options;
        let mismatch = |arg: &str, received: String, current: String| {
            Err(AmqpError::precondition(format!(
                "inequivalent arg '{arg}' for queue '{}' in vhost '{}': received {received} but current is {current}",
                existing.name, self.name
            )))
        };
        if have.durable != wanted.durable {
            return mismatch(
                "durable",
                format!("'{}'", yes_no(wanted.durable)),
                format!("'{}'", yes_no(have.durable)),
            );
        }
        if have.exclusive != wanted.exclusive {
            return mismatch(
                "exclusive",
                format!("'{}'", yes_no(wanted.exclusive)),
                format!("'{}'", yes_no(have.exclusive)),
            );
        }
        if have.auto_delete != wanted.auto_delete {
            return mismatch(
                "auto_delete",
                format!("'{}'", yes_no(wanted.auto_delete)),
                format!("'{}'", yes_no(have.auto_delete)),
            );
        }
        let compared = match existing.args.queue_type {
            QueueType::Classic => COMPARED_CLASSIC_ARGS,
            QueueType::Quorum => COMPARED_QUORUM_ARGS,
        };
        let same_type = match (type_name(&wanted.arguments), type_name(&have.arguments)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        for arg in compared {
            let a = wanted.arguments.inner().get(*arg);
            let b = have.arguments.inner().get(*arg);
            let equivalent = match *arg {
                "x-queue-type" => same_type,
                _ => args::same(a, b),
            };
            if !equivalent {
                return Err(AmqpError::precondition(format!(
                    "inequivalent arg '{arg}' for queue '{}' in vhost '{}': {}",
                    existing.name,
                    self.name,
                    args::describe_mismatch(a, b)
                )));
            }
        }
        Ok(())
    }

    /// Deletes a queue; returns the number of ready messages it held.
    pub fn delete_queue(
        &self,
        name: &str,
        connection: u64,
        if_unused: bool,
        if_empty: bool,
    ) -> AmqpResult<u32> {
        let Some(queue) = self.queues.read().get(name).cloned() else {
            return Ok(0);
        };
        self.check_owner(&queue, connection)?;
        let counts = queue.counts();
        if if_unused && counts.consumers > 0 {
            return Err(AmqpError::precondition(format!(
                "queue '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        if if_empty && counts.messages > 0 {
            return Err(AmqpError::precondition(format!(
                "queue '{name}' in vhost '{}' not empty",
                self.name
            )));
        }
        if let (Some(store), true) = (&self.store, queue.is_durable_store()) {
            if store.is_failed() {
                return Err(storage_error(StoreError::Failed(
                    "the store is recovering from a write error".into(),
                )));
            }
        }
        Ok(self.remove_queue(&queue))
    }

    /// Unconditional removal (exclusive owner gone, auto-delete, queue.delete).
    pub fn remove_queue(&self, queue: &Arc<Queue>) -> u32 {
        {
            let mut queues = self.queues.write();
            match queues.get(&queue.name) {
                Some(q) if Arc::ptr_eq(q, queue) => {
                    queues.remove(&queue.name);
                }
                _ => return 0,
            }
        }
        let count = queue.delete();
        if let Some(queue_store) = &queue.store {
            // After the queue's last writes: its definition goes in one write,
            // its messages follow in the background.
            let key = records::queue_key(&self.name, &queue.name);
            let deleted = queue
                .with_writes_quiet(|| queue_store.store().delete_queue(&key, queue_store.id()));
            if let Err(error) = deleted {
                tracing::error!(queue = %queue.name, %error, "could not delete a queue's definition");
            }
        }
        self.forget_destination(&Destination::Queue(queue.clone()));
        count
    }

    /// Exclusive queues of a closing connection.
    pub fn queues_owned_by(&self, connection: u64) -> Vec<Arc<Queue>> {
        self.queues
            .read()
            .values()
            .filter(|q| q.owner == Some(connection))
            .cloned()
            .collect()
    }

    pub fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> AmqpResult<()> {
        let queue = self.queue(queue, connection)?;
        let exchange = self.bindable_exchange(exchange)?;
        self.bind(&exchange, Destination::Queue(queue), key, arguments)
    }

    pub fn unbind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> AmqpResult<()> {
        if exchange.is_empty() {
            // Its implicit bindings cannot be removed, as in RabbitMQ.
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        let queue = self.queue(queue, connection)?;
        // Unbinding from a missing exchange succeeds in RabbitMQ: the binding is gone either way.
        let Some(exchange) = self.exchanges.read().get(exchange).cloned() else {
            return Ok(());
        };
        self.unbind(&exchange, &Destination::Queue(queue), key, arguments);
        Ok(())
    }

    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> AmqpResult<()> {
        let destination = self.bindable_exchange(destination)?;
        let source = self.bindable_exchange(source)?;
        self.bind(&source, Destination::Exchange(destination), key, arguments)
    }

    pub fn unbind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        arguments: &FieldTable,
    ) -> AmqpResult<()> {
        let destination = self.bindable_exchange(destination)?;
        let source = self.bindable_exchange(source)?;
        self.unbind(&source, &Destination::Exchange(destination), key, arguments);
        Ok(())
    }

    /// Binds, recording the binding when both ends survive restarts.
    fn bind(
        &self,
        source: &Arc<Exchange>,
        destination: Destination,
        key: &str,
        arguments: &FieldTable,
    ) -> AmqpResult<()> {
        let record = self.durable_binding(source, &destination, key, arguments);
        source.bind(destination.clone(), key, arguments)?;
        // A queue deleted meanwhile by another connection has already had its
        // bindings removed; this one would dangle.
        if let Destination::Queue(queue) = &destination {
            if queue.is_deleted() {
                source.unbind(&destination, Some(key), Some(arguments));
                return Err(self.no_queue(&queue.name));
            }
        }
        if let (Some(store), Some(record)) = (&self.store, record) {
            if let Err(error) = store.put_definition(&record.key(), &encode_json(&record)) {
                source.unbind(&destination, Some(key), Some(arguments));
                return Err(storage_error(error));
            }
        }
        Ok(())
    }

    fn unbind(
        &self,
        source: &Arc<Exchange>,
        destination: &Destination,
        key: &str,
        arguments: &FieldTable,
    ) {
        if source.unbind(destination, Some(key), Some(arguments)) {
            if let (Some(store), Some(record)) = (
                &self.store,
                self.durable_binding(source, destination, key, arguments),
            ) {
                if let Err(error) = store.remove_definition(&record.key()) {
                    tracing::error!(%error, "could not delete a binding's definition");
                }
            }
            self.maybe_auto_delete(source);
        }
    }

    fn durable_binding(
        &self,
        source: &Exchange,
        destination: &Destination,
        key: &str,
        arguments: &FieldTable,
    ) -> Option<BindingRecord> {
        (source.options.durable && destination.is_durable())
            .then(|| self.binding_record(source, destination, key, arguments))
    }

    fn binding_record(
        &self,
        source: &Exchange,
        destination: &Destination,
        key: &str,
        arguments: &FieldTable,
    ) -> BindingRecord {
        binding_record(
            &self.name,
            &source.name,
            matches!(destination, Destination::Queue(_)),
            destination.name(),
            key,
            arguments,
        )
    }

    /// Rebuilds what a restart found on disk for this vhost: exchanges, then
    /// queues with their messages, then the bindings between them, then the
    /// messages delayed exchanges were holding.
    pub fn restore(&self, recovered: RecoveredVHost) -> Result<(), StoreError> {
        let store = self.store.clone().expect("restore needs a store");
        for record in recovered.exchanges {
            match record.options() {
                Some(options) if !self.exchanges.read().contains_key(&record.name) => {
                    let exchange = Arc::new(Exchange::new(record.name.clone(), options));
                    self.exchanges.write().insert(record.name, exchange);
                }
                _ => {}
            }
        }
        for record in recovered.queues {
            let queue_store = store.queue(record.id);
            let entries = queue_store.recover()?;
            let options = record.options();
            // Stored arguments were checked when declared; a newer, stricter
            // check must not lose the queue, so fall back to the lenient defaults.
            let args =
                QueueArgs::parse(&options.arguments, &record.name, &self.name).unwrap_or_default();
            let spec = QueueSpec {
                name: record.name.clone(),
                options,
                args,
                owner: None,
                store: Some(queue_store),
            };
            let home = self.me.upgrade().expect("a vhost in use is alive");
            let queue = Queue::recovered(spec, &home, self.timers.clone(), entries);
            self.queues.write().insert(record.name, queue);
        }
        for b in recovered.bindings {
            let source = self.exchanges.read().get(&b.source).cloned();
            let destination = if b.destination_is_queue {
                self.queues
                    .read()
                    .get(&b.destination)
                    .cloned()
                    .map(Destination::Queue)
            } else {
                self.exchanges
                    .read()
                    .get(&b.destination)
                    .cloned()
                    .map(Destination::Exchange)
            };
            match (source, destination) {
                (Some(source), Some(destination)) => {
                    if let Err(error) = source.bind(destination, &b.routing_key, &b.arguments) {
                        tracing::warn!(%error, source = %b.source, "stored binding could not be restored");
                    }
                }
                _ => {
                    tracing::warn!(source = %b.source, destination = %b.destination, "stored binding refers to a missing object")
                }
            }
        }
        // Last: messages already due route at once, so their bindings must exist.
        self.delayed.restore(self, recovered.delayed);
        Ok(())
    }

    /// The default exchange takes no explicit bindings (403, as in RabbitMQ).
    fn bindable_exchange(&self, name: &str) -> AmqpResult<Arc<Exchange>> {
        if name.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange".to_string(),
            ));
        }
        self.exchange(name)
    }
}

/// One of the exchanges every vhost has: durable, plain, no arguments.
fn system_exchange(name: &str, kind: ExchangeKind) -> Arc<Exchange> {
    let options = ExchangeOptions {
        kind,
        delayed: false,
        durable: true,
        auto_delete: false,
        internal: false,
        arguments: FieldTable::default(),
    };
    Arc::new(Exchange::new(name.to_owned(), options))
}

/// Names like RabbitMQ's `amq.gen-XXXXXXXXXXXXXXXXXXXXXX` (random, URL-safe).
pub fn generated_name(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let suffix: String = (0..22)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{suffix}")
}
