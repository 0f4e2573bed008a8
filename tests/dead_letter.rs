//! Dead-lettering as RabbitMQ 3.10 does it: which events dead-letter a
//! message (reject / nack without requeue, TTL expiry, `x-max-length` with
//! drop-head or `reject-publish-dlx`), where the dead letter goes (the
//! queue's `x-dead-letter-exchange` of any kind, with its own or the original
//! routing key) and exactly what it carries: the `x-death` history with
//! RabbitMQ's field names and AMQP types, the `x-first-death-*` headers, the
//! `expiration` property removed. Worker frameworks read these headers for
//! their retry counters, so the types matter as much as the values.
//!
//! RabbitMQ's cycle rule is pinned too: a dead letter that would return to a
//! queue it already died in is dropped, unless a client rejected it somewhere
//! on the way (then the loop can end, and it keeps cycling).
//!
//! The restart test at the end runs `hare` as a process and is Hare-only.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::args::{table, text as ls};
use common::process::{open, restart_process, start_process};
use common::*;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// Queue arguments naming a dead-letter exchange, plus `extra`.
fn dlx_args(dlx: &str, extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = table(extra);
    t.insert("x-dead-letter-exchange".into(), ls(dlx));
    t
}

/// Declares queue `name` with `args`. Exclusive, so the shared RabbitMQ is
/// cleaned up when the test's connection closes; nothing here depends on it.
async fn declare(ch: &Channel, name: &str, args: FieldTable) {
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        args,
    ))
    .await
    .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
}

/// Declares a uniquely named auto-delete exchange of `kind` with `args`.
async fn exchange(ch: &Channel, prefix: &str, kind: ExchangeKind, args: FieldTable) -> String {
    let name = unique(prefix);
    within(ch.exchange_declare(
        name.as_str().into(),
        kind,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        args,
    ))
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
    name
}

/// basic.get with acks (the message stays unacked until settled).
async fn get(ch: &Channel, queue: &str) -> Option<BasicGetMessage> {
    within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
}

