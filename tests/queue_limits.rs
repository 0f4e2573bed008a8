//! Queue length limits (`x-max-length`, `x-max-length-bytes`) and what happens
//! to a publish that does not fit (`x-overflow`), as RabbitMQ 3.10 does it:
//!
//! * drop-head (the default) keeps the newest: the oldest *ready* messages are
//!   dropped so the queue never holds more than the limit. Deliveries awaiting
//!   an ack do not count, and only body bytes count towards the byte limit. A
//!   message goes straight to a consumer that can take it before any limit is
//!   looked at, so even a limit of 0 lets it through then. Requeued messages
//!   go back to the head and, over the limit, are the first to be dropped.
//!   In a priority queue the "head" is the highest priority.
//! * reject-publish keeps the oldest: a publish that would take the queue over
//!   the limit is refused (basic.nack with confirms, silently otherwise), even
//!   when a consumer is waiting. One refusing queue is enough for a nack when
//!   a message goes to several; the others keep their copy. Requeues may take
//!   the queue over the limit.
//! * reject-publish-dlx also dead-letters the refused message (reason maxlen).
//!
//! The restart test (bytes accounting after recovery) is Hare-only.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, confirm, AMQPClass};
use common::args::{int, table, text};
use common::process::{open, restart_process, start_process};
use common::raw::{self, Raw};
use common::*;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Publishes every body before waiting for any confirm, then returns the
/// confirms in publish order.
async fn publish_all(
    ch: &Channel,
    exchange: &str,
    key: &str,
    bodies: &[&str],
) -> Vec<Confirmation> {
    let mut pending = Vec::with_capacity(bodies.len());
    for body in bodies {
        pending.push(
            within(ch.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            ))
            .await
            .expect("basic.publish"),
        );
    }
    let mut out = Vec::with_capacity(pending.len());
    for p in pending {
        out.push(within(p).await.expect("confirm"));
    }
    out
}

/// A compact picture of confirms: 'A' for ack, 'N' for nack, '-' for none.
fn picture(confirms: &[Confirmation]) -> String {
    confirms
        .iter()
        .map(|c| match c {
            Confirmation::Ack(None) => 'A',
            Confirmation::Nack(None) => 'N',
            Confirmation::NotRequested => '-',
            other => panic!("unexpected confirm {other:?}"),
        })
        .collect()
}

