//! What a handler knows about the job it runs, and how it talks back.

use std::sync::Arc;
use std::time::SystemTime;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;

use crate::headers;
use crate::status::{JobState, Reply, StatusEvent};
use crate::topology::STATUS_EXCHANGE;

/// Per-job information and the way to report progress.
#[derive(Clone)]
pub struct Context {
    pub(crate) job: Arc<JobInfo>,
    pub(crate) cancel: CancellationToken,
    pub(crate) outbox: Option<Channel>,
}

/// The facts about one delivery of a job.
#[derive(Clone, Debug)]
pub(crate) struct JobInfo {
    pub job_id: String,
    pub name: String,
    pub queue: String,
    pub attempt: u32,
    pub redelivered: bool,
    pub enqueued_at: SystemTime,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub publish_status: bool,
    /// How the job came and how to answer its caller.
    pub protocol: Protocol,
}

/// The message protocol a job arrived in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Protocol {
    Hare,
    /// Celery's protocol 2; replies are `rpc://` backend results.
    Celery,
}

impl Context {
    /// The job's id: the same across retries and redeliveries, so it is the
    /// key to make a handler idempotent (e.g. an upsert keyed by it).
    pub fn job_id(&self) -> &str {
        &self.job.job_id
    }

    /// A stable key for side effects of this job: `{job id}:{what}`. Store
    /// it with the effect (a unique column, an object name) so a redelivered
    /// job finds the effect done and skips it.
    pub fn idempotency_key(&self, what: &str) -> String {
        format!("{}:{what}", self.job.job_id)
    }

    /// 1 for the first attempt; retries count up.
    pub fn attempt(&self) -> u32 {
        self.job.attempt
    }

    /// The broker says an earlier delivery of this copy may have been seen
    /// (a worker died or stopped mid-task): expect partial effects.
    pub fn redelivered(&self) -> bool {
        self.job.redelivered
    }

    /// When the job was first enqueued.
    pub fn enqueued_at(&self) -> SystemTime {
        self.job.enqueued_at
    }

    /// The task or event name.
    pub fn name(&self) -> &str {
        &self.job.name
    }

    /// Fires when the worker shuts down past its grace period or the task
    /// times out; long handlers should `select!` on it and stop.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A command that is killed when the handler is cancelled or dropped, so
    /// that a shutdown or timeout does not leave an ffmpeg running. On Linux
    /// it is also killed when the worker dies (`kill -9` included), so the
    /// worker that takes the redelivered job is not racing an orphan.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe, and the closure touches no
        // memory of the parent. The signal follows the thread that spawned the
        // child: handlers run on the runtime's worker threads, which live as
        // long as the worker.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Reports progress: a `progress` status event, and a progress message
    /// to an RPC caller waiting on [`crate::Client::submit`]. Best effort:
    /// progress is not worth failing a task over.
    pub async fn progress(&self, percent: f32, note: impl Into<String>) {
        let note = note.into();
        self.emit(JobState::Progress, |e| {
            e.percent = Some(percent);
            e.note = Some(note.clone());
        })
        .await;
        self.reply(&Reply::Progress { percent, note }).await;
    }

    /// Publishes a status event. Started, progress and failed events are
    /// not waited for (publishes on one channel stay in order anyway); the
    /// final ones, succeeded and dead, are confirmed before the delivery is
    /// acked, so a consumer of `hare.status` with a durable queue (a
    /// notifier, [`crate::WorkerBuilder::on_status`]) hears of every job's
    /// end at least once. Status events are persistent for the same reason.
    pub(crate) async fn emit(&self, state: JobState, fill: impl FnOnce(&mut StatusEvent)) {
        let (Some(ch), true) = (&self.outbox, self.job.publish_status) else {
            return;
        };
        let mut event = StatusEvent {
            job_id: self.job.job_id.clone(),
            task: self.job.name.clone(),
            queue: self.job.queue.clone(),
            state,
            attempt: self.job.attempt,
            percent: None,
            note: None,
            error: None,
            output: None,
            at_ms: headers::now_ms(),
        };
        fill(&mut event);
        let Ok(body) = serde_json::to_vec(&event) else {
            return;
        };
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(self.job.job_id.as_str().into())
            .with_type(state.as_str().into())
            .with_delivery_mode(2);
        let confirm = match ch
            .basic_publish(
                STATUS_EXCHANGE.into(),
                event.routing_key().as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
        {
            Ok(confirm) => confirm,
            Err(e) => {
                tracing::debug!(job = %self.job.job_id, "status event not sent: {e}");
                return;
            }
        };
        if matches!(state, JobState::Succeeded | JobState::Dead) {
            if let Err(e) = confirm.await {
                tracing::warn!(job = %self.job.job_id, "final status event not confirmed: {e}");
            }
        }
    }

    /// Sends a reply to the RPC caller, if there is one.
    pub(crate) async fn reply(&self, reply: &Reply) {
        let (Some(ch), Some(to)) = (&self.outbox, &self.job.reply_to) else {
            return;
        };
        let (body, props) = match self.job.protocol {
            Protocol::Hare => {
                let Ok(body) = serde_json::to_vec(reply) else {
                    return;
                };
                let mut props =
                    BasicProperties::default().with_content_type("application/json".into());
                if let Some(id) = &self.job.correlation_id {
                    props = props.with_correlation_id(id.as_str().into());
                }
                (body, props)
            }
            Protocol::Celery => crate::celery::reply_message(&self.job, reply),
        };
        if let Err(e) = ch
            .basic_publish(
                "".into(),
                to.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
        {
            tracing::debug!(job = %self.job.job_id, "reply not sent: {e}");
        }
    }
}
