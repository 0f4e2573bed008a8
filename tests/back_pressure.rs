//! Back pressure: memory and disk alarms block publishing connections
//! (connection.blocked / unblocked), and the consumer timeout closes a channel
//! that sits on an unacknowledged delivery.
//!
//! The alarm tests change Hare's thresholds at run time (a memory limit far
//! below the real RSS, a disk limit far above the real free space) and let the
//! real monitor notice; they skip under `HARE_TEST_URL` because a test cannot
//! change another broker's thresholds. The consumer-timeout tests skip there
//! too: RabbitMQ 3.10 has only the broker-wide `consumer_timeout` (which a test
//! cannot set) and ignores the `x-consumer-timeout` queue argument. The
//! texts asserted here were taken from RabbitMQ 3.10.8 with its alarms raised
//! and `consumer_timeout` set to 2000 ms.

mod common;

use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, connection, AMQPClass};
use amq_protocol::types::FieldTable as RawTable;
use common::raw::{self, Handshake, Raw};
use common::*;
use futures::StreamExt;
use hare_suite::{Config, MemoryWatermark, RunningBroker};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue as LapinValue, FieldTable};
use lapin::Event;

/// Samples often, so alarms set by the monitor's own tick also show quickly.
fn fast_monitor(config: &mut Config) {
    config.resource_check_interval = Duration::from_millis(50);
}

/// Waits (bounded) until `cond` holds for the broker's alarms.
async fn wait_alarm(hare: &RunningBroker, what: &str, cond: impl Fn(&RunningBroker) -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !cond(hare) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not reached within {TIMEOUT:?} (rss {} limit {}, disk free {} limit {})",
            hare.alarms().rss_bytes(),
            hare.alarms().memory_limit_bytes(),
            hare.alarms().disk_free_bytes(),
            hare.alarms().disk_free_limit_bytes(),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn raise_memory_alarm(hare: &RunningBroker) {
    // One byte: far below any process's resident memory.
    hare.set_memory_high_watermark(MemoryWatermark::Absolute(1));
    wait_alarm(hare, "memory alarm", |h| h.alarms().memory_alarm()).await;
}

async fn clear_memory_alarm(hare: &RunningBroker) {
    hare.set_memory_high_watermark(Config::default().memory_high_watermark);
    wait_alarm(hare, "memory alarm cleared", |h| !h.alarms().memory_alarm()).await;
}

async fn raise_disk_alarm(hare: &RunningBroker) {
    // More free space than any file system has.
    hare.set_disk_free_limit(u64::MAX);
    wait_alarm(hare, "disk alarm", |h| h.alarms().disk_alarm()).await;
}

async fn clear_disk_alarm(hare: &RunningBroker) {
    hare.set_disk_free_limit(Config::default().disk_free_limit);
    wait_alarm(hare, "disk alarm cleared", |h| !h.alarms().disk_alarm()).await;
}

/// The next connection event other than `Connected`, bounded by [`TIMEOUT`].
async fn next_event(events: &mut (impl futures::Stream<Item = Event> + Unpin)) -> Event {
    loop {
        match within(events.next()).await {
            Some(Event::Connected) => continue,
            Some(event) => return event,
            None => panic!("connection event stream ended"),
        }
    }
}

/// A publish with its content, as one write.
fn publish_frames(ch: u16, queue: &str, body: &[u8]) -> Vec<u8> {
    [
        raw::encode(&raw::publish(ch, queue, false)),
        raw::encode(&raw::content_header(ch, body.len() as u64)),
        raw::encode(&raw::body(ch, body)),
    ]
    .concat()
}

/// The next frame that is not a heartbeat.
async fn next_non_heartbeat(raw: &mut Raw) -> Option<AMQPFrame> {
    loop {
        match raw.next().await {
            Some(AMQPFrame::Heartbeat) => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn memory_alarm_blocks_a_publisher_while_consumers_drain_and_nothing_is_lost() {
    let broker = TestBroker::start_with(fast_monitor);
    let Some(hare) = broker.hare() else {
        return; // changes the alarm threshold at run time: Hare only
    };
    let publisher = connect(&broker).await;
    let mut publisher_events = publisher.events_listener();
    let pub_ch = within(publisher.create_channel()).await.expect("channel");
    within(pub_ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let queue = declare_queue(&pub_ch, "pressure.memory").await;
    for i in 0..3 {
        send(&pub_ch, &queue, format!("before-{i}").as_bytes()).await;
    }

    raise_memory_alarm(hare).await;
    // Held publishes complete (confirm included) only once the alarm clears.
    let held = {
        let (ch, queue) = (pub_ch.clone(), queue.clone());
        tokio::spawn(async move {
            for i in 0..3 {
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        Default::default(),
                        format!("held-{i}").as_bytes(),
                        Default::default(),
                    )
                    .await
                    .expect("basic.publish");
                confirm.await.expect("publisher confirm");
            }
        })
    };
    match next_event(&mut publisher_events).await {
        Event::ConnectionBlocked(reason) => assert_eq!(reason, "low on memory"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }

    // A connection that only consumes keeps being served and drains the queue.
    let consumer_conn = connect(&broker).await;
    let mut consumer_events = consumer_conn.events_listener();
    let con_ch = within(consumer_conn.create_channel())
        .await
        .expect("channel");
    let mut consumer = consume(&con_ch, &queue, true).await;
    let drained = collect_bodies(&mut consumer, 3).await;
    assert_eq!(drained, ["before-0", "before-1", "before-2"]);
    assert_no_delivery(&mut consumer).await;
    assert_eq!(message_count(&con_ch, &queue).await, 0);
    assert!(!held.is_finished(), "publishes completed while blocked");

    clear_memory_alarm(hare).await;
    match next_event(&mut publisher_events).await {
        Event::ConnectionUnblocked => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    let released = collect_bodies(&mut consumer, 3).await;
    assert_eq!(released, ["held-0", "held-1", "held-2"]);
    within(held).await.expect("held publishes confirmed");
    // The consumer's connection never published, so it was never blocked.
    match tokio::time::timeout(QUIET, consumer_events.next()).await {
        Err(_) | Ok(Some(Event::Connected)) => {}
        Ok(other) => panic!("consumer connection got {other:?}"),
    }
}

#[tokio::test]
async fn disk_alarm_blocks_a_raw_publisher_without_heartbeat_timeout() {
    let broker = TestBroker::start_with(fast_monitor);
    let Some(hare) = broker.hare() else {
        return; // changes the alarm threshold at run time: Hare only
    };
    let opts = Handshake {
        connection_blocked: true,
        heartbeat: 1,
        ..Handshake::default()
    };
    let mut publisher = Raw::open_with(broker.addr(), &opts).await;
    publisher.open_channel(1).await;
    let queue = unique("pressure.disk");
    publisher.declare(1, &queue, false).await;

    raise_disk_alarm(hare).await;
    publisher
        .send_raw(&publish_frames(1, &queue, b"during-alarm"))
        .await;
    match next_non_heartbeat(&mut publisher).await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(b)))) => {
            assert_eq!(b.reason.as_str(), "low on disk")
        }
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    publisher
        .send_raw(&publish_frames(1, &queue, b"while-blocked"))
        .await;

    let observer = connect(&broker).await;
    let ch = within(observer.create_channel()).await.expect("channel");
    assert_eq!(
        message_count(&ch, &queue).await,
        0,
        "blocked publishes were taken in"
    );
    // The client sends no heartbeats; a blocked client is not read, so its
    // silence past two intervals (2 s) must not count.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(message_count(&ch, &queue).await, 0);

    clear_disk_alarm(hare).await;
    match next_non_heartbeat(&mut publisher).await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)))) => {
        }
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    wait_message_count(&ch, &queue, 2).await;
    assert_eq!(drain(&ch, &queue).await, ["during-alarm", "while-blocked"]);
    publisher.close().await;
}