/// basic.get that must find a message (polling: dead letters arrive
/// asynchronously); acknowledged on the way out.
async fn get_one(ch: &Channel, queue: &str) -> BasicGetMessage {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let msg = within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
            .await
            .expect("basic.get");
        if let Some(m) = msg {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing arrived in {queue}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn reject(ch: &Channel, tag: u64) {
    within(ch.basic_reject(tag, BasicRejectOptions { requeue: false }))
        .await
        .expect("basic.reject");
}

async fn nack(ch: &Channel, tag: u64, multiple: bool) {
    within(ch.basic_nack(
        tag,
        BasicNackOptions {
            multiple,
            requeue: false,
        },
    ))
    .await
    .expect("basic.nack");
}

/// Gets the single message in `queue` and rejects it without requeue.
async fn get_and_reject(ch: &Channel, queue: &str) {
    let msg = get(ch, queue).await.expect("a message to reject");
    reject(ch, msg.delivery.delivery_tag).await;
}

fn body(msg: &BasicGetMessage) -> String {
    String::from_utf8_lossy(&msg.delivery.data).into_owned()
}

fn headers(msg: &BasicGetMessage) -> BTreeMap<ShortString, AMQPValue> {
    msg.delivery
        .properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default()
}

fn header_keys(msg: &BasicGetMessage) -> Vec<String> {
    headers(msg).keys().map(|k| k.to_string()).collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// One `x-death` entry as RabbitMQ 3.10 writes it, minus `time` (checked
/// separately): every field with its exact AMQP type.
fn death(
    count: i64,
    reason: &str,
    queue: &str,
    exchange: &str,
    routing_keys: &[&str],
    original_expiration: Option<&str>,
) -> BTreeMap<ShortString, AMQPValue> {
    let mut t = BTreeMap::new();
    t.insert("count".into(), AMQPValue::LongLongInt(count));
    t.insert("reason".into(), ls(reason));
    t.insert("queue".into(), ls(queue));
    t.insert("exchange".into(), ls(exchange));
    let keys: Vec<AMQPValue> = routing_keys.iter().map(|k| ls(k)).collect();
    t.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(keys)),
    );
    if let Some(e) = original_expiration {
        t.insert("original-expiration".into(), ls(e));
    }
    t
}

/// The `x-death` entries of `msg`, in order, each with its `time` checked
/// (a timestamp in whole seconds, not before `since`) and removed.
#[track_caller]
fn deaths(msg: &BasicGetMessage, since: u64) -> Vec<BTreeMap<ShortString, AMQPValue>> {
    let h = headers(msg);
    let Some(AMQPValue::FieldArray(entries)) = h.get("x-death") else {
        panic!("no x-death array in {h:?}");
    };
    entries
        .as_slice()
        .iter()
        .map(|e| {
            let AMQPValue::FieldTable(t) = e else {
                panic!("x-death entry is not a table: {e:?}");
            };
            let mut t = t.inner().clone();
            match t.remove("time") {
                Some(AMQPValue::Timestamp(secs)) => assert!(
                    secs >= since && secs <= now_secs() + 1,
                    "x-death time {secs} not between {since} and now"
                ),
                other => panic!("x-death time is not a timestamp: {other:?}"),
            }
            t
        })
        .collect()
}

/// The three `x-first-death-*` headers, as long strings.
#[track_caller]
fn assert_first_death(msg: &BasicGetMessage, reason: &str, queue: &str, exchange: &str) {
    let h = headers(msg);
    assert_eq!(h.get("x-first-death-reason"), Some(&ls(reason)));
    assert_eq!(h.get("x-first-death-queue"), Some(&ls(queue)));
    assert_eq!(h.get("x-first-death-exchange"), Some(&ls(exchange)));
}

// ---------------------------------------------------------------------------
// Rejections.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn reject_dead_letters_with_x_death_and_original_routing_key() {
    let ctx = setup().await;
    let since = now_secs();
    let source_x = exchange(
        &ctx.ch,
        "src-x",
        ExchangeKind::Direct,
        FieldTable::default(),
    )
    .await;
    let dlx = exchange(&ctx.ch, "dlx", ExchangeKind::Direct, FieldTable::default()).await;
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(&ctx.ch, &q, dlx_args(&dlx, &[])).await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    bind(&ctx.ch, &q, &source_x, "orders", FieldTable::default()).await;
    // No x-dead-letter-routing-key: the dead letter keeps "orders".
    bind(&ctx.ch, &dlq, &dlx, "orders", FieldTable::default()).await;

    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_message_id("m-1".into())
        .with_priority(3)
        .with_headers(table(&[
            ("app-header", ls("kept")),
            ("retries", AMQPValue::LongInt(7)),
        ]));
    publish_with(&ctx.ch, &source_x, "orders", b"payload", props).await;
    let msg = get(&ctx.ch, &q).await.expect("message in source queue");
    reject(&ctx.ch, msg.delivery.delivery_tag).await;

    let dead = get_one(&ctx.ch, &dlq).await;
    assert_eq!(body(&dead), "payload");
    assert_eq!(dead.delivery.exchange.as_str(), dlx);
    assert_eq!(dead.delivery.routing_key.as_str(), "orders");
    assert!(!dead.delivery.redelivered, "a dead letter is a new message");
    let p = &dead.delivery.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
    assert_eq!(*p.priority(), Some(3));
    assert_eq!(*p.expiration(), None);
    assert_eq!(
        header_keys(&dead),
        [
            "app-header",
            "retries",
            "x-death",
            "x-first-death-exchange",
            "x-first-death-queue",
            "x-first-death-reason"
        ]
    );
    let h = headers(&dead);
    assert_eq!(h.get("app-header"), Some(&ls("kept")));
    assert_eq!(h.get("retries"), Some(&AMQPValue::LongInt(7)));
    assert_first_death(&dead, "rejected", &q, &source_x);
    assert_eq!(
        deaths(&dead, since),
        [death(1, "rejected", &q, &source_x, &["orders"], None)]
    );
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
}

#[tokio::test]
async fn nack_dead_letters_with_the_dead_letter_routing_key() {
    let ctx = setup().await;
    let since = now_secs();
    let dlx = exchange(&ctx.ch, "dlx", ExchangeKind::Direct, FieldTable::default()).await;
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(
        &ctx.ch,
        &q,
        dlx_args(&dlx, &[("x-dead-letter-routing-key", ls("dead"))]),
    )
    .await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    bind(&ctx.ch, &dlq, &dlx, "dead", FieldTable::default()).await;

    send(&ctx.ch, &q, b"one").await;
    let msg = get(&ctx.ch, &q).await.expect("message");
    nack(&ctx.ch, msg.delivery.delivery_tag, false).await;

    let dead = get_one(&ctx.ch, &dlq).await;
    assert_eq!(body(&dead), "one");
    assert_eq!(dead.delivery.exchange.as_str(), dlx);
    assert_eq!(dead.delivery.routing_key.as_str(), "dead");
    // The entry keeps the key the message was published with.
    assert_eq!(
        deaths(&dead, since),
        [death(1, "rejected", &q, "", &[&q], None)]
    );
    assert_first_death(&dead, "rejected", &q, "");
}

