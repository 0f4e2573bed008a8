//! # hare-worker: typed background workers over AMQP 0-9-1
//!
//! Tasks and events are serde types; handlers are async functions; the SDK
//! owns the AMQP: topology, retries with backoff, dead letters that carry the
//! error, RPC, periodic jobs, reconnects and graceful shutdown. It speaks
//! plain AMQP 0-9-1 (through lapin), so the same worker runs on one Hare node
//! or on a RabbitMQ cluster.
//!
//! ```no_run
//! use std::time::Duration;
//! use hare_worker::{Client, Context, RetryPolicy, Task, TaskError, Worker};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Thumbnail { video: String, at_seconds: u32 }
//!
//! impl Task for Thumbnail {
//!     const NAME: &'static str = "video.thumbnail";
//!     type Output = String; // where the image went
//! }
//!
//! async fn thumbnail(job: Thumbnail, ctx: Context) -> Result<String, TaskError> {
//!     let out = format!("/tmp/{}.jpg", ctx.job_id());
//!     let status = ctx
//!         .command("ffmpeg") // killed if the task is cancelled
//!         .args(["-y", "-ss", &job.at_seconds.to_string(), "-i", &job.video])
//!         .args(["-frames:v", "1", &out])
//!         .status()
//!         .await?; // an I/O error: retried with backoff
//!     if !status.success() {
//!         return Err(TaskError::fatal(format!("ffmpeg failed: {status}")));
//!     }
//!     Ok(out)
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), hare_worker::Error> {
//!     let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
//!
//!     // Producer: returns once the broker has confirmed the task.
//!     let client = Client::connect(url).await?;
//!     let job = client
//!         .enqueue(&Thumbnail { video: "in.mp4".into(), at_seconds: 3 })
//!         .await?;
//!     println!("enqueued {job}");
//!
//!     // Worker: 4 at a time, 5 attempts 1 s, 2 s, 4 s… apart, then `video.thumbnail.dlq`.
//!     Worker::builder(url, "thumbnailer")
//!         .concurrency(4)
//!         .retry(RetryPolicy::exponential(5, Duration::from_secs(1)))
//!         .timeout(Duration::from_secs(120))
//!         .task::<Thumbnail, _>(thumbnail)
//!         .run() // until SIGTERM or Ctrl-C, then a graceful shutdown
//!         .await
//! }
//! ```
//!
//! ## Delivery guarantees, honestly
//! - **At least once.** A delivery is acked only after the handler returned
//!   `Ok` (and the reply and status went out), or after its retry copy or
//!   dead letter was confirmed by the broker. A worker that dies mid-task
//!   leaves the delivery unacked and the broker gives it to another worker,
//!   with [`Context::redelivered`] set. So a handler can run more than once
//!   for one job: make its effects idempotent, keyed by [`Context::job_id`]
//!   (stable across retries and redeliveries) or
//!   [`Context::idempotency_key`], e.g. an upsert or a file named after it.
//! - **Crash loops end.** Classic queues keep no delivery count, so the SDK
//!   counts redeliveries in a header (`x-hare-redeliveries`) by re-publishing
//!   a redelivered task before running it; after `crash_limit` deliveries
//!   without an outcome it is dead-lettered (kind `crash-loop`). A task
//!   requeued unstarted by a graceful shutdown counts too (the broker marks
//!   it redelivered either way), as with quorum queues' own delivery count;
//!   with [`WorkerBuilder::quorum_queues`] the broker's `x-delivery-limit`
//!   does the counting.
//! - **Retries wait in the broker, not in the worker**: a retry is a new copy
//!   published with a delay (the `x-delayed-message` exchange where the broker
//!   has it, as Hare does; else a ladder of TTL queues), and the original is
//!   acked once the copy is confirmed. Nothing is held unacked for a backoff,
//!   so the broker's consumer timeout never fires on a waiting retry.
//! - **Dead letters carry the error**: `{queue}.dlq` receives a copy with
//!   `x-hare-error`, `x-hare-error-kind`, `x-hare-attempts`, `x-hare-queue`
//!   and `x-hare-failed-at` headers; [`Client::replay_dead`] moves them back.
//!
//! ## Celery
//! [`WorkerBuilder::celery_task`] serves tasks that Python's Celery sends
//! (`send_task`, protocol 2, JSON) and answers through Celery's `rpc://`
//! result backend; [`Client::call_celery`] and [`Client::send_celery_task`]
//! run tasks on Celery workers. See [`celery`].
//!
//! ## On a RabbitMQ cluster
//! Give every node's URL, comma-separated, and use quorum queues on both
//! sides ([`WorkerBuilder::quorum_queues`], [`Client::connect_with`] with
//! [`QueueKind::Quorum`]): task, dead-letter, event, schedule-token and
//! delay-ladder queues are then replicated, and a worker or producer whose
//! node goes away reconnects to the next one. A task whose ack was lost with
//! the node runs again elsewhere (at least once). `examples/worker_cluster.rs`
//! shows it on a three-node cluster that loses a node mid-run. On RabbitMQ
//! before 3.12, a retry waiting in the delay ladder when a node is lost can be
//! held until that node is back (a RabbitMQ bug, fixed upstream by
//! rabbitmq-server commit 27886dd9a2); it is not lost.
//!
//! ## Topology
//! `hare.tasks` (direct) with a durable queue per task, declared by producers
//! too; `hare.events` (topic) with a durable queue per consumer group
//! (`{group}.events`) bound to each event name the group handles;
//! `hare.status` (topic) carrying [`StatusEvent`]s as `{task}.{state}`.

mod broker;
pub mod celery;
mod client;
mod context;
mod error;
mod handler;
mod headers;
mod message;
pub mod metrics;
mod publish;
mod retry;
mod status;
pub mod topology;
mod worker;

pub use celery::CeleryTask;
pub use client::{Client, EnqueueOptions, Submission, Update};
pub use context::Context;
pub use error::{BoxError, Error, Result, TaskError};
pub use handler::Handler;
pub use message::{Event, JobId, Task};
pub use retry::RetryPolicy;
pub use status::{JobState, StatusEvent};
pub use topology::{DelayPath, QueueKind};
pub use worker::{Schedule, Worker, WorkerBuilder};

/// Header names the SDK reads and writes, for programs that inspect messages.
pub mod header_names {
    pub use crate::headers::{
        ATTEMPT, ATTEMPTS, ENQUEUED_MS, ERROR, ERROR_KIND, FAILED_AT_MS, ORIGINAL_QUEUE,
        REDELIVERIES, TASK,
    };
}
