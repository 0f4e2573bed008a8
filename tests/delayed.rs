//! Delayed messages: the `x-delayed-message` exchange type of RabbitMQ's
//! rabbitmq-delayed-message-exchange plugin.
//!
//! An exchange of that type routes by the rules of its `x-delayed-type`
//! argument; a message published to it with a positive `x-delay` header
//! (milliseconds) is held and routed only once the delay has passed.
//! Persistent messages held by a durable delayed exchange survive a restart.
//!
//! The RabbitMQ these tests are checked against runs without the plugin, so
//! every test here is Hare-only: each returns early when `HARE_TEST_URL`
//! points at another broker.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::args::{table, text};
use common::process::{open, start_process};
use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};

const DELAYED: &str = "x-delayed-message";
const INVALID_TYPE: &str = "Invalid argument, 'x-delayed-type' must be an existing exchange type";

/// Properties carrying `x-delay` (any AMQP integer width) and nothing else.
fn delay(value: AMQPValue) -> BasicProperties {
    BasicProperties::default().with_headers(table(&[("x-delay", value)]))
}

fn delay_ms(ms: i32) -> BasicProperties {
    delay(AMQPValue::LongInt(ms))
}

async fn declare_delayed(
    ch: &Channel,
    name: &str,
    delayed_type: Option<&str>,
    durable: bool,
) -> lapin::Result<()> {
    let args = match delayed_type {
        Some(t) => table(&[("x-delayed-type", text(t))]),
        None => FieldTable::default(),
    };
    within(ch.exchange_declare(
        name.into(),
        ExchangeKind::Custom(DELAYED.into()),
        ExchangeDeclareOptions {
            durable,
            ..Default::default()
        },
        args,
    ))
    .await
}

/// A non-durable delayed exchange routing by `delayed_type`, with a unique name.
async fn delayed_exchange(ch: &Channel, delayed_type: &str) -> String {
    let name = unique("delayed");
    declare_delayed(ch, &name, Some(delayed_type), false)
        .await
        .unwrap_or_else(|e| panic!("declare {name}: {e}"));
    name
}

/// A queue bound to `exchange` with `key` and `args`.
async fn bound_queue(ch: &Channel, exchange: &str, key: &str, args: FieldTable) -> String {
    let q = declare_queue(ch, "delayed-q").await;
    bind(ch, &q, exchange, key, args).await;
    q
}

/// The next body from `consumer` and how long after `since` it arrived.
async fn next_body(consumer: &mut lapin::Consumer, since: Instant) -> (String, Duration) {
    let d = next_delivery(consumer).await;
    (
        String::from_utf8_lossy(&d.data).into_owned(),
        since.elapsed(),
    )
}

/// Whether `queue` holds a message right now (taken, if so).
async fn take(ch: &Channel, queue: &str) -> Option<String> {
    within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
        .map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned())
}

#[tokio::test]
async fn delays_delivery_until_x_delay_has_passed() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "direct").await;
    let q = bound_queue(&ctx.ch, &x, "k", FieldTable::default()).await;
    let mut consumer = consume(&ctx.ch, &q, true).await;
    let start = Instant::now();
    publish_with(&ctx.ch, &x, "k", b"later", delay_ms(500)).await;
    let (body, waited) = next_body(&mut consumer, start).await;
    assert_eq!(body, "later");
    assert!(
        waited >= Duration::from_millis(500),
        "delivered after {waited:?}, before its 500 ms delay"
    );
}

#[tokio::test]
async fn delivers_in_due_order_not_publish_order() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "direct").await;
    let q = bound_queue(&ctx.ch, &x, "k", FieldTable::default()).await;
    let mut consumer = consume(&ctx.ch, &q, true).await;
    let start = Instant::now();
    for ms in [900, 300, 600] {
        publish_with(&ctx.ch, &x, "k", ms.to_string().as_bytes(), delay_ms(ms)).await;
    }
    for ms in [300u64, 600, 900] {
        let (body, waited) = next_body(&mut consumer, start).await;
        assert_eq!(body, ms.to_string());
        assert!(
            waited >= Duration::from_millis(ms),
            "{ms} ms came after {waited:?}"
        );
    }
}