#[tokio::test]
async fn nack_multiple_dead_letters_every_message_in_order() {
    let ctx = setup().await;
    let since = now_secs();
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(
        &ctx.ch,
        &q,
        dlx_args("", &[("x-dead-letter-routing-key", ls(&dlq))]),
    )
    .await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    for b in ["m1", "m2", "m3"] {
        send(&ctx.ch, &q, b.as_bytes()).await;
    }
    let mut consumer = consume(&ctx.ch, &q, false).await;
    let mut last = 0;
    for _ in 0..3 {
        last = next_delivery(&mut consumer).await.delivery_tag;
    }
    nack(&ctx.ch, last, true).await;

    wait_message_count(&ctx.ch, &dlq, 3).await;
    for expected in ["m1", "m2", "m3"] {
        let dead = get_one(&ctx.ch, &dlq).await;
        assert_eq!(body(&dead), expected);
        assert_eq!(dead.delivery.exchange.as_str(), "");
        assert_eq!(dead.delivery.routing_key.as_str(), dlq);
        assert_eq!(
            deaths(&dead, since),
            [death(1, "rejected", &q, "", &[&q], None)]
        );
    }
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    assert_no_delivery(&mut consumer).await;
}

#[tokio::test]
async fn requeue_does_not_dead_letter() {
    let ctx = setup().await;
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(
        &ctx.ch,
        &q,
        dlx_args("", &[("x-dead-letter-routing-key", ls(&dlq))]),
    )
    .await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    send(&ctx.ch, &q, b"again").await;

    let msg = get(&ctx.ch, &q).await.expect("message");
    within(ctx.ch.basic_reject(
        msg.delivery.delivery_tag,
        BasicRejectOptions { requeue: true },
    ))
    .await
    .expect("basic.reject");
    let msg = get(&ctx.ch, &q).await.expect("requeued message");
    within(ctx.ch.basic_nack(
        msg.delivery.delivery_tag,
        BasicNackOptions {
            multiple: false,
            requeue: true,
        },
    ))
    .await
    .expect("basic.nack");

    let back = get_one(&ctx.ch, &q).await;
    assert_eq!(body(&back), "again");
    assert!(back.delivery.redelivered);
    assert!(back.delivery.properties.headers().is_none(), "no x-death");
    assert_eq!(message_count(&ctx.ch, &dlq).await, 0);
}

// ---------------------------------------------------------------------------
// Where dead letters go.
// ---------------------------------------------------------------------------

/// Rejects one message published to a fresh queue dead-lettering to `dlx`
/// (with `dlrk` when given) and returns what arrives in `dlq`.
async fn dead_letter_through(
    ctx: &Ctx,
    dlx: &str,
    dlrk: Option<&str>,
    dlq: &str,
    props: BasicProperties,
) -> (String, BasicGetMessage) {
    let q = unique("q");
    let extra: Vec<(&str, AMQPValue)> = dlrk
        .map(|k| ("x-dead-letter-routing-key", ls(k)))
        .into_iter()
        .collect();
    declare(&ctx.ch, &q, dlx_args(dlx, &extra)).await;
    publish_with(&ctx.ch, "", &q, b"dl", props).await;
    get_and_reject(&ctx.ch, &q).await;
    (q, get_one(&ctx.ch, dlq).await)
}

#[tokio::test]
async fn fanout_dlx() {
    let ctx = setup().await;
    let dlx = exchange(&ctx.ch, "dlx", ExchangeKind::Fanout, FieldTable::default()).await;
    let dlq = unique("dlq");
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    bind(&ctx.ch, &dlq, &dlx, "ignored", FieldTable::default()).await;
    let (q, dead) = dead_letter_through(&ctx, &dlx, None, &dlq, Default::default()).await;
    assert_eq!(dead.delivery.exchange.as_str(), dlx);
    assert_eq!(dead.delivery.routing_key.as_str(), q);
}

