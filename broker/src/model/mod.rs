//! The broker model: vhosts, exchanges, queues, messages. Pure logic with no
//! I/O; the protocol layer drives it and the store persists what it decides.

pub mod args;
pub mod dead_letter;
pub mod delayed;
pub mod direct_reply;
pub mod exchange;
pub mod headers;
pub mod message;
pub mod publish;
pub mod queue;
pub mod queue_args;
pub mod queue_disk;
pub mod ready;
pub mod records;
pub mod sender_selected;
pub mod timers;
pub mod topic;
pub mod vhost;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{Config, User};
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;
use timers::Timers;
use vhost::{RecoveredVHost, VHost};

/// The whole broker state that connections share.
pub struct Broker {
    vhosts: HashMap<String, Arc<VHost>>,
    users: Vec<User>,
    next_id: AtomicU64,
    store: Option<Arc<Store>>,
    metrics: Metrics,
    timers: Arc<Timers>,
}

impl Broker {
    /// A broker that keeps everything in memory.
    pub fn new(config: &Config) -> Self {
        let broker = Self::build(config, None);
        broker.timers.resume();
        broker
    }

    /// A broker on a data dir: opens the store and restores what it holds.
    /// Each queue reads only what it held in memory and the ends of its
    /// tail, so start-up does not grow with the messages queued.
    pub fn open(config: &Config) -> Result<Self, StoreError> {
        let store = Store::open(&config.data_dir, config.store_cache_bytes)?;
        let mut by_vhost = read_definitions(&store)?;
        // Data of queues deleted just before a crash goes, in the background;
        // once that and any purge a crash interrupted are done, a database
        // left mostly empty is compacted.
        let live: HashSet<u64> = by_vhost
            .values()
            .flat_map(|v| v.queues.iter().map(|q| q.id))
            .collect();
        store.forget_queues_except(&live)?;
        if store.wait_reaped_for(std::time::Duration::from_secs(5)) {
            store.compact_if_mostly_empty()?;
        }
        let broker = Self::build(config, Some(store.clone()));
        store.observe_flushes(crate::store::flusher::FlushMetrics {
            duration: broker.metrics.flush_duration.clone(),
            batch: broker.metrics.flush_batch.clone(),
        });
        for d in delayed::DelayedRecord::read_all(&store)? {
            by_vhost.entry(d.vhost.clone()).or_default().delayed.push(d);
        }
        for (name, parts) in by_vhost {
            match broker.vhosts.get(&name) {
                Some(vhost) => vhost.restore(parts)?,
                None => {
                    tracing::warn!(vhost = %name, "data dir holds a vhost this broker does not serve; left untouched")
                }
            }
        }
        // Only now may messages expire: their dead-letter targets exist.
        broker.timers.resume();
        Ok(broker)
    }

    fn build(config: &Config, store: Option<Arc<Store>>) -> Self {
        let timers = Timers::start();
        Broker {
            vhosts: config
                .vhosts
                .iter()
                .map(|name| {
                    (
                        name.clone(),
                        VHost::new(name, store.clone(), timers.clone()),
                    )
                })
                .collect(),
            users: config.users.clone(),
            next_id: AtomicU64::new(1),
            store,
            metrics: Metrics::new(),
            timers,
        }
    }

    /// No more expiries, x-expires deletions or delayed deliveries: called
    /// before the store closes at shutdown, so nothing changes on disk after.
    pub fn stop_timers(&self) {
        self.timers.stop();
    }

    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn vhosts(&self) -> impl Iterator<Item = &Arc<VHost>> {
        self.vhosts.values()
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.get(name).cloned()
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// Broker-wide unique ids for connections and consumers.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Every definition in the store, decoded and grouped by vhost.
fn read_definitions(store: &Store) -> Result<HashMap<String, RecoveredVHost>, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        dir: "(data dir)".into(),
        detail,
    };
    let mut by_vhost: HashMap<String, RecoveredVHost> = HashMap::new();
    for (key, value) in store.definitions()? {
        match key.first() {
            Some(b'e') => {
                let e: records::ExchangeRecord = records::decode_json(&value).map_err(corrupt)?;
                by_vhost
                    .entry(e.vhost.clone())
                    .or_default()
                    .exchanges
                    .push(e);
            }
            Some(b'q') => {
                let q: records::QueueRecord = records::decode_json(&value).map_err(corrupt)?;
                by_vhost.entry(q.vhost.clone()).or_default().queues.push(q);
            }
            Some(b'b') => {
                let b: records::BindingRecord = records::decode_json(&value).map_err(corrupt)?;
                by_vhost
                    .entry(b.vhost.clone())
                    .or_default()
                    .bindings
                    .push(b);
            }
            _ => {}
        }
    }
    Ok(by_vhost)
}