async fn get_ack_mode(ch: &Channel, q: &str) -> lapin::message::BasicGetMessage {
    within(ch.basic_get(q.into(), BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
        .unwrap_or_else(|| panic!("queue {q} is empty"))
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------
// drop-head
// ---------------------------------------------------------------------------

#[tokio::test]
async fn max_length_drops_oldest_and_never_exceeds_the_limit() {
    let ctx = setup_confirmed().await;
    let q = declare_with(&ctx.ch, "ql-maxlen", &[("x-max-length", int(3))]).await;
    for i in 1..=6u32 {
        send(&ctx.ch, &q, format!("m{i}").as_bytes()).await;
        assert_eq!(message_count(&ctx.ch, &q).await, i.min(3), "after m{i}");
    }
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["m4", "m5", "m6"]));
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn max_length_does_not_count_unacked_deliveries() {
    let ctx = setup_confirmed().await;
    let q = declare_with(&ctx.ch, "ql-unacked", &[("x-max-length", int(2))]).await;
    within(ctx.ch.basic_qos(2, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = consume(&ctx.ch, &q, false).await;
    for i in 1..=5 {
        send(&ctx.ch, &q, format!("m{i}").as_bytes()).await;
    }
    // m1 and m2 went straight to the consumer; m3 made room for m5.
    let first = collect_deliveries(&mut consumer, 2).await;
    assert_eq!(first.iter().map(body).collect::<Vec<_>>(), ["m1", "m2"]);
    assert_eq!(message_count(&ctx.ch, &q).await, 2);
    within(first[1].acker.ack(BasicAckOptions { multiple: true }))
        .await
        .expect("ack");
    let rest = collect_deliveries(&mut consumer, 2).await;
    assert_eq!(rest.iter().map(body).collect::<Vec<_>>(), ["m4", "m5"]);
    assert_no_delivery(&mut consumer).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    delete_queue(&ctx.ch, &q).await;
}

async fn collect_deliveries(
    consumer: &mut lapin::Consumer,
    n: usize,
) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_delivery(consumer).await);
    }
    out
}

#[tokio::test]
async fn max_length_bytes_counts_body_bytes_only() {
    let ctx = setup_confirmed().await;
    let q = declare_with(&ctx.ch, "ql-bytes", &[("x-max-length-bytes", int(10))]).await;
    for b in ["aaaa", "bbbb", "cc"] {
        send(&ctx.ch, &q, b.as_bytes()).await;
    }
    // Exactly at the limit: nothing dropped.
    assert_eq!(message_count(&ctx.ch, &q).await, 3);
    send(&ctx.ch, &q, b"d").await;
    // 11 bytes: the oldest goes.
    assert_eq!(message_count(&ctx.ch, &q).await, 3);
    // Properties and headers are not counted, however large.
    let mut headers = FieldTable::default();
    headers.insert("big".into(), text(&"h".repeat(2000)));
    publish_with(
        &ctx.ch,
        "",
        &q,
        b"e",
        BasicProperties::default()
            .with_headers(headers)
            .with_message_id("x".repeat(200).as_str().into()),
    )
    .await;
    assert_eq!(message_count(&ctx.ch, &q).await, 4);
    // 8 + 10 bytes: as many heads go as needed.
    send(&ctx.ch, &q, b"ffffffffff").await;
    assert_eq!(message_count(&ctx.ch, &q).await, 1);
    // A body larger than the limit drops everything, itself included.
    send(&ctx.ch, &q, b"ggggggggggg").await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    send(&ctx.ch, &q, b"hhh").await;
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["hhh"]));
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn max_length_bytes_does_not_count_unacked_deliveries() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "ql-bytes-unacked",
        &[("x-max-length-bytes", int(6))],
    )
    .await;
    send(&ctx.ch, &q, b"aaaaaa").await;
    let held = get_ack_mode(&ctx.ch, &q).await;
    assert_eq!(held.delivery.data, b"aaaaaa");
    send(&ctx.ch, &q, b"bbb").await;
    send(&ctx.ch, &q, b"ccc").await;
    assert_eq!(message_count(&ctx.ch, &q).await, 2);
    within(held.delivery.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["bbb", "ccc"]));
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn both_limits_the_tighter_one_wins() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "ql-both",
        &[("x-max-length", int(3)), ("x-max-length-bytes", int(10))],
    )
    .await;
    for b in ["a", "b", "c", "d", "e"] {
        send(&ctx.ch, &q, b.as_bytes()).await;
    }
    // The count binds: 3 messages, 3 bytes.
    assert_eq!(message_count(&ctx.ch, &q).await, 3);
    // 4 messages would be too many, and c+d+e+9 = 12 bytes too much: d goes too.
    send(&ctx.ch, &q, b"999999999").await;
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["e", "999999999"]));
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn limit_zero_keeps_nothing_but_a_waiting_consumer_still_gets_it() {
    let ctx = setup_confirmed().await;
    let q = declare_with(&ctx.ch, "ql-zero", &[("x-max-length", int(0))]).await;
    send(&ctx.ch, &q, b"lost").await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    // Delivery to a consumer that can take it comes before any limit.
    let mut consumer = consume(&ctx.ch, &q, true).await;
    send(&ctx.ch, &q, b"handed over").await;
    assert_eq!(body(&next_delivery(&mut consumer).await), "handed over");
    cancel(&ctx.ch, consumer).await;

    // A byte limit of 0 still admits empty bodies: they weigh nothing.
    let qb = declare_with(&ctx.ch, "ql-zero-bytes", &[("x-max-length-bytes", int(0))]).await;
    send(&ctx.ch, &qb, b"x").await;
    send(&ctx.ch, &qb, b"").await;
    send(&ctx.ch, &qb, b"").await;
    assert_eq!(message_count(&ctx.ch, &qb).await, 2);
    delete_queue(&ctx.ch, &q).await;
    delete_queue(&ctx.ch, &qb).await;
}