#[tokio::test]
async fn topic_dlx_with_dead_letter_routing_key() {
    let ctx = setup().await;
    let dlx = exchange(&ctx.ch, "dlx", ExchangeKind::Topic, FieldTable::default()).await;
    let dlq = unique("dlq");
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    bind(&ctx.ch, &dlq, &dlx, "dead.#", FieldTable::default()).await;
    let (_, dead) =
        dead_letter_through(&ctx, &dlx, Some("dead.orders.eu"), &dlq, Default::default()).await;
    assert_eq!(dead.delivery.exchange.as_str(), dlx);
    assert_eq!(dead.delivery.routing_key.as_str(), "dead.orders.eu");
}

#[tokio::test]
async fn headers_dlx_matches_on_the_publishers_headers() {
    let ctx = setup().await;
    let dlx = exchange(&ctx.ch, "dlx", ExchangeKind::Headers, FieldTable::default()).await;
    let (dlq, other) = (unique("dlq"), unique("other"));
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    declare(&ctx.ch, &other, FieldTable::default()).await;
    let matching = table(&[("x-match", ls("all")), ("kind", ls("invoice"))]);
    bind(&ctx.ch, &dlq, &dlx, "", matching).await;
    let not_matching = table(&[("x-match", ls("all")), ("kind", ls("receipt"))]);
    bind(&ctx.ch, &other, &dlx, "", not_matching).await;
    let props = BasicProperties::default().with_headers(table(&[("kind", ls("invoice"))]));
    let (q, dead) = dead_letter_through(&ctx, &dlx, None, &dlq, props).await;
    assert_eq!(dead.delivery.exchange.as_str(), dlx);
    assert_eq!(dead.delivery.routing_key.as_str(), q);
    assert_eq!(headers(&dead).get("kind"), Some(&ls("invoice")));
    assert_eq!(message_count(&ctx.ch, &other).await, 0);
}

#[tokio::test]
async fn default_exchange_dlx_routes_by_queue_name() {
    let ctx = setup().await;
    let dlq = unique("dlq");
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    let (_, dead) = dead_letter_through(&ctx, "", Some(&dlq), &dlq, Default::default()).await;
    assert_eq!(dead.delivery.exchange.as_str(), "");
    assert_eq!(dead.delivery.routing_key.as_str(), dlq);
}

#[tokio::test]
async fn dlx_alternate_exchange_takes_unroutable_dead_letters() {
    let ctx = setup().await;
    let ae = exchange(&ctx.ch, "ae", ExchangeKind::Fanout, FieldTable::default()).await;
    let dlx = exchange(
        &ctx.ch,
        "dlx",
        ExchangeKind::Direct,
        table(&[("alternate-exchange", ls(&ae))]),
    )
    .await;
    let dlq = unique("dlq");
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    bind(&ctx.ch, &dlq, &ae, "", FieldTable::default()).await;
    let (q, dead) = dead_letter_through(&ctx, &dlx, None, &dlq, Default::default()).await;
    // Still the dead-letter exchange, not the alternate one.
    assert_eq!(dead.delivery.exchange.as_str(), dlx);
    assert_eq!(dead.delivery.routing_key.as_str(), q);
}

#[tokio::test]
async fn missing_dlx_or_no_binding_drops_the_message() {
    let ctx = setup().await;
    let q = unique("q");
    declare(&ctx.ch, &q, dlx_args(&unique("no-such-x"), &[])).await;
    send(&ctx.ch, &q, b"gone").await;
    get_and_reject(&ctx.ch, &q).await;

    let dlx = exchange(&ctx.ch, "dlx", ExchangeKind::Direct, FieldTable::default()).await;
    let unbound = unique("q");
    declare(&ctx.ch, &unbound, dlx_args(&dlx, &[])).await;
    send(&ctx.ch, &unbound, b"gone too").await;
    get_and_reject(&ctx.ch, &unbound).await;

    sync_probe(&ctx.ch).await.expect("channel still open");
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    assert_eq!(message_count(&ctx.ch, &unbound).await, 0);
}

