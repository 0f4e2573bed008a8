//! `perf` — a PerfTest-style throughput and latency load generator for any
//! AMQP 0-9-1 broker (Hare itself, or a RabbitMQ reference node), built on
//! lapin.
//!
//! ```text
//! cargo run --release --example perf -- --url amqp://guest:guest@127.0.0.1:5672/%2f \
//!     --producers 1 --consumers 1 --size 1024 --duration 10 --prefetch 1000 [--confirm] \
//!     [--persistent] [--durable] [--autoack] [--outstanding 1000] [--queue NAME] \
//!     [--count N] [--keep-queue]
//! ```
//!
//! # What it measures
//!
//! * **Throughput**: how many messages per second the producers manage to hand
//!   to the broker (`sent_per_sec`) and how many the consumers get back
//!   (`received_per_sec`), both counted inside the `--duration` window only.
//!   When the two differ the broker (or the consumers) fell behind and a
//!   backlog built up in the queue.
//! * **End-to-end latency**: every body carries, in its first 8 bytes
//!   (little endian), the nanoseconds since a process-wide `Instant` at the
//!   moment the publish was handed to lapin; a consumer subtracts it from its
//!   own clock on receipt. Producers and consumers live in one process, so the
//!   clocks agree. p50/p99 come from a log-linear histogram (< 0.8 % error).
//!   Like PerfTest, producers are not rate-limited, so when the broker cannot
//!   keep up latency mostly measures the queue's backlog, not the broker's
//!   per-message cost.
//!
//! The point is to compare Hare against RabbitMQ with the same client, the
//! same host and the same workload, so a regression shows up as a number.
//!
//! # Workload
//!
//! * One queue (`--queue`, default `perf-<pid>`), declared (durable with
//!   `--durable`), purged at start and deleted at the end.
//! * Each producer has its own connection and channel and publishes to the
//!   default exchange with routing key = queue, as fast as it can. Bodies are
//!   `--size` bytes (at least 16); `--persistent` sets delivery_mode 2.
//!   With `--confirm` the channel is in confirm mode and at most
//!   `--outstanding` publishes per producer are unconfirmed at any time.
//! * Each consumer has its own connection and channel. Without `--autoack`
//!   it sets `basic.qos(--prefetch)` (0 = unlimited, PerfTest's default) and
//!   acks **every message individually**, like PerfTest does by default;
//!   `--multi-ack N` instead acks with `multiple=true` once every N messages.
//! * Connections, channels and consumers are all set up before the clock
//!   starts. After `--duration` seconds producers stop (with `--confirm`
//!   they wait up to `--drain` seconds for outstanding confirms), consumers
//!   get up to `--drain` seconds (default 2) to catch up with what was sent,
//!   then everything is closed.
//!
//! # Fixed-count runs, fills and drains
//!
//! With `--count N` the run is sized by messages instead of time: the
//! producers together publish exactly N messages (with `--confirm` they also
//! wait for every confirm) and the consumers stop once they have received N,
//! however long that takes; `--duration` and `--drain` are then ignored and
//! the rates are taken over the whole run (`elapsed_s`). Either side may be
//! absent: `--consumers 0` is a pure fill (publish N into the queue and
//! leave them there), `--producers 0` a pure drain (consume N messages that
//! are already queued). `--keep-queue` leaves the queue alone: it is not
//! purged at the start and not deleted at the end, so a fill can be followed
//! by a broker restart and then a drain of the same queue (the latency
//! figures of such a drain mean nothing: the timestamps in the bodies come
//! from another process's clock):
//!
//! ```text
//! perf --queue backlog --durable --persistent --confirm --size 1024 \
//!     --consumers 0 --count 1000000 --keep-queue      # fill
//! perf --queue backlog --durable --producers 0 --prefetch 1000 \
//!     --count 1000000 --keep-queue                    # drain
//! ```
//!
//! # Keeping the client out of the way
//!
//! The broker and the tool share a small machine, so the tool has to be
//! cheap. lapin's `basic_publish` future resolves only once the frames have
//! been written to the socket by the connection's I/O thread, and `basic_ack`
//! likewise; awaiting them one at a time costs a thread hand-off per message
//! and caps a producer far below what a broker can take. So the producer
//! keeps up to `--pipeline` publishes in flight (they are queued by lapin and
//! written in batches) and the consumer keeps its acks in flight instead of
//! waiting for each one. (Against RabbitMQ 3.10 on a 2-core box, 16-byte
//! autoack: `--pipeline 1`, i.e. awaiting each publish, tops out near 35k
//! msg/s with the tool burning a whole core; the default 256 reaches ~100k
//! msg/s with the tool at ~70 % of a core.) The process's own CPU use during
//! the window is reported as `client_cpu_pct` (100 = one core) so a run where
//! the tool saturated a core can be recognised. The runtime is tokio's
//! multi-thread one with its default worker count (one per core;
//! `TOKIO_WORKER_THREADS` overrides it); lapin adds one I/O thread per
//! connection.
//!
//! # Output
//!
//! One JSON object on stdout, e.g.
//! `{"sent":..,"received":..,"sent_per_sec":..,"received_per_sec":..,
//! "latency_p50_ms":..,"latency_p99_ms":..,"size":..,"producers":..,
//! "consumers":..,"confirm":..,"persistent":..,"prefetch":..,"autoack":..,
//! "duration_s":..}` plus a few extra fields (`confirmed`, `nacked`, `count`,
//! `sent_in_window`, `received_in_window`, `latency_p999_ms`,
//! `latency_max_ms`, `client_cpu_pct`, ...). `sent` and `received` are totals
//! including the drain phase; the `*_per_sec` rates use only the counts taken
//! at the end of the window. Progress and errors go to stderr.

