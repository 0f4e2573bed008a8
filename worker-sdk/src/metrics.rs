//! The worker's metrics, through the `metrics` facade: whatever recorder the
//! application installs gets them; [`crate::WorkerBuilder::metrics_listen`]
//! installs a Prometheus one.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const STARTED: &str = "hare_worker_tasks_started_total";
pub const SUCCEEDED: &str = "hare_worker_tasks_succeeded_total";
pub const FAILED: &str = "hare_worker_tasks_failed_total";
pub const RETRIED: &str = "hare_worker_tasks_retried_total";
pub const DEAD_LETTERED: &str = "hare_worker_tasks_dead_lettered_total";
pub const DURATION: &str = "hare_worker_task_duration_seconds";
pub const QUEUE_WAIT: &str = "hare_worker_queue_wait_seconds";
pub const IN_FLIGHT: &str = "hare_worker_in_flight";

/// Buckets from 1 ms to an hour: handlers range from no-ops to transcodes.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    1800.0, 3600.0,
];

pub fn started(task: &str, queue_wait: Duration) {
    counter!(STARTED, "task" => task.to_owned()).increment(1);
    histogram!(QUEUE_WAIT, "task" => task.to_owned()).record(queue_wait.as_secs_f64());
    gauge!(IN_FLIGHT).increment(1.0);
}

pub fn finished(task: &str, took: Duration, outcome: &'static str) {
    gauge!(IN_FLIGHT).decrement(1.0);
    histogram!(DURATION, "task" => task.to_owned()).record(took.as_secs_f64());
    let name = match outcome {
        "succeeded" => SUCCEEDED,
        _ => FAILED,
    };
    counter!(name, "task" => task.to_owned()).increment(1);
}

pub fn retried(task: &str) {
    counter!(RETRIED, "task" => task.to_owned()).increment(1);
}

pub fn dead_lettered(task: &str, kind: &str) {
    counter!(DEAD_LETTERED, "task" => task.to_owned(), "kind" => kind.to_owned()).increment(1);
}

/// Serves `/metrics` on `addr` (a global recorder: one per process).
pub fn serve(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| e.to_string())
}