#[tokio::test]
async fn requeued_messages_over_the_limit_are_dropped_first() {
    let ctx = setup_confirmed().await;
    let q = declare_with(&ctx.ch, "ql-requeue", &[("x-max-length", int(2))]).await;
    send(&ctx.ch, &q, b"m1").await;
    send(&ctx.ch, &q, b"m2").await;
    let _m1 = get_ack_mode(&ctx.ch, &q).await;
    let m2 = get_ack_mode(&ctx.ch, &q).await;
    send(&ctx.ch, &q, b"m3").await;
    send(&ctx.ch, &q, b"m4").await;
    assert_eq!(message_count(&ctx.ch, &q).await, 2);
    // m1 and m2 go back to the head, then the head is trimmed to the limit.
    within(ctx.ch.basic_nack(
        m2.delivery.delivery_tag,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    ))
    .await
    .expect("nack");
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["m3", "m4"]));
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn drop_head_in_a_priority_queue_drops_the_highest_priority() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "ql-prio",
        &[("x-max-length", int(2)), ("x-max-priority", int(5))],
    )
    .await;
    let with_priority = |p: u8| BasicProperties::default().with_priority(p);
    publish_with(&ctx.ch, "", &q, b"low", with_priority(1)).await;
    publish_with(&ctx.ch, "", &q, b"high", with_priority(5)).await;
    publish_with(&ctx.ch, "", &q, b"mid", with_priority(3)).await;
    // The head is what would be delivered next: the high one.
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["mid", "low"]));
    delete_queue(&ctx.ch, &q).await;
}

// ---------------------------------------------------------------------------
// reject-publish
// ---------------------------------------------------------------------------