#[tokio::test]
async fn routes_at_once_without_a_positive_delay() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "direct").await;
    let q = bound_queue(&ctx.ch, &x, "k", FieldTable::default()).await;
    let mut consumer = consume(&ctx.ch, &q, true).await;
    // Published first but held: the others must overtake it.
    publish_with(&ctx.ch, &x, "k", b"held", delay_ms(1500)).await;
    publish_with(&ctx.ch, &x, "k", b"none", BasicProperties::default()).await;
    publish_with(&ctx.ch, &x, "k", b"zero", delay_ms(0)).await;
    publish_with(&ctx.ch, &x, "k", b"negative", delay_ms(-250)).await;
    let other_headers = table(&[("other", text("x"))]);
    let props = BasicProperties::default().with_headers(other_headers);
    publish_with(&ctx.ch, &x, "k", b"other-header", props).await;
    let got = collect_bodies(&mut consumer, 4).await;
    assert_eq!(got, ["none", "zero", "negative", "other-header"]);
    within(
        ctx.ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()),
    )
    .await
    .expect("exchange.delete");
}

#[tokio::test]
async fn direct_delayed_type_routes_by_key() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "direct").await;
    let hit = bound_queue(&ctx.ch, &x, "a.b", FieldTable::default()).await;
    let miss = bound_queue(&ctx.ch, &x, "a.c", FieldTable::default()).await;
    let mut consumer = consume(&ctx.ch, &hit, true).await;
    let start = Instant::now();
    publish_with(
        &ctx.ch,
        &x,
        "a.b",
        b"m",
        delay(AMQPValue::ShortShortInt(100)),
    )
    .await;
    let (body, waited) = next_body(&mut consumer, start).await;
    assert_eq!(body, "m");
    assert!(waited >= Duration::from_millis(100), "after {waited:?}");
    assert_eq!(take(&ctx.ch, &miss).await, None);
}

#[tokio::test]
async fn topic_delayed_type_routes_by_pattern() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "topic").await;
    let hit = bound_queue(&ctx.ch, &x, "orders.*.eu", FieldTable::default()).await;
    let hash = bound_queue(&ctx.ch, &x, "orders.#", FieldTable::default()).await;
    let miss = bound_queue(&ctx.ch, &x, "orders.*.us", FieldTable::default()).await;
    let mut consumer = consume(&ctx.ch, &hit, true).await;
    let start = Instant::now();
    let props = delay(AMQPValue::ShortUInt(150));
    publish_with(&ctx.ch, &x, "orders.new.eu", b"m", props).await;
    let (body, waited) = next_body(&mut consumer, start).await;
    assert_eq!(body, "m");
    assert!(waited >= Duration::from_millis(150), "after {waited:?}");
    // Each queue is filled in turn: the consumer's copy can arrive first.
    wait_message_count(&ctx.ch, &hash, 1).await;
    assert_eq!(take(&ctx.ch, &hash).await.as_deref(), Some("m"));
    assert_eq!(take(&ctx.ch, &miss).await, None);
}

#[tokio::test]
async fn fanout_delayed_type_routes_to_every_queue() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "fanout").await;
    let first = bound_queue(&ctx.ch, &x, "", FieldTable::default()).await;
    let second = bound_queue(&ctx.ch, &x, "whatever", FieldTable::default()).await;
    let mut consumer = consume(&ctx.ch, &first, true).await;
    let start = Instant::now();
    let props = delay(AMQPValue::LongLongInt(120));
    publish_with(&ctx.ch, &x, "any-key", b"m", props).await;
    let (body, waited) = next_body(&mut consumer, start).await;
    assert_eq!(body, "m");
    assert!(waited >= Duration::from_millis(120), "after {waited:?}");
    // Each queue is filled in turn: the consumer's copy can arrive first.
    wait_message_count(&ctx.ch, &second, 1).await;
    assert_eq!(take(&ctx.ch, &second).await.as_deref(), Some("m"));
}