// ---------------------------------------------------------------------------
// x-death history.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn dying_again_in_the_same_queue_counts_up_and_moves_first() {
    let ctx = setup().await;
    let since = now_secs();
    // Two queues that dead-letter into each other through the default exchange.
    let (a, b) = (unique("a"), unique("b"));
    declare(
        &ctx.ch,
        &a,
        dlx_args("", &[("x-dead-letter-routing-key", ls(&b))]),
    )
    .await;
    declare(
        &ctx.ch,
        &b,
        dlx_args("", &[("x-dead-letter-routing-key", ls(&a))]),
    )
    .await;
    send(&ctx.ch, &a, b"ping-pong").await;

    get_and_reject(&ctx.ch, &a).await;
    wait_message_count(&ctx.ch, &b, 1).await;
    get_and_reject(&ctx.ch, &b).await;
    wait_message_count(&ctx.ch, &a, 1).await;
    get_and_reject(&ctx.ch, &a).await;

    let msg = get_one(&ctx.ch, &b).await;
    assert_eq!(body(&msg), "ping-pong");
    assert_eq!(msg.delivery.routing_key.as_str(), b);
    // Each entry records the key the message had when it died there: a's
    // from the publish, b's from a's x-dead-letter-routing-key.
    assert_eq!(
        deaths(&msg, since),
        [
            death(2, "rejected", &a, "", &[&a], None),
            death(1, "rejected", &b, "", &[&b], None),
        ]
    );
    assert_first_death(&msg, "rejected", &a, "");
}

#[tokio::test]
async fn a_different_reason_in_the_same_queue_adds_an_entry() {
    let ctx = setup().await;
    let since = now_secs();
    // q dead-letters to a fanout that leads back to q and to a witness queue.
    let dlx = exchange(&ctx.ch, "dlx", ExchangeKind::Fanout, FieldTable::default()).await;
    let (q, witness) = (unique("q"), unique("witness"));
    declare(
        &ctx.ch,
        &q,
        dlx_args(&dlx, &[("x-message-ttl", AMQPValue::LongInt(400))]),
    )
    .await;
    declare(&ctx.ch, &witness, FieldTable::default()).await;
    bind(&ctx.ch, &q, &dlx, "", FieldTable::default()).await;
    bind(&ctx.ch, &witness, &dlx, "", FieldTable::default()).await;
    send(&ctx.ch, &q, b"boomerang").await;

    // Rejected: one copy back in q (no cycle check for rejections), one in witness.
    get_and_reject(&ctx.ch, &q).await;
    let first = get_one(&ctx.ch, &witness).await;
    assert_eq!(
        deaths(&first, since),
        [death(1, "rejected", &q, "", &[&q], None)]
    );

    // The copy in q then expires: routing back to q is a cycle without a
    // rejection in it, so only the witness gets it.
    let second = get_one(&ctx.ch, &witness).await;
    assert_eq!(second.delivery.exchange.as_str(), dlx);
    assert_eq!(second.delivery.routing_key.as_str(), q);
    assert_eq!(
        deaths(&second, since),
        [
            death(1, "expired", &q, &dlx, &[&q], None),
            death(1, "rejected", &q, "", &[&q], None),
        ]
    );
    assert_first_death(&second, "rejected", &q, "");
    tokio::time::sleep(QUIET).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    assert_eq!(message_count(&ctx.ch, &witness).await, 0);
}

#[tokio::test]
async fn rejection_cycle_keeps_cycling_and_counting() {
    let ctx = setup().await;
    let since = now_secs();
    // DLX "" without a routing key: the dead letter goes back to q itself.
    let q = unique("q");
    declare(&ctx.ch, &q, dlx_args("", &[])).await;
    send(&ctx.ch, &q, b"loop").await;
    for round in 1..=3 {
        get_and_reject(&ctx.ch, &q).await;
        wait_message_count(&ctx.ch, &q, 1).await;
        let msg = get(&ctx.ch, &q).await.expect("back in q");
        assert!(!msg.delivery.redelivered);
        assert_eq!(
            deaths(&msg, since),
            [death(round, "rejected", &q, "", &[&q], None)]
        );
        within(ctx.ch.basic_reject(
            msg.delivery.delivery_tag,
            BasicRejectOptions { requeue: true },
        ))
        .await
        .expect("requeue");
    }
}

