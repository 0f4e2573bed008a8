//! The producer's side: tasks for Celery workers, and their results through
//! the client's reply queue (what Celery's `rpc://` backend answers to).

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::wire::{self, Outgoing};
use crate::client::{open_rpc, Client, Pending, Session};
use crate::error::{Error, Result};
use crate::message::new_job_id;
use crate::publish;
use crate::status::Reply;

impl Client {
    /// Enqueues Celery task `name` with positional `args` (anything that
    /// serializes to a JSON array, e.g. a tuple or `json!([2, 3])`) and
    /// keyword `kwargs` (a JSON object, or `()` for none) on `queue` (Celery's
    /// default is [`celery::DEFAULT_QUEUE`](crate::celery::DEFAULT_QUEUE)),
    /// declared as Celery declares it. Returns the task id once the broker
    /// confirmed the message. Nobody waits for the result.
    pub async fn send_celery_task(
        &self,
        name: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
        queue: &str,
    ) -> Result<String> {
        let (args, kwargs) = arguments(args, kwargs)?;
        let id = new_job_id();
        let (body, props) = wire::task_message(&Outgoing {
            id: &id,
            name,
            args: &args,
            kwargs: &kwargs,
            reply_to: None,
        });
        self.with_session(|s| async move {
            self.ensure_celery_queue(&s, queue).await?;
            publish::confirmed(&s.ch, "", queue, &body, props, true).await
        })
        .await?;
        Ok(id)
    }

    /// Like [`Client::send_celery_task`], then waits up to `timeout` for the
    /// result, which a Celery worker with `result_backend = "rpc://"` sends
    /// to this client's reply queue. A Python exception is
    /// [`Error::TaskFailed`] with `kind` = the exception's type name and
    /// `message` = its arguments; no answer in time is [`Error::Timeout`]
    /// (the task may still run).
    pub async fn call_celery(
        &self,
        name: &str,
        args: impl Serialize,
        kwargs: impl Serialize,
        queue: &str,
        timeout: Duration,
    ) -> Result<Value> {
        let (args, kwargs) = arguments(args, kwargs)?;
        let id = new_job_id();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pending = self
            .with_session(|s| {
                let id = id.clone();
                async move {
                    self.ensure_celery_queue(&s, queue).await?;
                    let rpc = s.rpc.get_or_try_init(|| open_rpc(&s.conn)).await?;
                    rpc.pending.lock().insert(id.clone(), tx);
                    let (body, props) = wire::task_message(&Outgoing {
                        id: &id,
                        name,
                        args: &args,
                        kwargs: &kwargs,
                        reply_to: Some(&rpc.reply_to),
                    });
                    let sent = publish::confirmed(&rpc.ch, "", queue, &body, props, true).await;
                    if sent.is_err() {
                        rpc.pending.lock().remove(&id);
                    }
                    sent.map(|()| rpc.pending.clone())
                }
            })
            .await?;
        let _forget = Forget { pending, id };
        let wait = async {
            loop {
                match rx.recv().await {
                    Some(Reply::Progress { .. }) => continue,
                    Some(Reply::Result { output }) => return Ok(output),
                    Some(Reply::Error { kind, message }) => {
                        return Err(Error::TaskFailed { kind, message })
                    }
                    None => return Err(Error::Disconnected),
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Declares a Celery queue once per connection, so that a task sent
    /// before any worker started is kept.
    async fn ensure_celery_queue(&self, session: &Session, queue: &str) -> Result<()> {
        let key = format!("\0celery:{queue}");
        if session.declared.lock().contains(&key) {
            return Ok(());
        }
        super::declare_queue(&session.ch, queue, self.queue_kind(), None).await?;
        session.declared.lock().insert(key);
        Ok(())
    }
}

/// Stops routing replies to a call that gave up waiting.
struct Forget {
    pending: Pending,
    id: String,
}

impl Drop for Forget {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
    }
}

/// `args` as a list and `kwargs` as a mapping (null is empty for both).
fn arguments(
    args: impl Serialize,
    kwargs: impl Serialize,
) -> Result<(Vec<Value>, Map<String, Value>)> {
    use serde::de::Error as _;
    let args = match serde_json::to_value(args)? {
        Value::Array(a) => a,
        Value::Null => Vec::new(),
        other => {
            return Err(Error::Json(serde_json::Error::custom(format!(
                "Celery args must serialize to a list, got {other}"
            ))))
        }
    };
    let kwargs = match serde_json::to_value(kwargs)? {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        other => {
            return Err(Error::Json(serde_json::Error::custom(format!(
                "Celery kwargs must serialize to a mapping, got {other}"
            ))))
        }
    };
    Ok((args, kwargs))
}
