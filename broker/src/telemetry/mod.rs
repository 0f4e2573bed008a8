//! Prometheus metrics, named `hare_…` after RabbitMQ's Prometheus plugin
//! (same suffixes and labels) so dashboards and habits carry over.
//!
//! Nothing here runs per message. Queues and exchanges keep plain running
//! totals next to the state they already lock or touch; this module reads
//! them when Prometheus scrapes and hands them to a per-broker
//! `metrics-exporter-prometheus` recorder, which renders the text format.
//! Only histograms (confirm latency, store flushes) are recorded as events,
//! once per confirm batch or flush. The recorder is the broker's own rather
//! than the process-global one, so several brokers in one process (tests)
//! report apart.

pub mod http;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::MetricKindMask;

use crate::model::dead_letter::Reason;
use crate::model::Broker;

/// Series of deleted queues and exchanges disappear after going this long
/// without an update (every scrape updates the living ones).
const FORGET_AFTER: Duration = Duration::from_secs(300);

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Connection and channel counts, kept by the protocol layer.
#[derive(Default)]
pub struct ConnectionTotals {
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub channels_opened: AtomicU64,
    pub channels_closed: AtomicU64,
}

impl ConnectionTotals {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Figures about the process and the machine, supplied by whoever measures
/// them (the resource monitor).
pub trait ResourceReport: Send + Sync {
    fn resident_memory_bytes(&self) -> u64;
    fn memory_limit_bytes(&self) -> u64;
    fn memory_alarm(&self) -> bool;
    fn disk_free_bytes(&self) -> u64;
    fn disk_free_limit_bytes(&self) -> u64;
    fn disk_alarm(&self) -> bool;
}

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub connections: ConnectionTotals,
    /// From the end of a publish's read batch to its basic.ack going out.
    pub confirm_latency: Histogram,
    pub flush_duration: Histogram,
    /// Confirm batches released by one store flush.
    pub flush_batch: Histogram,
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .idle_timeout(
                MetricKindMask::COUNTER | MetricKindMask::GAUGE,
                Some(FORGET_AFTER),
            )
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), BATCH_BUCKETS))
            .expect("static bucket lists are valid")
            .build_recorder();
        let handle = recorder.handle();
        for (name, unit, help) in DESCRIPTIONS {
            let key = KeyName::from(*name);
            let help = (*help).into();
            if name.ends_with("_total") {
                recorder.describe_counter(key, *unit, help);
            } else if name.ends_with("_seconds") || name.ends_with("_size") {
                recorder.describe_histogram(key, *unit, help);
            } else {
                recorder.describe_gauge(key, *unit, help);
            }
        }
        let histogram = |name: &'static str| {
            recorder.register_histogram(&Key::from_static_name(name), &metadata())
        };
        Metrics {
            confirm_latency: histogram("hare_publisher_confirm_latency_seconds"),
            flush_duration: histogram("hare_store_flush_duration_seconds"),
            flush_batch: histogram("hare_store_flush_batch_size"),
            connections: ConnectionTotals::default(),
            recorder,
            handle,
        }
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&key(name, labels), &metadata())
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &metadata())
    }

    /// The Prometheus text for a scrape: reads every figure now, then renders.
    pub fn render(&self, broker: &Broker, resources: Option<&dyn ResourceReport>) -> String {
        self.sample(broker, resources);
        self.handle.run_upkeep();
        self.handle.render()
    }

    fn sample(&self, broker: &Broker, resources: Option<&dyn ResourceReport>) {
        let mut consumers = 0;
        for vhost in broker.vhosts() {
            let v = vhost.name.as_str();
            for queue in vhost.queues() {
                let stats = queue.stats();
                consumers += stats.consumers;
                let labels = [("vhost", v), ("queue", queue.name.as_str())];
                let set = |name, value: u64| self.gauge(name, &labels).set(value as f64);
                set("hare_queue_messages_ready", stats.ready);
                set("hare_queue_messages_unacked", stats.unacked);
                set("hare_queue_messages", stats.ready + stats.unacked);
                set("hare_queue_messages_ready_bytes", stats.ready_bytes);
                set("hare_queue_consumers", stats.consumers);
                let t = stats.totals;
                let count = |name, value: u64| self.counter(name, &labels).absolute(value);
                count("hare_queue_messages_published_total", t.published);
                count("hare_queue_messages_delivered_total", t.delivered);
                count("hare_queue_messages_redelivered_total", t.redelivered);
                count("hare_queue_messages_acked_total", t.acked);
                count("hare_queue_messages_expired_total", t.expired);
                for reason in Reason::ALL {
                    let labels = [
                        ("vhost", v),
                        ("queue", queue.name.as_str()),
                        ("reason", reason.as_str()),
                    ];
                    self.counter("hare_queue_messages_dead_lettered_total", &labels)
                        .absolute(t.dead_lettered[reason as usize]);
                }
            }
            for exchange in vhost.exchanges() {
                let labels = [("vhost", v), ("exchange", exchange.name.as_str())];
                let t = &exchange.totals;
                let out = t.published_out.load(Ordering::Relaxed);
                let unroutable = t.unroutable.load(Ordering::Relaxed);
                let count = |name, value| self.counter(name, &labels).absolute(value);
                count(
                    "hare_exchange_messages_published_in_total",
                    out + unroutable,
                );
                count("hare_exchange_messages_published_out_total", out);
                count("hare_exchange_messages_unroutable_total", unroutable);
            }
        }
        let c = &self.connections;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (opened, closed) = (load(&c.connections_opened), load(&c.connections_closed));
        let (ch_opened, ch_closed) = (load(&c.channels_opened), load(&c.channels_closed));
        let count = |name, value: u64| self.counter(name, &[]).absolute(value);
        let set = |name, value: u64| self.gauge(name, &[]).set(value as f64);
        count("hare_connections_opened_total", opened);
        count("hare_connections_closed_total", closed);
        count("hare_channels_opened_total", ch_opened);
        count("hare_channels_closed_total", ch_closed);
        set("hare_connections", opened.saturating_sub(closed));
        set("hare_channels", ch_opened.saturating_sub(ch_closed));
        set("hare_consumers", consumers);
        set("hare_process_open_fds", open_fds() as u64);
        if let Some(r) = resources {
            set(
                "hare_process_resident_memory_bytes",
                r.resident_memory_bytes(),
            );
            set("hare_resident_memory_limit_bytes", r.memory_limit_bytes());
            set(
                "hare_alarms_memory_used_watermark",
                u64::from(r.memory_alarm()),
            );
            set("hare_disk_space_available_bytes", r.disk_free_bytes());
            set(
                "hare_disk_space_available_limit_bytes",
                r.disk_free_limit_bytes(),
            );
            set(
                "hare_alarms_free_disk_space_watermark",
                u64::from(r.disk_alarm()),
            );
        }
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, (*v).to_owned()))
        .collect();
    Key::from_parts(name, labels)
}

