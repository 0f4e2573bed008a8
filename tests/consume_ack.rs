//! Consumers, basic.get, acknowledgements, prefetch, recover, cancel, and message
//! fidelity (properties and bodies).

mod common;

use std::collections::BTreeMap;

use common::*;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRecoverOptions, BasicRejectOptions,
};
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::{BasicProperties, Channel, Consumer};

async fn fill(ch: &Channel, q: &str, n: usize) {
    for i in 0..n {
        send(ch, q, format!("m{i}").as_bytes()).await;
    }
    wait_message_count(ch, q, n as u32).await;
}

async fn consume_opts(
    ch: &Channel,
    q: &str,
    tag: &str,
    options: BasicConsumeOptions,
) -> lapin::Result<Consumer> {
    within(ch.basic_consume(q.into(), tag.into(), options, FieldTable::default())).await
}

async fn qos(ch: &Channel, prefetch: u16, global: bool) {
    within(ch.basic_qos(prefetch, BasicQosOptions { global }))
        .await
        .expect("basic.qos");
}

/// Reads deliveries until none arrives for [`QUIET`]; returns their bodies.
async fn read_until_quiet(consumer: &mut Consumer) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(item) = tokio::time::timeout(QUIET, consumer.next()).await {
        match item {
            Some(Ok(d)) => out.push(String::from_utf8_lossy(&d.data).into_owned()),
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => break,
        }
    }
    out
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

#[tokio::test]
async fn round_robin_over_two_consumers() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-rr").await;
    let ch2 = ctx.channel().await;
    let mut c1 = consume(&ctx.ch, &q, true).await;
    let mut c2 = consume(&ch2, &q, true).await;
    let pubch = ctx.channel().await;
    for i in 0..6 {
        send(&pubch, &q, format!("m{i}").as_bytes()).await;
    }
    let got1 = collect_bodies(&mut c1, 3).await;
    let got2 = collect_bodies(&mut c2, 3).await;
    let evens = vec!["m0", "m2", "m4"];
    let odds = vec!["m1", "m3", "m5"];
    assert!(
        (got1 == evens && got2 == odds) || (got1 == odds && got2 == evens),
        "strict alternation expected: {got1:?} / {got2:?}"
    );
    assert_no_delivery(&mut c1).await;
    assert_no_delivery(&mut c2).await;
    drop((c1, c2));
    delete_queue(&pubch, &q).await;
}

#[tokio::test]
async fn server_generated_consumer_tag() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-ctag").await;
    let c = consume(&ctx.ch, &q, false).await;
    let tag = c.tag().as_str().to_string();
    assert!(tag.starts_with("amq.ctag-"), "{tag}");
    assert_eq!(tag.len(), "amq.ctag-".len() + 22, "{tag}");
    let c2 = consume(&ctx.ch, &q, false).await;
    assert_ne!(c2.tag().as_str(), tag);
    // A client-chosen tag is used as given.
    let c3 = consume_opts(&ctx.ch, &q, "my-tag", Default::default())
        .await
        .expect("consume");
    assert_eq!(c3.tag().as_str(), "my-tag");
    let declared = within(ctx.ch.queue_declare(
        q.as_str().into(),
        Default::default(),
        FieldTable::default(),
    ))
    .await
    .expect("declare");
    assert_eq!(declared.consumer_count(), 3);
    drop((c, c2, c3));
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn exclusive_consumer_blocks_others_with_403() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-excl").await;
    let _c = consume_opts(
        &ctx.ch,
        &q,
        "",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await
    .expect("exclusive consume");
    let ch2 = ctx.channel().await;
    let res = consume_opts(&ch2, &q, "", Default::default()).await;
    let text = expect_channel_error(res.map(|_| ()), 403);
    assert_eq!(
        text,
        format!("ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use")
    );
    // Another exclusive consumer is refused the same way.
    let ch3 = ctx.channel().await;
    let res = consume_opts(
        &ch3,
        &q,
        "",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    let text = expect_channel_error(res.map(|_| ()), 403);
    assert_eq!(
        text,
        format!("ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use")
    );
    let ch4 = ctx.channel().await;
    delete_queue(&ch4, &q).await;
}

#[tokio::test]
async fn exclusive_consume_on_queue_with_consumers_is_403() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-excl-late").await;
    let _c = consume(&ctx.ch, &q, false).await;
    let ch2 = ctx.channel().await;
    let res = consume_opts(
        &ch2,
        &q,
        "",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    let text = expect_channel_error(res.map(|_| ()), 403);
    assert_eq!(
        text,
        format!("ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use")
    );
    let ch3 = ctx.channel().await;
    delete_queue(&ch3, &q).await;
}

#[tokio::test]
async fn duplicate_consumer_tag_on_channel_closes_connection_530() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-duptag").await;
    let _c = consume_opts(&ctx.ch, &q, "dup", Default::default())
        .await
        .expect("first consume");
    let res = consume_opts(&ctx.ch, &q, "dup", Default::default()).await;
    let text = expect_connection_error(res.map(|_| ()), 530);
    assert_eq!(text, "NOT_ALLOWED - attempt to reuse consumer tag 'dup'");
    let conn = ctx.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    delete_queue(&ch, &q).await;
}

