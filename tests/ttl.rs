//! Message TTLs (`x-message-ttl`, the `expiration` property) and unused-queue
//! expiry (`x-expires`), as RabbitMQ 3.10 applies them to classic queues:
//!
//! * the lower of the queue's and the message's TTL wins;
//! * an expired message is never delivered, and leaves the queue on its own
//!   (the message count drops with no consumer around);
//! * TTL 0 means "deliver now or never";
//! * expiry happens at the head only: a short-lived message behind a
//!   long-lived one is counted until it reaches the head;
//! * a requeued message keeps its original deadline;
//! * a queue with `x-expires` and no consumers is deleted once nobody used it
//!   for that long; declares (passive ones too) and basic.get count as use.
//!
//! The restart tests at the end run `hare` as a process and are Hare-only.

mod common;

use std::time::{Duration, Instant};

use common::args::{table, text as ls};
use common::process::{open, restart_process, start_process};
use common::*;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

fn int(v: i32) -> AMQPValue {
    AMQPValue::LongInt(v)
}

fn expiring(ms: &str) -> BasicProperties {
    BasicProperties::default().with_expiration(ms.into())
}

/// Declares queue `name` with `args`; exclusive (cleaned up with the
/// connection) unless the test is about the queue's own lifetime.
async fn declare(ch: &Channel, name: &str, args: FieldTable, exclusive: bool) {
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            exclusive,
            ..Default::default()
        },
        args,
    ))
    .await
    .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
}

async fn get(ch: &Channel, queue: &str) -> Option<String> {
    within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
        .map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned())
}

