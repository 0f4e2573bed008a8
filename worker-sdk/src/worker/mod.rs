//! The consumer side: a worker process for one consumer group.
//!
//! Lifecycle: connect → declare the topology → consume every route with a
//! prefetch tied to the concurrency → run handlers → settle each delivery
//! (ack, retry copy, or dead letter, always confirmed before the ack) → on a
//! lost connection reconnect with backoff → on shutdown stop consuming,
//! requeue what has not started, give in-flight handlers their grace, then
//! cancel them.

mod consume;
mod schedule;
mod session;
mod settle;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::broker::Nodes;
use crate::celery::CeleryTask;
use crate::context::Context;
use crate::error::{Error, Result, TaskError};
use crate::handler::{self, ErasedBatchHandler, ErasedHandler, Handler};
use crate::message::{Event, Task};
use crate::retry::RetryPolicy;
use crate::status::StatusEvent;
use crate::topology::QueueKind;

pub use schedule::Schedule;
pub(crate) use session::Shared;
pub(crate) use settle::{Failure, Job};

/// Entry point: `Worker::builder(url, group)`.
pub struct Worker;

impl Worker {
    /// A worker of consumer group `group`: workers of one group share the
    /// group's event queue (each event is handled once per group). `url` may
    /// list a cluster's nodes, comma-separated; the worker reconnects to the
    /// next one when its node goes away.
    pub fn builder(url: &str, group: &str) -> WorkerBuilder {
        WorkerBuilder {
            config: Config {
                nodes: Arc::new(Nodes::parse(url)),
                group: group.to_owned(),
                concurrency: 8,
                retry: RetryPolicy::default(),
                timeout: Duration::from_secs(600),
                shutdown_grace: Duration::from_secs(30),
                broker_consumer_timeout: Duration::from_secs(1800),
                crash_limit: None,
                quorum: false,
                status_events: true,
                metrics_listen: None,
            },
            routes: Routes::default(),
        }
    }
}

/// The settings that apply to every route.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub nodes: Arc<Nodes>,
    pub group: String,
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    pub shutdown_grace: Duration,
    pub broker_consumer_timeout: Duration,
    pub crash_limit: Option<u32>,
    pub quorum: bool,
    pub status_events: bool,
    pub metrics_listen: Option<SocketAddr>,
}

impl Config {
    /// Deliveries that may end without an outcome (the worker died) before
    /// the task is dead-lettered as a crash loop.
    pub fn crash_limit(&self) -> u32 {
        self.crash_limit.unwrap_or(self.retry.max_attempts).max(1)
    }

    pub fn queue_kind(&self) -> QueueKind {
        if self.quorum {
            QueueKind::Quorum {
                delivery_limit: self.crash_limit(),
            }
        } else {
            QueueKind::Classic
        }
    }
}

/// What a worker consumes.
#[derive(Default)]
pub(crate) struct Routes {
    /// Task queue → (task name, max priority, handler).
    pub tasks: Vec<TaskRoute>,
    /// Event name → handler, all on the group's queue.
    pub events: HashMap<String, ErasedHandler>,
    pub batches: Vec<BatchRoute>,
    pub periodic: Vec<schedule::Periodic>,
    /// Celery queues, each with its tasks' handlers by task name.
    pub celery: Vec<CeleryRoute>,
    /// Other jobs' status events, on the group's `{group}.status` queue.
    pub status: Option<StatusRoute>,
}

pub(crate) struct StatusRoute {
    /// Topic patterns on `hare.status` (`{task}.{state}` keys).
    pub patterns: Vec<String>,
    pub handler: ErasedHandler,
}

pub(crate) struct CeleryRoute {
    pub queue: String,
    pub handlers: HashMap<String, ErasedHandler>,
}

pub(crate) struct TaskRoute {
    pub queue: String,
    pub name: String,
    pub max_priority: Option<u8>,
    pub handler: ErasedHandler,
}

pub(crate) struct BatchRoute {
    pub queue: String,
    pub name: String,
    pub max_priority: Option<u8>,
    pub max: usize,
    pub linger: Duration,
    pub handler: ErasedBatchHandler,
}

/// Configures and starts a worker.
pub struct WorkerBuilder {
    config: Config,
    routes: Routes,
}