#[tokio::test]
async fn same_consumer_tag_on_different_channels_is_fine() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-sametag").await;
    let ch2 = ctx.channel().await;
    let _c1 = consume_opts(&ctx.ch, &q, "same", Default::default())
        .await
        .expect("consume 1");
    let _c2 = consume_opts(&ch2, &q, "same", Default::default())
        .await
        .expect("consume 2");
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn consume_from_missing_queue_is_404() {
    let ctx = setup().await;
    let q = unique("c-noq");
    let res = consume_opts(&ctx.ch, &q, "", Default::default()).await;
    let text = expect_channel_error(res.map(|_| ()), 404);
    assert_eq!(text, format!("NOT_FOUND - no queue '{q}' in vhost '/'"));
}

#[tokio::test]
async fn basic_get_and_get_empty() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-get").await;
    assert!(within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions::default())
    )
    .await
    .expect("get-empty")
    .is_none());
    fill(&ctx.ch, &q, 3).await;
    let mut tags = Vec::new();
    for (i, remaining) in [2u32, 1, 0].into_iter().enumerate() {
        let m = within(
            ctx.ch
                .basic_get(q.as_str().into(), BasicGetOptions::default()),
        )
        .await
        .expect("get")
        .expect("message");
        assert_eq!(body(&m.delivery), format!("m{i}"));
        assert_eq!(m.message_count, remaining, "messages left after get {i}");
        assert!(!m.delivery.redelivered);
        assert_eq!(m.delivery.exchange.as_str(), "");
        assert_eq!(m.delivery.routing_key.as_str(), q);
        tags.push(m.delivery.delivery_tag);
    }
    assert_eq!(
        tags,
        vec![1, 2, 3],
        "delivery tags count from 1 per channel"
    );
    assert!(within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions::default())
    )
    .await
    .expect("get-empty")
    .is_none());
    // Unacked gets are returned to the queue when the channel closes.
    let ch2 = ctx.channel().await;
    within(ctx.ch.close(200, "OK".into())).await.expect("close");
    wait_message_count(&ch2, &q, 3).await;
    let m = within(ch2.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("message");
    assert!(m.delivery.redelivered);
    assert_eq!(body(&m.delivery), "m0");
    delete_queue(&ch2, &q).await;
}

#[tokio::test]
async fn basic_get_from_missing_queue_is_404() {
    let ctx = setup().await;
    let q = unique("c-get-noq");
    let res = within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions::default()),
    )
    .await;
    let text = expect_channel_error(res.map(|_| ()), 404);
    assert_eq!(text, format!("NOT_FOUND - no queue '{q}' in vhost '/'"));
}