/// Whether `queue` exists, by a passive declare on a fresh channel (a 404
/// closes the channel). In RabbitMQ this counts as use for `x-expires`.
async fn exists(conn: &Connection, queue: &str) -> bool {
    let ch = within(conn.create_channel()).await.expect("channel");
    let res = within(ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    match res {
        Ok(_) => {
            let _ = ch.close(200, "ok".into()).await;
            true
        }
        Err(e) => {
            expect_channel_error(Err::<(), _>(e), 404);
            false
        }
    }
}

/// Sleeps until `ms` after `start`.
async fn until(start: Instant, ms: u64) {
    let at = start + Duration::from_millis(ms);
    tokio::time::sleep_until(at.into()).await;
}

/// Asserts `queue` holds `n` messages while nothing in it can have expired
/// yet: `start` was taken before the publishes, `ms` is the earliest TTL.
///
/// Polls, because RabbitMQ answers a passive declare ahead of deliveries
/// still waiting in the queue's mailbox (its `stat` call has priority), so
/// a count taken right after a publish or requeue can be short. A broker on
/// a loaded machine may not get there before `ms`; then nothing is checked.
async fn count_before(ch: &Channel, queue: &str, n: u32, start: Instant, ms: u64) {
    loop {
        let count = message_count(ch, queue).await;
        if start.elapsed() >= Duration::from_millis(ms) || count == n {
            return;
        }
        assert!(count < n, "{queue} holds {count} messages, expected {n}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until `queue` holds `n` messages, failing if that takes past `ms`
/// after `start` (an expiry that came late).
async fn count_by(ch: &Channel, queue: &str, n: u32, start: Instant, ms: u64) {
    loop {
        let count = message_count(ch, queue).await;
        if count == n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_millis(ms),
            "{queue} still holds {count} messages {ms} ms in, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Message TTL.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn queue_ttl_expires_messages_nobody_consumes() {
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, table(&[("x-message-ttl", int(300))]), true).await;
    let start = Instant::now();
    send(&ctx.ch, &q, b"a").await;
    send(&ctx.ch, &q, b"b").await;
    count_before(&ctx.ch, &q, 2, start, 300).await;
    count_by(&ctx.ch, &q, 0, start, 800).await;
    assert_eq!(get(&ctx.ch, &q).await, None);
}

#[tokio::test]
async fn expired_messages_are_never_delivered() {
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, table(&[("x-message-ttl", int(150))]), true).await;
    send(&ctx.ch, &q, b"stale").await;
    // The broker has the publish once it answered this; the TTL runs from there.
    message_count(&ctx.ch, &q).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&ctx.ch, &q).await, None);

    // A consumer that arrives late gets nothing either.
    send(&ctx.ch, &q, b"stale too").await;
    message_count(&ctx.ch, &q).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ch = ctx.channel().await;
    let mut late = consume(&ch, &q, true).await;
    assert_no_delivery(&mut late).await;
    cancel(&ch, late).await;

    // Nor does a busy consumer once it has room again.
    within(ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("basic.qos");
    let mut busy = consume(&ch, &q, false).await;
    send(&ctx.ch, &q, b"first").await;
    let first = next_delivery(&mut busy).await;
    assert_eq!(first.data, b"first");
    send(&ctx.ch, &q, b"waits and expires").await;
    message_count(&ctx.ch, &q).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.ack(BasicAckOptions::default()).await.expect("ack");
    assert_no_delivery(&mut busy).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
}

#[tokio::test]
async fn per_message_expiration() {
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, FieldTable::default(), true).await;
    let start = Instant::now();
    publish_with(&ctx.ch, "", &q, b"brief", expiring("300")).await;
    count_before(&ctx.ch, &q, 1, start, 300).await;
    count_by(&ctx.ch, &q, 0, start, 800).await;
    assert_eq!(get(&ctx.ch, &q).await, None);
}

#[tokio::test]
async fn the_lower_of_queue_and_message_ttl_wins() {
    let ctx = setup().await;
    let (short_queue, long_queue, plain) = (unique("short-q"), unique("long-q"), unique("plain"));
    declare(
        &ctx.ch,
        &short_queue,
        table(&[("x-message-ttl", int(300))]),
        true,
    )
    .await;
    declare(
        &ctx.ch,
        &long_queue,
        table(&[("x-message-ttl", int(60_000))]),
        true,
    )
    .await;
    declare(
        &ctx.ch,
        &plain,
        table(&[("x-message-ttl", int(60_000))]),
        true,
    )
    .await;
    let start = Instant::now();
    publish_with(&ctx.ch, "", &short_queue, b"x", expiring("60000")).await;
    publish_with(&ctx.ch, "", &long_queue, b"y", expiring("300")).await;
    send(&ctx.ch, &plain, b"z").await;
    count_before(&ctx.ch, &short_queue, 1, start, 300).await;
    count_before(&ctx.ch, &long_queue, 1, start, 300).await;
    count_by(&ctx.ch, &short_queue, 0, start, 800).await;
    count_by(&ctx.ch, &long_queue, 0, start, 800).await;
    assert_eq!(message_count(&ctx.ch, &plain).await, 1);
}

#[tokio::test]
async fn ttl_zero_reaches_only_a_consumer_that_can_take_it_now() {
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, table(&[("x-message-ttl", int(0))]), true).await;

    // Nobody waiting: gone at once.
    send(&ctx.ch, &q, b"lost").await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    assert_eq!(get(&ctx.ch, &q).await, None);
    let plain = unique("plain");
    declare(&ctx.ch, &plain, FieldTable::default(), true).await;
    publish_with(&ctx.ch, "", &plain, b"lost", expiring("0")).await;
    assert_eq!(message_count(&ctx.ch, &plain).await, 0);

    // A waiting consumer gets it, from either kind of TTL.
    let ch = ctx.channel().await;
    within(ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("basic.qos");
    let mut consumer = consume(&ch, &q, false).await;
    send(&ctx.ch, &q, b"caught").await;
    let caught = next_delivery(&mut consumer).await;
    assert_eq!(caught.data, b"caught");
    let mut plain_consumer = consume(&ch, &plain, true).await;
    publish_with(&ctx.ch, "", &plain, b"caught too", expiring("0")).await;
    assert_eq!(next_delivery(&mut plain_consumer).await.data, b"caught too");

    // A consumer at its prefetch limit cannot take it now: lost.
    send(&ctx.ch, &q, b"lost again").await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    caught.ack(BasicAckOptions::default()).await.expect("ack");
    assert_no_delivery(&mut consumer).await;
}

#[tokio::test]
async fn per_message_ttl_expires_only_at_the_head() {
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, FieldTable::default(), true).await;
    let start = Instant::now();
    publish_with(&ctx.ch, "", &q, b"long", expiring("1000")).await;
    publish_with(&ctx.ch, "", &q, b"short", expiring("1")).await;
    publish_with(&ctx.ch, "", &q, b"zero", expiring("0")).await;
    until(start, 200).await;
    // Past their TTL, but behind a live head: still counted.
    count_before(&ctx.ch, &q, 3, start, 1000).await;
    // Once the head is taken, the expired ones behind it go without delivery.
    assert_eq!(get(&ctx.ch, &q).await.as_deref(), Some("long"));
    assert_eq!(get(&ctx.ch, &q).await, None);
    assert_eq!(message_count(&ctx.ch, &q).await, 0);

    // Left alone, they all go when the head expires.
    let start = Instant::now();
    publish_with(&ctx.ch, "", &q, b"long", expiring("500")).await;
    publish_with(&ctx.ch, "", &q, b"short", expiring("1")).await;
    until(start, 200).await;
    count_before(&ctx.ch, &q, 2, start, 500).await;
    count_by(&ctx.ch, &q, 0, start, 1000).await;
}

