//! The worker's outer loop: one session per connection, reconnecting with
//! backoff until the stop signal, then the graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::Channel;
use rand::Rng;
use tokio::sync::{OnceCell, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{consume, schedule, Config, Routes};
use crate::error::{Error, Result};
use crate::topology::{self, DelayPath};

/// State shared by every session and in-flight handler of one worker.
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub routes: Arc<Routes>,
    /// One permit per concurrent handler, across all routes.
    pub permits: Arc<Semaphore>,
    /// In-flight handlers, across sessions.
    pub in_flight: TaskTracker,
    /// The stop signal: consume no more.
    pub stop: CancellationToken,
    /// Past the grace period: cancel running handlers.
    pub hard: CancellationToken,
    delay_path: OnceCell<DelayPath>,
}

impl Shared {
    pub fn delay_path(&self) -> DelayPath {
        *self
            .delay_path
            .get()
            .expect("probed before the first consumer starts")
    }
}

pub(crate) async fn run(
    config: Arc<Config>,
    routes: Arc<Routes>,
    stop: impl Future<Output = ()> + Send,
) -> Result<()> {
    let shared = Arc::new(Shared {
        permits: Arc::new(Semaphore::new(config.concurrency)),
        config,
        routes,
        in_flight: TaskTracker::new(),
        stop: CancellationToken::new(),
        hard: CancellationToken::new(),
        delay_path: OnceCell::new(),
    });
    let done = CancellationToken::new();
    let watch_stop = async {
        tokio::select! {
            _ = stop => shared.stop.cancel(),
            _ = done.cancelled() => {}
        }
    };
    let work = async {
        let result = reconnect_loop(&shared).await;
        done.cancel();
        result
    };
    let ((), result) = tokio::join!(watch_stop, work);
    result
}

/// Sessions until the stop signal; a failed session (broker down, connection
/// lost) is retried after a backoff with jitter.
async fn reconnect_loop(w: &Arc<Shared>) -> Result<()> {
    let mut failures = 0u32;
    loop {
        let began = std::time::Instant::now();
        match session(w).await {
            Ok(()) => return Ok(()),
            Err(Error::Config(e)) => return Err(Error::Config(e)),
            Err(e) => {
                if w.stop.is_cancelled() {
                    // No connection to finish on: in-flight handlers are cut
                    // off and their deliveries requeued by the broker.
                    w.hard.cancel();
                    return Ok(());
                }
                if began.elapsed() > Duration::from_secs(30) {
                    failures = 0;
                }
                failures += 1;
                let backoff = reconnect_backoff(failures);
                tracing::warn!(
                    group = %w.config.group,
                    "connection lost ({e}); reconnecting in {backoff:?}"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = w.stop.cancelled() => { w.hard.cancel(); return Ok(()); }
                }
            }
        }
    }
}