#[tokio::test]
async fn headers_delayed_type_routes_by_match() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "headers").await;
    let all = table(&[("x-match", text("all")), ("kind", text("order"))]);
    let other = table(&[("x-match", text("all")), ("kind", text("invoice"))]);
    let hit = bound_queue(&ctx.ch, &x, "", all).await;
    let miss = bound_queue(&ctx.ch, &x, "", other).await;
    let mut consumer = consume(&ctx.ch, &hit, true).await;
    let start = Instant::now();
    let headers = table(&[
        ("kind", text("order")),
        ("x-delay", AMQPValue::LongUInt(100)),
    ]);
    let props = BasicProperties::default().with_headers(headers);
    publish_with(&ctx.ch, &x, "ignored", b"m", props).await;
    let delivery = next_delivery(&mut consumer).await;
    let waited = start.elapsed();
    assert_eq!(delivery.data, b"m");
    assert!(waited >= Duration::from_millis(100), "after {waited:?}");
    // The x-delay header travels with the message.
    let headers = delivery.properties.headers().clone().expect("headers kept");
    assert!(headers.inner().contains_key("x-delay"), "{headers:?}");
    assert_eq!(take(&ctx.ch, &miss).await, None);
}

#[tokio::test]
async fn missing_or_bogus_delayed_type_is_precondition_failed() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    for delayed_type in [None, Some("bogus")] {
        let ch = ctx.channel().await;
        let name = unique("delayed-bad");
        let res = declare_delayed(&ch, &name, delayed_type, false).await;
        let text = expect_channel_error(res, 406);
        assert!(text.contains(INVALID_TYPE), "{delayed_type:?}: {text}");
    }
    // Nor can it delay by its own type.
    let ch = ctx.channel().await;
    let res = declare_delayed(&ch, &unique("delayed-bad"), Some(DELAYED), false).await;
    expect_channel_error(res, 406);
}

#[tokio::test]
async fn redeclare_with_another_delayed_type_is_inequivalent() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "direct").await;
    declare_delayed(&ctx.ch, &x, Some("direct"), false)
        .await
        .expect("an identical redeclare is fine");
    let res = declare_delayed(&ctx.ch, &x, Some("topic"), false).await;
    let text = expect_channel_error(res, 406);
    assert!(
        text.contains("inequivalent arg 'x-delayed-type'")
            && text.contains("received 'topic' but current is 'direct'"),
        "{text}"
    );
    let ch = ctx.channel().await;
    let res = within(ch.exchange_declare(
        x.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_channel_error(res, 406);
    assert!(
        text.contains("inequivalent arg 'type'")
            && text.contains("received 'direct' but current is 'x-delayed-message'"),
        "{text}"
    );
}

#[tokio::test]
async fn held_message_counts_as_routed_for_mandatory() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "direct").await;
    within(ctx.ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let confirm = within(ctx.ch.basic_publish(
        x.as_str().into(),
        "nowhere".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"m",
        delay_ms(100),
    ))
    .await
    .expect("basic.publish");
    let confirmation = within(confirm).await.expect("confirm");
    assert!(
        matches!(confirmation, Confirmation::Ack(None)),
        "a held message is neither returned nor nacked: {confirmation:?}"
    );
}

#[tokio::test]
async fn deleting_the_exchange_drops_pending_messages() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return; // RabbitMQ here runs without the delayed-message plugin.
    }
    let x = delayed_exchange(&ctx.ch, "direct").await;
    let q = bound_queue(&ctx.ch, &x, "k", FieldTable::default()).await;
    publish_with(&ctx.ch, &x, "k", b"dropped", delay_ms(200)).await;
    within(
        ctx.ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()),
    )
    .await
    .expect("exchange.delete");
    // A new exchange of the same name does not inherit the old one's messages.
    declare_delayed(&ctx.ch, &x, Some("direct"), false)
        .await
        .expect("redeclare");
    bind(&ctx.ch, &q, &x, "k", FieldTable::default()).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(take(&ctx.ch, &q).await, None);
}

