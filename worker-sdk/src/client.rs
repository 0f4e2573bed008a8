//! The producer side: enqueue tasks, publish events, call tasks and wait
//! for their results. Every "done" here means the broker confirmed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use parking_lot::Mutex;
use tokio::sync::{mpsc, OnceCell};

use crate::broker::Nodes;
use crate::error::{Error, Result};
use crate::headers;
use crate::message::{new_job_id, Event, JobId, Task};
use crate::publish;
use crate::status::Reply;
use crate::topology::{self, DelayPath, QueueKind};

/// Options for one enqueue.
#[derive(Clone, Debug, Default)]
pub struct EnqueueOptions {
    /// The job id; give one (an idempotency key, e.g. an upload id) so that a
    /// retried enqueue and its handler can recognise the same job.
    pub job_id: Option<String>,
    /// Hold the task back this long (in the broker, never in a worker).
    pub delay: Option<Duration>,
    /// Needs `Task::MAX_PRIORITY`; higher runs first.
    pub priority: Option<u8>,
    /// Drop the task if no worker took it within this time (AMQP `expiration`).
    pub expires: Option<Duration>,
}

/// A handle on a producer connection. Clone it freely: clones share one
/// connection and one confirm channel. After a broker outage the next call
/// reconnects; a call during the outage fails, it never pretends.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    nodes: Nodes,
    queue_kind: QueueKind,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    delay_path: OnceCell<DelayPath>,
}

pub(crate) struct Session {
    pub(crate) conn: Connection,
    /// The node it connected to.
    url: String,
    pub(crate) ch: Channel,
    pub(crate) declared: Mutex<HashSet<String>>,
    pub(crate) rpc: OnceCell<Rpc>,
}

/// Where RPC replies arrive: direct reply-to, or an exclusive queue.
pub(crate) struct Rpc {
    pub(crate) ch: Channel,
    pub(crate) reply_to: String,
    pub(crate) pending: Pending,
}

pub(crate) type Pending = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Reply>>>>;

impl Client {
    /// Connects to `url` (`amqp://user:pass@host:port/vhost`, or several,
    /// comma-separated, for the nodes of a cluster).
    pub async fn connect(url: &str) -> Result<Client> {
        Self::connect_with(url, QueueKind::Classic).await
    }

    /// Connects, declaring queues of `kind` (must match the workers').
    pub async fn connect_with(url: &str, queue_kind: QueueKind) -> Result<Client> {
        let client = Client {
            inner: Arc::new(Inner {
                nodes: Nodes::parse(url),
                queue_kind,
                session: tokio::sync::Mutex::new(None),
                delay_path: OnceCell::new(),
            }),
        };
        client.session().await?;
        Ok(client)
    }

    /// The kind of queues this client declares.
    pub(crate) fn queue_kind(&self) -> QueueKind {
        self.inner.queue_kind
    }

    /// How this broker delays messages (probed once).
    pub async fn delay_path(&self) -> Result<DelayPath> {
        let session = self.session().await?;
        Ok(*self
            .inner
            .delay_path
            .get_or_try_init(|| topology::probe_delay_path(&session.url))
            .await?)
    }

    /// The live session, reconnecting (once) if the last one died.
    async fn session(&self) -> Result<Arc<Session>> {
        let mut slot = self.inner.session.lock().await;
        if let Some(s) = slot.as_ref() {
            if s.conn.status().connected() && s.ch.status().connected() {
                return Ok(s.clone());
            }
        }
        *slot = None;
        let (conn, url) = self.inner.nodes.connect().await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let session = Arc::new(Session {
            conn,
            url,
            ch,
            declared: Mutex::new(HashSet::new()),
            rpc: OnceCell::new(),
        });
        *slot = Some(session.clone());
        Ok(session)
    }

