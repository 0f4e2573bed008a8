//! Broker settings: one struct, filled from CLI flags / environment in `main.rs`
//! and built directly by tests and embedders.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::alarms::MemoryWatermark;

/// Everything the broker needs to know before it accepts a connection.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where AMQP clients connect.
    pub listen: SocketAddr,
    /// Where Prometheus scrapes `/metrics` (RabbitMQ's port 15692); `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Where durable state lives (used by the store).
    pub data_dir: PathBuf,
    /// Largest frame we accept and offer in connection.tune (RabbitMQ: 131072).
    pub frame_max: u32,
    /// Highest channel number a connection may open (RabbitMQ: 2047).
    pub channel_max: u16,
    /// Heartbeat interval we propose; the client's lower non-zero value wins.
    pub heartbeat: Duration,
    /// Largest message body accepted; larger ones get 406 (RabbitMQ: 128 MiB).
    pub max_message_size: u64,
    /// Users allowed to log in: (username, password, loopback_only).
    pub users: Vec<User>,
    /// Virtual hosts that exist at start-up.
    pub vhosts: Vec<String>,
    /// Memory the store may use to cache disk pages (bodies of paged-out
    /// messages live on disk, so this bounds what they cost in RAM).
    pub store_cache_bytes: u64,
    /// How long connections get at shutdown to receive their 320 close.
    pub shutdown_grace: Duration,
    /// Above this resident memory the memory alarm blocks publishers
    /// (RabbitMQ's `vm_memory_high_watermark`, 0.4 of total RAM).
    pub memory_high_watermark: MemoryWatermark,
    /// Below this many free bytes on the data dir's file system the disk
    /// alarm blocks publishers (RabbitMQ's `disk_free_limit`, 50 MB).
    pub disk_free_limit: u64,
    /// How often memory and disk are sampled for the alarms.
    pub resource_check_interval: Duration,
    /// A manual-ack delivery unacknowledged for longer closes its channel with
    /// 406 (RabbitMQ's `consumer_timeout`, 30 minutes); `None` disables it.
    /// A queue's `x-consumer-timeout` argument (ms) overrides it.
    pub consumer_timeout: Option<Duration>,
}

/// A user account. `loopback_only` mirrors RabbitMQ's `loopback_users` for guest.
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub password: String,
    pub loopback_only: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:5672".parse().expect("static address"),
            metrics_listen: Some("0.0.0.0:15692".parse().expect("static address")),
            data_dir: PathBuf::from("./data"),
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: Duration::from_secs(60),
            max_message_size: 128 * 1024 * 1024,
            users: vec![User {
                name: "guest".into(),
                password: "guest".into(),
                loopback_only: true,
            }],
            vhosts: vec!["/".into()],
            store_cache_bytes: 16 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(5),
            memory_high_watermark: MemoryWatermark::Relative(0.4),
            disk_free_limit: 50_000_000,
            resource_check_interval: Duration::from_secs(1),
            consumer_timeout: Some(Duration::from_secs(30 * 60)),
        }
    }
}