#[tokio::test]
async fn a_client_without_the_capability_is_held_silently() {
    let broker = TestBroker::start_with(fast_monitor);
    let Some(hare) = broker.hare() else {
        return; // changes the alarm threshold at run time: Hare only
    };
    let mut publisher = Raw::open(broker.addr()).await;
    publisher.open_channel(1).await;
    let queue = unique("pressure.silent");
    publisher.declare(1, &queue, false).await;

    raise_memory_alarm(hare).await;
    publisher
        .send_raw(&publish_frames(1, &queue, b"held"))
        .await;
    publisher
        .expect_silence("no connection.blocked without the capability")
        .await;
    let observer = connect(&broker).await;
    let ch = within(observer.create_channel()).await.expect("channel");
    assert_eq!(message_count(&ch, &queue).await, 0);

    clear_memory_alarm(hare).await;
    wait_message_count(&ch, &queue, 1).await;
    // Reading resumed: the connection answers again, with no unblocked frame first.
    assert_eq!(publisher.declare(1, &queue, true).await, 1);
    publisher.close().await;
}

#[tokio::test]
async fn publishing_before_an_alarm_and_consuming_during_one_go_on() {
    let broker = TestBroker::start_with(fast_monitor);
    let Some(hare) = broker.hare() else {
        return; // changes the alarm threshold at run time: Hare only
    };
    let ctx_conn = connect(&broker).await;
    let ch = within(ctx_conn.create_channel()).await.expect("channel");
    let queue = declare_queue(&ch, "pressure.consume").await;
    send(&ch, &queue, b"queued").await;
    // Taken in before the alarm: content arriving during it would block us.
    wait_message_count(&ch, &queue, 1).await;
    raise_disk_alarm(hare).await;
    // Methods other than publishes are still served, and deliveries flow.
    let mut consumer = consume(&ch, &queue, false).await;
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.data, b"queued");
    within(delivery.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    sync_probe(&ch).await.expect("channel still works");
    assert_eq!(message_count(&ch, &queue).await, 0);
    clear_disk_alarm(hare).await;
}

