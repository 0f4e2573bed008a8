//! Publisher confirms, transactions, channel.flow.

mod common;

use common::*;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ChannelFlowOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};

async fn confirm_select(ch: &Channel) -> lapin::Result<()> {
    within(ch.confirm_select(ConfirmSelectOptions::default())).await
}

#[tokio::test]
async fn confirm_select_then_publish_is_acked() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "cf-ack").await;
    confirm_select(&ctx.ch).await.expect("confirm.select");
    assert!(ctx.ch.status().confirm());
    assert_eq!(
        publish_confirmed(&ctx.ch, &q, b"one").await,
        Confirmation::Ack(None)
    );
    assert_eq!(
        publish_confirmed(&ctx.ch, &q, b"two").await,
        Confirmation::Ack(None)
    );
    // Confirmed messages are in the queue.
    assert_eq!(message_count(&ctx.ch, &q).await, 2);
    // Selecting again is harmless.
    confirm_select(&ctx.ch)
        .await
        .expect("second confirm.select");
    assert_eq!(
        publish_confirmed(&ctx.ch, &q, b"three").await,
        Confirmation::Ack(None)
    );
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn publish_without_confirm_select_is_not_requested() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "cf-none").await;
    assert_eq!(
        publish_confirmed(&ctx.ch, &q, b"x").await,
        Confirmation::NotRequested
    );
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn many_publishes_are_all_acked() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "cf-many").await;
    confirm_select(&ctx.ch).await.expect("confirm.select");
    let n = 1000;
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        confirms.push(
            within(ctx.ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            ))
            .await
            .expect("publish"),
        );
    }
    let returned = within(ctx.ch.wait_for_confirms())
        .await
        .expect("wait_for_confirms");
    assert!(returned.is_empty());
    for c in confirms {
        assert_eq!(within(c).await.expect("confirm"), Confirmation::Ack(None));
    }
    assert_eq!(message_count(&ctx.ch, &q).await, n as u32);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn confirms_to_several_queues_and_unroutable_are_acked() {
    let ctx = setup().await;
    confirm_select(&ctx.ch).await.expect("confirm.select");
    let q1 = declare_queue(&ctx.ch, "cf-fan1").await;
    let q2 = declare_queue(&ctx.ch, "cf-fan2").await;
    let x = declare_exchange(&ctx.ch, "cf-fan", lapin::ExchangeKind::Fanout).await;
    bind(&ctx.ch, &q1, &x, "", FieldTable::default()).await;
    bind(&ctx.ch, &q2, &x, "", FieldTable::default()).await;
    let confirm = within(ctx.ch.basic_publish(
        x.as_str().into(),
        "".into(),
        BasicPublishOptions::default(),
        b"both",
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    assert_eq!(
        within(confirm).await.expect("confirm"),
        Confirmation::Ack(None)
    );
    assert_eq!(message_count(&ctx.ch, &q1).await, 1);
    assert_eq!(message_count(&ctx.ch, &q2).await, 1);
    // No queue at all: still acked.
    assert_eq!(
        publish_confirmed(&ctx.ch, &unique("cf-nobody"), b"void").await,
        Confirmation::Ack(None)
    );
    delete_queue(&ctx.ch, &q1).await;
    delete_queue(&ctx.ch, &q2).await;
    within(
        ctx.ch
            .exchange_delete(x.as_str().into(), Default::default()),
    )
    .await
    .expect("delete x");
}

#[tokio::test]
async fn confirm_select_on_tx_channel_is_406() {
    let ctx = setup().await;
    within(ctx.ch.tx_select()).await.expect("tx.select");
    let text = expect_channel_error(confirm_select(&ctx.ch).await, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - cannot switch from tx to confirm mode"
    );
}

#[tokio::test]
async fn tx_select_on_confirm_channel_is_406() {
    let ctx = setup().await;
    confirm_select(&ctx.ch).await.expect("confirm.select");
    let text = expect_channel_error(within(ctx.ch.tx_select()).await, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - cannot switch from confirm to tx mode"
    );
}

#[tokio::test]
async fn tx_commit_and_rollback_without_select_are_406() {
    let ctx = setup().await;
    let text = expect_channel_error(within(ctx.ch.tx_commit()).await, 406);
    assert_eq!(text, "PRECONDITION_FAILED - channel is not transactional");
    let ch = ctx.channel().await;
    let text = expect_channel_error(within(ch.tx_rollback()).await, 406);
    assert_eq!(text, "PRECONDITION_FAILED - channel is not transactional");
}

#[tokio::test]
async fn tx_publishes_invisible_until_commit() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "cf-tx-commit").await;
    let tx = ctx.channel().await;
    within(tx.tx_select()).await.expect("tx.select");
    // tx.select twice is fine.
    within(tx.tx_select()).await.expect("tx.select again");
    for i in 0..3 {
        send(&tx, &q, format!("m{i}").as_bytes()).await;
    }
    // Round-trip on the tx channel so the publishes certainly reached the broker.
    sync_probe(&tx).await.expect("probe");
    assert_eq!(
        message_count(&ctx.ch, &q).await,
        0,
        "not visible before commit"
    );
    within(tx.tx_commit()).await.expect("commit");
    assert_eq!(message_count(&ctx.ch, &q).await, 3, "visible after commit");
    assert_eq!(drain(&ctx.ch, &q).await, vec!["m0", "m1", "m2"]);
    // The channel stays transactional: the next batch also waits for a commit.
    send(&tx, &q, b"second").await;
    sync_probe(&tx).await.expect("probe");
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    within(tx.tx_commit()).await.expect("commit");
    assert_eq!(drain(&ctx.ch, &q).await, vec!["second"]);
    // An empty commit is fine.
    within(tx.tx_commit()).await.expect("empty commit");
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn tx_rollback_discards_publishes() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "cf-tx-rollback").await;
    let tx = ctx.channel().await;
    within(tx.tx_select()).await.expect("tx.select");
    send(&tx, &q, b"discarded").await;
    within(tx.tx_rollback()).await.expect("rollback");
    send(&tx, &q, b"kept").await;
    within(tx.tx_commit()).await.expect("commit");
    assert_eq!(drain(&ctx.ch, &q).await, vec!["kept"]);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn uncommitted_publishes_vanish_when_channel_closes() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "cf-tx-close").await;
    let tx = ctx.channel().await;
    within(tx.tx_select()).await.expect("tx.select");
    send(&tx, &q, b"never").await;
    within(tx.close(200, "OK".into())).await.expect("close");
    tokio::time::sleep(QUIET).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn tx_acks_take_effect_at_commit() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "cf-tx-ack").await;
    for i in 0..2 {
        send(&ctx.ch, &q, format!("m{i}").as_bytes()).await;
    }
    wait_message_count(&ctx.ch, &q, 2).await;
    let tx = ctx.channel().await;
    within(tx.tx_select()).await.expect("tx.select");
    for _ in 0..2 {
        let m = within(tx.basic_get(q.as_str().into(), BasicGetOptions::default()))
            .await
            .expect("get")
            .expect("message");
        within(m.delivery.acker.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    within(tx.tx_commit()).await.expect("commit");
    within(tx.close(200, "OK".into())).await.expect("close");
    // Committed acks are final: nothing comes back.
    tokio::time::sleep(QUIET).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn tx_rollback_undoes_acks() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "cf-tx-ack-rb").await;
    for i in 0..2 {
        send(&ctx.ch, &q, format!("m{i}").as_bytes()).await;
    }
    wait_message_count(&ctx.ch, &q, 2).await;
    let tx = ctx.channel().await;
    within(tx.tx_select()).await.expect("tx.select");
    let mut tags = Vec::new();
    for _ in 0..2 {
        let m = within(tx.basic_get(q.as_str().into(), BasicGetOptions::default()))
            .await
            .expect("get")
            .expect("message");
        tags.push(m.delivery.delivery_tag);
    }
    within(tx.basic_ack(tags[1], BasicAckOptions { multiple: true }))
        .await
        .expect("ack");
    within(tx.tx_rollback()).await.expect("rollback");
    // Rolled back: the messages are still unacked (not requeued yet)...
    tokio::time::sleep(QUIET).await;
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    // ...and can be acked again, in a new transaction.
    within(tx.basic_ack(tags[0], BasicAckOptions::default()))
        .await
        .expect("ack m0 again");
    within(tx.tx_commit()).await.expect("commit");
    // Closing the channel requeues the one still unacked, flagged redelivered.
    within(tx.close(200, "OK".into())).await.expect("close");
    wait_message_count(&ctx.ch, &q, 1).await;
    let m = within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("message");
    assert_eq!(m.delivery.data, b"m1");
    assert!(m.delivery.redelivered);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn channel_flow_true_is_accepted() {
    let ctx = setup().await;
    let active = within(ctx.ch.channel_flow(ChannelFlowOptions { active: true }))
        .await
        .expect("channel.flow(true)");
    assert!(active);
    sync_probe(&ctx.ch).await.expect("channel still open");
}

#[tokio::test]
async fn channel_flow_false_is_not_implemented_540() {
    // RabbitMQ 3.10 does not support client-initiated flow=false: it closes the
    // connection with 540 NOT_IMPLEMENTED.
    let ctx = setup().await;
    let res = within(ctx.ch.channel_flow(ChannelFlowOptions { active: false })).await;
    let text = expect_connection_error(res, 540);
    assert_eq!(text, "NOT_IMPLEMENTED - active=false");
}