use std::{
    error::Error,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use futures::{stream::FuturesUnordered, StreamExt};
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
    },
    types::{FieldTable, ShortString},
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer, PublisherConfirm,
};
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};

type BoxError = Box<dyn Error + Send + Sync>;

/// Command line of the load tool.
#[derive(Parser, Debug, Clone)]
#[command(
    about = "AMQP 0-9-1 throughput/latency load tool (PerfTest-like), prints one JSON object"
)]
struct Args {
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    url: String,
    /// Number of producers, each with its own connection.
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Number of consumers, each with its own connection.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Message body size in bytes (at least 16; the first 8 carry a timestamp).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(16..))]
    size: u32,
    /// Length of the measurement window in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Put producer channels in confirm mode and track publisher confirms.
    #[arg(long)]
    confirm: bool,
    /// Publish with delivery_mode 2 (persistent).
    #[arg(long)]
    persistent: bool,
    /// basic.qos prefetch count per consumer (0 = unlimited); ignored with --autoack.
    #[arg(long, default_value_t = 0)]
    prefetch: u16,
    /// Consume with no_ack=true instead of acking.
    #[arg(long)]
    autoack: bool,
    /// Queue name (default: perf-<pid>); declared, purged at start and deleted
    /// at the end unless --keep-queue.
    #[arg(long)]
    queue: Option<String>,
    /// Declare the queue durable.
    #[arg(long)]
    durable: bool,
    /// With --confirm: most unconfirmed publishes per producer.
    #[arg(long, default_value_t = 1000)]
    outstanding: usize,
    /// Ack with multiple=true once every N messages (1 = ack each message).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    multi_ack: u32,
    /// Publishes per producer handed to lapin but not yet written to the socket.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pipeline: u32,
    /// Seconds allowed after the window for confirms and consumers to catch up.
    #[arg(long, default_value_t = 2.0)]
    drain: f64,
    /// Publish exactly N messages in total (and, with consumers, receive N)
    /// instead of running for --duration; --duration and --drain are ignored.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Neither purge the queue at the start nor delete it at the end.
    #[arg(long)]
    keep_queue: bool,
}

// ---------------------------------------------------------------------------
// Clock and latency histogram
// ---------------------------------------------------------------------------

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the process-wide epoch.
fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Linear buckets per power of two: 2^SUB_BITS values below 2^SUB_BITS, then
/// 2^(SUB_BITS-1) buckets per octave, i.e. a relative error below 1/64.
const SUB_BITS: u32 = 7;
const BUCKETS: usize = (64 - SUB_BITS as usize + 2) << (SUB_BITS - 1);

/// A fixed-size log-linear histogram of nanosecond values.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < (1 << SUB_BITS) {
            v as usize
        } else {
            let shift = 64 - v.leading_zeros() - SUB_BITS;
            ((shift as usize) << (SUB_BITS - 1)) + (v >> shift) as usize
        }
    }

    /// Midpoint of the values that land in bucket `i`.
    fn value_of(i: usize) -> u64 {
        let half = 1usize << (SUB_BITS - 1);
        if i < 2 * half {
            i as u64
        } else {
            let shift = i / half - 1;
            let mantissa = (i - shift * half) as u64;
            (mantissa << shift) + (1u64 << shift) / 2
        }
    }

    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// Value at quantile `q` (0..=1), in milliseconds; 0 when empty.
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value_of(i).min(self.max) as f64 / 1e6;
            }
        }
        self.max as f64 / 1e6
    }
}