const TIMED_OUT: &str = "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. \
Timeout value used: 500 ms. This timeout value can be configured, see consumers doc guide to learn more";

/// Declares a queue with `x-consumer-timeout` = `ms` (as a long, the way
/// RabbitMQ documents it).
async fn declare_with_timeout(ch: &lapin::Channel, prefix: &str, ms: i64) -> String {
    let name = unique(prefix);
    let mut args = FieldTable::default();
    args.insert("x-consumer-timeout".into(), LapinValue::LongLongInt(ms));
    within(ch.queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args))
        .await
        .expect("declare queue");
    name
}

#[tokio::test]
async fn an_unacked_delivery_past_x_consumer_timeout_closes_the_channel() {
    let broker = TestBroker::start();
    if !broker.is_hare() {
        return; // RabbitMQ 3.10 ignores x-consumer-timeout (it came in 3.12)
    }
    let conn = connect(&broker).await;
    let mut errors = ErrorWatch::new(&conn);
    let ch = within(conn.create_channel()).await.expect("channel");
    let queue = declare_with_timeout(&ch, "pressure.timeout", 500).await;
    send(&ch, &queue, b"slow").await;
    let mut consumer = consume(&ch, &queue, false).await;
    let first = next_delivery(&mut consumer).await;
    assert!(!first.redelivered);

    let closed_at = std::time::Instant::now();
    let text = expect_channel_error::<()>(Err(errors.next().await), 406);
    assert_eq!(text, TIMED_OUT);
    assert!(closed_at.elapsed() < Duration::from_secs(2));

    let other = connect(&broker).await;
    let other_ch = within(other.create_channel()).await.expect("channel");
    let mut second = consume(&other_ch, &queue, false).await;
    let again = next_delivery(&mut second).await;
    assert_eq!(again.data, b"slow");
    assert!(
        again.redelivered,
        "a timed-out delivery comes back redelivered"
    );
    within(again.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
}

#[tokio::test]
async fn the_broker_wide_consumer_timeout_closes_the_channel_with_rabbitmqs_frame() {
    let broker = TestBroker::start_with(|c| c.consumer_timeout = Some(Duration::from_millis(500)));
    if !broker.is_hare() {
        return; // needs consumer_timeout set in the broker's configuration
    }
    let mut raw = Raw::open(broker.addr()).await;
    raw.open_channel(1).await;
    let queue = unique("pressure.global-timeout");
    raw.declare(1, &queue, false).await;
    raw.send_raw(&publish_frames(1, &queue, b"slow")).await;
    raw.send(&raw::method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.as_str().into(),
            consumer_tag: "slowpoke".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: RawTable::default(),
        })),
    ))
    .await;
    let mut delivered = false;
    while !delivered {
        match raw.next().await {
            Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d)))) => {
                assert!(!d.redelivered);
                delivered = true;
            }
            Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)))) => {}
            other => panic!("expected consume-ok and a delivery, got {other:?}"),
        }
    }
    assert!(matches!(raw.next().await, Some(AMQPFrame::Header(1, _))));
    assert!(matches!(raw.next().await, Some(AMQPFrame::Body(1, _))));
    raw.expect_channel_close(1, 406, TIMED_OUT, 0, 0).await;

    let other = connect(&broker).await;
    let ch = within(other.create_channel()).await.expect("channel");
    let got = within(ch.basic_get(
        queue.as_str().into(),
        lapin::options::BasicGetOptions { no_ack: true },
    ))
    .await
    .expect("basic.get")
    .expect("the message went back to the queue");
    assert!(got.delivery.redelivered);
    // The connection itself is fine.
    raw.assert_healthy(2).await;
    raw.close().await;
}

#[tokio::test]
async fn a_consumer_that_acks_in_time_is_not_affected() {
    let broker = TestBroker::start();
    if !broker.is_hare() {
        return; // RabbitMQ 3.10 ignores x-consumer-timeout (it came in 3.12)
    }
    let conn = connect(&broker).await;
    let mut errors = ErrorWatch::new(&conn);
    let ch = within(conn.create_channel()).await.expect("channel");
    let queue = declare_with_timeout(&ch, "pressure.in-time", 400).await;
    let mut consumer = within(ch.basic_consume(
        queue.as_str().into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    // Over three timeouts' worth of time, each delivery is acked well within one.
    for i in 0..6 {
        send(&ch, &queue, format!("m{i}").as_bytes()).await;
        let d = next_delivery(&mut consumer).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        within(d.acker.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    sync_probe(&ch).await.expect("channel still open");
    if let Ok(error) = tokio::time::timeout(QUIET, errors.next()).await {
        panic!("unexpected error: {error}");
    }
}