/// Open file descriptors: sockets, store files. Linux only; 0 elsewhere.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count())
}

/// HELP lines, and the kind of each metric by its suffix.
const DESCRIPTIONS: &[(&str, Option<Unit>, &str)] = &[
    (
        "hare_queue_messages_ready",
        Some(Unit::Count),
        "Messages ready to be delivered",
    ),
    (
        "hare_queue_messages_unacked",
        Some(Unit::Count),
        "Messages delivered and not yet acknowledged",
    ),
    (
        "hare_queue_messages",
        Some(Unit::Count),
        "Ready plus unacknowledged messages",
    ),
    (
        "hare_queue_messages_ready_bytes",
        Some(Unit::Bytes),
        "Body bytes of ready messages",
    ),
    (
        "hare_queue_consumers",
        Some(Unit::Count),
        "Consumers on the queue",
    ),
    (
        "hare_queue_messages_published_total",
        Some(Unit::Count),
        "Messages enqueued",
    ),
    (
        "hare_queue_messages_delivered_total",
        Some(Unit::Count),
        "Messages delivered to consumers or basic.get",
    ),
    (
        "hare_queue_messages_redelivered_total",
        Some(Unit::Count),
        "Deliveries of messages delivered before",
    ),
    (
        "hare_queue_messages_acked_total",
        Some(Unit::Count),
        "Messages acknowledged",
    ),
    (
        "hare_queue_messages_expired_total",
        Some(Unit::Count),
        "Messages whose TTL ran out",
    ),
    (
        "hare_queue_messages_dead_lettered_total",
        Some(Unit::Count),
        "Messages sent to the dead-letter exchange, by reason",
    ),
    (
        "hare_exchange_messages_published_in_total",
        Some(Unit::Count),
        "Messages published to the exchange",
    ),
    (
        "hare_exchange_messages_published_out_total",
        Some(Unit::Count),
        "Messages the exchange routed to at least one queue",
    ),
    (
        "hare_exchange_messages_unroutable_total",
        Some(Unit::Count),
        "Messages the exchange routed nowhere",
    ),
    (
        "hare_connections",
        Some(Unit::Count),
        "Open client connections",
    ),
    ("hare_channels", Some(Unit::Count), "Open channels"),
    (
        "hare_consumers",
        Some(Unit::Count),
        "Consumers on all queues",
    ),
    (
        "hare_connections_opened_total",
        Some(Unit::Count),
        "Connections opened",
    ),
    (
        "hare_connections_closed_total",
        Some(Unit::Count),
        "Connections closed",
    ),
    (
        "hare_channels_opened_total",
        Some(Unit::Count),
        "Channels opened",
    ),
    (
        "hare_channels_closed_total",
        Some(Unit::Count),
        "Channels closed",
    ),
    (
        "hare_publisher_confirm_latency_seconds",
        Some(Unit::Seconds),
        "From a publish being read to its confirm being sent",
    ),
    (
        "hare_store_flush_duration_seconds",
        Some(Unit::Seconds),
        "Time of one store flush (fsync)",
    ),
    (
        "hare_store_flush_batch_size",
        Some(Unit::Count),
        "Confirm batches released by one flush",
    ),
    (
        "hare_process_open_fds",
        Some(Unit::Count),
        "Open file descriptors",
    ),
    (
        "hare_process_resident_memory_bytes",
        Some(Unit::Bytes),
        "Resident memory of the broker process",
    ),
    (
        "hare_resident_memory_limit_bytes",
        Some(Unit::Bytes),
        "Memory high watermark",
    ),
    (
        "hare_alarms_memory_used_watermark",
        None,
        "1 while the memory alarm is on",
    ),
    (
        "hare_disk_space_available_bytes",
        Some(Unit::Bytes),
        "Free disk space where the data dir is",
    ),
    (
        "hare_disk_space_available_limit_bytes",
        Some(Unit::Bytes),
        "Disk free limit",
    ),
    (
        "hare_alarms_free_disk_space_watermark",
        None,
        "1 while the disk alarm is on",
    ),
];
