//! The exchanges and queues the SDK declares, idempotently, on both the
//! producer's and the worker's side (so a task enqueued before any worker
//! started is kept), and how a message is sent "later".
//!
//! - `hare.tasks` (direct): one durable queue per task, bound by its name.
//! - `hare.events` (topic): one durable queue per consumer group, bound to
//!   each event name the group handles.
//! - `{queue}.dlq`: where the SDK puts what failed for good, with the error.
//! - `hare.status` (topic): job lifecycle events, `{task}.{state}`; a group
//!   that follows them has a durable `{group}.status` queue bound to its patterns.
//! - Delays: the `x-delayed-message` exchange `hare.delayed` when the broker
//!   has it (Hare does), else a binary ladder of TTL queues (below).

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

pub const TASKS_EXCHANGE: &str = "hare.tasks";
pub const EVENTS_EXCHANGE: &str = "hare.events";
pub const STATUS_EXCHANGE: &str = "hare.status";
pub const DELAYED_EXCHANGE: &str = "hare.delayed";
/// Direct reply-to, RabbitMQ's pseudo-queue for RPC replies.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Levels of the TTL ladder: level `k` waits 2^k ms, so 32 levels reach
/// about 49 days, with millisecond resolution.
pub const LADDER_LEVELS: u32 = 32;
const LADDER_DELIVER: &str = "hare.delay.deliver";

/// Where a queue's failures go.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The queue of a consumer group's events.
pub fn group_queue(group: &str) -> String {
    format!("{group}.events")
}

/// The queue of the status events a consumer group follows.
pub fn status_queue(group: &str) -> String {
    format!("{group}.status")
}

/// How queues are declared: classic (Hare's default, or one RabbitMQ node)
/// or quorum (a RabbitMQ cluster, where work must survive losing a node).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueKind {
    #[default]
    Classic,
    /// `x-queue-type: quorum`; the broker's `x-delivery-limit` caps crash loops.
    Quorum { delivery_limit: u32 },
}

/// How the broker can hold a message back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelayPath {
    /// `hare.delayed`, an `x-delayed-message` exchange.
    Plugin,
    /// The TTL ladder.
    Ladder,
}

/// A string argument value.
fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Declares a durable work queue (and its dead-letter queue), plus the way
/// back into it after a delay.
pub async fn declare_work_queue(
    ch: &Channel,
    queue: &str,
    kind: QueueKind,
    max_priority: Option<u8>,
    delay: DelayPath,
) -> lapin::Result<()> {
    let mut args = FieldTable::default();
    if let Some(p) = max_priority {
        args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(p));
    }
    let dlq = dead_letter_queue(queue);
    if let QueueKind::Quorum { delivery_limit } = kind {
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(delivery_limit as i32),
        );
        // A crash loop the broker ends goes to the same dead-letter queue.
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text(dlq.as_str()));
    }
    let mut dlq_args = FieldTable::default();
    if matches!(kind, QueueKind::Quorum { .. }) {
        dlq_args.insert("x-queue-type".into(), text("quorum"));
    }
    ch.queue_declare(dlq.as_str().into(), durable_queue(), dlq_args)
        .await?;
    ch.queue_declare(queue.into(), durable_queue(), args)
        .await?;
    bind_delay_path(ch, queue, delay).await
}

