//! The broker model: vhosts, exchanges, queues, messages. Pure logic with no
//! I/O; the protocol layer drives it and the store persists what it decides.

pub mod args;
pub mod exchange;
pub mod headers;
pub mod message;
pub mod queue;
pub mod topic;
pub mod vhost;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{Config, User};
use vhost::VHost;

/// The whole broker state that connections share.
pub struct Broker {
    vhosts: HashMap<String, Arc<VHost>>,
    users: Vec<User>,
    next_id: AtomicU64,
}

impl Broker {
    pub fn new(config: &Config) -> Self {
        Broker {
            vhosts: config
                .vhosts
                .iter()
                .map(|name| (name.clone(), Arc::new(VHost::new(name))))
                .collect(),
            users: config.users.clone(),
            next_id: AtomicU64::new(1),
        }
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
