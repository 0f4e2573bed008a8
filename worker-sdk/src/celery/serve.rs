//! The worker's side of Celery: declare the queue as Celery does, check each
//! message before it runs (protocol 2, JSON, no canvas, not expired, due),
//! bind its arguments, and answer through the `rpc://` backend. Retries,
//! dead letters and crash-loop counting are the SDK's own (`worker::settle`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ExchangeKind};

use super::{args, wire, CeleryTask};
use crate::context::{Context, JobInfo};
use crate::error::TaskError;
use crate::handler::{DecodeError, ErasedHandler, Handler};
use crate::headers;
use crate::publish;
use crate::status::Reply;
use crate::topology::{self, DelayPath, QueueKind};
use crate::worker::{Failure, Job, Shared};

/// Declares `queue` the way Celery's own workers and clients do (a durable
/// direct exchange of the same name, a durable queue bound by its name, no
/// arguments), so both sides' declarations agree, plus the SDK's dead-letter
/// queue and the way back in after a delay.
pub(crate) async fn declare_queue(
    ch: &Channel,
    queue: &str,
    kind: QueueKind,
    delay: Option<DelayPath>,
) -> lapin::Result<()> {
    let durable = || QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = FieldTable::default();
    if matches!(kind, QueueKind::Quorum { .. }) {
        // Celery's `task_default_queue_type = "quorum"` declares just this.
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    ch.exchange_declare(
        queue.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(queue.into(), durable(), args.clone())
        .await?;
    ch.queue_bind(
        queue.into(),
        queue.into(),
        queue.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    if let Some(path) = delay {
        let dlq = topology::dead_letter_queue(queue);
        ch.queue_declare(dlq.as_str().into(), durable(), args)
            .await?;
        topology::bind_delay_path(ch, queue, path).await?;
    }
    Ok(())
}

/// The Celery task a message asks for (its `task` header).
pub(crate) fn task_name(props: &BasicProperties) -> Option<String> {
    wire::header_str(props, "task")
}

/// Fills in what Celery puts elsewhere than the SDK: the job id is the `id`
/// header, the result goes to `reply_to` (empty, or `ignore_result`, means
/// nobody waits) under the task id.
pub(crate) fn adapt(info: &mut JobInfo, props: &BasicProperties) {
    if let Some(id) = wire::header_str(props, "id") {
        info.job_id = id;
    }
    let ignore = matches!(
        wire::header(props, "ignore_result"),
        Some(serde_json::Value::Bool(true))
    );
    if ignore || info.reply_to.as_deref() == Some("") {
        info.reply_to = None;
    }
    if info.correlation_id.as_deref().unwrap_or("").is_empty() {
        info.correlation_id = Some(info.job_id.clone());
    }
}

/// A reply to a Celery caller: the `rpc://` backend's result message.
pub(crate) fn reply_message(job: &JobInfo, reply: &Reply) -> (Vec<u8>, BasicProperties) {
    let id = job.correlation_id.as_deref().unwrap_or(&job.job_id);
    let body = wire::result_body(&job.job_id, reply)
        .to_string()
        .into_bytes();
    (body, wire::result_properties(id))
}

/// The handler of a Celery task, behind the SDK's JSON-in, JSON-out shape:
/// the body `[args, kwargs, embed]` is bound to `T::Args` (see [`args`]).
pub(crate) fn erase<T, H>(handler: H) -> ErasedHandler
where
    T: CeleryTask,
    H: Handler<T::Args, Output = T::Output>,
{
    let handler = Arc::new(handler);
    Arc::new(move |body: &[u8], ctx: Context| {
        let parts = wire::decode_body(body).map_err(DecodeError)?;
        let message: T::Args = args::bind(parts.args, parts.kwargs)
            .map_err(|e| DecodeError(format!("{}() {e}", T::NAME)))?;
        let handler = handler.clone();
        Ok(Box::pin(async move {
            let output = handler.handle(message, ctx).await?;
            serde_json::to_value(output).map_err(|e| TaskError::Fatal(Box::new(e)))
        }) as BoxFuture<'static, _>)
    })
}

/// What to do with a Celery message before any handler sees it.
enum Verdict {
    Run,
    /// Refused, never run: the message and the chained tasks to fail too.
    Refuse(String, Vec<(String, String)>),
    Expired(String),
    /// Its `eta` is ahead: back into the queue after this long.
    Later(Duration),
}

fn inspect(job: &Job) -> Verdict {
    let props = &job.delivery.properties;
    if task_name(props).is_none() || wire::header_str(props, "id").is_none() {
        return Verdict::Refuse(
            "not a Celery protocol 2 task message (no `task` and `id` headers): hare-worker \
             speaks protocol 2 only (Celery 4 and later send it by default)"
                .into(),
            Vec::new(),
        );
    }
    let content_type = props
        .content_type()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default();
    if content_type != wire::JSON {
        let what = match content_type.as_str() {
            "application/x-python-serialize" => "pickle".to_owned(),
            "" => "no content type".to_owned(),
            other => other.to_owned(),
        };
        return Verdict::Refuse(
            format!(
                "refusing {what} content: hare-worker only accepts Celery's json serializer \
                 (set task_serializer='json', or serializer='json' on the call)"
            ),
            Vec::new(),
        );
    }
    if let Some(compression) = wire::header_str(props, "compression") {
        return Verdict::Refuse(
            format!("refusing a {compression}-compressed body: send tasks uncompressed"),
            Vec::new(),
        );
    }
    // A body that does not parse is the handler's decode error.
    let body = wire::decode_body(&job.delivery.data).unwrap_or_default();
    let canvas = wire::canvas(&body.embed);
    if !canvas.is_empty() {
        return Verdict::Refuse(
            format!(
                "Celery canvas ({}) is not supported by hare-worker: send the tasks one by one \
                 and combine their results in the caller",
                canvas.join(", ")
            ),
            wire::chained(&body.embed),
        );
    }
    let now = SystemTime::now();
    if let Some(expires) = wire::header_str(props, "expires") {
        match wire::parse_time(&expires) {
            Some(t) if t <= now => return Verdict::Expired(format!("expired at {expires}")),
            Some(_) => {}
            None => return Verdict::Refuse(format!("invalid expires {expires:?}"), Vec::new()),
        }
    }
    if let Some(eta) = wire::header_str(props, "eta") {
        match wire::parse_time(&eta) {
            Some(t) => {
                let ahead = t.duration_since(now).unwrap_or_default();
                if ahead > Duration::from_millis(5) {
                    return Verdict::Later(ahead);
                }
            }
            None => return Verdict::Refuse(format!("invalid eta {eta:?}"), Vec::new()),
        }
    }
    Verdict::Run
}

/// Runs a Celery message, or settles it without running it.
pub(crate) async fn serve(job: Job, w: &Shared, outbox: &Channel, handler: Option<ErasedHandler>) {
    match inspect(&job) {
        Verdict::Run => job.run(w, outbox, handler).await,
        Verdict::Refuse(message, chained) => {
            let reply = Reply::Error {
                kind: "unsupported".into(),
                message: message.clone(),
            };
            job.dead_letter(w, outbox, Failure::permanent("unsupported", message))
                .await;
            for (id, to) in chained {
                let body = wire::result_body(&id, &reply).to_string();
                let props = wire::result_properties(&id);
                let _ = outbox
                    .basic_publish(
                        "".into(),
                        to.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        props,
                    )
                    .await;
            }
        }
        Verdict::Expired(message) => {
            job.dead_letter(w, outbox, Failure::permanent("expired", message))
                .await
        }
        // Waits in the broker, as retries do: the copy is confirmed first.
        Verdict::Later(delay) => {
            let props = &job.delivery.properties;
            let props = props.clone().with_headers(headers::for_copy(props));
            match publish::to_queue_after(
                outbox,
                w.delay_path(),
                &job.queue,
                delay,
                &job.delivery.data,
                props,
            )
            .await
            {
                Ok(()) => job.ack().await,
                Err(e) => job.requeue(&e.to_string()).await,
            }
        }
    }
}