// ---------------------------------------------------------------------------
// Restarts: `hare` as a separate process on a data dir of its own.
// ---------------------------------------------------------------------------

/// A data dir for one test, removed when the test passes.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        Scratch(hare_suite::temp_data_dir(&format!("delayed-{test}")))
    }

    fn data(&self) -> PathBuf {
        self.0.join("data")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; keeping {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A durable delayed exchange (direct) and a durable queue bound to it with `k`.
async fn durable_setup(ch: &Channel) -> (String, String) {
    let x = unique("delayed-durable");
    declare_delayed(ch, &x, Some("direct"), true)
        .await
        .expect("declare durable delayed exchange");
    let q = unique("delayed-durable-q");
    within(ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("declare durable queue");
    bind(ch, &q, &x, "k", FieldTable::default()).await;
    (x, q)
}

async fn publish_confirmed(ch: &Channel, x: &str, body: &[u8], props: BasicProperties) {
    let confirm = within(ch.basic_publish(
        x.into(),
        "k".into(),
        BasicPublishOptions::default(),
        body,
        props,
    ))
    .await
    .expect("basic.publish");
    let confirmation = within(confirm).await.expect("confirm");
    assert!(
        matches!(confirmation, Confirmation::Ack(_)),
        "{confirmation:?}"
    );
}

fn persistent(props: BasicProperties) -> BasicProperties {
    props.with_delivery_mode(2)
}

#[tokio::test]
async fn confirmed_persistent_delayed_message_survives_kill9() {
    let scratch = Scratch::new("kill9");
    let broker = start_process(&scratch.data()).await;
    let (conn, ch) = open(&broker.url()).await;
    let (x, q) = durable_setup(&ch).await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let published = Instant::now();
    publish_confirmed(&ch, &x, b"late", persistent(delay_ms(1500))).await;
    publish_confirmed(&ch, &x, b"soon", persistent(delay_ms(100))).await;
    drop(conn);
    let job = tokio::task::spawn_blocking(move || broker.kill9());
    within(job).await.expect("kill -9");

    let broker = start_process(&scratch.data()).await;
    let (_conn, ch) = open(&broker.url()).await;
    // The exchange comes back as a delayed one with its arguments.
    declare_delayed(&ch, &x, Some("direct"), true)
        .await
        .expect("equivalent redeclare after restart");
    let mut consumer = consume(&ch, &q, true).await;
    let restarted = Instant::now();
    let (body, _) = next_body(&mut consumer, restarted).await;
    assert_eq!(body, "soon", "the message already due comes first");
    let (body, _) = next_body(&mut consumer, restarted).await;
    let waited = published.elapsed();
    assert_eq!(body, "late");
    assert!(
        waited >= Duration::from_millis(1500),
        "due time not honored across the restart: delivered after {waited:?}"
    );
    assert_no_delivery(&mut consumer).await;
}

#[tokio::test]
async fn transient_delayed_message_does_not_survive_restart() {
    let scratch = Scratch::new("transient");
    let broker = start_process(&scratch.data()).await;
    let (conn, ch) = open(&broker.url()).await;
    let (x, q) = durable_setup(&ch).await;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    publish_confirmed(&ch, &x, b"transient", delay_ms(200)).await;
    publish_confirmed(&ch, &x, b"persistent", persistent(delay_ms(200))).await;
    drop(conn);
    let job = tokio::task::spawn_blocking(move || broker.kill9());
    within(job).await.expect("kill -9");

    let broker = start_process(&scratch.data()).await;
    let (_conn, ch) = open(&broker.url()).await;
    let mut consumer = consume(&ch, &q, true).await;
    let got = next_delivery(&mut consumer).await;
    assert_eq!(got.data, b"persistent");
    assert_no_delivery(&mut consumer).await;
}