/// Binds `queue` to where its delayed messages come out.
pub async fn bind_delay_path(ch: &Channel, queue: &str, delay: DelayPath) -> lapin::Result<()> {
    match delay {
        DelayPath::Plugin => {
            ch.queue_bind(
                queue.into(),
                DELAYED_EXCHANGE.into(),
                queue.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
        DelayPath::Ladder => {
            ch.queue_bind(
                queue.into(),
                LADDER_DELIVER.into(),
                ladder_delivery_pattern(queue).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
        }
    }
}

/// Declares `hare.tasks` and binds a task queue to it.
pub async fn declare_task_queue(
    ch: &Channel,
    queue: &str,
    kind: QueueKind,
    max_priority: Option<u8>,
    delay: DelayPath,
) -> lapin::Result<()> {
    ch.exchange_declare(
        TASKS_EXCHANGE.into(),
        ExchangeKind::Direct,
        durable_exchange(),
        FieldTable::default(),
    )
    .await?;
    declare_work_queue(ch, queue, kind, max_priority, delay).await?;
    ch.queue_bind(
        queue.into(),
        TASKS_EXCHANGE.into(),
        queue.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Declares `hare.events` (and `hare.status`, which workers publish to).
pub async fn declare_event_exchanges(ch: &Channel) -> lapin::Result<()> {
    for name in [EVENTS_EXCHANGE, STATUS_EXCHANGE] {
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// Binds a group's queue to each event name it handles.
pub async fn bind_events(ch: &Channel, queue: &str, events: &[&str]) -> lapin::Result<()> {
    bind_keys(ch, EVENTS_EXCHANGE, queue, events).await
}

/// Binds a group's status queue to each `{task}.{state}` pattern it follows.
pub async fn bind_status(ch: &Channel, queue: &str, patterns: &[&str]) -> lapin::Result<()> {
    bind_keys(ch, STATUS_EXCHANGE, queue, patterns).await
}

async fn bind_keys(ch: &Channel, exchange: &str, queue: &str, keys: &[&str]) -> lapin::Result<()> {
    for key in keys {
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            (*key).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// Finds out, on a throwaway connection, whether the broker has the
/// `x-delayed-message` exchange type, declaring `hare.delayed` if so.
/// RabbitMQ without the plugin answers an unknown type by closing the whole
/// connection (503), which is why this cannot run on a connection in use.
pub async fn probe_delay_path(url: &str) -> lapin::Result<DelayPath> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-delayed-type".into(), text("direct"));
    let outcome = ch
        .exchange_declare(
            DELAYED_EXCHANGE.into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            durable_exchange(),
            args,
        )
        .await;
    let _ = conn.close(200, ShortString::from("probe done")).await;
    match outcome {
        Ok(()) => Ok(DelayPath::Plugin),
        Err(e) if is_broker_refusal(&e) => Ok(DelayPath::Ladder),
        Err(e) => Err(e),
    }
}

/// A refusal the broker sent (as opposed to a dead socket).
fn is_broker_refusal(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(_) | lapin::ErrorKind::InvalidConnectionState(_)
    )
}

/// The TTL ladder, after NServiceBus's delayed delivery: a message delayed
/// by `d` ms gets the routing key `b31.b30.….b0.{queue}` (the bits of `d`)
/// and enters at the top level. Level `k` is a topic exchange: bit `k` set
/// routes to queue `hare.delay.k` (TTL 2^k ms, dead-lettering to level
/// `k-1`), bit clear routes straight to exchange `k-1`. Level 0 hands over
/// to `hare.delay.deliver`, where each work queue is bound by its name. Every
/// queue on the ladder holds messages of one TTL only, so expiry is always at
/// the head and nothing waits behind a longer delay, and no delayed task is
/// ever held unacked in a worker.
///
/// The ladder's queues are of `kind`, like the work queues: on a cluster a
/// classic ladder queue lives on one node, and once that node is gone every
/// re-declare of it fails (404 "home node … is down"), which would keep every
/// worker and producer from reconnecting, and the retries waiting in it would
/// be stuck. Quorum ladder queues (message TTL needs RabbitMQ 3.10+) pass
/// expired messages on at least once: the broker keeps a message until the
/// level below has it (which needs `reject-publish` overflow).
pub async fn declare_ladder(ch: &Channel, kind: QueueKind) -> lapin::Result<()> {
    let topic = |name: String| {
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
    };
    topic(LADDER_DELIVER.to_owned()).await?;
    for level in 0..LADDER_LEVELS {
        topic(ladder_exchange(level)).await?;
    }
    for level in 0..LADDER_LEVELS {
        let below = if level == 0 {
            LADDER_DELIVER.to_owned()
        } else {
            ladder_exchange(level - 1)
        };
        let queue = format!("hare.delay.{level}");
        let mut args = FieldTable::default();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(1i64 << level),
        );
        args.insert("x-dead-letter-exchange".into(), text(below.as_str()));
        if matches!(kind, QueueKind::Quorum { .. }) {
            for (key, value) in [
                ("x-queue-type", "quorum"),
                ("x-dead-letter-strategy", "at-least-once"),
                ("x-overflow", "reject-publish"),
            ] {
                args.insert(key.into(), text(value));
            }
        }
        ch.queue_declare(queue.as_str().into(), durable_queue(), args)
            .await?;
        ch.queue_bind(
            queue.as_str().into(),
            ladder_exchange(level).into(),
            bit_pattern(level, '1').into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.exchange_bind(
            below.as_str().into(),
            ladder_exchange(level).into(),
            bit_pattern(level, '0').into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

fn ladder_exchange(level: u32) -> String {
    format!("hare.delay.level.{level}")
}

/// The exchange a ladder message enters at.
pub fn ladder_entry() -> String {
    ladder_exchange(LADDER_LEVELS - 1)
}

/// `*.*.…1.#` with the bit of `level` fixed (the key lists bits high to low).
fn bit_pattern(level: u32, bit: char) -> String {
    let mut words: Vec<String> = (0..(LADDER_LEVELS - 1 - level))
        .map(|_| "*".to_owned())
        .collect();
    words.push(bit.to_string());
    words.push("#".to_owned());
    words.join(".")
}

/// The routing key that walks the ladder for `delay` and ends in `queue`.
pub fn ladder_key(delay: Duration, queue: &str) -> String {
    let ms = delay.as_millis().min((1u128 << LADDER_LEVELS) - 1) as u64;
    let mut key = String::with_capacity(LADDER_LEVELS as usize * 2 + queue.len());
    for level in (0..LADDER_LEVELS).rev() {
        key.push(if ms >> level & 1 == 1 { '1' } else { '0' });
        key.push('.');
    }
    key.push_str(queue);
    key
}

/// Exactly `LADDER_LEVELS` bit words, then the queue's name.
fn ladder_delivery_pattern(queue: &str) -> String {
    let mut pattern = "*.".repeat(LADDER_LEVELS as usize);
    pattern.push_str(queue);
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_key_spells_the_delay_in_binary_high_bit_first() {
        let key = ladder_key(Duration::from_millis(5), "q.a");
        let words: Vec<&str> = key.split('.').collect();
        assert_eq!(words.len(), LADDER_LEVELS as usize + 2);
        assert_eq!(&words[29..32], &["1", "0", "1"]);
        assert!(words[..29].iter().all(|w| *w == "0"));
        assert_eq!(&words[32..], &["q", "a"]);
    }

    #[test]
    fn bit_patterns_fix_one_word() {
        assert_eq!(bit_pattern(LADDER_LEVELS - 1, '1'), "1.#");
        assert!(bit_pattern(0, '0').ends_with("*.0.#"));
        assert_eq!(bit_pattern(0, '0').matches('*').count(), 31);
    }
}