#[tokio::test]
async fn expiry_cycle_back_to_the_same_queue_drops_the_message() {
    let ctx = setup().await;
    let since = now_secs();
    // Through the default exchange: nothing else to route to.
    let q = unique("q");
    declare(
        &ctx.ch,
        &q,
        dlx_args("", &[("x-message-ttl", AMQPValue::LongInt(100))]),
    )
    .await;
    send(&ctx.ch, &q, b"expiring").await;

    // Through a fanout: the witness gets exactly one copy, q none.
    let dlx = exchange(&ctx.ch, "dlx", ExchangeKind::Fanout, FieldTable::default()).await;
    let (q2, witness) = (unique("q2"), unique("witness"));
    declare(
        &ctx.ch,
        &q2,
        dlx_args(&dlx, &[("x-message-ttl", AMQPValue::LongInt(100))]),
    )
    .await;
    declare(&ctx.ch, &witness, FieldTable::default()).await;
    bind(&ctx.ch, &q2, &dlx, "", FieldTable::default()).await;
    bind(&ctx.ch, &witness, &dlx, "", FieldTable::default()).await;
    send(&ctx.ch, &q2, b"expiring").await;

    wait_message_count(&ctx.ch, &witness, 1).await;
    wait_message_count(&ctx.ch, &q, 0).await;
    wait_message_count(&ctx.ch, &q2, 0).await;
    // And nothing comes round again.
    tokio::time::sleep(QUIET).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    assert_eq!(message_count(&ctx.ch, &q2).await, 0);
    assert_eq!(message_count(&ctx.ch, &witness).await, 1);
    let msg = get_one(&ctx.ch, &witness).await;
    assert_eq!(
        deaths(&msg, since),
        [death(1, "expired", &q2, "", &[&q2], None)]
    );
    assert_first_death(&msg, "expired", &q2, "");
}

// ---------------------------------------------------------------------------
// Expiry and length limits.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn expired_dead_letter_loses_expiration_and_records_it() {
    let ctx = setup().await;
    let since = now_secs();
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(
        &ctx.ch,
        &q,
        dlx_args("", &[("x-dead-letter-routing-key", ls(&dlq))]),
    )
    .await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    let props = BasicProperties::default()
        .with_expiration("100".into())
        .with_delivery_mode(2)
        .with_headers(table(&[("trace", ls("abc"))]));
    publish_with(&ctx.ch, "", &q, b"short-lived", props).await;

    let dead = get_one(&ctx.ch, &dlq).await;
    assert_eq!(body(&dead), "short-lived");
    assert_eq!(dead.delivery.exchange.as_str(), "");
    assert_eq!(dead.delivery.routing_key.as_str(), dlq);
    let p = &dead.delivery.properties;
    assert_eq!(*p.expiration(), None);
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(headers(&dead).get("trace"), Some(&ls("abc")));
    assert_eq!(
        deaths(&dead, since),
        [death(1, "expired", &q, "", &[&q], Some("100"))]
    );
    assert_first_death(&dead, "expired", &q, "");
}

#[tokio::test]
async fn queue_ttl_expiry_records_the_message_expiration_too() {
    let ctx = setup().await;
    let since = now_secs();
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(
        &ctx.ch,
        &q,
        dlx_args(
            "",
            &[
                ("x-dead-letter-routing-key", ls(&dlq)),
                ("x-message-ttl", AMQPValue::LongInt(100)),
            ],
        ),
    )
    .await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    // The queue's TTL is the lower one and expires it, but the message's own
    // expiration is still what x-death records.
    let props = BasicProperties::default().with_expiration("60000".into());
    publish_with(&ctx.ch, "", &q, b"x", props).await;
    send(&ctx.ch, &q, b"y").await;

    let x = get_one(&ctx.ch, &dlq).await;
    assert_eq!(
        deaths(&x, since),
        [death(1, "expired", &q, "", &[&q], Some("60000"))]
    );
    let y = get_one(&ctx.ch, &dlq).await;
    assert_eq!(body(&y), "y");
    assert_eq!(
        deaths(&y, since),
        [death(1, "expired", &q, "", &[&q], None)]
    );
}

#[tokio::test]
async fn ttl_zero_without_a_consumer_dead_letters_at_once() {
    let ctx = setup().await;
    let since = now_secs();
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(
        &ctx.ch,
        &q,
        dlx_args(
            "",
            &[
                ("x-dead-letter-routing-key", ls(&dlq)),
                ("x-message-ttl", AMQPValue::LongInt(0)),
            ],
        ),
    )
    .await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    send(&ctx.ch, &q, b"now or never").await;
    let dead = get_one(&ctx.ch, &dlq).await;
    assert_eq!(body(&dead), "now or never");
    assert_eq!(
        deaths(&dead, since),
        [death(1, "expired", &q, "", &[&q], None)]
    );
}

