//! The `hare` command line: parse flags (each also an environment variable),
//! set up logging, and serve AMQP until interrupted. The binary itself lives in
//! the workspace root package so black-box tests can spawn it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::alarms::{parse_bytes, Alarms, MemoryWatermark};
use crate::config::Config;
use clap::Parser;

/// Hare: a single-node AMQP 0-9-1 message broker.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address AMQP clients connect to.
    #[arg(long, env = "HARE_LISTEN", default_value = "0.0.0.0:5672")]
    listen: SocketAddr,
    /// Address Prometheus scrapes at /metrics.
    #[arg(long, env = "HARE_METRICS_LISTEN", default_value = "0.0.0.0:15692")]
    metrics_listen: SocketAddr,
    /// Serve no metrics endpoint.
    #[arg(long, env = "HARE_NO_METRICS")]
    no_metrics: bool,
    /// Directory for durable state.
    #[arg(long, env = "HARE_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Largest frame offered in connection.tune, in bytes.
    #[arg(long, env = "HARE_FRAME_MAX", default_value_t = 131_072)]
    frame_max: u32,
    /// Heartbeat interval offered in connection.tune, in seconds (0 disables).
    #[arg(long, env = "HARE_HEARTBEAT", default_value_t = 60)]
    heartbeat: u64,
    /// Memory for sled's page cache, in MiB. sled holds definitions and
    /// each queue's bookkeeping; messages live in segment files and the
    /// kernel's page cache, so this rarely needs changing.
    #[arg(long, env = "HARE_STORE_CACHE_MB", default_value_t = 16)]
    store_cache_mb: u64,
    /// Largest message body accepted, in bytes.
    #[arg(long, env = "HARE_MAX_MESSAGE_SIZE", default_value_t = 134_217_728)]
    max_message_size: u64,
    /// Memory alarm threshold for the broker's resident memory: a fraction of
    /// total RAM (0.4) or a size with a unit (2GB, 1536MiB, 1000000B).
    #[arg(long, env = "HARE_MEMORY_HIGH_WATERMARK", default_value = "0.4", value_parser = parse_watermark)]
    memory_high_watermark: MemoryWatermark,
    /// Disk alarm threshold: free space on the data dir's file system, in
    /// bytes or with a unit (50MB, 1GiB).
    #[arg(long, env = "HARE_DISK_FREE_LIMIT", default_value = "50MB", value_parser = parse_bytes)]
    disk_free_limit: u64,
    /// Close a channel whose manual-ack delivery stays unacknowledged longer
    /// than this many milliseconds (0 disables; queues override it with x-consumer-timeout).
    #[arg(long, env = "HARE_CONSUMER_TIMEOUT", default_value_t = 1_800_000)]
    consumer_timeout: u64,
}

fn parse_watermark(s: &str) -> Result<MemoryWatermark, String> {
    s.parse()
}

/// Runs the broker as the `hare` binary does, until SIGINT/SIGTERM.
pub fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = Config {
        listen: args.listen,
        metrics_listen: (!args.no_metrics).then_some(args.metrics_listen),
        data_dir: args.data_dir,
        frame_max: args.frame_max,
        heartbeat: std::time::Duration::from_secs(args.heartbeat),
        max_message_size: args.max_message_size,
        store_cache_bytes: args.store_cache_mb * 1024 * 1024,
        memory_high_watermark: args.memory_high_watermark,
        disk_free_limit: args.disk_free_limit,
        consumer_timeout: (args.consumer_timeout > 0)
            .then(|| std::time::Duration::from_millis(args.consumer_timeout)),
        ..Config::default()
    };
    if config.frame_max < 4096 {
        eprintln!("hare: --frame-max must be at least 4096 (AMQP's minimum frame size)");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hare")
        .build()?;
    let broker = match crate::model::Broker::open(&config) {
        Ok(broker) => Arc::new(broker),
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("hare: {error}");
            std::process::exit(1);
        }
    };
    let store = broker.store().cloned();
    let alarms = Alarms::new(&config);
    tracing::info!(
        memory_limit = alarms.memory_limit_bytes(),
        watermark = %config.memory_high_watermark,
        disk_free_limit = config.disk_free_limit,
        "resource alarms armed"
    );
    // Kept alive past serve(): the store must be closed before queues drop.
    let _model = broker.clone();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
            None => None,
        };
        if let Some(metrics) = &metrics {
            tracing::info!(listen = %metrics.local_addr()?, "serving Prometheus metrics at /metrics");
        }
        let listeners = crate::net::Listeners {
            amqp: listener,
            metrics,
        };
        tracing::info!(listen = %listeners.amqp.local_addr()?, data_dir = %config.data_dir.display(), "hare is accepting AMQP connections");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_stop_signal().await;
            tracing::info!("stopping: closing connections");
            let _ = stop.send(true);
        });
        crate::net::serve(listeners, broker, Arc::new(config), alarms, stopped).await;
        Ok::<_, std::io::Error>(())
    })?;
    _model.stop_timers();
    if let Some(store) = store {
        store.close();
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn wait_for_stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