    /// Runs `op` on the session; an AMQP failure or a nack drops the session
    /// so the next call starts afresh.
    ///
    /// A nack counts because a channel may keep refusing: RabbitMQ before
    /// 3.12 sets up a channel's link to a quorum queue on its first publish
    /// by asking the node that the queue record names as leader, and if that
    /// node was just lost the channel nacks every later publish to the queue
    /// too. A new channel asks again.
    pub(crate) async fn with_session<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: FnOnce(Arc<Session>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let session = self.session().await?;
        let result = op(session.clone()).await;
        if matches!(result, Err(Error::Amqp(_) | Error::Nacked(_))) {
            let mut slot = self.inner.session.lock().await;
            if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, &session)) {
                *slot = None;
            }
        }
        result
    }

    /// Declares the task's queue (once per connection), so that a task
    /// enqueued before any worker starts is kept.
    async fn ensure_task_queue<T: Task>(&self, session: &Session) -> Result<()> {
        if session.declared.lock().contains(T::QUEUE) {
            return Ok(());
        }
        let path = self.delay_path().await?;
        self.ensure_delay_path(session, path).await?;
        topology::declare_task_queue(
            &session.ch,
            T::QUEUE,
            self.inner.queue_kind,
            T::MAX_PRIORITY,
            path,
        )
        .await?;
        session.declared.lock().insert(T::QUEUE.to_owned());
        Ok(())
    }

    async fn ensure_delay_path(&self, session: &Session, path: DelayPath) -> Result<()> {
        const LADDER: &str = "\0ladder";
        if path == DelayPath::Ladder && !session.declared.lock().contains(LADDER) {
            topology::declare_ladder(&session.ch, self.inner.queue_kind).await?;
            session.declared.lock().insert(LADDER.to_owned());
        }
        Ok(())
    }

    /// Enqueues `task`; returns once the broker confirmed it is stored.
    pub async fn enqueue<T: Task>(&self, task: &T) -> Result<JobId<T>> {
        self.enqueue_with(task, EnqueueOptions::default()).await
    }

    /// Enqueues `task` to run at `at` (at once if that has passed).
    pub async fn schedule<T: Task>(&self, task: &T, at: SystemTime) -> Result<JobId<T>> {
        let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
        self.enqueue_with(
            task,
            EnqueueOptions {
                delay: Some(delay),
                ..Default::default()
            },
        )
        .await
    }

    /// Enqueues with options (job id, delay, priority, expiry).
    pub async fn enqueue_with<T: Task>(
        &self,
        task: &T,
        options: EnqueueOptions,
    ) -> Result<JobId<T>> {
        let body = serde_json::to_vec(task)?;
        let job_id = options.job_id.clone().unwrap_or_else(new_job_id);
        let props = task_properties(T::NAME, &job_id, &options);
        self.with_session(|s| async move {
            self.ensure_task_queue::<T>(&s).await?;
            match options.delay.filter(|d| !d.is_zero()) {
                Some(delay) => {
                    let path = self.delay_path().await?;
                    publish::to_queue_after(&s.ch, path, T::QUEUE, delay, &body, props).await
                }
                None => {
                    publish::confirmed(
                        &s.ch,
                        topology::TASKS_EXCHANGE,
                        T::QUEUE,
                        &body,
                        props,
                        true,
                    )
                    .await
                }
            }
        })
        .await?;
        Ok(JobId::new(job_id))
    }

    /// Publishes `event` once for every consumer group that subscribed to it.
    /// An event no group listens to is [`Error::Unroutable`], not a silent drop.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<String> {
        let body = serde_json::to_vec(event)?;
        let id = new_job_id();
        let props = task_properties(E::NAME, &id, &EnqueueOptions::default());
        self.with_session(|s| async move {
            topology::declare_event_exchanges(&s.ch).await?;
            publish::confirmed(
                &s.ch,
                topology::EVENTS_EXCHANGE,
                E::NAME,
                &body,
                props,
                true,
            )
            .await
        })
        .await?;
        Ok(id)
    }

    /// Enqueues `task` and waits up to `timeout` for its result (RPC).
    pub async fn call<T: Task>(&self, task: &T, timeout: Duration) -> Result<T::Output> {
        let submission = self.submit(task).await?;
        submission.result(timeout).await
    }

    /// Enqueues `task` with a reply address: the handle yields its progress
    /// reports and then its result.
    pub async fn submit<T: Task>(&self, task: &T) -> Result<Submission<T>> {
        let body = serde_json::to_vec(task)?;
        let job_id = new_job_id();
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = self
            .with_session(|s| {
                let job_id = job_id.clone();
                async move {
                    self.ensure_task_queue::<T>(&s).await?;
                    let rpc = s.rpc.get_or_try_init(|| open_rpc(&s.conn)).await?;
                    rpc.pending.lock().insert(job_id.clone(), tx);
                    let props = task_properties(T::NAME, &job_id, &EnqueueOptions::default())
                        .with_reply_to(rpc.reply_to.as_str().into())
                        .with_correlation_id(job_id.as_str().into());
                    let sent = publish::confirmed(
                        &rpc.ch,
                        topology::TASKS_EXCHANGE,
                        T::QUEUE,
                        &body,
                        props,
                        true,
                    )
                    .await;
                    if sent.is_err() {
                        rpc.pending.lock().remove(&job_id);
                    }
                    sent.map(|()| rpc.pending.clone())
                }
            })
            .await?;
        Ok(Submission {
            job_id: JobId::new(job_id),
            replies: rx,
            pending,
        })
    }

    /// Moves up to `max` dead letters of `queue` back into it, as first
    /// attempts, each confirmed before its dead letter is removed.
    pub async fn replay_dead(&self, queue: &str, max: usize) -> Result<usize> {
        self.with_session(|s| async move {
            let getter = s.conn.create_channel().await?;
            let dlq = topology::dead_letter_queue(queue);
            let mut moved = 0;
            while moved < max {
                let Some(msg) = getter
                    .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                    .await?
                else {
                    break;
                };
                let mut table = headers::without(
                    &headers::for_copy(&msg.delivery.properties),
                    &[
                        headers::ERROR,
                        headers::ERROR_KIND,
                        headers::ATTEMPTS,
                        headers::ORIGINAL_QUEUE,
                        headers::FAILED_AT_MS,
                        headers::REDELIVERIES,
                    ],
                );
                headers::set_int(&mut table, headers::ATTEMPT, 1);
                let props = msg.delivery.properties.clone().with_headers(table);
                publish::confirmed(&s.ch, "", queue, &msg.delivery.data, props, true).await?;
                msg.delivery.ack(BasicAckOptions::default()).await?;
                moved += 1;
            }
            let _ = getter.close(200, "replayed".into()).await;
            Ok(moved)
        })
        .await
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Some(s) = self.inner.session.lock().await.take() {
            let _ = s.conn.close(200, "client closed".into()).await;
        }
    }
}