#[tokio::test]
async fn max_length_drop_head_dead_letters_the_oldest() {
    let ctx = setup().await;
    let since = now_secs();
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(
        &ctx.ch,
        &q,
        dlx_args(
            "",
            &[
                ("x-dead-letter-routing-key", ls(&dlq)),
                ("x-max-length", AMQPValue::LongInt(2)),
            ],
        ),
    )
    .await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    for b in ["m1", "m2", "m3", "m4"] {
        send(&ctx.ch, &q, b.as_bytes()).await;
    }
    wait_message_count(&ctx.ch, &dlq, 2).await;
    for expected in ["m1", "m2"] {
        let dead = get_one(&ctx.ch, &dlq).await;
        assert_eq!(body(&dead), expected);
        assert_eq!(
            deaths(&dead, since),
            [death(1, "maxlen", &q, "", &[&q], None)]
        );
        assert_first_death(&dead, "maxlen", &q, "");
    }
    assert_eq!(drain(&ctx.ch, &q).await, ["m3", "m4"]);
}

#[tokio::test]
async fn requeue_past_max_length_dead_letters_the_head() {
    let ctx = setup().await;
    let since = now_secs();
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(
        &ctx.ch,
        &q,
        dlx_args(
            "",
            &[
                ("x-dead-letter-routing-key", ls(&dlq)),
                ("x-max-length", AMQPValue::LongInt(1)),
            ],
        ),
    )
    .await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    send(&ctx.ch, &q, b"m1").await;
    let m1 = get(&ctx.ch, &q).await.expect("m1");
    send(&ctx.ch, &q, b"m2").await;
    // m1 goes back to the head of a full queue: drop-head takes it.
    within(ctx.ch.basic_reject(
        m1.delivery.delivery_tag,
        BasicRejectOptions { requeue: true },
    ))
    .await
    .expect("requeue");
    let dead = get_one(&ctx.ch, &dlq).await;
    assert_eq!(body(&dead), "m1");
    assert_eq!(
        deaths(&dead, since),
        [death(1, "maxlen", &q, "", &[&q], None)]
    );
    assert_eq!(drain(&ctx.ch, &q).await, ["m2"]);
}