#[tokio::test]
async fn ack_and_ack_multiple() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-ack").await;
    fill(&ctx.ch, &q, 5).await;
    let ch = ctx.channel().await;
    let mut c = consume(&ch, &q, false).await;
    let mut deliveries = Vec::new();
    for i in 0..5 {
        let d = next_delivery(&mut c).await;
        assert_eq!(body(&d), format!("m{i}"));
        assert_eq!(d.delivery_tag, i as u64 + 1);
        deliveries.push(d);
    }
    // Single ack of m1, multiple ack up to m3 (acks m0, m2, m3).
    assert!(within(deliveries[1].acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack"));
    within(ch.basic_ack(4, BasicAckOptions { multiple: true }))
        .await
        .expect("ack multiple");
    sync_probe(&ch).await.expect("acks accepted");
    // Only m4 is still unacked: closing the channel requeues just that one.
    drop(c);
    within(ch.close(200, "OK".into())).await.expect("close");
    wait_message_count(&ctx.ch, &q, 1).await;
    let m = within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("message");
    assert_eq!(body(&m.delivery), "m4");
    assert!(m.delivery.redelivered);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn ack_multiple_with_zero_acks_everything() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-ack0").await;
    fill(&ctx.ch, &q, 3).await;
    let ch = ctx.channel().await;
    for _ in 0..3 {
        within(ch.basic_get(q.as_str().into(), BasicGetOptions::default()))
            .await
            .expect("get")
            .expect("message");
    }
    within(ch.basic_ack(0, BasicAckOptions { multiple: true }))
        .await
        .expect("ack all");
    sync_probe(&ch).await.expect("accepted");
    within(ch.close(200, "OK".into())).await.expect("close");
    // Nothing comes back.
    tokio::time::sleep(QUIET).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn nack_multiple_requeue_redelivers_in_original_order() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-nack").await;
    fill(&ctx.ch, &q, 4).await;
    let ch = ctx.channel().await;
    let mut c = consume(&ch, &q, false).await;
    let mut last = 0;
    for i in 0..4 {
        let d = next_delivery(&mut c).await;
        assert_eq!(body(&d), format!("m{i}"));
        assert!(!d.redelivered);
        last = d.delivery_tag;
    }
    within(ch.basic_nack(
        last,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    ))
    .await
    .expect("nack");
    for i in 0..4 {
        let d = next_delivery(&mut c).await;
        assert_eq!(body(&d), format!("m{i}"), "original order kept");
        assert!(d.redelivered, "requeued messages are flagged redelivered");
        assert_eq!(d.delivery_tag, 5 + i as u64, "new delivery tags");
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_no_delivery(&mut c).await;
    drop(c);
    delete_queue(&ch, &q).await;
}

#[tokio::test]
async fn nack_requeue_false_and_reject_requeue_false_drop() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-drop").await;
    fill(&ctx.ch, &q, 3).await;
    let ch = ctx.channel().await;
    let mut c = consume(&ch, &q, false).await;
    let d0 = next_delivery(&mut c).await;
    let d1 = next_delivery(&mut c).await;
    let d2 = next_delivery(&mut c).await;
    assert!(
        within(d0.acker.reject(BasicRejectOptions { requeue: false }))
            .await
            .expect("reject")
    );
    assert!(within(d1.acker.nack(BasicNackOptions {
        multiple: false,
        requeue: false
    }))
    .await
    .expect("nack"));
    // reject with requeue=true puts it back at the front.
    assert!(
        within(d2.acker.reject(BasicRejectOptions { requeue: true }))
            .await
            .expect("reject requeue")
    );
    let again = next_delivery(&mut c).await;
    assert_eq!(body(&again), "m2");
    assert!(again.redelivered);
    assert_no_delivery(&mut c).await;
    drop(c);
    within(ch.close(200, "OK".into())).await.expect("close");
    // Dropped messages do not come back; the requeued-and-unacked one does.
    wait_message_count(&ctx.ch, &q, 1).await;
    assert_eq!(drain(&ctx.ch, &q).await, vec!["m2"]);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn unacked_requeued_when_channel_closes() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-chclose").await;
    fill(&ctx.ch, &q, 3).await;
    let ch = ctx.channel().await;
    let mut c = consume(&ch, &q, false).await;
    let got = collect_bodies(&mut c, 3).await;
    assert_eq!(got, vec!["m0", "m1", "m2"]);
    assert_eq!(
        message_count(&ctx.ch, &q).await,
        0,
        "all unacked, none ready"
    );
    within(ch.close(200, "OK".into())).await.expect("close");
    wait_message_count(&ctx.ch, &q, 3).await;
    let mut c2 = consume(&ctx.ch, &q, true).await;
    for i in 0..3 {
        let d = next_delivery(&mut c2).await;
        assert_eq!(body(&d), format!("m{i}"));
        assert!(d.redelivered);
    }
    drop(c2);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn unacked_requeued_when_connection_closes() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-connclose").await;
    fill(&ctx.ch, &q, 2).await;
    let conn = ctx.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    let mut c = consume(&ch, &q, false).await;
    assert_eq!(collect_bodies(&mut c, 2).await, vec!["m0", "m1"]);
    within(conn.close(200, "bye".into())).await.expect("close");
    wait_message_count(&ctx.ch, &q, 2).await;
    let m = within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("message");
    assert_eq!(body(&m.delivery), "m0");
    assert!(m.delivery.redelivered);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn prefetch_limits_unacked_deliveries() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-prefetch").await;
    fill(&ctx.ch, &q, 5).await;
    let ch = ctx.channel().await;
    qos(&ch, 2, false).await;
    let mut c = consume(&ch, &q, false).await;
    let d0 = next_delivery(&mut c).await;
    let d1 = next_delivery(&mut c).await;
    assert_eq!((body(&d0), body(&d1)), ("m0".into(), "m1".into()));
    assert_no_delivery(&mut c).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 3);
    d0.acker.ack(BasicAckOptions::default()).await.expect("ack");
    let d2 = next_delivery(&mut c).await;
    assert_eq!(body(&d2), "m2");
    assert_no_delivery(&mut c).await;
    // Acking both outstanding frees two slots.
    within(ch.basic_ack(d2.delivery_tag, BasicAckOptions { multiple: true }))
        .await
        .expect("ack multiple");
    assert_eq!(collect_bodies(&mut c, 2).await, vec!["m3", "m4"]);
    drop(c);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn prefetch_is_ignored_for_no_ack_consumers() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-noack").await;
    fill(&ctx.ch, &q, 20).await;
    let ch = ctx.channel().await;
    qos(&ch, 1, false).await;
    let mut c = consume(&ch, &q, true).await;
    let got = collect_bodies(&mut c, 20).await;
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    assert_no_delivery(&mut c).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    // Nothing is unacked: closing the channel brings nothing back.
    drop(c);
    within(ch.close(200, "OK".into())).await.expect("close");
    tokio::time::sleep(QUIET).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn qos_global_false_is_per_consumer() {
    let ctx = setup().await;
    let q1 = declare_queue(&ctx.ch, "c-qos-pc1").await;
    let q2 = declare_queue(&ctx.ch, "c-qos-pc2").await;
    fill(&ctx.ch, &q1, 5).await;
    fill(&ctx.ch, &q2, 5).await;
    let ch = ctx.channel().await;
    qos(&ch, 2, false).await;
    let mut c1 = consume(&ch, &q1, false).await;
    let mut c2 = consume(&ch, &q2, false).await;
    let (g1, g2) = tokio::join!(read_until_quiet(&mut c1), read_until_quiet(&mut c2));
    assert_eq!(g1.len(), 2, "{g1:?}");
    assert_eq!(g2.len(), 2, "{g2:?}");
    drop((c1, c2));
    delete_queue(&ctx.ch, &q1).await;
    delete_queue(&ctx.ch, &q2).await;
}

#[tokio::test]
async fn qos_global_true_is_shared_across_the_channel() {
    let ctx = setup().await;
    let q1 = declare_queue(&ctx.ch, "c-qos-g1").await;
    let q2 = declare_queue(&ctx.ch, "c-qos-g2").await;
    fill(&ctx.ch, &q1, 5).await;
    fill(&ctx.ch, &q2, 5).await;
    let ch = ctx.channel().await;
    qos(&ch, 3, true).await;
    let mut c1 = consume(&ch, &q1, false).await;
    let mut c2 = consume(&ch, &q2, false).await;
    let (g1, g2) = tokio::join!(read_until_quiet(&mut c1), read_until_quiet(&mut c2));
    assert_eq!(g1.len() + g2.len(), 3, "channel-wide limit: {g1:?} {g2:?}");
    assert_eq!(
        message_count(&ctx.ch, &q1).await + message_count(&ctx.ch, &q2).await,
        7
    );
    drop((c1, c2));
    delete_queue(&ctx.ch, &q1).await;
    delete_queue(&ctx.ch, &q2).await;
}

#[tokio::test]
async fn qos_global_and_per_consumer_combine() {
    let ctx = setup().await;
    let q1 = declare_queue(&ctx.ch, "c-qos-both1").await;
    let q2 = declare_queue(&ctx.ch, "c-qos-both2").await;
    fill(&ctx.ch, &q1, 5).await;
    fill(&ctx.ch, &q2, 5).await;
    let ch = ctx.channel().await;
    // Per-consumer first, then global: both limits apply.
    qos(&ch, 2, false).await;
    qos(&ch, 3, true).await;
    let mut c1 = consume(&ch, &q1, false).await;
    // Let the first consumer fill up to its per-consumer limit first.
    let g1 = read_until_quiet(&mut c1).await;
    assert_eq!(g1.len(), 2, "per-consumer limit: {g1:?}");
    let mut c2 = consume(&ch, &q2, false).await;
    let g2 = read_until_quiet(&mut c2).await;
    assert_eq!(g2.len(), 1, "channel limit leaves one slot: {g2:?}");
    drop((c1, c2));
    delete_queue(&ctx.ch, &q1).await;
    delete_queue(&ctx.ch, &q2).await;
}

#[tokio::test]
async fn qos_global_false_after_global_true_clears_the_channel_limit() {
    // RabbitMQ quirk: basic.qos(global=false) also removes a previously set
    // channel-wide (global=true) prefetch limit.
    let ctx = setup().await;
    let q1 = declare_queue(&ctx.ch, "c-qos-clear1").await;
    let q2 = declare_queue(&ctx.ch, "c-qos-clear2").await;
    fill(&ctx.ch, &q1, 5).await;
    fill(&ctx.ch, &q2, 5).await;
    let ch = ctx.channel().await;
    qos(&ch, 3, true).await;
    qos(&ch, 2, false).await;
    let mut c1 = consume(&ch, &q1, false).await;
    let g1 = read_until_quiet(&mut c1).await;
    assert_eq!(g1.len(), 2, "per-consumer limit: {g1:?}");
    let mut c2 = consume(&ch, &q2, false).await;
    let g2 = read_until_quiet(&mut c2).await;
    assert_eq!(g2.len(), 2, "no channel-wide limit any more: {g2:?}");
    drop((c1, c2));
    delete_queue(&ctx.ch, &q1).await;
    delete_queue(&ctx.ch, &q2).await;
}

#[tokio::test]
async fn basic_recover_requeue_redelivers_unacked() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-recover").await;
    fill(&ctx.ch, &q, 2).await;
    let ch = ctx.channel().await;
    for i in 0..2 {
        let m = within(ch.basic_get(q.as_str().into(), BasicGetOptions::default()))
            .await
            .expect("get")
            .expect("message");
        assert_eq!(body(&m.delivery), format!("m{i}"));
    }
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    within(ch.basic_recover(BasicRecoverOptions { requeue: true }))
        .await
        .expect("recover");
    wait_message_count(&ctx.ch, &q, 2).await;
    for i in 0..2 {
        let m = within(ch.basic_get(q.as_str().into(), BasicGetOptions::default()))
            .await
            .expect("get")
            .expect("message");
        assert_eq!(body(&m.delivery), format!("m{i}"));
        assert!(m.delivery.redelivered);
        assert_eq!(m.delivery.delivery_tag, 3 + i as u64);
        within(m.delivery.acker.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    sync_probe(&ch).await.expect("acks of new tags are valid");
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn basic_recover_without_requeue_is_not_implemented() {
    let ctx = setup().await;
    let res = within(ctx.ch.basic_recover(BasicRecoverOptions { requeue: false })).await;
    let text = expect_connection_error(res, 540);
    assert_eq!(text, "NOT_IMPLEMENTED - requeue=false");
}

#[tokio::test]
async fn cancel_stops_delivery() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-cancel").await;
    let mut c = consume(&ctx.ch, &q, true).await;
    send(&ctx.ch, &q, b"before").await;
    assert_eq!(body(&next_delivery(&mut c).await), "before");
    within(ctx.ch.basic_cancel(c.tag(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    // The stream ends.
    assert!(within(c.next()).await.is_none(), "stream ends after cancel");
    send(&ctx.ch, &q, b"after").await;
    wait_message_count(&ctx.ch, &q, 1).await;
    let declared = within(ctx.ch.queue_declare(
        q.as_str().into(),
        Default::default(),
        FieldTable::default(),
    ))
    .await
    .expect("declare");
    assert_eq!(declared.consumer_count(), 0);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn cancel_of_unknown_consumer_tag_is_ok() {
    let ctx = setup().await;
    within(
        ctx.ch
            .basic_cancel("no-such-tag".into(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel of unknown tag succeeds");
    sync_probe(&ctx.ch).await.expect("channel open");
}

#[tokio::test]
async fn unacked_messages_of_cancelled_consumer_stay_unacked() {
    // Cancelling does not requeue: the messages stay with the channel until acked
    // or the channel closes.
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-cancel-unacked").await;
    fill(&ctx.ch, &q, 2).await;
    let ch = ctx.channel().await;
    let mut c = consume(&ch, &q, false).await;
    let d0 = next_delivery(&mut c).await;
    let _d1 = next_delivery(&mut c).await;
    within(ch.basic_cancel(c.tag(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    tokio::time::sleep(QUIET).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    // Still ackable after cancel.
    within(ch.basic_ack(d0.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack");
    sync_probe(&ch).await.expect("ack after cancel is valid");
    within(ch.close(200, "OK".into())).await.expect("close");
    wait_message_count(&ctx.ch, &q, 1).await;
    assert_eq!(drain(&ctx.ch, &q).await, vec!["m1"]);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn server_cancels_consumer_when_queue_deleted() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-srvcancel").await;
    let ch = ctx.channel().await;
    let mut c = consume(&ch, &q, false).await;
    delete_queue(&ctx.ch, &q).await;
    // lapin surfaces basic.cancel from the server as the end of the stream.
    assert!(
        within(c.next()).await.is_none(),
        "stream ends on server cancel"
    );
    // The channel itself stays open.
    sync_probe(&ch).await.expect("channel still open");
}

#[tokio::test]
async fn ack_of_unknown_delivery_tag_is_406() {
    let ctx = setup().await;
    within(ctx.ch.basic_ack(42, BasicAckOptions::default()))
        .await
        .expect("ack sent");
    let text = ctx.channel_closed(406).await;
    assert_eq!(text, "PRECONDITION_FAILED - unknown delivery tag 42");
    assert!(ctx.conn.status().connected());
}

#[tokio::test]
async fn double_ack_is_406() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-dblack").await;
    fill(&ctx.ch, &q, 1).await;
    let ch = ctx.channel().await;
    let m = within(ch.basic_get(q.as_str().into(), BasicGetOptions::default()))
        .await
        .expect("get")
        .expect("message");
    let tag = m.delivery.delivery_tag;
    within(ch.basic_ack(tag, BasicAckOptions::default()))
        .await
        .expect("ack");
    within(ch.basic_ack(tag, BasicAckOptions::default()))
        .await
        .expect("second ack sent");
    let text = ctx.channel_closed(406).await;
    assert_eq!(
        text,
        format!("PRECONDITION_FAILED - unknown delivery tag {tag}")
    );
    // The first ack counted: the message is gone.
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn reject_and_nack_of_unknown_tag_are_406() {
    let ctx = setup().await;
    within(ctx.ch.basic_reject(7, BasicRejectOptions { requeue: true }))
        .await
        .expect("reject sent");
    let text = ctx.channel_closed(406).await;
    assert_eq!(text, "PRECONDITION_FAILED - unknown delivery tag 7");

    let ch = ctx.channel().await;
    within(ch.basic_nack(
        9,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    ))
    .await
    .expect("nack sent");
    let text = ctx.channel_closed(406).await;
    assert_eq!(text, "PRECONDITION_FAILED - unknown delivery tag 9");
}

#[tokio::test]
async fn ack_of_no_ack_delivery_is_406() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-ack-noack").await;
    fill(&ctx.ch, &q, 1).await;
    let ch = ctx.channel().await;
    let m = within(ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("message");
    within(ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()))
        .await
        .expect("ack sent");
    let text = ctx.channel_closed(406).await;
    assert_eq!(
        text,
        format!(
            "PRECONDITION_FAILED - unknown delivery tag {}",
            m.delivery.delivery_tag
        )
    );
    delete_queue(&ctx.ch, &q).await;
}

fn every_field_type() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner-int".into(), AMQPValue::LongInt(-7));
    nested.insert(
        "inner-str".into(),
        AMQPValue::LongString(LongString::from("deep")),
    );
    let mut deeper = FieldTable::default();
    deeper.insert("level".into(), AMQPValue::ShortShortUInt(3));
    nested.insert("deeper".into(), AMQPValue::FieldTable(deeper));

    let array = FieldArray::from(vec![
        AMQPValue::LongInt(1),
        AMQPValue::LongString(LongString::from("two")),
        AMQPValue::Boolean(false),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Double(3.5)])),
        AMQPValue::Void,
    ]);

    let entries: Vec<(&str, AMQPValue)> = vec![
        ("bool-true", AMQPValue::Boolean(true)),
        ("bool-false", AMQPValue::Boolean(false)),
        ("i8", AMQPValue::ShortShortInt(-128)),
        ("u8", AMQPValue::ShortShortUInt(255)),
        ("i16", AMQPValue::ShortInt(-32768)),
        ("u16", AMQPValue::ShortUInt(65535)),
        ("i32", AMQPValue::LongInt(i32::MIN)),
        ("u32", AMQPValue::LongUInt(u32::MAX)),
        ("i64", AMQPValue::LongLongInt(i64::MIN)),
        ("f32", AMQPValue::Float(1.5)),
        ("f64", AMQPValue::Double(-2.25e100)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        ),
        (
            "long-string",
            AMQPValue::LongString(LongString::from("x".repeat(1000))),
        ),
        (
            "utf8",
            AMQPValue::LongString(LongString::from("héllo wörld ✓")),
        ),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 255, 0])),
        ),
        ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
        ("table", AMQPValue::FieldTable(nested)),
        ("empty-table", AMQPValue::FieldTable(FieldTable::default())),
        ("array", AMQPValue::FieldArray(array)),
        ("empty-array", AMQPValue::FieldArray(FieldArray::default())),
        ("void", AMQPValue::Void),
    ];
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

fn full_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/x-test".into())
        .with_content_encoding("gzip".into())
        .with_headers(every_field_type())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-1".into())
        .with_reply_to("reply-queue".into())
        .with_expiration("600000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_234_567_890)
        .with_type("test.kind".into())
        .with_user_id("guest".into())
        .with_app_id("hare-tests".into())
        .with_cluster_id("cluster-x".into())
}

#[tokio::test]
async fn every_property_and_field_type_round_trips() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-props").await;
    let props = full_properties();
    publish_with(&ctx.ch, "", &q, b"props", props.clone()).await;
    let mut c = consume(&ctx.ch, &q, true).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(d.data, b"props");
    assert_eq!(d.properties, props);
    cancel(&ctx.ch, c).await;

    // basic.get delivers identical properties too.
    publish_with(&ctx.ch, "", &q, b"props-get", props.clone()).await;
    wait_message_count(&ctx.ch, &q, 1).await;
    let m = within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("message");
    assert_eq!(m.delivery.properties, props);

    // No properties at all stays no properties.
    publish_with(&ctx.ch, "", &q, b"bare", BasicProperties::default()).await;
    wait_message_count(&ctx.ch, &q, 1).await;
    let m = within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("message");
    assert_eq!(m.delivery.properties, BasicProperties::default());
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn user_id_must_match_authenticated_user() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-userid").await;
    within(ctx.ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default().with_user_id(ShortString::from("mallory")),
    ))
    .await
    .expect("publish sent");
    let text = ctx.channel_closed(406).await;
    assert_eq!(
        text,
        "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'"
    );
    let ch = ctx.channel().await;
    assert_eq!(message_count(&ch, &q).await, 0);
    delete_queue(&ch, &q).await;
}

#[tokio::test]
async fn bodies_of_various_sizes_round_trip() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "c-sizes").await;
    let sizes = [0usize, 1, 131_064, 131_065, 200 * 1024, 5 * 1024 * 1024];
    let bodies: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n).map(|i| (i * 31 % 256) as u8).collect())
        .collect();
    let mut seen = BTreeMap::new();
    for (i, b) in bodies.iter().enumerate() {
        publish_with(
            &ctx.ch,
            "",
            &q,
            b,
            BasicProperties::default().with_message_id(format!("{i}").into()),
        )
        .await;
    }
    let mut c = consume(&ctx.ch, &q, true).await;
    for _ in 0..bodies.len() {
        let d = next_delivery(&mut c).await;
        let i: usize = d
            .properties
            .message_id()
            .as_ref()
            .expect("message id")
            .as_str()
            .parse()
            .expect("index");
        assert_eq!(d.data.len(), sizes[i], "size of body {i}");
        assert!(d.data == bodies[i], "content of body {i}");
        seen.insert(i, ());
    }
    assert_eq!(seen.len(), bodies.len());
    drop(c);
    delete_queue(&ctx.ch, &q).await;
}

