//! Broker settings: one struct, filled from CLI flags / environment in `main.rs`
//! and built directly by tests and embedders.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the broker needs to know before it accepts a connection.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where AMQP clients connect.
    pub listen: SocketAddr,
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
        }
    }
}