#[tokio::test]
async fn reject_publish_nacks_the_refused_and_keeps_the_oldest() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "ql-reject",
        &[
            ("x-max-length", int(2)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    let confirms = publish_all(&ctx.ch, "", &q, &["m1", "m2", "m3", "m4", "m5"]).await;
    assert_eq!(picture(&confirms), "AANNN");
    assert_eq!(message_count(&ctx.ch, &q).await, 2);
    // Once a message leaves, one more fits.
    let m1 = get_ack_mode(&ctx.ch, &q).await;
    assert_eq!(m1.delivery.data, b"m1");
    // An unacked delivery does not count either.
    let confirms = publish_all(&ctx.ch, "", &q, &["m6", "m7"]).await;
    assert_eq!(picture(&confirms), "AN");
    within(m1.delivery.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["m2", "m6"]));
    let confirms = publish_all(&ctx.ch, "", &q, &["m8", "m9", "m10"]).await;
    assert_eq!(picture(&confirms), "AAN");
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn reject_publish_bytes_refuses_what_does_not_fit() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "ql-reject-bytes",
        &[
            ("x-max-length-bytes", int(5)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    // "ccc" does not fit after 4 bytes, but the smaller "d" still does.
    let confirms = publish_all(&ctx.ch, "", &q, &["aa", "bb", "ccc", "d", "e"]).await;
    assert_eq!(picture(&confirms), "AANAN");
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["aa", "bb", "d"]));
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn reject_publish_refuses_even_with_a_consumer_waiting() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "ql-reject-zero",
        &[
            ("x-max-length", int(0)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    let mut consumer = consume(&ctx.ch, &q, true).await;
    let confirms = publish_all(&ctx.ch, "", &q, &["m1", "m2"]).await;
    assert_eq!(picture(&confirms), "NN");
    assert_no_delivery(&mut consumer).await;
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn reject_publish_without_confirms_drops_silently() {
    let ctx = setup().await;
    let q = declare_with(
        &ctx.ch,
        "ql-reject-silent",
        &[
            ("x-max-length", int(2)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    let confirms = publish_all(&ctx.ch, "", &q, &["m1", "m2", "m3", "m4"]).await;
    assert_eq!(picture(&confirms), "----");
    sync_probe(&ctx.ch).await.expect("channel still open");
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["m1", "m2"]));
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn reject_publish_one_full_queue_of_two_means_nack() {
    let ctx = setup_confirmed().await;
    let full = declare_with(
        &ctx.ch,
        "ql-two-full",
        &[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    let open = declare_queue(&ctx.ch, "ql-two-open").await;
    let x = declare_exchange(&ctx.ch, "ql-two", ExchangeKind::Fanout).await;
    bind(&ctx.ch, &full, &x, "", FieldTable::default()).await;
    bind(&ctx.ch, &open, &x, "", FieldTable::default()).await;
    let confirms = publish_all(&ctx.ch, &x, "", &["m1", "m2"]).await;
    assert_eq!(picture(&confirms), "AN");
    // Mandatory: the message did reach queues, so it is not returned either.
    let confirm = within(ctx.ch.basic_publish(
        x.as_str().into(),
        "".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"m3",
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    assert_eq!(
        within(confirm).await.expect("confirm"),
        Confirmation::Nack(None)
    );
    // The queue with room kept its copies.
    assert_eq!(drain(&ctx.ch, &open).await, strings(&["m1", "m2", "m3"]));
    assert_eq!(drain(&ctx.ch, &full).await, strings(&["m1"]));
    delete_queue(&ctx.ch, &full).await;
    delete_queue(&ctx.ch, &open).await;
    delete_exchange(&ctx.ch, &x).await;
}

#[tokio::test]
async fn reject_publish_lets_requeues_exceed_the_limit() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "ql-reject-requeue",
        &[
            ("x-max-length", int(2)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    assert_eq!(
        picture(&publish_all(&ctx.ch, "", &q, &["m1", "m2"]).await),
        "AA"
    );
    let _m1 = get_ack_mode(&ctx.ch, &q).await;
    let m2 = get_ack_mode(&ctx.ch, &q).await;
    assert_eq!(
        picture(&publish_all(&ctx.ch, "", &q, &["m3", "m4", "m5"]).await),
        "AAN"
    );
    within(ctx.ch.basic_nack(
        m2.delivery.delivery_tag,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    ))
    .await
    .expect("nack");
    // Nothing is dropped: four ready messages in a queue limited to two.
    wait_message_count(&ctx.ch, &q, 4).await;
    assert_eq!(picture(&publish_all(&ctx.ch, "", &q, &["m6"]).await), "N");
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["m1", "m2", "m3", "m4"]));
    delete_queue(&ctx.ch, &q).await;
}

/// Confirms as they appear on the wire: a batch written in one go, refused
/// publishes in the middle. Every tag is settled exactly once, a
/// `multiple=true` ack never covers a refused publish, and the outcome per tag
/// is exact.
#[tokio::test]
async fn reject_publish_confirms_on_the_wire() {
    let ctx = setup_confirmed().await;
    let full = declare_with(
        &ctx.ch,
        "ql-wire-full",
        &[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish")),
        ],
    )
    .await;
    let open = declare_queue(&ctx.ch, "ql-wire-open").await;
    send(&ctx.ch, &full, b"occupant").await;

    let mut raw = Raw::open(ctx.broker.addr()).await;
    raw.open_channel(1).await;
    raw.send(&raw::method(
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    ))
    .await;
    match raw.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)))) => {}
        other => panic!("expected confirm.select-ok, got {other:?}"),
    }
    let targets = [
        &open, &open, &full, &open, &open, &open, &full, &full, &open,
    ];
    let expected = "AANAAANNA";
    let mut batch = Vec::new();
    for (i, q) in targets.iter().enumerate() {
        let data = format!("p{}", i + 1);
        batch.extend(raw::encode(&raw::publish(1, q, false)));
        batch.extend(raw::encode(&raw::content_header(1, data.len() as u64)));
        batch.extend(raw::encode(&raw::body(1, data.as_bytes())));
    }
    raw.send_raw(&batch).await;

    let n = targets.len() as u64;
    let mut outcome: BTreeMap<u64, char> = BTreeMap::new();
    while (outcome.len() as u64) < n {
        let (tag, multiple, verdict) = match raw.next().await {
            Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(a)))) => {
                (a.delivery_tag, a.multiple, 'A')
            }
            Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Nack(a)))) => {
                (a.delivery_tag, a.multiple, 'N')
            }
            other => panic!("expected basic.ack/nack, got {other:?}"),
        };
        assert!((1..=n).contains(&tag), "confirm for unknown tag {tag}");
        if multiple {
            let covered: Vec<u64> = (1..=tag).filter(|t| !outcome.contains_key(t)).collect();
            assert!(!covered.is_empty(), "multiple confirm {tag} covers nothing");
            for t in covered {
                outcome.insert(t, verdict);
            }
        } else {
            assert!(
                outcome.insert(tag, verdict).is_none(),
                "tag {tag} confirmed twice"
            );
        }
    }
    let got: String = outcome.values().collect();
    assert_eq!(got, expected);
    // Nothing more is confirmed.
    assert!(
        raw.next_within(Duration::from_millis(200)).await.is_none(),
        "unexpected frame after all confirms"
    );
    raw.close().await;
    assert_eq!(message_count(&ctx.ch, &open).await, 6);
    assert_eq!(drain(&ctx.ch, &full).await, strings(&["occupant"]));
    delete_queue(&ctx.ch, &full).await;
    delete_queue(&ctx.ch, &open).await;
}