#[tokio::test]
async fn reject_publish_dlx_dead_letters_the_refused_message() {
    let ctx = setup().await;
    let since = now_secs();
    let (q, dlq) = (unique("q"), unique("dlq"));
    declare(
        &ctx.ch,
        &q,
        dlx_args(
            "",
            &[
                ("x-dead-letter-routing-key", ls(&dlq)),
                ("x-max-length", AMQPValue::LongInt(1)),
                ("x-overflow", ls("reject-publish-dlx")),
            ],
        ),
    )
    .await;
    declare(&ctx.ch, &dlq, FieldTable::default()).await;
    within(ctx.ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    assert!(matches!(
        publish_confirmed(&ctx.ch, &q, b"first").await,
        Confirmation::Ack(_)
    ));
    assert!(matches!(
        publish_confirmed(&ctx.ch, &q, b"refused").await,
        Confirmation::Nack(_)
    ));

    let dead = get_one(&ctx.ch, &dlq).await;
    assert_eq!(body(&dead), "refused");
    assert_eq!(
        deaths(&dead, since),
        [death(1, "maxlen", &q, "", &[&q], None)]
    );
    assert_first_death(&dead, "maxlen", &q, "");
    assert_eq!(drain(&ctx.ch, &q).await, ["first"]);
}

// ---------------------------------------------------------------------------
// Restart (Hare-only: it runs the hare binary on a data dir it owns).
// ---------------------------------------------------------------------------

#[tokio::test]
async fn dead_letters_in_a_durable_queue_survive_restart_with_x_death() {
    if std::env::var("HARE_TEST_URL").is_ok() {
        // Restarting the shared RabbitMQ is not ours to do.
        return;
    }
    let since = now_secs();
    let dir = hare_suite::temp_data_dir("dlx-restart");
    let data = dir.join("data");
    let broker = start_process(&data).await;
    let (conn, ch) = open(&broker.url()).await;
    let (q, dlq) = (unique("q"), unique("dlq"));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    within(ch.queue_declare(
        q.as_str().into(),
        durable,
        dlx_args("", &[("x-dead-letter-routing-key", ls(&dlq))]),
    ))
    .await
    .expect("declare q");
    within(ch.queue_declare(dlq.as_str().into(), durable, FieldTable::default()))
        .await
        .expect("declare dlq");
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table(&[("app-header", ls("kept"))]));
    publish_with(&ch, "", &q, b"rejected", props.clone()).await;
    get_and_reject(&ch, &q).await;
    wait_message_count(&ch, &dlq, 1).await;
    publish_with(&ch, "", &q, b"expired", props.with_expiration("50".into())).await;
    wait_message_count(&ch, &dlq, 2).await;
    drop(conn);

    let broker = restart_process(broker, &data).await;
    let (conn, ch) = open(&broker.url()).await;
    assert_eq!(message_count(&ch, &q).await, 0);
    let first = get_one(&ch, &dlq).await;
    assert_eq!(body(&first), "rejected");
    assert_eq!(
        deaths(&first, since),
        [death(1, "rejected", &q, "", &[&q], None)]
    );
    assert_first_death(&first, "rejected", &q, "");
    assert_eq!(headers(&first).get("app-header"), Some(&ls("kept")));
    assert_eq!(*first.delivery.properties.delivery_mode(), Some(2));
    let second = get_one(&ch, &dlq).await;
    assert_eq!(body(&second), "expired");
    assert_eq!(*second.delivery.properties.expiration(), None);
    assert_eq!(
        deaths(&second, since),
        [death(1, "expired", &q, "", &[&q], Some("50"))]
    );
    assert_first_death(&second, "expired", &q, "");
    drop(conn);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// A message published with `CC` keys is dead-lettered along all its keys
/// when the queue has no dead-letter routing key (and `x-death` lists them
/// all); with one, only along it, and the `CC` header is dropped.
#[tokio::test]
async fn cc_keys_route_dead_letters_unless_the_queue_sets_a_routing_key() {
    let ctx = setup().await;
    let dlx = exchange(
        &ctx.ch,
        "dlx-cc",
        ExchangeKind::Direct,
        FieldTable::default(),
    )
    .await;
    let (by_key, by_cc) = (unique("dl-cc-key"), unique("dl-cc-cc"));
    for (q, key) in [(&by_key, "the-key"), (&by_cc, "the-cc")] {
        declare(&ctx.ch, q, FieldTable::default()).await;
        bind(&ctx.ch, q, &dlx, key, FieldTable::default()).await;
    }
    let cc = AMQPValue::FieldArray(vec![ls("the-cc")].into());
    for own_key in [None, Some("the-key")] {
        let source = unique("dl-cc-src");
        let mut args = vec![("x-dead-letter-exchange", ls(&dlx))];
        args.extend(own_key.map(|k| ("x-dead-letter-routing-key", ls(k))));
        declare(&ctx.ch, &source, table(&args)).await;
        let props = BasicProperties::default().with_headers(table(&[("CC", cc.clone())]));
        publish_with(&ctx.ch, "", &source, b"m", props).await;
        wait_message_count(&ctx.ch, &source, 1).await;
        get_and_reject(&ctx.ch, &source).await;
        let expected_keys = vec![ls(&source), ls("the-cc")];
        let reached: Vec<&String> = match own_key {
            None => vec![&by_cc],
            Some(_) => vec![&by_key],
        };
        for q in &reached {
            let m = get_one(&ctx.ch, q).await;
            let headers = m.delivery.properties.headers().clone().unwrap_or_default();
            assert_eq!(
                headers.inner().contains_key("CC"),
                own_key.is_none(),
                "{headers:?}"
            );
            let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
                panic!("no x-death: {headers:?}");
            };
            let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
                panic!("empty x-death");
            };
            let keys = death.inner().get("routing-keys");
            assert_eq!(
                keys,
                Some(&AMQPValue::FieldArray(expected_keys.clone().into()))
            );
        }
        for q in [&by_key, &by_cc] {
            if !reached.contains(&q) {
                assert!(
                    get(&ctx.ch, q).await.is_none(),
                    "{q} got a copy ({own_key:?})"
                );
            }
        }
    }
}