/// The properties of a first attempt.
fn task_properties(name: &str, job_id: &str, options: &EnqueueOptions) -> BasicProperties {
    let now = headers::now_ms();
    let mut table = FieldTable::default();
    headers::set_str(&mut table, headers::TASK, name);
    headers::set_int(&mut table, headers::ATTEMPT, 1);
    headers::set_int(&mut table, headers::ENQUEUED_MS, now);
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(job_id.into())
        .with_type(name.into())
        .with_timestamp((now / 1000) as u64)
        .with_headers(table);
    if let Some(p) = options.priority {
        props = props.with_priority(p);
    }
    if let Some(ttl) = options.expires {
        props = props.with_expiration(ttl.as_millis().to_string().as_str().into());
    }
    props
}

/// Opens the reply channel: direct reply-to where the broker has it (no
/// queue to create or delete), else an exclusive server-named queue.
pub(crate) async fn open_rpc(conn: &Connection) -> Result<Rpc> {
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let (ch, reply_to, consumer) = match ch
        .basic_consume(
            topology::DIRECT_REPLY_TO.into(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
    {
        Ok(consumer) => (ch, topology::DIRECT_REPLY_TO.to_owned(), consumer),
        Err(_) => {
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let queue = ch
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let name = queue.name().as_str().to_owned();
            let consumer = ch
                .basic_consume(
                    name.as_str().into(),
                    "".into(),
                    no_ack,
                    FieldTable::default(),
                )
                .await?;
            (ch, name, consumer)
        }
    };
    let pending: Pending = Arc::default();
    let routes = pending.clone();
    tokio::spawn(async move {
        let mut consumer = consumer;
        while let Some(Ok(delivery)) = consumer.next().await {
            let Some(id) = delivery.properties.correlation_id().as_ref() else {
                continue;
            };
            let reply = match serde_json::from_slice::<Reply>(&delivery.data) {
                Ok(reply) => reply,
                // A Celery worker's result (`rpc://` backend); none for
                // states that are not final.
                Err(_) => match crate::celery::reply_from_result(&delivery.data) {
                    Some(reply) => reply,
                    None => continue,
                },
            };
            let last = !matches!(reply, Reply::Progress { .. });
            let mut map = routes.lock();
            if let Some(tx) = map.get(id.as_str()) {
                let _ = tx.send(reply);
            }
            if last {
                map.remove(id.as_str());
            }
        }
        // The connection is gone: waiting callers learn it at once.
        routes.lock().clear();
    });
    Ok(Rpc {
        ch,
        reply_to,
        pending,
    })
}

/// What a submitted job reports.
#[derive(Debug)]
pub enum Update<O> {
    Progress { percent: f32, note: String },
    Done(Result<O>),
}

/// A job submitted with a reply address.
pub struct Submission<T: Task> {
    job_id: JobId<T>,
    replies: mpsc::UnboundedReceiver<Reply>,
    pending: Pending,
}

impl<T: Task> Submission<T> {
    pub fn job_id(&self) -> &JobId<T> {
        &self.job_id
    }

    /// The next progress report or the result; `None` after the result.
    pub async fn next(&mut self) -> Option<Update<T::Output>> {
        match self.replies.recv().await? {
            Reply::Progress { percent, note } => Some(Update::Progress { percent, note }),
            Reply::Result { output } => Some(Update::Done(
                serde_json::from_value(output).map_err(Error::from),
            )),
            Reply::Error { kind, message } => {
                Some(Update::Done(Err(Error::TaskFailed { kind, message })))
            }
        }
    }

    /// Skips progress and waits up to `timeout` for the result.
    pub async fn result(mut self, timeout: Duration) -> Result<T::Output> {
        let wait = async {
            loop {
                match self.next().await {
                    Some(Update::Progress { .. }) => continue,
                    Some(Update::Done(result)) => return result,
                    None => return Err(Error::Disconnected),
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }
}

impl<T: Task> Drop for Submission<T> {
    fn drop(&mut self) {
        self.pending.lock().remove(self.job_id.as_str());
    }
}
