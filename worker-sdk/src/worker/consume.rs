//! Consumer loops: deliveries in, handlers out, bounded by the permits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::session::Shared;
use super::settle::{guarded, Failure, Job};
use crate::context::Protocol;
use crate::error::{Error, Result};
use crate::handler::ErasedHandler;
use crate::headers;
use crate::topology;

/// Which route a consumer serves.
#[derive(Clone, Copy)]
pub(crate) enum Source {
    Task(usize),
    Events,
    /// A queue of Celery tasks, told apart by their `task` header.
    Celery(usize),
    /// The group's status queue: other jobs' status events.
    Status,
}

/// Starts consuming `queue` with a prefetch of `prefetch`.
async fn start(ch: &Channel, queue: &str, prefetch: usize) -> Result<Consumer> {
    ch.basic_qos(
        prefetch.min(u16::MAX as usize) as u16,
        BasicQosOptions::default(),
    )
    .await?;
    Ok(ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// The next delivery, or `None` once the stop signal fired.
async fn next(w: &Shared, consumer: &mut Consumer) -> Result<Option<Delivery>> {
    tokio::select! {
        biased;
        _ = w.stop.cancelled() => Ok(None),
        item = consumer.next() => match item {
            Some(Ok(d)) => Ok(Some(d)),
            Some(Err(e)) => Err(e.into()),
            None => Err(Error::Disconnected),
        },
    }
}

/// A permit to run one handler, or `None` once the stop signal fired.
async fn permit(w: &Shared) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        _ = w.stop.cancelled() => None,
        p = w.permits.clone().acquire_owned() => p.ok(),
    }
}

/// Stops the consumer and hands back what it prefetched but never started.
async fn stop(ch: &Channel, mut consumer: Consumer, unstarted: Vec<Delivery>) {
    let _ = ch
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let mut unstarted = unstarted;
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
    {
        unstarted.push(d);
    }
    for d in unstarted {
        let _ = d
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await;
    }
}

/// One task queue, or the group's event queue: each delivery runs on its
/// own once a permit is free, so one slow task never holds up the others.
pub(crate) async fn tasks(
    w: Arc<Shared>,
    ch: Channel,
    outbox: Channel,
    source: Source,
) -> Result<()> {
    let queue = match source {
        Source::Task(i) => w.routes.tasks[i].queue.clone(),
        Source::Events => topology::group_queue(&w.config.group),
        Source::Celery(i) => w.routes.celery[i].queue.clone(),
        Source::Status => topology::status_queue(&w.config.group),
    };
    let protocol = match source {
        Source::Celery(_) => Protocol::Celery,
        _ => Protocol::Hare,
    };
    let mut consumer = start(&ch, &queue, w.config.concurrency).await?;
    while let Some(delivery) = next(&w, &mut consumer).await? {
        let Some(permit) = permit(&w).await else {
            stop(&ch, consumer, vec![delivery]).await;
            return Ok(());
        };
        let (name, handler) = resolve(&w, source, &delivery);
        let mut job = Job::new(&w, &outbox, &queue, &name, delivery, protocol);
        if matches!(source, Source::Status) {
            // A status event about handling a status event would loop.
            job.publish_no_status();
        }
        let span = job.span();
        // The handler keeps the consumer's channel open: lapin closes a
        // channel with its last handle, and with it every unsettled delivery.
        let (w2, outbox, _channel) = (w.clone(), outbox.clone(), ch.clone());
        w.in_flight.spawn(
            async move {
                let (_permit, _channel) = (permit, _channel);
                if job.settle_if_crash_loop(&w2, &outbox).await {
                    return;
                }
                match protocol {
                    Protocol::Hare => job.run(&w2, &outbox, handler).await,
                    Protocol::Celery => crate::celery::serve(job, &w2, &outbox, handler).await,
                }
            }
            .instrument(span),
        );
    }
    stop(&ch, consumer, Vec::new()).await;
    Ok(())
}

