//! Quorum queues (`x-queue-type: quorum`) as RabbitMQ 3.10 answers them.
//!
//! Hare has no cluster: a quorum queue is its ordinary durable queue on one
//! node. What applications written for RabbitMQ clusters rely on is pinned
//! here against both brokers: which declarations are refused (reply code and
//! text), redeclare equivalence between quorum and classic, the
//! `x-delivery-count` header on redeliveries, `x-delivery-limit` dead-lettering
//! (reason `delivery_limit`), and the overflow modes. RabbitMQ's quorum queues
//! are real there, so every queue made here is deleted again.
//!
//! The restart test at the end runs `hare` as a process and is Hare-only, as
//! is the refusal of streams (RabbitMQ has them).

mod common;

use std::collections::BTreeMap;

use common::args::{int, table, text};
use common::process::{open, restart_process, start_process};
use common::*;
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicRecoverOptions, BasicRejectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// `pairs` plus `x-queue-type: quorum`.
fn quorum(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = table(pairs);
    t.insert("x-queue-type".into(), text("quorum"));
    t
}

async fn declare(
    ch: &Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> lapin::Result<lapin::Queue> {
    within(ch.queue_declare(name.into(), options, args)).await
}

/// Declares the durable quorum queue `name` with `pairs`.
async fn declare_quorum(ch: &Channel, name: &str, pairs: &[(&str, AMQPValue)]) {
    declare(ch, name, DURABLE, quorum(pairs))
        .await
        .unwrap_or_else(|e| panic!("declare quorum queue {name}: {e}"));
}

/// basic.get with acks.
async fn get(ch: &Channel, queue: &str) -> Option<BasicGetMessage> {
    within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
}

/// basic.get that waits for a message (requeues are asynchronous).
async fn get_one(ch: &Channel, queue: &str) -> BasicGetMessage {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(m) = get(ch, queue).await {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing arrived in {queue}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn headers(properties: &BasicProperties) -> BTreeMap<ShortString, AMQPValue> {
    properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default()
}

/// The `x-delivery-count` header, `None` when absent.
fn delivery_count(properties: &BasicProperties) -> Option<AMQPValue> {
    headers(properties).get("x-delivery-count").cloned()
}

async fn nack_requeue(ch: &Channel, tag: u64) {
    within(ch.basic_nack(
        tag,
        BasicNackOptions {
            multiple: false,
            requeue: true,
        },
    ))
    .await
    .expect("basic.nack");
}

// ---------------------------------------------------------------------------
// Declarations.
// ---------------------------------------------------------------------------

/// What a declare that creates a queue gets: every argument a quorum queue
/// takes, and each refusal with RabbitMQ 3.10's text. Arguments are checked
/// before the durable / exclusive / auto-delete properties, and arguments of
/// the other queue type are refused whatever their value.
#[tokio::test]
async fn declarations_follow_rabbitmq_rules() {
    let ctx = setup().await;
    let durable = DURABLE;
    let transient = QueueDeclareOptions::default();
    let exclusive = QueueDeclareOptions {
        durable: true,
        exclusive: true,
        ..Default::default()
    };
    let auto_delete = QueueDeclareOptions {
        durable: true,
        auto_delete: true,
        ..Default::default()
    };
    let exclusive_auto_delete = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let accepted: Vec<(&str, FieldTable)> = vec![
        ("plain", quorum(&[])),
        ("delivery limit", quorum(&[("x-delivery-limit", int(3))])),
        // RabbitMQ 3.10 does not check its value: not an integer means no limit.
        (
            "delivery limit text",
            quorum(&[("x-delivery-limit", text("a"))]),
        ),
        ("drop-head", quorum(&[("x-overflow", text("drop-head"))])),
        (
            "reject-publish",
            quorum(&[("x-overflow", text("reject-publish"))]),
        ),
        (
            "reject-publish-dlx",
            quorum(&[("x-overflow", text("reject-publish-dlx"))]),
        ),
        (
            "limits and ttl",
            quorum(&[
                ("x-max-length", int(10)),
                ("x-max-length-bytes", int(1000)),
                ("x-message-ttl", int(60_000)),
                ("x-expires", int(600_000)),
            ]),
        ),
        (
            "dead-lettering",
            quorum(&[
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text("k")),
                ("x-dead-letter-strategy", text("at-least-once")),
            ]),
        ),
        (
            "single active consumer",
            quorum(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
        ),
        (
            "cluster arguments",
            quorum(&[
                ("x-quorum-initial-group-size", int(3)),
                ("x-queue-leader-locator", text("balanced")),
                ("x-max-in-memory-length", int(5)),
                ("x-max-in-memory-bytes", int(5000)),
            ]),
        ),
        (
            "unknown argument",
            quorum(&[("x-no-such-argument", int(1))]),
        ),
    ];
    for (case, args) in accepted {
        let q = unique("quorum-ok");
        let ch = ctx.channel().await;
        declare(&ch, &q, durable, args)
            .await
            .unwrap_or_else(|e| panic!("case {case}: {e}"));
        delete_queue(&ch, &q).await;
    }

    let property = |p: &str| format!("invalid property '{p}'");
    let quorum_arg = |arg: &str| format!("invalid arg '{arg}' QUORUM");
    let refused: Vec<(&str, QueueDeclareOptions, FieldTable, String)> = vec![
        ("non-durable", transient, quorum(&[]), property("non-durable")),
        ("exclusive", exclusive, quorum(&[]), property("exclusive-owner")),
        ("auto-delete", auto_delete, quorum(&[]), property("auto-delete")),
        (
            "exclusive auto-delete transient",
            exclusive_auto_delete,
            quorum(&[]),
            property("auto-delete"),
        ),
        (
            "priorities",
            durable,
            quorum(&[("x-max-priority", int(5))]),
            quorum_arg("x-max-priority"),
        ),
        (
            "priorities on a transient queue",
            transient,
            quorum(&[("x-max-priority", int(5))]),
            quorum_arg("x-max-priority"),
        ),
        (
            "priorities, a value classic queues refuse",
            durable,
            quorum(&[("x-max-priority", text("a"))]),
            quorum_arg("x-max-priority"),
        ),
        (
            "queue mode",
            durable,
            quorum(&[("x-queue-mode", text("lazy"))]),
            quorum_arg("x-queue-mode"),
        ),
        (
            "master locator",
            durable,
            quorum(&[("x-queue-master-locator", text("min-masters"))]),
            quorum_arg("x-queue-master-locator"),
        ),
        (
            "stream argument",
            durable,
            quorum(&[("x-max-age", text("1D"))]),
            quorum_arg("x-max-age"),
        ),
        (
            "bad overflow before the transient property",
            transient,
            quorum(&[("x-overflow", text("bogus"))]),
            "invalid arg 'x-overflow' for queue 'Q' in vhost '/': invalid_overflow".into(),
        ),
        (
            "group size 0",
            durable,
            quorum(&[("x-quorum-initial-group-size", int(0))]),
            "invalid arg 'x-quorum-initial-group-size' for queue 'Q' in vhost '/': {value_zero,0}"
                .into(),
        ),
        (
            "dead-letter strategy",
            durable,
            quorum(&[("x-dead-letter-strategy", text("bogus"))]),
            "invalid arg 'x-dead-letter-strategy' for queue 'Q' in vhost '/': invalid_dlx_strategy"
                .into(),
        ),
        (
            "leader locator",
            durable,
            quorum(&[("x-queue-leader-locator", text("bogus"))]),
            "invalid arg 'x-queue-leader-locator' for queue 'Q' in vhost '/': invalid_queue_locator_arg"
                .into(),
        ),
        (
            "delivery limit on a classic queue",
            transient,
            table(&[("x-delivery-limit", int(3))]),
            "invalid arg 'x-delivery-limit' CLASSIC".into(),
        ),
        (
            "group size on a classic queue",
            durable,
            table(&[("x-quorum-initial-group-size", int(0))]),
            "invalid arg 'x-quorum-initial-group-size' CLASSIC".into(),
        ),
    ];
    for (case, options, args, expected) in refused {
        let q = unique("quorum-refused");
        let expected = format!("PRECONDITION_FAILED - {expected}")
            .replace(
                " QUORUM",
                &format!(" for queue '{q}' in vhost '/' of queue type rabbit_quorum_queue"),
            )
            .replace(
                " CLASSIC",
                &format!(" for queue '{q}' in vhost '/' of queue type rabbit_classic_queue"),
            )
            .replace("'Q'", &format!("'{q}'"));
        let expected = if expected.contains("invalid property") {
            format!("{expected} for queue '{q}' in vhost '/'")
        } else {
            expected
        };
        let ch = ctx.channel().await;
        let got = expect_channel_error(declare(&ch, &q, options, args).await, 406);
        assert_eq!(got, expected, "case {case}");
    }
}

/// Hare has no streams: a stream declaration is refused as RabbitMQ refuses
/// a queue type it does not know, instead of quietly making a classic queue
/// (RabbitMQ creates the stream, so this is Hare-only).
#[tokio::test]
async fn streams_are_refused() {
    let ctx = setup().await;
    if !ctx.broker.is_hare() {
        return;
    }
    let q = unique("stream");
    let got = expect_channel_error(
        declare(
            &ctx.ch,
            &q,
            DURABLE,
            table(&[("x-queue-type", text("stream"))]),
        )
        .await,
        406,
    );
    assert_eq!(
        got,
        format!(
            "PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue '{q}' in vhost '/': \"unsupported queue type 'stream'\""
        )
    );
}

/// A redeclare compares the type: absent and `classic` are the same, quorum
/// and classic are not. Quorum queues also compare their own arguments
/// (`x-delivery-limit`...) in RabbitMQ's order and ignore classic-only ones
/// on a redeclare.
#[tokio::test]
async fn redeclare_compares_the_queue_type() {
    let ctx = setup().await;
    let inequivalent = |arg: &str, q: &str, detail: &str| {
        format!(
            "PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{q}' in vhost '/': {detail}"
        )
    };
    let q = unique("quorum-redeclare");
    let limit = || ("x-delivery-limit", int(3));
    let ttl = || ("x-message-ttl", int(60_000));
    declare_quorum(&ctx.ch, &q, &[limit(), ttl()]).await;
    declare(&ctx.ch, &q, DURABLE, quorum(&[limit(), ttl()]))
        .await
        .expect("same declaration");
    // Classic-only arguments are not compared for a quorum queue.
    declare(
        &ctx.ch,
        &q,
        DURABLE,
        quorum(&[limit(), ttl(), ("x-max-priority", int(5))]),
    )
    .await
    .expect("redeclare with x-max-priority");
    // The first mismatch in RabbitMQ's order is named: the type before the
    // delivery limit before the TTL.
    let cases: Vec<(&str, QueueDeclareOptions, FieldTable, String)> = vec![
        (
            "type only",
            DURABLE,
            quorum(&[]),
            inequivalent(
                "x-delivery-limit",
                &q,
                "received none but current is the value '3' of type 'long'",
            ),
        ),
        (
            "no type",
            DURABLE,
            table(&[limit()]),
            inequivalent(
                "x-queue-type",
                &q,
                "received none but current is the value 'quorum' of type 'longstr'",
            ),
        ),
        (
            "classic",
            DURABLE,
            table(&[limit(), ("x-queue-type", text("classic"))]),
            inequivalent(
                "x-queue-type",
                &q,
                "received 'classic' but current is 'quorum'",
            ),
        ),
        (
            "other limit",
            DURABLE,
            quorum(&[("x-delivery-limit", int(5))]),
            inequivalent("x-delivery-limit", &q, "received '5' but current is '3'"),
        ),
        (
            "group size",
            DURABLE,
            quorum(&[limit(), ("x-quorum-initial-group-size", int(3))]),
            inequivalent(
                "x-quorum-initial-group-size",
                &q,
                "received the value '3' of type 'long' but current is none",
            ),
        ),
        (
            "transient",
            QueueDeclareOptions::default(),
            quorum(&[limit()]),
            inequivalent("durable", &q, "received 'false' but current is 'true'"),
        ),
    ];
    for (case, options, args, expected) in cases {
        let ch = ctx.channel().await;
        let got = expect_channel_error(declare(&ch, &q, options, args).await, 406);
        assert_eq!(got, expected, "case {case}");
    }
    delete_queue(&ctx.ch, &q).await;

    // Classic queues, declared without a type and with `classic`.
    let implicit = unique("classic-implicit");
    let explicit = unique("classic-explicit");
    let classic = table(&[("x-queue-type", text("classic"))]);
    declare(&ctx.ch, &implicit, DURABLE, FieldTable::default())
        .await
        .expect("declare classic");
    declare(&ctx.ch, &explicit, DURABLE, classic.clone())
        .await
        .expect("declare explicit classic");
    declare(&ctx.ch, &implicit, DURABLE, classic.clone())
        .await
        .expect("classic names the type the queue has");
    declare(&ctx.ch, &explicit, DURABLE, FieldTable::default())
        .await
        .expect("no type is classic");
    let ch = ctx.channel().await;
    let got = expect_channel_error(declare(&ch, &implicit, DURABLE, quorum(&[])).await, 406);
    assert_eq!(
        got,
        inequivalent(
            "x-queue-type",
            &implicit,
            "received the value 'quorum' of type 'longstr' but current is none"
        )
    );
    let ch = ctx.channel().await;
    let got = expect_channel_error(declare(&ch, &explicit, DURABLE, quorum(&[])).await, 406);
    assert_eq!(
        got,
        inequivalent(
            "x-queue-type",
            &explicit,
            "received 'quorum' but current is 'classic'"
        )
    );
    delete_queue(&ctx.ch, &implicit).await;
    delete_queue(&ctx.ch, &explicit).await;
}

// ---------------------------------------------------------------------------
// Deliveries.
// ---------------------------------------------------------------------------

/// `x-delivery-count` counts the times a message came back unsettled: nack
/// or reject with requeue, basic.recover, its channel closing. A consumer's
/// first delivery has no such header; basic.get always has it, 0 at first.
/// The publisher's headers are kept. Classic queues never add it.
#[tokio::test]
async fn delivery_count_counts_returns() {
    let ctx = setup_confirmed().await;
    let q = unique("quorum-count");
    declare_quorum(&ctx.ch, &q, &[]).await;
    let props = BasicProperties::default().with_headers(table(&[("app", text("kept"))]));
    publish_with(&ctx.ch, "", &q, b"m", props).await;

    let ch = ctx.channel().await;
    let mut consumer = consume(&ch, &q, false).await;
    let first = next_delivery(&mut consumer).await;
    assert!(!first.redelivered);
    assert_eq!(delivery_count(&first.properties), None, "first delivery");
    assert_eq!(headers(&first.properties).get("app"), Some(&text("kept")));
    nack_requeue(&ch, first.delivery_tag).await;
    let second = next_delivery(&mut consumer).await;
    assert!(second.redelivered);
    assert_eq!(delivery_count(&second.properties), Some(int(1)));
    assert_eq!(headers(&second.properties).get("app"), Some(&text("kept")));
    within(ch.basic_reject(second.delivery_tag, BasicRejectOptions { requeue: true }))
        .await
        .expect("basic.reject");
    let third = next_delivery(&mut consumer).await;
    assert_eq!(delivery_count(&third.properties), Some(int(2)));
    // Left unacked: closing the channel returns it.
    within(ch.close(200, "bye".into())).await.expect("close");

    let got = get_one(&ctx.ch, &q).await;
    assert_eq!(delivery_count(&got.delivery.properties), Some(int(3)));
    assert!(got.delivery.redelivered);
    within(ctx.ch.basic_recover(BasicRecoverOptions { requeue: true }))
        .await
        .expect("basic.recover");
    let got = get_one(&ctx.ch, &q).await;
    assert_eq!(delivery_count(&got.delivery.properties), Some(int(4)));
    within(
        ctx.ch
            .basic_ack(got.delivery.delivery_tag, BasicAckOptions::default()),
    )
    .await
    .expect("ack");

    // basic.get's first delivery says 0.
    publish(&ctx.ch, "", &q, b"fresh").await;
    let fresh = get_one(&ctx.ch, &q).await;
    assert!(!fresh.delivery.redelivered);
    assert_eq!(delivery_count(&fresh.delivery.properties), Some(int(0)));
    within(
        ctx.ch
            .basic_ack(fresh.delivery.delivery_tag, BasicAckOptions::default()),
    )
    .await
    .expect("ack");
    delete_queue(&ctx.ch, &q).await;

    // A classic queue's redelivery has no count.
    let classic = declare_queue(&ctx.ch, "classic-count").await;
    publish(&ctx.ch, "", &classic, b"m").await;
    let m = get_one(&ctx.ch, &classic).await;
    assert_eq!(delivery_count(&m.delivery.properties), None);
    nack_requeue(&ctx.ch, m.delivery.delivery_tag).await;
    let m = get_one(&ctx.ch, &classic).await;
    assert!(m.delivery.redelivered);
    assert_eq!(delivery_count(&m.delivery.properties), None);
    delete_queue(&ctx.ch, &classic).await;
}

/// A message returned more often than `x-delivery-limit` is dead-lettered
/// with reason `delivery_limit` (limit 1: two deliveries), or dropped when
/// the queue has no dead-letter exchange. A channel closing counts like a
/// nack. The dead letter carries `x-death`, not `x-delivery-count`.
#[tokio::test]
async fn delivery_limit_dead_letters_or_drops() {
    let ctx = setup_confirmed().await;
    let (q, dlq) = (unique("quorum-limit"), unique("quorum-limit-dead"));
    declare(
        &ctx.ch,
        &dlq,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare dead-letter queue");
    declare_quorum(
        &ctx.ch,
        &q,
        &[
            ("x-delivery-limit", int(1)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&dlq)),
        ],
    )
    .await;
    let props = BasicProperties::default().with_headers(table(&[("app", text("kept"))]));
    publish_with(&ctx.ch, "", &q, b"poison", props).await;
    for round in 0..2 {
        let m = get_one(&ctx.ch, &q).await;
        assert_eq!(m.delivery.redelivered, round > 0, "round {round}");
        nack_requeue(&ctx.ch, m.delivery.delivery_tag).await;
    }
    let dead = get_one(&ctx.ch, &dlq).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    assert_eq!(dead.delivery.data, b"poison");
    let h = headers(&dead.delivery.properties);
    assert_eq!(h.get("app"), Some(&text("kept")));
    assert_eq!(h.get("x-delivery-count"), None);
    assert_eq!(h.get("x-first-death-reason"), Some(&text("delivery_limit")));
    assert_eq!(h.get("x-first-death-queue"), Some(&text(&q)));
    let Some(AMQPValue::FieldArray(deaths)) = h.get("x-death") else {
        panic!("no x-death in {h:?}");
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
        panic!("x-death entry is not a table");
    };
    let death = death.inner();
    assert_eq!(death.get("reason"), Some(&text("delivery_limit")));
    assert_eq!(death.get("queue"), Some(&text(&q)));
    assert_eq!(death.get("count"), Some(&int(1)));
    delete_queue(&ctx.ch, &q).await;
    delete_queue(&ctx.ch, &dlq).await;

    // No dead-letter exchange, limit 0: one delivery, then the message is
    // gone; here the consumer's channel closing is the failed delivery.
    let q = unique("quorum-limit-drop");
    declare_quorum(&ctx.ch, &q, &[("x-delivery-limit", int(0))]).await;
    publish(&ctx.ch, "", &q, b"poison").await;
    let ch = ctx.channel().await;
    let mut consumer = consume(&ch, &q, false).await;
    next_delivery(&mut consumer).await;
    within(ch.close(200, "bye".into())).await.expect("close");
    wait_message_count(&ctx.ch, &q, 0).await;
    assert!(get(&ctx.ch, &q).await.is_none());
    delete_queue(&ctx.ch, &q).await;
}

/// Quorum queues take drop-head and reject-publish; RabbitMQ 3.10 accepts
/// reject-publish-dlx too but drops (and dead-letters) from the head as
/// with drop-head.
#[tokio::test]
async fn overflow_modes() {
    let ctx = setup_confirmed().await;
    for overflow in ["drop-head", "reject-publish-dlx"] {
        let (q, dlq) = (unique("quorum-overflow"), unique("quorum-overflow-dead"));
        declare(
            &ctx.ch,
            &dlq,
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare dead-letter queue");
        declare_quorum(
            &ctx.ch,
            &q,
            &[
                ("x-max-length", int(1)),
                ("x-overflow", text(overflow)),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&dlq)),
            ],
        )
        .await;
        for body in ["1", "2", "3"] {
            let confirmation = publish_confirmed(&ctx.ch, &q, body.as_bytes()).await;
            assert!(
                matches!(confirmation, Confirmation::Ack(_)),
                "{overflow}: publish {body}: {confirmation:?}"
            );
        }
        wait_message_count(&ctx.ch, &dlq, 2).await;
        assert_eq!(drain(&ctx.ch, &q).await, ["3"], "{overflow}");
        assert_eq!(drain(&ctx.ch, &dlq).await, ["1", "2"], "{overflow}");
        delete_queue(&ctx.ch, &q).await;
        delete_queue(&ctx.ch, &dlq).await;
    }

    // reject-publish: a full queue refuses publishes and keeps its head.
    // (RabbitMQ's quorum queue notices it is full one message late, so only
    // the third publish is pinned.)
    let q = unique("quorum-reject");
    declare_quorum(
        &ctx.ch,
        &q,
        &[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    let mut confirmations = Vec::new();
    for body in ["1", "2", "3"] {
        confirmations.push(publish_confirmed(&ctx.ch, &q, body.as_bytes()).await);
    }
    assert!(matches!(confirmations[0], Confirmation::Ack(_)));
    assert!(matches!(confirmations[2], Confirmation::Nack(_)));
    assert_eq!(
        drain(&ctx.ch, &q).await.first().map(String::as_str),
        Some("1")
    );
    delete_queue(&ctx.ch, &q).await;
}

// ---------------------------------------------------------------------------
// Restart (Hare only).
// ---------------------------------------------------------------------------

/// A quorum queue is a durable queue: its persistent messages and its
/// definition survive a restart, type included, so redeclares compare as
/// before and the delivery limit still applies.
#[tokio::test]
async fn quorum_queue_survives_restart() {
    if std::env::var("HARE_TEST_URL").is_ok() {
        // Restarting the shared RabbitMQ is not ours to do.
        return;
    }
    let dir = hare_suite::temp_data_dir("quorum-restart");
    let data = dir.join("data");
    let broker = start_process(&data).await;
    let (conn, ch) = open(&broker.url()).await;
    let q = unique("quorum-restart");
    declare_quorum(&ch, &q, &[("x-delivery-limit", int(0))]).await;
    confirm_select(&ch).await;
    let persistent = BasicProperties::default().with_delivery_mode(2);
    publish_with(&ch, "", &q, b"kept", persistent).await;
    drop(conn);

    let broker = restart_process(broker, &data).await;
    let (conn, ch) = open(&broker.url()).await;
    declare(&ch, &q, DURABLE, quorum(&[("x-delivery-limit", int(0))]))
        .await
        .expect("redeclare as quorum after restart");
    let got = expect_channel_error(declare(&ch, &q, DURABLE, FieldTable::default()).await, 406);
    assert_eq!(
        got,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{q}' in vhost '/': \
             received none but current is the value 'quorum' of type 'longstr'"
        )
    );
    let ch = within(conn.create_channel()).await.expect("channel");
    let m = get_one(&ch, &q).await;
    assert_eq!(m.delivery.data, b"kept");
    assert_eq!(delivery_count(&m.delivery.properties), Some(int(0)));
    nack_requeue(&ch, m.delivery.delivery_tag).await;
    wait_message_count(&ch, &q, 0).await;
    drop(conn);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