impl WorkerBuilder {
    /// Handlers running at once (and the prefetch of each queue).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n.max(1);
        self
    }

    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// A handler running longer is cancelled and counts as a failed attempt.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// How long in-flight handlers may finish after a shutdown signal.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// The broker's `consumer_timeout` (RabbitMQ's default is 30 minutes): a
    /// delivery unacked for longer closes the channel, so the handler timeout
    /// plus the grace must stay below it; `run` refuses otherwise.
    pub fn broker_consumer_timeout(mut self, timeout: Duration) -> Self {
        self.config.broker_consumer_timeout = timeout;
        self
    }

    /// Deliveries without an outcome (the worker died mid-task) before a task
    /// is dead-lettered as a crash loop; defaults to the retry attempts.
    pub fn crash_limit(mut self, deliveries: u32) -> Self {
        self.config.crash_limit = Some(deliveries);
        self
    }

    /// Declare quorum queues (a RabbitMQ cluster); the broker's
    /// `x-delivery-limit` then caps crash loops.
    pub fn quorum_queues(mut self) -> Self {
        self.config.quorum = true;
        self
    }

    /// Publish job status events on `hare.status` (on by default).
    pub fn status_events(mut self, on: bool) -> Self {
        self.config.status_events = on;
        self
    }

    /// Serve Prometheus `/metrics` on `addr` from this process.
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.config.metrics_listen = Some(addr);
        self
    }

    /// Handles task `T` (from its own queue).
    pub fn task<T, H>(mut self, handler: H) -> Self
    where
        T: Task,
        H: Handler<T, Output = T::Output>,
    {
        self.routes.tasks.push(TaskRoute {
            queue: T::QUEUE.to_owned(),
            name: T::NAME.to_owned(),
            max_priority: T::MAX_PRIORITY,
            handler: handler::erase::<T, H>(handler),
        });
        self
    }

    /// Handles Celery task `T`: Python's `send_task(T::NAME, …)` runs
    /// `handler` and `AsyncResult.get()` returns its output (see
    /// [`crate::celery`] for the argument binding, results and limits).
    pub fn celery_task<T, H>(mut self, handler: H) -> Self
    where
        T: CeleryTask,
        H: Handler<T::Args, Output = T::Output>,
    {
        let handler = crate::celery::erase::<T, H>(handler);
        let routes = &mut self.routes.celery;
        let index = match routes.iter().position(|r| r.queue == T::QUEUE) {
            Some(i) => i,
            None => {
                routes.push(CeleryRoute {
                    queue: T::QUEUE.to_owned(),
                    handlers: HashMap::new(),
                });
                routes.len() - 1
            }
        };
        routes[index].handlers.insert(T::NAME.to_owned(), handler);
        self
    }

    /// Handles event `E` in this worker's group.
    pub fn on<E, H>(mut self, handler: H) -> Self
    where
        E: Event,
        H: Handler<E, Output = ()>,
    {
        self.routes
            .events
            .insert(E::NAME.to_owned(), handler::erase::<E, H>(handler));
        self
    }

    /// Handles the status events ([`StatusEvent`]) of jobs whose routing key
    /// `{task}.{state}` matches one of the topic `patterns` (`video.*.succeeded`,
    /// `#.dead`, `#`), read from the group's own durable queue
    /// `{group}.status`, at least once, with retries and a dead-letter queue
    /// like any task. This is how a notifier learns that every part of a job
    /// ended, or an API keeps the state it shows: succeeded and dead events
    /// are confirmed by the broker before the job they report on is acked.
    /// Handling status events publishes none (no loops); one status handler
    /// per worker, a later call replaces the earlier one.
    pub fn on_status<H>(mut self, patterns: &[&str], handler: H) -> Self
    where
        H: Handler<StatusEvent, Output = ()>,
    {
        self.routes.status = Some(StatusRoute {
            patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
            handler: handler::erase::<StatusEvent, H>(handler),
        });
        self
    }

    /// Handles task `T` in batches of up to `max`, waiting at most `linger`
    /// after the first for the batch to fill. One outcome for the batch: on
    /// failure each task is retried (or dead-lettered) on its own.
    pub fn batch<T, F, Fut>(mut self, max: usize, linger: Duration, handler: F) -> Self
    where
        T: Task,
        F: Fn(Vec<T>, Vec<Context>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        self.routes.batches.push(BatchRoute {
            queue: T::QUEUE.to_owned(),
            name: T::NAME.to_owned(),
            max_priority: T::MAX_PRIORITY,
            max: max.max(1),
            linger,
            handler: handler::erase_batch::<T, F, Fut>(handler),
        });
        self
    }

    /// Enqueues the task `make()` returns once per tick of `schedule`, across
    /// all worker processes (one leader at a time, by single active
    /// consumer), for whichever worker handles `T`.
    pub fn every<T, F>(mut self, schedule: Schedule, make: F) -> Self
    where
        T: Task + Serialize,
        F: Fn() -> T + Send + Sync + 'static,
    {
        self.routes
            .periodic
            .push(schedule::Periodic::new::<T, F>(schedule, make));
        self
    }

    /// Checks the configuration against the guarantees it must keep.
    fn validate(&self) -> Result<()> {
        let c = &self.config;
        if c.timeout + c.shutdown_grace >= c.broker_consumer_timeout {
            return Err(Error::Config(format!(
                "timeout ({:?}) plus shutdown grace ({:?}) must stay below the broker's consumer \
                 timeout ({:?}), or the broker would close the channel under a running task",
                c.timeout, c.shutdown_grace, c.broker_consumer_timeout
            )));
        }
        let r = &self.routes;
        if r.tasks.is_empty()
            && r.events.is_empty()
            && r.batches.is_empty()
            && r.periodic.is_empty()
            && r.celery.is_empty()
            && r.status.is_none()
        {
            return Err(Error::Config(
                "the worker has no task, event or schedule".into(),
            ));
        }
        if c.quorum && !r.celery.is_empty() {
            return Err(Error::Config(
                "Celery tasks need classic queues: a Celery queue is declared as Celery declares \
                 it, without the delivery limit quorum queues rely on here"
                    .into(),
            ));
        }
        for batch in &r.batches {
            if batch.max > u16::MAX as usize || batch.linger >= c.timeout {
                return Err(Error::Config(format!(
                    "batch of {} for {}: at most 65535 and a linger below the timeout",
                    batch.max, batch.name
                )));
            }
        }
        Ok(())
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run(self) -> Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Runs until `stop` completes, then shuts down gracefully.
    pub async fn run_until(self, stop: impl Future<Output = ()> + Send) -> Result<()> {
        self.validate()?;
        if let Some(addr) = self.config.metrics_listen {
            crate::metrics::serve(addr).map_err(Error::Config)?;
        }
        session::run(Arc::new(self.config), Arc::new(self.routes), stop).await
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