/// The handler for a delivery: its route's, or by event name.
fn resolve(w: &Shared, source: Source, d: &Delivery) -> (String, Option<ErasedHandler>) {
    match source {
        Source::Task(i) => {
            let route = &w.routes.tasks[i];
            (route.name.clone(), Some(route.handler.clone()))
        }
        Source::Events => {
            let name = headers::get_str(&d.properties, headers::TASK)
                .unwrap_or_else(|| d.routing_key.as_str().to_owned());
            let handler = w.routes.events.get(&name).cloned();
            (name, handler)
        }
        Source::Celery(i) => {
            let name = crate::celery::task_name(&d.properties).unwrap_or_default();
            let handler = w.routes.celery[i].handlers.get(&name).cloned();
            (name, handler)
        }
        Source::Status => (
            topology::STATUS_EXCHANGE.to_owned(),
            w.routes.status.as_ref().map(|r| r.handler.clone()),
        ),
    }
}

/// A batch route: collect up to `max` deliveries (waiting at most `linger`
/// after the first), then run the handler once for all of them.
pub(crate) async fn batches(
    w: Arc<Shared>,
    ch: Channel,
    outbox: Channel,
    index: usize,
) -> Result<()> {
    let route = &w.routes.batches[index];
    let mut consumer = start(&ch, &route.queue, route.max.max(w.config.concurrency)).await?;
    loop {
        let Some(first) = next(&w, &mut consumer).await? else {
            break;
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + route.linger;
        while batch.len() < route.max {
            match tokio::time::timeout_at(deadline, next(&w, &mut consumer)).await {
                Ok(Ok(Some(d))) => batch.push(d),
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(e)) => return Err(e),
            }
        }
        let Some(permit) = permit(&w).await else {
            stop(&ch, consumer, batch).await;
            return Ok(());
        };
        let jobs: Vec<Job> = batch
            .into_iter()
            .map(|d| Job::new(&w, &outbox, &route.queue, &route.name, d, Protocol::Hare))
            .collect();
        let (w2, outbox, _channel) = (w.clone(), outbox.clone(), ch.clone());
        w.in_flight.spawn(async move {
            let (_permit, _channel) = (permit, _channel);
            run_batch(&w2, &outbox, index, jobs).await;
        });
    }
    stop(&ch, consumer, Vec::new()).await;
    Ok(())
}

async fn run_batch(w: &Shared, outbox: &Channel, index: usize, jobs: Vec<Job>) {
    let handler = &w.routes.batches[index].handler;
    let mut runnable = Vec::with_capacity(jobs.len());
    for job in jobs {
        if job.settle_if_crash_loop(w, outbox).await {
            continue;
        }
        if let Err(e) = (handler.check)(&job.delivery.data) {
            let message = format!("cannot decode {}: {}", w.routes.batches[index].name, e.0);
            job.dead_letter(
                w,
                outbox,
                Failure {
                    kind: "decode",
                    message,
                    retry_after: None,
                    retryable: false,
                },
            )
            .await;
            continue;
        }
        runnable.push(job);
    }
    if runnable.is_empty() {
        return;
    }
    for job in &runnable {
        job.begin().await;
    }
    let began = Instant::now();
    let bodies: Vec<&[u8]> = runnable
        .iter()
        .map(|j| j.delivery.data.as_slice())
        .collect();
    let ctxs = runnable.iter().map(|j| j.ctx.clone()).collect();
    let future = (handler.run)(bodies, ctxs);
    let cancel = tokio_util::sync::CancellationToken::new();
    let outcome = guarded(future, w.config.timeout, &cancel, &w.hard).await;
    for job in &runnable {
        let outcome = match &outcome {
            Ok(()) => Ok(serde_json::Value::Null),
            Err(failure) => Err(failure.clone()),
        };
        job.finish(w, outbox, outcome.into(), began).await;
    }
}
