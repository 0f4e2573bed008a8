//! One delivery, start to finish: run the handler under its timeout and the
//! shutdown, then settle the delivery. The rule throughout: the original is
//! acked only after whatever replaces it (a retry copy, a dead letter) is
//! confirmed; if that publish fails the original is requeued, so a failure
//! of the SDK can duplicate a task but never lose one.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::session::Shared;
use crate::context::{Context, JobInfo, Protocol};
use crate::error::TaskError;
use crate::handler::{DecodeError, ErasedHandler};
use crate::headers;
use crate::metrics;
use crate::publish;
use crate::status::{JobState, Reply};
use crate::topology::{self, QueueKind};

/// How a handler run ended.
pub(crate) enum Outcome {
    Succeeded(serde_json::Value),
    Failed(Failure),
    /// Cancelled by the shutdown past its grace: left unacked, the broker
    /// requeues it when the connection closes.
    Aborted,
}

/// A failed attempt.
#[derive(Clone)]
pub(crate) struct Failure {
    /// `error`, `fatal`, `timeout`, `panic`, `decode`, `crash-loop`, `no-handler`.
    pub kind: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
    pub retryable: bool,
}

impl Failure {
    pub fn permanent(kind: &'static str, message: String) -> Self {
        Failure {
            kind,
            message,
            retry_after: None,
            retryable: false,
        }
    }
}

impl From<TaskError> for Failure {
    fn from(err: TaskError) -> Self {
        let message = err.message();
        match err {
            TaskError::Retry(_) => Failure {
                kind: "error",
                message,
                retry_after: None,
                retryable: true,
            },
            TaskError::RetryAfter(after, _) => Failure {
                kind: "error",
                message,
                retry_after: Some(after),
                retryable: true,
            },
            TaskError::Fatal(_) => Failure::permanent("fatal", message),
        }
    }
}

/// One delivery and what the worker knows about it.
pub(crate) struct Job {
    pub delivery: Delivery,
    pub ctx: Context,
    pub queue: String,
}