#[tokio::test]
async fn a_head_uncovered_by_drop_head_expires_on_time() {
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, table(&[("x-max-length", int(2))]), true).await;
    let start = Instant::now();
    publish_with(&ctx.ch, "", &q, b"long", expiring("2000")).await;
    publish_with(&ctx.ch, "", &q, b"short", expiring("150")).await;
    // Pushes "long" out: "short" is the head now and expires at its own time.
    send(&ctx.ch, &q, b"forever").await;
    until(start, 450).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 1);
    assert_eq!(get(&ctx.ch, &q).await.as_deref(), Some("forever"));
}

#[tokio::test]
async fn a_requeued_message_keeps_its_original_expiry() {
    let ctx = setup().await;
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(&ctx.ch, &dlq, FieldTable::default(), true).await;
    let args = table(&[
        ("x-message-ttl", int(600)),
        ("x-dead-letter-exchange", ls("")),
        ("x-dead-letter-routing-key", ls(&dlq)),
    ]);
    declare(&ctx.ch, &q, args, true).await;

    // Requeued before its deadline: it expires at the original time, not a
    // fresh TTL after the requeue.
    let start = Instant::now();
    send(&ctx.ch, &q, b"early").await;
    let msg = within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions::default()),
    )
    .await
    .expect("basic.get")
    .expect("a message");
    until(start, 300).await;
    within(ctx.ch.basic_nack(
        msg.delivery.delivery_tag,
        BasicNackOptions {
            multiple: false,
            requeue: true,
        },
    ))
    .await
    .expect("nack");
    count_before(&ctx.ch, &q, 1, start, 600).await;
    // A fresh TTL from the requeue would last until 900 ms at least.
    count_by(&ctx.ch, &q, 0, start, 880).await;
    wait_message_count(&ctx.ch, &dlq, 1).await;
    assert_eq!(get(&ctx.ch, &dlq).await.as_deref(), Some("early"));

    // Requeued after its deadline: dead-lettered, never delivered again.
    let ch = ctx.channel().await;
    let mut consumer = consume(&ch, &q, false).await;
    send(&ctx.ch, &q, b"late").await;
    let delivery = next_delivery(&mut consumer).await;
    tokio::time::sleep(Duration::from_millis(750)).await;
    delivery
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .expect("nack");
    assert_no_delivery(&mut consumer).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    wait_message_count(&ctx.ch, &dlq, 1).await;
    assert_eq!(get(&ctx.ch, &dlq).await.as_deref(), Some("late"));
}

// ---------------------------------------------------------------------------
// x-expires.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_unused_queue_is_deleted_with_its_messages() {
    let ctx = setup().await;
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(&ctx.ch, &dlq, FieldTable::default(), true).await;
    let args = table(&[
        ("x-expires", int(300)),
        ("x-dead-letter-exchange", ls("")),
        ("x-dead-letter-routing-key", ls(&dlq)),
    ]);
    declare(&ctx.ch, &q, args, false).await;
    send(&ctx.ch, &q, b"goes with the queue").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!exists(&ctx.conn, &q).await, "queue still there");
    // Deleting a queue does not dead-letter what it held.
    assert_eq!(message_count(&ctx.ch, &dlq).await, 0);
}

#[tokio::test]
async fn a_consumer_keeps_an_expiring_queue_alive() {
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, table(&[("x-expires", int(200))]), false).await;
    let ch = ctx.channel().await;
    let consumer = consume(&ch, &q, true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(exists(&ctx.conn, &q).await, "deleted under its consumer");
    // The clock starts when the last consumer goes.
    cancel(&ch, consumer).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!exists(&ctx.conn, &q).await, "queue still there");
}

/// Declares an `x-expires: 500` queue, does `touch` at 300 ms, and checks it
/// still exists at 650 ms (it would be gone at 500 without the touch).
async fn assert_resets_expiry<F, Fut>(touch: F)
where
    F: FnOnce(Ctx, String) -> Fut,
    Fut: std::future::Future<Output = Ctx>,
{
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, table(&[("x-expires", int(500))]), false).await;
    let start = Instant::now();
    until(start, 300).await;
    let ctx = touch(ctx, q.clone()).await;
    until(start, 650).await;
    assert!(exists(&ctx.conn, &q).await, "expired despite being used");
}