/// CPU seconds (user + system) used by this process so far, from
/// /proc/self/stat (Linux; assumes the usual USER_HZ of 100).
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line, i.e. 12 and 13 after the name.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

// ---------------------------------------------------------------------------
// Producers
// ---------------------------------------------------------------------------

#[derive(Default)]
struct ProducerStats {
    published: u64,
    confirmed: u64,
    nacked: u64,
}

/// Publishes one timestamped message; resolves once lapin has written it.
async fn publish_one(
    channel: &Channel,
    routing_key: &ShortString,
    properties: &BasicProperties,
    size: usize,
) -> lapin::Result<PublisherConfirm> {
    let mut body = vec![0u8; size];
    body[..8].copy_from_slice(&now_ns().to_le_bytes());
    channel
        .basic_publish(
            ShortString::default(),
            routing_key.clone(),
            BasicPublishOptions::default(),
            &body,
            properties.clone(),
        )
        .await
}

struct ProducerSetup {
    channel: Channel,
    queue: ShortString,
    properties: BasicProperties,
    size: usize,
    confirm: bool,
    pipeline: usize,
    outstanding: usize,
    deadline: tokio::time::Instant,
    /// How long to wait for outstanding confirms once publishing has stopped
    /// (`None`: until all have arrived).
    drain: Option<Duration>,
    /// With `--count`: messages still to be published by all producers
    /// together; each producer claims one before every publish and stops
    /// when none are left.
    budget: Option<Arc<AtomicU64>>,
    /// Publishes written so far, read by the main task at the end of the window.
    published: Arc<AtomicU64>,
}