/// 100 ms doubling to 10 s, each scaled by a random factor in [0.5, 1].
fn reconnect_backoff(failures: u32) -> Duration {
    let nominal = Duration::from_millis(100) * 2u32.pow(failures.saturating_sub(1).min(7));
    nominal
        .min(Duration::from_secs(10))
        .mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// One connection's worth of work. A stop signal during the start-up ends
/// it at once: this connection consumed nothing, and handlers left from a
/// lost one cannot ack any more.
async fn session(w: &Arc<Shared>) -> Result<()> {
    let (conn, mut consumers) = tokio::select! {
        started = start(w) => started?,
        _ = w.stop.cancelled() => {
            w.hard.cancel();
            return Ok(());
        }
    };
    // Until the stop signal or the first consumer that fails.
    let failed = tokio::select! {
        _ = w.stop.cancelled() => None,
        Some(ended) = consumers.join_next() => Some(ended),
    };
    if let Some(ended) = failed {
        consumers.abort_all();
        return match ended {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Err(Error::Disconnected),
            Err(e) => Err(Error::Config(format!("consumer task failed: {e}"))),
        };
    }
    // Consumers cancel themselves and requeue what has not started.
    while consumers.join_next().await.is_some() {}
    finish_in_flight(w).await;
    // Bounded: lapin's close can wait for a close-ok that never comes (seen
    // under load), and a stopping worker must not hang on a goodbye.
    let close = conn.close(200, "worker stopped".into());
    if tokio::time::timeout(Duration::from_secs(5), close)
        .await
        .is_err()
    {
        tracing::warn!("the broker did not confirm the close within 5 s; leaving anyway");
    }
    Ok(())
}

/// Connects, declares the topology and starts every consumer.
async fn start(w: &Arc<Shared>) -> Result<(lapin::Connection, JoinSet<Result<()>>)> {
    let (conn, url) = w.config.nodes.connect().await?;
    let path = *w
        .delay_path
        .get_or_try_init(|| topology::probe_delay_path(&url))
        .await?;
    let outbox = conn.create_channel().await?;
    outbox
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    declare(w, &outbox, path).await?;

    let mut consumers: JoinSet<Result<()>> = JoinSet::new();
    for (i, _) in w.routes.tasks.iter().enumerate() {
        let ch = conn.create_channel().await?;
        consumers.spawn(consume::tasks(
            w.clone(),
            ch,
            outbox.clone(),
            consume::Source::Task(i),
        ));
    }
    if !w.routes.events.is_empty() {
        let ch = conn.create_channel().await?;
        consumers.spawn(consume::tasks(
            w.clone(),
            ch,
            outbox.clone(),
            consume::Source::Events,
        ));
    }
    for (i, _) in w.routes.celery.iter().enumerate() {
        let ch = conn.create_channel().await?;
        consumers.spawn(consume::tasks(
            w.clone(),
            ch,
            outbox.clone(),
            consume::Source::Celery(i),
        ));
    }
    if w.routes.status.is_some() {
        let ch = conn.create_channel().await?;
        consumers.spawn(consume::tasks(
            w.clone(),
            ch,
            outbox.clone(),
            consume::Source::Status,
        ));
    }
    for (i, _) in w.routes.batches.iter().enumerate() {
        let ch = conn.create_channel().await?;
        consumers.spawn(consume::batches(w.clone(), ch, outbox.clone(), i));
    }
    for (i, _) in w.routes.periodic.iter().enumerate() {
        let ch = conn.create_channel().await?;
        consumers.spawn(schedule::lead(w.clone(), ch, outbox.clone(), i));
    }

    Ok((conn, consumers))
}

/// Lets in-flight handlers finish within the grace period, then cancels them.
async fn finish_in_flight(w: &Shared) {
    w.in_flight.close();
    if tokio::time::timeout(w.config.shutdown_grace, w.in_flight.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "{} handler(s) still running after the {:?} grace: cancelling",
            w.in_flight.len(),
            w.config.shutdown_grace
        );
        w.hard.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), w.in_flight.wait()).await;
    }
}

/// The worker's side of the topology, declared on every (re)connect.
async fn declare(w: &Shared, ch: &Channel, path: DelayPath) -> Result<()> {
    let kind = w.config.queue_kind();
    topology::declare_event_exchanges(ch).await?;
    if path == DelayPath::Ladder {
        topology::declare_ladder(ch, kind).await?;
    }
    for route in &w.routes.tasks {
        topology::declare_task_queue(ch, &route.queue, kind, route.max_priority, path).await?;
    }
    for route in &w.routes.batches {
        topology::declare_task_queue(ch, &route.queue, kind, route.max_priority, path).await?;
    }
    for route in &w.routes.celery {
        crate::celery::declare_queue(ch, &route.queue, kind, Some(path)).await?;
    }
    if !w.routes.events.is_empty() {
        let queue = topology::group_queue(&w.config.group);
        topology::declare_work_queue(ch, &queue, kind, None, path).await?;
        let names: Vec<&str> = w.routes.events.keys().map(String::as_str).collect();
        topology::bind_events(ch, &queue, &names).await?;
    }
    if let Some(route) = &w.routes.status {
        let queue = topology::status_queue(&w.config.group);
        topology::declare_work_queue(ch, &queue, kind, None, path).await?;
        let patterns: Vec<&str> = route.patterns.iter().map(String::as_str).collect();
        topology::bind_status(ch, &queue, &patterns).await?;
    }
    for periodic in &w.routes.periodic {
        periodic.declare(ch, kind, path).await?;
    }
    Ok(())
}