#[tokio::test]
async fn redeclare_resets_the_expiry_clock() {
    assert_resets_expiry(|ctx, q| async move {
        declare(&ctx.ch, &q, table(&[("x-expires", int(500))]), false).await;
        ctx
    })
    .await;
}

#[tokio::test]
async fn passive_declare_resets_the_expiry_clock() {
    assert_resets_expiry(|ctx, q| async move {
        assert!(exists(&ctx.conn, &q).await);
        ctx
    })
    .await;
}

#[tokio::test]
async fn basic_get_resets_the_expiry_clock() {
    assert_resets_expiry(|ctx, q| async move {
        assert_eq!(get(&ctx.ch, &q).await, None);
        ctx
    })
    .await;
}

#[tokio::test]
async fn publishing_does_not_reset_the_expiry_clock() {
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, table(&[("x-expires", int(500))]), false).await;
    let start = Instant::now();
    until(start, 300).await;
    send(&ctx.ch, &q, b"not a use").await;
    // Gone at 500; a reset by the publish would keep it until 800.
    until(start, 650).await;
    assert!(!exists(&ctx.conn, &q).await, "queue still there");
}

// ---------------------------------------------------------------------------
// Restart (Hare-only: it runs the hare binary on a data dir it owns).
// ---------------------------------------------------------------------------

fn against_other_broker() -> bool {
    // Restarting the shared RabbitMQ is not ours to do.
    std::env::var("HARE_TEST_URL").is_ok()
}

#[tokio::test]
async fn expiry_deadlines_survive_a_restart() {
    if against_other_broker() {
        return;
    }
    let dir = hare_suite::temp_data_dir("ttl-restart");
    let data = dir.join("data");
    let broker = start_process(&data).await;
    let (conn, ch) = open(&broker.url()).await;
    let (by_queue, by_message) = (unique("by-queue"), unique("by-message"));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    within(ch.queue_declare(
        by_queue.as_str().into(),
        durable,
        table(&[("x-message-ttl", int(1500))]),
    ))
    .await
    .expect("declare");
    within(ch.queue_declare(by_message.as_str().into(), durable, FieldTable::default()))
        .await
        .expect("declare");
    let start = Instant::now();
    let persistent = BasicProperties::default().with_delivery_mode(2);
    publish_with(&ch, "", &by_queue, b"q", persistent.clone()).await;
    publish_with(
        &ch,
        "",
        &by_message,
        b"m",
        persistent.with_expiration("1500".into()),
    )
    .await;
    drop(conn);
    until(start, 600).await;

    let broker = restart_process(broker, &data).await;
    let (conn, ch) = open(&broker.url()).await;
    count_before(&ch, &by_queue, 1, start, 1500).await;
    count_before(&ch, &by_message, 1, start, 1500).await;
    // A fresh TTL from the restart would last until at least 2100 ms.
    count_by(&ch, &by_queue, 0, start, 2050).await;
    count_by(&ch, &by_message, 0, start, 2050).await;
    drop(conn);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn messages_that_expired_while_down_are_dead_lettered_on_start() {
    if against_other_broker() {
        return;
    }
    let dir = hare_suite::temp_data_dir("ttl-down");
    let data = dir.join("data");
    let broker = start_process(&data).await;
    let (conn, ch) = open(&broker.url()).await;
    let (q, dlq) = (unique("q"), unique("dlq"));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let args = table(&[
        ("x-message-ttl", int(300)),
        ("x-dead-letter-exchange", ls("")),
        ("x-dead-letter-routing-key", ls(&dlq)),
    ]);
    within(ch.queue_declare(q.as_str().into(), durable, args))
        .await
        .expect("declare");
    within(ch.queue_declare(dlq.as_str().into(), durable, FieldTable::default()))
        .await
        .expect("declare");
    let start = Instant::now();
    let persistent = BasicProperties::default().with_delivery_mode(2);
    publish_with(&ch, "", &q, b"expires while down", persistent).await;
    drop(conn);
    // Hare is down when the deadline passes.
    let job = tokio::task::spawn_blocking(move || broker.terminate(Duration::from_secs(10)));
    assert!(within(job).await.expect("terminate").is_some());
    until(start, 500).await;

    let broker = start_process(&data).await;
    let (conn, ch) = open(&broker.url()).await;
    wait_message_count(&ch, &dlq, 1).await;
    assert_eq!(message_count(&ch, &q).await, 0);
    assert_eq!(get(&ch, &dlq).await.as_deref(), Some("expires while down"));
    drop(conn);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