/// Takes one message from a shared `--count` budget; false once it is spent.
fn claim(budget: &AtomicU64) -> bool {
    budget
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

async fn run_producer(p: ProducerSetup) -> Result<ProducerStats, BoxError> {
    let mut stats = ProducerStats::default();
    let mut publishes = FuturesUnordered::new();
    let mut confirms: FuturesUnordered<PublisherConfirm> = FuturesUnordered::new();
    let stop = tokio::time::sleep_until(p.deadline);
    tokio::pin!(stop);
    let mut running = true;

    loop {
        if running {
            while publishes.len() < p.pipeline
                && (!p.confirm || publishes.len() + confirms.len() < p.outstanding)
            {
                if let Some(budget) = &p.budget {
                    if !claim(budget) {
                        running = false;
                        break;
                    }
                }
                publishes.push(publish_one(&p.channel, &p.queue, &p.properties, p.size));
            }
            if !running {
                continue;
            }
        } else if publishes.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(res) = publishes.next(), if !publishes.is_empty() => {
                let confirm = res?;
                stats.published += 1;
                p.published.store(stats.published, Ordering::Relaxed);
                if p.confirm {
                    confirms.push(confirm);
                }
            }
            Some(res) = confirms.next(), if !confirms.is_empty() => {
                if res?.is_ack() { stats.confirmed += 1 } else { stats.nacked += 1 }
            }
            _ = &mut stop, if running => running = false,
        }
    }

    // Window over: give the broker a little time to confirm the rest (with
    // --count, all the time it needs).
    let rest = async {
        while let Some(res) = confirms.next().await {
            match res {
                Ok(c) if c.is_ack() => stats.confirmed += 1,
                Ok(_) => stats.nacked += 1,
                Err(e) => eprintln!("perf: producer confirm error: {e}"),
            }
        }
    };
    match p.drain {
        Some(limit) => {
            let _ = tokio::time::timeout(limit, rest).await;
        }
        None => rest.await,
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------
// Consumers
// ---------------------------------------------------------------------------

struct ConsumerSetup {
    channel: Channel,
    consumer: Consumer,
    autoack: bool,
    multi_ack: u32,
    /// Messages received so far, read by the main task.
    received: Arc<AtomicU64>,
    stop: watch::Receiver<bool>,
}

async fn run_consumer(mut c: ConsumerSetup) -> Result<Histogram, BoxError> {
    let mut hist = Histogram::new();
    let mut received = 0u64;
    let mut unacked = 0u32;
    let ack_options = BasicAckOptions {
        multiple: c.multi_ack > 1,
    };
    let channel = c.channel.clone();
    let mut acks = FuturesUnordered::new();

    loop {
        tokio::select! {
            biased;
            _ = c.stop.changed() => break,
            Some(res) = acks.next(), if !acks.is_empty() => res?,
            delivery = c.consumer.next() => match delivery {
                Some(Ok(d)) => {
                    if let Some(ts) = d.data.get(..8) {
                        let sent = u64::from_le_bytes(ts.try_into().expect("8 bytes"));
                        hist.record(now_ns().saturating_sub(sent));
                    }
                    received += 1;
                    c.received.store(received, Ordering::Relaxed);
                    if !c.autoack {
                        unacked += 1;
                        if unacked >= c.multi_ack {
                            unacked = 0;
                            acks.push(channel.basic_ack(d.delivery_tag, ack_options));
                        }
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
        }
    }
    // Let the acks already handed to lapin go out before the connection closes.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while acks.next().await.is_some() {}
    })
    .await;
    Ok(hist)
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

async fn connect(url: &str) -> Result<Connection, BoxError> {
    Ok(Connection::connect(url, ConnectionProperties::default()).await?)
}

fn sum(counters: &[Arc<AtomicU64>]) -> u64 {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    EPOCH.get_or_init(Instant::now);
    if !args.duration.is_finite()
        || args.duration <= 0.0
        || !args.drain.is_finite()
        || args.drain < 0.0
    {
        return Err("--duration must be > 0 and --drain >= 0".into());
    }
    if !args.autoack && args.prefetch > 0 && args.multi_ack > u32::from(args.prefetch) {
        return Err("--multi-ack must not exceed --prefetch".into());
    }
    let queue_name = args
        .queue
        .clone()
        .unwrap_or_else(|| format!("perf-{}", std::process::id()));
    let queue: ShortString = queue_name.clone().into();
    let size = args.size as usize;
    let drain = Duration::from_secs_f64(args.drain);

    // Queue setup on a connection of its own.
    let admin = connect(&args.url).await?;
    let admin_ch = admin.create_channel().await?;
    admin_ch
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                durable: args.durable,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    if !args.keep_queue {
        admin_ch
            .queue_purge(queue.clone(), QueuePurgeOptions::default())
            .await?;
    }

    // Consumers first, so that nothing piles up before they are attached.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut consumer_conns = Vec::new();
    let mut consumer_setups = Vec::new();
    let mut received_counters = Vec::new();
    for i in 0..args.consumers {
        let conn = connect(&args.url).await?;
        let channel = conn.create_channel().await?;
        if !args.autoack && args.prefetch > 0 {
            channel
                .basic_qos(args.prefetch, BasicQosOptions::default())
                .await?;
        }
        let consumer = channel
            .basic_consume(
                queue.clone(),
                format!("perf-consumer-{i}").into(),
                BasicConsumeOptions {
                    no_ack: args.autoack,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let received = Arc::new(AtomicU64::new(0));
        received_counters.push(received.clone());
        consumer_setups.push(ConsumerSetup {
            channel,
            consumer,
            autoack: args.autoack,
            multi_ack: args.multi_ack,
            received,
            stop: stop_rx.clone(),
        });
        consumer_conns.push(conn);
    }

    let mut producer_conns = Vec::new();
    let mut producer_channels = Vec::new();
    for _ in 0..args.producers {
        let conn = connect(&args.url).await?;
        let channel = conn.create_channel().await?;
        if args.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        producer_channels.push(channel);
        producer_conns.push(conn);
    }

    let properties = if args.persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };

    // The window starts now.
    // With --count there is no time limit: the producers stop when the
    // budget is spent (a deadline a year away never fires).
    let window = match args.count {
        Some(_) => Duration::from_secs(365 * 24 * 3600),
        None => Duration::from_secs_f64(args.duration),
    };
    let budget = args.count.map(|n| Arc::new(AtomicU64::new(n)));
    let cpu_start = process_cpu_secs();
    let start = tokio::time::Instant::now();
    let deadline = start + window;

    let consumers: Vec<JoinHandle<Result<Histogram, BoxError>>> = consumer_setups
        .into_iter()
        .map(|c| tokio::spawn(run_consumer(c)))
        .collect();
    let mut published_counters = Vec::new();
    let producers: Vec<JoinHandle<Result<ProducerStats, BoxError>>> = producer_channels
        .into_iter()
        .map(|channel| {
            let published = Arc::new(AtomicU64::new(0));
            published_counters.push(published.clone());
            tokio::spawn(run_producer(ProducerSetup {
                channel,
                queue: queue.clone(),
                properties: properties.clone(),
                size,
                confirm: args.confirm,
                pipeline: args.pipeline as usize,
                outstanding: args.outstanding.max(1),
                deadline,
                drain: args.count.is_none().then_some(drain),
                budget: budget.clone(),
                published,
            }))
        })
        .collect();

    // Stop producers (they stop on their own at the deadline, or when the
    // --count budget is spent and confirmed) and collect.
    let collect_producers = async {
        let mut stats = ProducerStats::default();
        for p in producers {
            match p.await {
                Ok(Ok(s)) => {
                    stats.published += s.published;
                    stats.confirmed += s.confirmed;
                    stats.nacked += s.nacked;
                }
                Ok(Err(e)) => eprintln!("perf: producer failed: {e}"),
                Err(e) => eprintln!("perf: producer task failed: {e}"),
            }
        }
        stats
    };
    let (elapsed, sent_in_window, received_in_window, cpu_window, stats) = match args.count {
        None => {
            tokio::time::sleep_until(deadline).await;
            let elapsed = start.elapsed().as_secs_f64();
            let sent_in_window = sum(&published_counters);
            let received_in_window = sum(&received_counters);
            let cpu_window = match (cpu_start, process_cpu_secs()) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            let stats = collect_producers.await;
            (
                elapsed,
                sent_in_window,
                received_in_window,
                cpu_window,
                stats,
            )
        }
        Some(n) => {
            // The run lasts until every producer is done (all N published
            // and confirmed) and the consumers, if any, have received N.
            let stats = collect_producers.await;
            while args.consumers > 0 && sum(&received_counters) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let elapsed = start.elapsed().as_secs_f64();
            let cpu_window = match (cpu_start, process_cpu_secs()) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            (
                elapsed,
                sum(&published_counters),
                sum(&received_counters),
                cpu_window,
                stats,
            )
        }
    };

    // Give consumers up to --drain to catch up with what was sent.
    if args.consumers > 0 && args.count.is_none() {
        let drain_deadline = tokio::time::Instant::now() + drain;
        while sum(&received_counters) < stats.published
            && tokio::time::Instant::now() < drain_deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let _ = stop_tx.send(true);
    let mut hist = Histogram::new();
    for c in consumers {
        match c.await? {
            Ok(h) => hist.merge(&h),
            Err(e) => eprintln!("perf: consumer failed: {e}"),
        }
    }
    let received = sum(&received_counters);

    // Tear down.
    for conn in producer_conns.iter().chain(&consumer_conns) {
        let _ = conn.close(200, "OK".into()).await;
    }
    if !args.keep_queue {
        if let Err(e) = admin_ch
            .queue_delete(queue.clone(), QueueDeleteOptions::default())
            .await
        {
            eprintln!("perf: could not delete queue {queue_name}: {e}");
        }
    }
    let _ = admin.close(200, "OK".into()).await;

    let report = json!({
        "sent": stats.published,
        "received": received,
        "sent_per_sec": sent_in_window as f64 / elapsed,
        "received_per_sec": received_in_window as f64 / elapsed,
        "latency_p50_ms": hist.quantile_ms(0.50),
        "latency_p99_ms": hist.quantile_ms(0.99),
        "latency_p999_ms": hist.quantile_ms(0.999),
        "latency_max_ms": hist.max as f64 / 1e6,
        "size": size,
        "producers": args.producers,
        "consumers": args.consumers,
        "confirm": args.confirm,
        "persistent": args.persistent,
        "durable": args.durable,
        "prefetch": args.prefetch,
        "autoack": args.autoack,
        "multi_ack": args.multi_ack,
        "outstanding": args.outstanding,
        "pipeline": args.pipeline,
        "duration_s": args.duration,
        "count": args.count,
        "keep_queue": args.keep_queue,
        "elapsed_s": elapsed,
        "sent_in_window": sent_in_window,
        "received_in_window": received_in_window,
        "confirmed": stats.confirmed,
        "nacked": stats.nacked,
        "client_cpu_pct": cpu_window.map(|c| 100.0 * c / elapsed),
        "queue": queue_name,
    });
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn histogram_buckets_are_contiguous_and_accurate() {
        for v in [
            0u64,
            1,
            127,
            128,
            129,
            255,
            256,
            1000,
            123_456,
            9_999_999_999,
        ] {
            let i = Histogram::index(v);
            assert!(i < super::BUCKETS);
            let mid = Histogram::value_of(i);
            let err = (mid as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.01, "v={v} mid={mid}");
        }
        let mut prev = 0;
        for v in 0..100_000u64 {
            let i = Histogram::index(v);
            assert!(i == prev || i == prev + 1, "gap at {v}");
            prev = i;
        }
        assert!(Histogram::index(u64::MAX) < super::BUCKETS);
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1_000_000);
        }
        assert!((h.quantile_ms(0.5) - 500.0).abs() < 5.0);
        assert!((h.quantile_ms(0.99) - 990.0).abs() < 10.0);
    }
}