/// A channel that deletes a queue its own consumer reads gets the delete-ok
/// first and the consumer's basic.cancel after it, as from RabbitMQ (amqplib
/// takes the cancel as the end of the channel's work and closes it: a
/// delete-ok still to come was lost, failing its "cancelled consumer" test).
#[tokio::test]
async fn deleting_a_consumed_queue_answers_delete_ok_before_the_cancel() {
    use amq_protocol::frame::AMQPFrame;
    use amq_protocol::protocol::{basic, queue, AMQPClass};
    use common::raw::{method, Handshake, Raw};

    let broker = hare_suite::TestBroker::start();
    let opts = Handshake {
        consumer_cancel_notify: true,
        ..Handshake::default()
    };
    let mut raw = Raw::open_with(broker.addr(), &opts).await;
    raw.open_channel(1).await;
    let name = unique("delete-consumed");
    raw.declare(1, &name, false).await;
    raw.send(&method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: name.as_str().into(),
            consumer_tag: "c1".into(),
            no_ack: true,
            ..Default::default()
        })),
    ))
    .await;
    assert!(matches!(
        raw.next().await,
        Some(AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))
        ))
    ));
    raw.send(&method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: name.as_str().into(),
            ..Default::default()
        })),
    ))
    .await;
    let first = raw.next().await;
    assert!(
        matches!(
            first,
            Some(AMQPFrame::Method(
                1,
                AMQPClass::Queue(queue::AMQPMethod::DeleteOk(_))
            ))
        ),
        "expected queue.delete-ok first, got {first:?}"
    );
    let second = raw.next().await;
    assert!(
        matches!(
            &second,
            Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Cancel(c))))
                if c.consumer_tag.as_str() == "c1"
        ),
        "expected basic.cancel after it, got {second:?}"
    );
    raw.close().await;
}