#[tokio::test]
async fn reject_publish_dlx_nacks_and_dead_letters_with_reason_maxlen() {
    let ctx = setup_confirmed().await;
    let dlx = declare_exchange(&ctx.ch, "ql-dlx", ExchangeKind::Fanout).await;
    let dead = declare_queue(&ctx.ch, "ql-dlx-dead").await;
    bind(&ctx.ch, &dead, &dlx, "", FieldTable::default()).await;
    let q = declare_with(
        &ctx.ch,
        "ql-dlx-src",
        &[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish-dlx")),
            ("x-dead-letter-exchange", text(&dlx)),
        ],
    )
    .await;
    // Plain reject-publish with a dead-letter exchange only nacks.
    let plain = declare_with(
        &ctx.ch,
        "ql-dlx-plain",
        &[
            ("x-max-length", int(1)),
            ("x-overflow", text("reject-publish")),
            ("x-dead-letter-exchange", text(&dlx)),
        ],
    )
    .await;
    assert_eq!(
        picture(&publish_all(&ctx.ch, "", &plain, &["p1", "p2"]).await),
        "AN"
    );
    assert_eq!(
        picture(&publish_all(&ctx.ch, "", &q, &["m1", "m2", "m3"]).await),
        "ANN"
    );
    wait_message_count(&ctx.ch, &dead, 2).await;
    let mut dead_letters = Vec::new();
    for _ in 0..2 {
        let m = within(
            ctx.ch
                .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get")
        .expect("a dead letter");
        let headers = m
            .delivery
            .properties
            .headers()
            .clone()
            .expect("dead letter has headers");
        let reason = headers.inner().get("x-first-death-reason").cloned();
        assert_eq!(reason, Some(text("maxlen")), "x-first-death-reason");
        let from = headers.inner().get("x-first-death-queue").cloned();
        assert_eq!(from, Some(text(&q)), "x-first-death-queue");
        dead_letters.push(body(&m.delivery));
    }
    assert_eq!(dead_letters, ["m2", "m3"]);
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["m1"]));
    assert_eq!(drain(&ctx.ch, &plain).await, strings(&["p1"]));
    delete_queue(&ctx.ch, &q).await;
    delete_queue(&ctx.ch, &plain).await;
    delete_queue(&ctx.ch, &dead).await;
    delete_exchange(&ctx.ch, &dlx).await;
}

// ---------------------------------------------------------------------------
// Restart (Hare-only: RabbitMQ cannot be restarted from a test)
// ---------------------------------------------------------------------------

async fn publish_persistent(ch: &Channel, q: &str, body: &str) {
    publish_with(
        ch,
        "",
        q,
        body.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;
}

#[tokio::test]
async fn max_length_bytes_accounting_survives_a_restart() {
    // Hare-only: restarts a broker process; HARE_TEST_URL cannot be restarted.
    if std::env::var("HARE_TEST_URL").is_ok() {
        return;
    }
    let dir = hare_suite::temp_data_dir("ql-restart");
    let data = dir.join("data");
    let q = unique("ql-restart");
    let broker = start_process(&data).await;
    {
        let (conn, ch) = open(&broker.url()).await;
        within(ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[("x-max-length-bytes", int(10))]),
        ))
        .await
        .expect("declare");
        confirm_select(&ch).await;
        for b in ["aaa", "bbb", "cccc"] {
            publish_persistent(&ch, &q, b).await;
        }
        let _ = within(conn.close(200, "bye".into())).await;
    }
    let broker = restart_process(broker, &data).await;
    let (conn, ch) = open(&broker.url()).await;
    assert_eq!(message_count(&ch, &q).await, 3);
    // 10 bytes recovered: one more byte pushes out "aaa" and nothing else.
    publish_persistent(&ch, &q, "d").await;
    assert_eq!(message_count(&ch, &q).await, 3);
    publish_persistent(&ch, &q, "eee").await;
    assert_eq!(message_count(&ch, &q).await, 3);
    assert_eq!(drain(&ch, &q).await, strings(&["cccc", "d", "eee"]));
    let _ = within(conn.close(200, "bye".into())).await;
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
