//! Periodic jobs, once per tick across any number of worker processes.
//!
//! Leadership is a token: one message in the durable queue
//! `hare.schedule.{task}`, which every worker consumes with
//! `x-single-active-consumer`, so only one of them (the leader) receives it.
//! The leader holds the token until the next tick, then enqueues the task
//! (job id `{task}@{tick ms}`), publishes a new token naming that tick, and
//! acks the old one, each step confirmed. If the leader dies, the broker
//! requeues the token and the next consumer becomes leader. A crash between
//! the new token and the ack can leave two tokens; the leader drops any token
//! that is not its own and not newer than its last tick, so they converge,
//! at the price of one duplicate tick (with the same job id) at a crash.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};

use super::session::Shared;
use crate::error::{Error, Result};
use crate::headers;
use crate::message::Task;
use crate::publish;
use crate::topology::{self, DelayPath, QueueKind};

/// When a periodic job runs.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// Every `d`, aligned to the Unix epoch (so all processes agree on ticks).
    Interval(Duration),
    /// A cron expression with seconds (`sec min hour day month weekday`), UTC.
    Cron(Box<cron::Schedule>),
}

impl Schedule {
    pub fn interval(every: Duration) -> Self {
        Schedule::Interval(every.max(Duration::from_millis(10)))
    }

    /// Parses a cron expression, e.g. `"0 */5 * * * *"` (every five minutes).
    pub fn cron(expr: &str) -> Result<Self> {
        cron::Schedule::from_str(expr)
            .map(|s| Schedule::Cron(Box::new(s)))
            .map_err(|e| Error::Config(format!("cron expression {expr:?}: {e}")))
    }

    /// The first tick strictly after `t` (ms since the epoch).
    pub fn next_after(&self, t: i64) -> i64 {
        match self {
            Schedule::Interval(every) => {
                let every = every.as_millis().max(1) as i64;
                (t.div_euclid(every) + 1) * every
            }
            Schedule::Cron(schedule) => {
                let Some(after) = chrono::DateTime::from_timestamp_millis(t) else {
                    return i64::MAX;
                };
                schedule
                    .after(&after)
                    .next()
                    .map(|next| next.timestamp_millis())
                    .unwrap_or(i64::MAX)
            }
        }
    }
}

/// One periodic job of a worker.
pub(crate) struct Periodic {
    task: &'static str,
    queue: &'static str,
    max_priority: Option<u8>,
    schedule: Schedule,
    make: Arc<dyn Fn() -> serde_json::Result<Vec<u8>> + Send + Sync>,
}

/// The leadership token.
#[derive(Serialize, Deserialize)]
struct Token {
    id: String,
    /// The last tick enqueued (ms since the epoch).
    last: Option<i64>,
}

/// How long a leader holds the token before re-publishing it, to stay far
/// below any broker consumer timeout when ticks are far apart.
const KEEPALIVE: Duration = Duration::from_secs(300);

impl Periodic {
    pub fn new<T: Task, F: Fn() -> T + Send + Sync + 'static>(schedule: Schedule, make: F) -> Self {
        Periodic {
            task: T::NAME,
            queue: T::QUEUE,
            max_priority: T::MAX_PRIORITY,
            schedule,
            make: Arc::new(move || serde_json::to_vec(&make())),
        }
    }

    fn token_queue(&self) -> String {
        format!("hare.schedule.{}", self.task)
    }

    pub async fn declare(&self, ch: &Channel, kind: QueueKind, path: DelayPath) -> Result<()> {
        topology::declare_task_queue(ch, self.queue, kind, self.max_priority, path).await?;
        let mut args = FieldTable::default();
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        if matches!(kind, QueueKind::Quorum { .. }) {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        let token_queue = self.token_queue();
        let declared = ch
            .queue_declare(
                token_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        // No token waiting: add one. If the leader holds the token unacked
        // this makes a second, which the leader drops (see the module doc).
        if declared.message_count() == 0 {
            publish_token(ch, &token_queue, None).await?;
        }
        Ok(())
    }
}

async fn publish_token(ch: &Channel, queue: &str, last: Option<i64>) -> Result<String> {
    let token = Token {
        id: crate::message::new_job_id(),
        last,
    };
    let body = serde_json::to_vec(&token)?;
    let props = BasicProperties::default().with_delivery_mode(2);
    publish::confirmed(ch, "", queue, &body, props, true).await?;
    Ok(token.id)
}

/// Competes for leadership of periodic job `index` and, while leader,
/// enqueues its ticks.
pub(crate) async fn lead(w: Arc<Shared>, ch: Channel, outbox: Channel, index: usize) -> Result<()> {
    let job = &w.routes.periodic[index];
    let token_queue = job.token_queue();
    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            token_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // (token id, its tick) of the last token this process published.
    let mut mine: Option<(String, i64)> = None;
    loop {
        let delivery = tokio::select! {
            biased;
            _ = w.stop.cancelled() => break,
            item = consumer.next() => match item {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(Error::Disconnected),
            },
        };
        let token: Token = match serde_json::from_slice(&delivery.data) {
            Ok(t) => t,
            Err(_) => {
                delivery.ack(BasicAckOptions::default()).await?;
                continue;
            }
        };
        if let Some((my_id, my_last)) = &mine {
            if token.id != *my_id && token.last.is_none_or(|last| last <= *my_last) {
                delivery.ack(BasicAckOptions::default()).await?;
                continue;
            }
        }
        let now = headers::now_ms();
        let due = job.schedule.next_after(token.last.unwrap_or(now));
        let wait = Duration::from_millis(due.saturating_sub(now).max(0) as u64);
        let fire = wait <= KEEPALIVE;
        tokio::select! {
            _ = tokio::time::sleep(wait.min(KEEPALIVE)) => {}
            _ = w.stop.cancelled() => {
                delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await?;
                break;
            }
        }
        let last = if fire {
            let body = (job.make)()?;
            let job_id = format!("{}@{due}", job.task);
            let mut table = FieldTable::default();
            headers::set_str(&mut table, headers::TASK, job.task);
            headers::set_int(&mut table, headers::ATTEMPT, 1);
            headers::set_int(&mut table, headers::ENQUEUED_MS, headers::now_ms());
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(job_id.as_str().into())
                .with_type(job.task.into())
                .with_headers(table);
            publish::confirmed(
                &outbox,
                topology::TASKS_EXCHANGE,
                job.queue,
                &body,
                props,
                true,
            )
            .await?;
            tracing::debug!(task = job.task, tick = due, "periodic job enqueued");
            // Missed ticks (no leader for a while) collapse into this one.
            Some(due.max(headers::now_ms()))
        } else {
            token.last
        };
        let id = publish_token(&outbox, &token_queue, last).await?;
        delivery.ack(BasicAckOptions::default()).await?;
        mine = last.map(|l| (id, l));
    }
    let _ = ch
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_align_to_the_epoch() {
        let s = Schedule::interval(Duration::from_secs(1));
        assert_eq!(s.next_after(0), 1000);
        assert_eq!(s.next_after(999), 1000);
        assert_eq!(s.next_after(1000), 2000);
    }

    #[test]
    fn cron_ticks_follow_the_expression() {
        let s = Schedule::cron("*/10 * * * * *").unwrap();
        assert_eq!(s.next_after(1_000), 10_000);
        assert_eq!(s.next_after(10_000), 20_000);
        assert!(Schedule::cron("not cron").is_err());
    }
}
