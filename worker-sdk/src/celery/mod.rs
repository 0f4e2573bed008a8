//! # Celery interop: Rust workers for Celery callers, Celery workers for Rust callers
//!
//! Python code that uses [Celery](https://docs.celeryq.dev) 5 (message
//! protocol 2, the `json` serializer) can send tasks to a Rust worker and get
//! the results through Celery's `rpc://` result backend, and a Rust
//! [`Client`](crate::Client) can send tasks to Celery workers and wait for
//! their results. No Celery code or Python runs in the Rust process: this
//! module speaks Celery's wire format over the same AMQP connection.
//!
//! ## Serving Celery tasks in Rust
//! ```no_run
//! use hare_worker::{CeleryTask, Context, TaskError, Worker};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Add { x: i64, y: i64 }
//!
//! struct AddTask;
//! impl CeleryTask for AddTask {
//!     const NAME: &'static str = "tasks.add"; // what Python sends
//!     type Args = Add;                        // add(2, 3) or add(x=2, y=3)
//!     type Output = i64;                      // AsyncResult.get() == 5
//! }
//!
//! # async fn run() -> hare_worker::Result<()> {
//! Worker::builder("amqp://guest:guest@127.0.0.1:5672/%2f", "adders")
//!     .celery_task::<AddTask, _>(|a: Add, _ctx: Context| async move {
//!         Ok::<_, TaskError>(a.x + a.y)
//!     })
//!     .run()
//!     .await
//! # }
//! ```
//! and in Python, with `Celery(broker=url, backend="rpc://")`:
//! `app.send_task("tasks.add", args=[2, 3]).get(timeout=10) == 5`.
//!
//! - **Routing**: a task is consumed from [`CeleryTask::QUEUE`] (Celery's
//!   default `celery`), declared as Celery declares it: a durable direct
//!   exchange and a durable queue of that name, bound by the name, no
//!   arguments. Tasks sharing a queue are told apart by the `task` header;
//!   a task this worker has no handler for fails with Celery's
//!   `NotRegistered`. If Python workers consume the same queue, give the
//!   Rust tasks a queue of their own (and route them there in Celery with
//!   `task_routes` or `queue=`).
//! - **Arguments**: `args` and `kwargs` are bound to [`CeleryTask::Args`]
//!   the way Python binds parameters: a struct takes positionals in field
//!   order and keywords by field name; a tuple (or `Vec`, or
//!   `serde_json::Value`) takes positionals only; a map takes keywords only;
//!   `()` takes none; a one-argument task may use the bare type. A call that
//!   does not bind fails at once with Python's `TypeError`.
//! - **Results**: when the message has a `reply_to` (Celery sets it; the
//!   `rpc://` backend reads it) and `ignore_result` is not set, the output
//!   goes back as a `SUCCESS` result, [`Context::progress`](crate::Context::progress)
//!   as a `PROGRESS` state (`AsyncResult.get(on_message=…)` sees it), and a
//!   final failure as `FAILURE`, which `AsyncResult.get()` raises:
//!   `RuntimeError` with the handler's error text (fatal errors, retries
//!   exhausted, panics, crash loops), `TypeError` (arguments that do not
//!   bind), `celery.exceptions.TimeLimitExceeded` (the worker's timeout),
//!   `celery.exceptions.NotRegistered` (no handler), `NotImplementedError`
//!   (refused, below); an expired task is `REVOKED`
//!   (`celery.exceptions.TaskRevokedError`).
//! - **Failures** are the SDK's: a retryable error is retried per the
//!   worker's [`RetryPolicy`](crate::RetryPolicy) (the caller waits; Celery
//!   hears only the final outcome), a final failure goes to `{queue}.dlq`
//!   with the error in headers, as for any task. Celery's own retry
//!   (`self.retry()`) has no counterpart: return a retryable error instead.
//! - **Refused, never run** (dead-lettered, `FAILURE` with
//!   `NotImplementedError` and the reason): canvas (a message with a `chain`,
//!   `chord`, `callbacks` or `errbacks`; the tasks chained after it fail
//!   too, so a chain's `get()` raises rather than hangs), any serializer but
//!   JSON (pickle, YAML, msgpack), compressed bodies, and protocol 1.
//!   Groups work: each member is an ordinary task.
//! - **`eta` / `countdown`** waits in the broker (the SDK's delay path), not
//!   in the worker; **`expires`** past its time is not run.
//! - Not supported: [`WorkerBuilder::quorum_queues`](crate::WorkerBuilder::quorum_queues)
//!   together with Celery tasks (the queue must be declared as Celery does,
//!   without the delivery limit the SDK relies on there); Celery's time
//!   limits from the message (the worker's own timeout applies); result
//!   backends other than `rpc://` (the task runs, the result is not stored).
//!
//! ## Calling Celery workers from Rust
//! [`Client::send_celery_task`](crate::Client::send_celery_task) publishes a
//! protocol 2 message that a Celery worker runs;
//! [`Client::call_celery`](crate::Client::call_celery) also waits for the
//! result, which a Celery worker configured with `result_backend = "rpc://"`
//! sends to the client's reply queue. A Python exception comes back as
//! [`Error::TaskFailed`](crate::Error::TaskFailed) with `kind` = its type
//! name (e.g. `ZeroDivisionError`) and `message` = its arguments.

mod args;
mod client;
mod serve;
mod wire;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub(crate) use serve::{adapt, declare_queue, erase, reply_message, serve, task_name};
pub(crate) use wire::reply_from_result;

/// Celery's default queue (also its default exchange and routing key).
pub const DEFAULT_QUEUE: &str = wire::DEFAULT_QUEUE;

/// A task Celery callers send by name, served by a Rust handler
/// ([`WorkerBuilder::celery_task`](crate::WorkerBuilder::celery_task)).
pub trait CeleryTask: Send + Sync + 'static {
    /// The task name Python uses (`send_task(NAME, …)`, or the name a
    /// `@app.task` stub registers, e.g. `proj.tasks.add`).
    const NAME: &'static str;
    /// The queue Celery routes it to.
    const QUEUE: &'static str = DEFAULT_QUEUE;
    /// The call's `args` and `kwargs`, bound as the [module docs](self) say.
    type Args: DeserializeOwned + Send + 'static;
    /// The result `AsyncResult.get()` returns (as JSON).
    type Output: Serialize + Send + 'static;
}