impl Job {
    pub fn new(
        w: &Shared,
        outbox: &Channel,
        queue: &str,
        name: &str,
        delivery: Delivery,
        protocol: Protocol,
    ) -> Job {
        let props = &delivery.properties;
        let job_id = props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|| format!("delivery-{}", delivery.delivery_tag));
        let enqueued_at = headers::get_int(props, headers::ENQUEUED_MS)
            .map(headers::from_ms)
            .or_else(|| props.timestamp().map(|s| headers::from_ms(s as i64 * 1000)))
            .unwrap_or_else(SystemTime::now);
        let mut info = JobInfo {
            job_id,
            name: name.to_owned(),
            queue: queue.to_owned(),
            attempt: headers::get_int(props, headers::ATTEMPT)
                .unwrap_or(1)
                .max(1) as u32,
            // A copy the SDK re-published after a redelivery is one too.
            redelivered: delivery.redelivered
                || headers::get_int(props, headers::REDELIVERIES).unwrap_or(0) > 0,
            enqueued_at,
            reply_to: props.reply_to().as_ref().map(|s| s.as_str().to_owned()),
            correlation_id: props
                .correlation_id()
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            publish_status: w.config.status_events,
            protocol,
        };
        if protocol == Protocol::Celery {
            crate::celery::adapt(&mut info, props);
        }
        let ctx = Context {
            job: Arc::new(info),
            cancel: w.hard.child_token(),
            outbox: Some(outbox.clone()),
        };
        Job {
            delivery,
            ctx,
            queue: queue.to_owned(),
        }
    }

    /// Runs this job without publishing status events about it.
    pub fn publish_no_status(&mut self) {
        Arc::make_mut(&mut self.ctx.job).publish_status = false;
    }

    fn name(&self) -> &str {
        &self.ctx.job.name
    }

    /// The span everything about this delivery is logged in.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("task", job = %self.ctx.job_id(), task = %self.name(), attempt = self.ctx.attempt())
    }

    /// A redelivery on a classic queue: the last delivery ended without an
    /// outcome. Counted in a header (classic queues keep no count); past the
    /// crash limit the task is dead-lettered instead of killing another worker.
    /// Returns true when the delivery was settled here.
    pub async fn settle_if_crash_loop(&self, w: &Shared, outbox: &Channel) -> bool {
        if !self.delivery.redelivered || w.config.queue_kind() != QueueKind::Classic {
            return false;
        }
        let props = &self.delivery.properties;
        let count = headers::get_int(props, headers::REDELIVERIES).unwrap_or(0) + 1;
        if count >= w.config.crash_limit() as i64 {
            let message = format!(
                "delivered {count} times without an outcome: the worker died or was stopped \
                 during the task each time"
            );
            self.dead_letter(w, outbox, Failure::permanent("crash-loop", message))
                .await;
            return true;
        }
        let mut table = headers::for_copy(props);
        headers::set_int(&mut table, headers::REDELIVERIES, count);
        let copy = props.clone().with_headers(table);
        let path = w.delay_path();
        match publish::to_queue_after(
            outbox,
            path,
            &self.queue,
            Duration::ZERO,
            &self.delivery.data,
            copy,
        )
        .await
        {
            Ok(()) => self.ack().await,
            Err(e) => self.requeue(&e.to_string()).await,
        }
        true
    }

    /// Runs the handler and settles the delivery by its outcome.
    pub async fn run(self, w: &Shared, outbox: &Channel, handler: Option<ErasedHandler>) {
        let Some(handler) = handler else {
            let message = format!("no handler for {:?} in this group", self.name());
            return self
                .dead_letter(w, outbox, Failure::permanent("no-handler", message))
                .await;
        };
        let future = match handler(&self.delivery.data, self.ctx.clone()) {
            Ok(f) => f,
            Err(DecodeError(e)) => {
                let message = format!("cannot decode {}: {e}", self.name());
                return self
                    .dead_letter(w, outbox, Failure::permanent("decode", message))
                    .await;
            }
        };
        self.begin().await;
        let began = Instant::now();
        let outcome = guarded(future, w.config.timeout, &self.ctx.cancel, &w.hard).await;
        self.finish(w, outbox, outcome.into(), began).await;
    }

    /// Metrics and the `started` event.
    pub async fn begin(&self) {
        let wait = SystemTime::now()
            .duration_since(self.ctx.enqueued_at())
            .unwrap_or_default();
        metrics::started(self.name(), wait);
        tracing::debug!("started");
        self.ctx.emit(JobState::Started, |_| {}).await;
    }

    /// Settles by outcome.
    pub async fn finish(&self, w: &Shared, outbox: &Channel, outcome: Outcome, began: Instant) {
        match outcome {
            Outcome::Aborted => {
                metrics::finished(self.name(), began.elapsed(), "aborted");
            }
            Outcome::Succeeded(output) => {
                metrics::finished(self.name(), began.elapsed(), "succeeded");
                self.ctx
                    .reply(&Reply::Result {
                        output: output.clone(),
                    })
                    .await;
                self.ctx
                    .emit(JobState::Succeeded, |e| e.output = Some(output))
                    .await;
                self.ack().await;
            }
            Outcome::Failed(failure) => {
                metrics::finished(self.name(), began.elapsed(), "failed");
                self.fail(w, outbox, failure).await;
            }
        }
    }

    /// Retries (a delayed copy with the next attempt number) or dead-letters.
    pub async fn fail(&self, w: &Shared, outbox: &Channel, failure: Failure) {
        let attempt = self.ctx.attempt();
        tracing::warn!(kind = failure.kind, "failed: {}", failure.message);
        if !failure.retryable || w.config.retry.exhausted(attempt) {
            let failure = Failure {
                kind: if failure.kind == "error" {
                    "exhausted"
                } else {
                    failure.kind
                },
                ..failure
            };
            return self.dead_letter(w, outbox, failure).await;
        }
        let delay = failure
            .retry_after
            .unwrap_or_else(|| w.config.retry.delay(attempt));
        let mut table = headers::for_copy(&self.delivery.properties);
        headers::set_int(&mut table, headers::ATTEMPT, attempt as i64 + 1);
        headers::set_int(&mut table, headers::REDELIVERIES, 0);
        headers::set_str(&mut table, headers::ERROR, &failure.message);
        let copy = self.delivery.properties.clone().with_headers(table);
        match publish::to_queue_after(
            outbox,
            w.delay_path(),
            &self.queue,
            delay,
            &self.delivery.data,
            copy,
        )
        .await
        {
            Ok(()) => {
                metrics::retried(self.name());
                self.ctx
                    .emit(JobState::Failed, |e| {
                        e.error = Some(failure.message.clone())
                    })
                    .await;
                self.ack().await;
            }
            Err(e) => self.requeue(&e.to_string()).await,
        }
    }

    /// Copies the message to `{queue}.dlq` with the error, waits for the
    /// confirm, tells the caller and the status stream, then acks.
    pub async fn dead_letter(&self, _w: &Shared, outbox: &Channel, failure: Failure) {
        let mut table = headers::for_copy(&self.delivery.properties);
        headers::set_str(&mut table, headers::ERROR, &failure.message);
        headers::set_str(&mut table, headers::ERROR_KIND, failure.kind);
        headers::set_int(&mut table, headers::ATTEMPTS, self.ctx.attempt() as i64);
        headers::set_str(&mut table, headers::ORIGINAL_QUEUE, &self.queue);
        headers::set_int(&mut table, headers::FAILED_AT_MS, headers::now_ms());
        table.insert(
            headers::TASK.into(),
            AMQPValue::LongString(self.name().into()),
        );
        let copy = dead_letter_properties(&self.delivery.properties).with_headers(table);
        let dlq = topology::dead_letter_queue(&self.queue);
        match publish::confirmed(outbox, "", &dlq, &self.delivery.data, copy, true).await {
            Ok(()) => {
                metrics::dead_lettered(self.name(), failure.kind);
                self.ctx
                    .reply(&Reply::Error {
                        kind: failure.kind.to_owned(),
                        message: failure.message.clone(),
                    })
                    .await;
                self.ctx
                    .emit(JobState::Dead, |e| e.error = Some(failure.message.clone()))
                    .await;
                self.ack().await;
            }
            Err(e) => self.requeue(&e.to_string()).await,
        }
    }

    pub async fn ack(&self) {
        if let Err(e) = self.delivery.acker.ack(BasicAckOptions::default()).await {
            // The connection is gone: the broker requeues the delivery.
            tracing::debug!(job = %self.ctx.job_id(), "ack failed: {e}");
        }
    }

    /// Puts the delivery back: what should replace it was not confirmed.
    pub async fn requeue(&self, why: &str) {
        tracing::warn!(job = %self.ctx.job_id(), "requeued: {why}");
        let _ = self
            .delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await;
    }
}

