//! Hare: a single-node AMQP 0-9-1 broker.
//!
//! Data flows one way through four layers; each module owns one concern:
//!
//! - [`cli`]       — the `hare` command line (flags, environment, logging).
//! - [`config`]    — settings, filled by the CLI or built by tests.
//! - [`net`]       — accept loop; one reader and one writer task per connection.
//! - [`protocol`]  — what goes over the wire: frame I/O around amq-protocol's codec,
//!   the batched outbox, content assembly, the connection and channel state machines,
//!   and AMQP exceptions with RabbitMQ's reply codes.
//! - [`model`]     — vhosts, exchanges and their routing tables, queues with their
//!   ready/unacked messages and consumers, and what each durable queue writes.
//!   Decides; no sockets, and no disk I/O under a queue's lock.
//! - [`store`]     — sled beneath the model: keys, bytes, group commit, background
//!   removal; it imports nothing from the model or the protocol.
//! - [`alarms`]    — memory and disk alarms that block publishers (back pressure).
//!
//! `model` decides, `protocol` speaks, `store` remembers.

pub mod alarms;
pub mod cli;
pub mod config;
pub mod error;
pub mod model;
pub mod net;
pub mod protocol;
pub mod store;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

/// A broker running on its own thread and runtime, as tests and embedders use it.
///
/// Dropping it stops the broker: the listener closes and every connection is dropped.
pub struct RunningBroker {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    alarms: Arc<alarms::Alarms>,
    shutdown: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningBroker {
    /// Opens the data dir and binds the listener now (so errors and the port
    /// are known on return), then serves on a new thread.
    pub fn start(config: config::Config) -> std::io::Result<Self> {
        let broker = Arc::new(model::Broker::open(&config).map_err(std::io::Error::other)?);
        let listener = std::net::TcpListener::bind(config.listen)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let metrics = match config.metrics_listen {
            Some(addr) => {
                let metrics = std::net::TcpListener::bind(addr)?;
                metrics.set_nonblocking(true)?;
                Some(metrics)
            }
            None => None,
        };
        let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
        let alarms = alarms::Alarms::new(&config);
        let serve_alarms = alarms.clone();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hare")
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("hare-broker".into())
            .spawn(move || {
                let store = broker.store().cloned();
                let stop_timers = broker.clone();
                runtime.block_on(async move {
                    let listeners = net::Listeners {
                        amqp: tokio::net::TcpListener::from_std(listener)
                            .expect("listener registers with the runtime"),
                        metrics: metrics.map(|m| {
                            tokio::net::TcpListener::from_std(m)
                                .expect("listener registers with the runtime")
                        }),
                    };
                    net::serve(
                        listeners,
                        broker,
                        Arc::new(config),
                        serve_alarms,
                        shutdown_rx,
                    )
                    .await;
                });
                // Closed before the model is dropped: dropping queues must not
                // delete the persistent messages they hold.
                stop_timers.stop_timers();
                if let Some(store) = store {
                    store.close();
                }
                runtime.shutdown_background();
            })?;
        Ok(RunningBroker {
            local_addr,
            metrics_addr,
            alarms,
            shutdown,
            thread: Some(thread),
        })
    }

    /// The address the listener is bound to (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The resource alarms: current state, last samples, thresholds.
    pub fn alarms(&self) -> &Arc<alarms::Alarms> {
        &self.alarms
    }

    /// Changes the memory high watermark while running; the monitor samples
    /// the real RSS against it at once (e.g. `Absolute(1)` raises the alarm).
    pub fn set_memory_high_watermark(&self, watermark: config::MemoryWatermark) {
        self.alarms.set_memory_high_watermark(watermark);
    }

    /// Changes the disk free limit (bytes) while running; the monitor samples
    /// the real free space against it at once (`u64::MAX` raises the alarm).
    pub fn set_disk_free_limit(&self, bytes: u64) {
        self.alarms.set_disk_free_limit(bytes);
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
