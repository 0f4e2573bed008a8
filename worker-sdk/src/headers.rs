//! The SDK's message headers: what a worker needs to know about a job that
//! AMQP's own properties do not carry. All are plain AMQP field-table values,
//! so a Python or Go program can read and write them too.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

/// The task or event name (also the AMQP `type` property).
pub const TASK: &str = "x-hare-task";
/// The 1-based attempt this copy is for; a retry copy carries the next number.
pub const ATTEMPT: &str = "x-hare-attempt";
/// How many times this copy came back without an outcome (worker died or
/// stopped mid-task), counted by the SDK because classic queues do not.
pub const REDELIVERIES: &str = "x-hare-redeliveries";
/// When the job was first enqueued, in ms since the epoch (for queue-wait metrics).
pub const ENQUEUED_MS: &str = "x-hare-enqueued-ms";
/// On a dead letter: the error text, its kind, the attempts made, the queue it
/// came from, and when (ms since the epoch).
pub const ERROR: &str = "x-hare-error";
pub const ERROR_KIND: &str = "x-hare-error-kind";
pub const ATTEMPTS: &str = "x-hare-attempts";
pub const ORIGINAL_QUEUE: &str = "x-hare-queue";
pub const FAILED_AT_MS: &str = "x-hare-failed-at";
/// The delayed-message exchange's delay, in ms.
pub const X_DELAY: &str = "x-delay";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    to_ms(SystemTime::now())
}

pub fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Reads an integer header whatever integer width the sender chose.
pub fn get_int(props: &BasicProperties, name: &str) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(*v as i64),
        AMQPValue::ShortShortUInt(v) => Some(*v as i64),
        AMQPValue::ShortInt(v) => Some(*v as i64),
        AMQPValue::ShortUInt(v) => Some(*v as i64),
        AMQPValue::LongInt(v) => Some(*v as i64),
        AMQPValue::LongUInt(v) => Some(*v as i64),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => Some(*v as i64),
        _ => None,
    }
}

/// Reads a string header.
pub fn get_str(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The headers of `props`, to copy and amend.
pub fn table(props: &BasicProperties) -> FieldTable {
    props.headers().clone().unwrap_or_default()
}

/// What the broker adds when it dead-letters (each pass through the TTL
/// ladder does).
const DEATH: &[&str] = &[
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// The headers for a copy the SDK re-publishes (a retry, a counted
/// redelivery), without the broker's dead-letter history: RabbitMQ drops a
/// message whose `x-death` shows it already expired from the same queue (its
/// cycle detection), which a second trip through the ladder would be.
pub fn for_copy(props: &BasicProperties) -> FieldTable {
    without(&table(props), DEATH)
}

pub fn set_int(table: &mut FieldTable, name: &str, v: i64) {
    table.insert(ShortString::from(name), AMQPValue::LongLongInt(v));
}

pub fn set_str(table: &mut FieldTable, name: &str, v: &str) {
    table.insert(
        ShortString::from(name),
        AMQPValue::LongString(LongString::from(v)),
    );
}

/// A copy of `table` without the headers in `drop`.
pub fn without(table: &FieldTable, drop: &[&str]) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in table.inner() {
        if !drop.contains(&k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}