/// The dead letter keeps the message's identity and content type but not
/// its reply address (a replayed task has nobody waiting) nor an expiry that
/// would drop it.
fn dead_letter_properties(props: &BasicProperties) -> BasicProperties {
    let content_type = props
        .content_type()
        .clone()
        .unwrap_or_else(|| "application/json".into());
    let mut copy = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(content_type);
    if let Some(encoding) = props.content_encoding() {
        copy = copy.with_content_encoding(encoding.clone());
    }
    if let Some(id) = props.message_id() {
        copy = copy.with_message_id(id.clone());
    }
    if let Some(kind) = props.kind() {
        copy = copy.with_type(kind.clone());
    }
    if let Some(ts) = props.timestamp() {
        copy = copy.with_timestamp(*ts);
    }
    copy
}

/// Runs the handler in its own task (so a panic is a failed attempt, not a
/// dead worker) under the timeout and the hard shutdown.
pub(crate) async fn guarded<T: Send + 'static>(
    future: BoxFuture<'static, Result<T, TaskError>>,
    timeout: Duration,
    cancel: &CancellationToken,
    hard: &CancellationToken,
) -> Result<T, Option<Failure>> {
    let mut task = tokio::spawn(future.in_current_span());
    tokio::select! {
        joined = &mut task => match joined {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Some(e.into())),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let text = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-text panic".into());
                Err(Some(Failure { kind: "panic", message: format!("handler panicked: {text}"), retry_after: None, retryable: true }))
            }
            Err(_) => Err(None),
        },
        _ = tokio::time::sleep(timeout) => {
            cancel.cancel();
            // Dropping the future kills its `kill_on_drop` children.
            task.abort();
            Err(Some(Failure { kind: "timeout", message: format!("ran longer than {timeout:?}"), retry_after: None, retryable: true }))
        }
        _ = hard.cancelled() => {
            task.abort();
            Err(None)
        }
    }
}

impl From<Result<serde_json::Value, Option<Failure>>> for Outcome {
    fn from(r: Result<serde_json::Value, Option<Failure>>) -> Self {
        match r {
            Ok(v) => Outcome::Succeeded(v),
            Err(Some(f)) => Outcome::Failed(f),
            Err(None) => Outcome::Aborted,
        }
    }
}
