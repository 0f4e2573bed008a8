//! queue.declare / bind / unbind / purge / delete semantics.

mod common;

use common::*;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind, Queue};

async fn declare(ch: &Channel, name: &str, options: QueueDeclareOptions) -> lapin::Result<Queue> {
    within(ch.queue_declare(name.into(), options, FieldTable::default())).await
}

async fn declare_args(
    ch: &Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> lapin::Result<Queue> {
    within(ch.queue_declare(name.into(), options, args)).await
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    }
}

async fn delete(ch: &Channel, name: &str, options: QueueDeleteOptions) -> lapin::Result<u32> {
    within(ch.queue_delete(name.into(), options)).await
}

async fn queue_exists(ctx: &Ctx, name: &str) -> bool {
    let ch = ctx.channel().await;
    match declare(&ch, name, passive()).await {
        Ok(_) => true,
        Err(e) => {
            let (code, text, _) = amqp_error(&e);
            // 405: it exists but is exclusive to another connection.
            assert!(
                code == 404 || code == 405,
                "passive declare of {name}: {text}"
            );
            code == 405
        }
    }
}

/// Polls until `name` no longer exists (deletions triggered by disconnects and
/// cancels are asynchronous in RabbitMQ).
async fn wait_queue_gone(ctx: &Ctx, name: &str) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while queue_exists(ctx, name).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue {name} still exists"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn declare_returns_name_and_counts() {
    let ctx = setup().await;
    let name = unique("q-plain");
    let q = declare(&ctx.ch, &name, Default::default())
        .await
        .expect("declare");
    assert_eq!(q.name().as_str(), name);
    assert_eq!(q.message_count(), 0);
    assert_eq!(q.consumer_count(), 0);

    for i in 0..3 {
        send(&ctx.ch, &name, format!("m{i}").as_bytes()).await;
    }
    let other = ctx.channel().await;
    let _c1 = consume(&other, &name, false).await;
    let q = declare(&ctx.ch, &name, Default::default())
        .await
        .expect("redeclare");
    // The consumer (prefetch unlimited) took all three: they are unacked, not ready.
    assert_eq!(q.consumer_count(), 1);
    assert_eq!(q.message_count(), 0);
    delete(&ctx.ch, &name, Default::default())
        .await
        .expect("delete");
}

#[tokio::test]
async fn declare_ok_message_count_counts_ready_messages() {
    let ctx = setup().await;
    let name = declare_queue(&ctx.ch, "q-count").await;
    for i in 0..5 {
        send(&ctx.ch, &name, format!("m{i}").as_bytes()).await;
    }
    wait_message_count(&ctx.ch, &name, 5).await;
    let q = declare(&ctx.ch, &name, passive()).await.expect("passive");
    assert_eq!(q.message_count(), 5);
    assert_eq!(q.consumer_count(), 0);
    // A non-passive equivalent redeclare reports the same.
    let q = declare(&ctx.ch, &name, Default::default())
        .await
        .expect("redeclare");
    assert_eq!(q.message_count(), 5);
    delete(&ctx.ch, &name, Default::default())
        .await
        .expect("delete");
}

#[tokio::test]
async fn passive_declare_of_missing_queue_is_404() {
    let ctx = setup().await;
    let name = unique("q-missing");
    let text = expect_channel_error(declare(&ctx.ch, &name, passive()).await, 404);
    assert_eq!(text, format!("NOT_FOUND - no queue '{name}' in vhost '/'"));
    assert!(ctx.conn.status().connected());
}

#[tokio::test]
async fn durable_queue_and_durability_mismatch_is_406() {
    let ctx = setup().await;
    let name = unique("q-durable");
    declare(&ctx.ch, &name, QueueDeclareOptions::durable())
        .await
        .expect("durable declare");
    let text = expect_channel_error(declare(&ctx.ch, &name, Default::default()).await, 406);
    assert_eq!(
        text,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{name}' in vhost '/': \
             received 'false' but current is 'true'"
        )
    );
    let ch = ctx.channel().await;
    // Passive declare ignores durability.
    declare(&ch, &name, passive()).await.expect("passive");
    delete(&ch, &name, Default::default())
        .await
        .expect("delete");
}

#[tokio::test]
async fn redeclare_with_different_auto_delete_is_406() {
    let ctx = setup().await;
    let name = declare_queue(&ctx.ch, "q-readel").await;
    let res = declare(
        &ctx.ch,
        &name,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await;
    let text = expect_channel_error(res, 406);
    assert_eq!(
        text,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue '{name}' in vhost '/': \
             received 'true' but current is 'false'"
        )
    );
    let ch = ctx.channel().await;
    delete(&ch, &name, Default::default())
        .await
        .expect("delete");
}

#[tokio::test]
async fn redeclare_with_different_arguments_is_406() {
    let ctx = setup().await;
    let name = unique("q-args");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(10));
    declare_args(&ctx.ch, &name, Default::default(), args.clone())
        .await
        .expect("declare with args");
    // Same arguments: fine.
    declare_args(&ctx.ch, &name, Default::default(), args)
        .await
        .expect("equivalent redeclare");

    // Different value.
    let mut other = FieldTable::default();
    other.insert("x-max-length".into(), AMQPValue::LongInt(20));
    let text = expect_channel_error(
        declare_args(&ctx.ch, &name, Default::default(), other).await,
        406,
    );
    assert_eq!(
        text,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{name}' in vhost '/': \
             received '20' but current is '10'"
        )
    );

    // Argument missing on redeclare.
    let ch = ctx.channel().await;
    let text = expect_channel_error(declare(&ch, &name, Default::default()).await, 406);
    assert_eq!(
        text,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{name}' in vhost '/': \
             received none but current is the value '10' of type 'signedint'"
        )
    );
    let ch = ctx.channel().await;
    delete(&ch, &name, Default::default())
        .await
        .expect("delete");
}

#[tokio::test]
async fn server_named_queue() {
    let ctx = setup().await;
    let q = declare(&ctx.ch, "", exclusive()).await.expect("declare");
    let name = q.name().as_str().to_string();
    assert!(name.starts_with("amq.gen-"), "{name}");
    assert_eq!(name.len(), "amq.gen-".len() + 22, "{name}");
    let q2 = declare(&ctx.ch, "", exclusive()).await.expect("declare");
    assert_ne!(q2.name().as_str(), name, "names are unique");
    // It is a real queue.
    send(&ctx.ch, &name, b"hi").await;
    wait_message_count(&ctx.ch, &name, 1).await;
}

#[tokio::test]
async fn empty_queue_name_means_last_declared_queue() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "q-lastdecl-x", ExchangeKind::Fanout).await;
    let q = declare(&ctx.ch, "", exclusive()).await.expect("declare");
    // Bind with an empty queue name binds the channel's last declared queue.
    within(ctx.ch.queue_bind(
        "".into(),
        x.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind ''");
    publish(&ctx.ch, &x, "", b"via-last").await;
    wait_message_count(&ctx.ch, q.name().as_str(), 1).await;
    // basic.get with an empty queue name too.
    let got = within(
        ctx.ch
            .basic_get("".into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get ''")
    .expect("message");
    assert_eq!(got.delivery.data, b"via-last");
    within(
        ctx.ch
            .exchange_delete(x.as_str().into(), Default::default()),
    )
    .await
    .expect("delete x");
}

#[tokio::test]
async fn empty_queue_name_without_previous_declare_is_404() {
    let ctx = setup().await;
    let res = within(ctx.ch.queue_bind(
        "".into(),
        "amq.fanout".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_channel_error(res, 404);
    assert_eq!(text, "NOT_FOUND - no previously declared queue");
}

#[tokio::test]
async fn declaring_amq_prefixed_queue_is_403() {
    let ctx = setup().await;
    let name = format!("amq.{}", unique("q"));
    let text = expect_channel_error(declare(&ctx.ch, &name, Default::default()).await, 403);
    assert_eq!(
        text,
        format!("ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'")
    );
}

#[tokio::test]
async fn exclusive_queue_is_locked_for_other_connections() {
    let ctx = setup().await;
    let name = unique("q-excl");
    declare(&ctx.ch, &name, exclusive())
        .await
        .expect("declare exclusive");
    let locked = format!(
        "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in vhost '/'. \
         It could be originally declared on another connection or the exclusive property value \
         does not match that of the original declaration."
    );

    let other = ctx.connect().await;
    // Passive declare.
    let ch = within(other.create_channel()).await.expect("channel");
    let text = expect_channel_error(declare(&ch, &name, passive()).await, 405);
    assert_eq!(text, locked);
    // Consume.
    let ch = within(other.create_channel()).await.expect("channel");
    let res = within(ch.basic_consume(
        name.as_str().into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_channel_error(res.map(|_| ()), 405);
    assert_eq!(text, locked);
    // Delete.
    let ch = within(other.create_channel()).await.expect("channel");
    let text = expect_channel_error(delete(&ch, &name, Default::default()).await, 405);
    assert_eq!(text, locked);
    // Other connection's channel errors do not affect the owner.
    assert!(queue_exists(&ctx, &name).await);
    // The owner's other channels can use it.
    let mine = ctx.channel().await;
    send(&mine, &name, b"ok").await;
    wait_message_count(&mine, &name, 1).await;
}

#[tokio::test]
async fn redeclaring_shared_queue_as_exclusive_is_405() {
    let ctx = setup().await;
    let name = declare_queue(&ctx.ch, "q-notexcl").await;
    let text = expect_channel_error(declare(&ctx.ch, &name, exclusive()).await, 405);
    assert!(
        text.starts_with("RESOURCE_LOCKED - cannot obtain exclusive access to locked queue"),
        "{text}"
    );
    let ch = ctx.channel().await;
    delete(&ch, &name, Default::default())
        .await
        .expect("delete");
}

#[tokio::test]
async fn exclusive_queue_deleted_when_connection_closes() {
    let ctx = setup().await;
    let name = unique("q-excl-gone");
    let owner = ctx.connect().await;
    let ch = within(owner.create_channel()).await.expect("channel");
    declare(&ch, &name, exclusive()).await.expect("declare");
    send(&ch, &name, b"lost").await;
    assert!(queue_exists(&ctx, &name).await);
    within(owner.close(200, "bye".into())).await.expect("close");
    wait_queue_gone(&ctx, &name).await;
}

#[tokio::test]
async fn exclusive_queue_survives_its_channel_closing() {
    let ctx = setup().await;
    let name = unique("q-excl-chan");
    let ch = ctx.channel().await;
    declare(&ch, &name, exclusive()).await.expect("declare");
    within(ch.close(200, "OK".into())).await.expect("close");
    assert!(
        queue_exists(&ctx, &name).await,
        "exclusive is per connection"
    );
}

#[tokio::test]
async fn auto_delete_queue_deleted_after_last_consumer_cancels() {
    let ctx = setup().await;
    let name = unique("q-autodel");
    declare(
        &ctx.ch,
        &name,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare");
    // Never consumed: stays.
    assert!(queue_exists(&ctx, &name).await);

    let c1 = consume(&ctx.ch, &name, true).await;
    let c2 = consume(&ctx.ch, &name, true).await;
    within(ctx.ch.basic_cancel(c1.tag(), BasicCancelOptions::default()))
        .await
        .expect("cancel 1");
    assert!(queue_exists(&ctx, &name).await, "one consumer left");
    within(ctx.ch.basic_cancel(c2.tag(), BasicCancelOptions::default()))
        .await
        .expect("cancel 2");
    wait_queue_gone(&ctx, &name).await;
}

#[tokio::test]
async fn auto_delete_queue_deleted_when_consumer_channel_closes() {
    let ctx = setup().await;
    let name = unique("q-autodel-chan");
    declare(
        &ctx.ch,
        &name,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare");
    let ch = ctx.channel().await;
    let _c = consume(&ch, &name, false).await;
    within(ch.close(200, "OK".into())).await.expect("close");
    wait_queue_gone(&ctx, &name).await;
}

#[tokio::test]
async fn purge_returns_message_count() {
    let ctx = setup().await;
    let name = declare_queue(&ctx.ch, "q-purge").await;
    for i in 0..7 {
        send(&ctx.ch, &name, format!("m{i}").as_bytes()).await;
    }
    wait_message_count(&ctx.ch, &name, 7).await;
    let purged = within(
        ctx.ch
            .queue_purge(name.as_str().into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge");
    assert_eq!(purged, 7);
    assert_eq!(message_count(&ctx.ch, &name).await, 0);
    let purged = within(
        ctx.ch
            .queue_purge(name.as_str().into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge empty");
    assert_eq!(purged, 0);
    delete(&ctx.ch, &name, Default::default())
        .await
        .expect("delete");
}

#[tokio::test]
async fn purge_does_not_touch_unacked_messages() {
    let ctx = setup().await;
    let name = declare_queue(&ctx.ch, "q-purge-unacked").await;
    for i in 0..3 {
        send(&ctx.ch, &name, format!("m{i}").as_bytes()).await;
    }
    wait_message_count(&ctx.ch, &name, 3).await;
    let consumer_ch = ctx.channel().await;
    let got =
        within(consumer_ch.basic_get(name.as_str().into(), BasicGetOptions { no_ack: false }))
            .await
            .expect("get")
            .expect("message");
    let purged = within(
        ctx.ch
            .queue_purge(name.as_str().into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge");
    assert_eq!(purged, 2, "only ready messages are purged");
    // Closing the channel returns the unacked one.
    drop(got);
    within(consumer_ch.close(200, "OK".into()))
        .await
        .expect("close");
    wait_message_count(&ctx.ch, &name, 1).await;
    delete(&ctx.ch, &name, Default::default())
        .await
        .expect("delete");
}

#[tokio::test]
async fn purge_of_missing_queue_is_404() {
    let ctx = setup().await;
    let name = unique("q-purge-missing");
    let res = within(
        ctx.ch
            .queue_purge(name.as_str().into(), QueuePurgeOptions::default()),
    )
    .await;
    let text = expect_channel_error(res, 404);
    assert_eq!(text, format!("NOT_FOUND - no queue '{name}' in vhost '/'"));
}

#[tokio::test]
async fn delete_if_empty_on_non_empty_queue_is_406() {
    let ctx = setup().await;
    let name = declare_queue(&ctx.ch, "q-ifempty").await;
    send(&ctx.ch, &name, b"x").await;
    wait_message_count(&ctx.ch, &name, 1).await;
    let res = delete(
        &ctx.ch,
        &name,
        QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        },
    )
    .await;
    let text = expect_channel_error(res, 406);
    assert_eq!(
        text,
        format!("PRECONDITION_FAILED - queue '{name}' in vhost '/' not empty")
    );
    assert!(queue_exists(&ctx, &name).await);
    let ch = ctx.channel().await;
    assert_eq!(drain(&ch, &name).await.len(), 1);
    let n = delete(
        &ch,
        &name,
        QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        },
    )
    .await
    .expect("if-empty delete of empty queue");
    assert_eq!(n, 0);
}

#[tokio::test]
async fn delete_if_unused_with_consumer_is_406() {
    let ctx = setup().await;
    let name = declare_queue(&ctx.ch, "q-ifunused").await;
    let cons_ch = ctx.channel().await;
    let c = consume(&cons_ch, &name, false).await;
    let res = delete(
        &ctx.ch,
        &name,
        QueueDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    )
    .await;
    let text = expect_channel_error(res, 406);
    assert_eq!(
        text,
        format!("PRECONDITION_FAILED - queue '{name}' in vhost '/' in use")
    );
    within(cons_ch.basic_cancel(c.tag(), BasicCancelOptions::default()))
        .await
        .expect("cancel");
    let ch = ctx.channel().await;
    delete(
        &ch,
        &name,
        QueueDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    )
    .await
    .expect("if-unused delete without consumers");
    assert!(!queue_exists(&ctx, &name).await);
}

#[tokio::test]
async fn delete_returns_message_count() {
    let ctx = setup().await;
    let name = declare_queue(&ctx.ch, "q-delcount").await;
    for i in 0..4 {
        send(&ctx.ch, &name, format!("m{i}").as_bytes()).await;
    }
    wait_message_count(&ctx.ch, &name, 4).await;
    let n = delete(&ctx.ch, &name, Default::default())
        .await
        .expect("delete");
    assert_eq!(n, 4);
    assert!(!queue_exists(&ctx, &name).await);
}

#[tokio::test]
async fn delete_of_missing_queue_is_ok() {
    let ctx = setup().await;
    let name = unique("q-never");
    let n = delete(&ctx.ch, &name, Default::default())
        .await
        .expect("deleting a missing queue succeeds");
    assert_eq!(n, 0);
    let n = delete(
        &ctx.ch,
        &name,
        QueueDeleteOptions {
            if_empty: true,
            if_unused: true,
            ..Default::default()
        },
    )
    .await
    .expect("...also with if-empty/if-unused");
    assert_eq!(n, 0);
    sync_probe(&ctx.ch).await.expect("channel still open");
}

#[tokio::test]
async fn bind_to_missing_exchange_is_404() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "q-bind-nox").await;
    let x = unique("q-nox");
    let res = within(ctx.ch.queue_bind(
        q.as_str().into(),
        x.as_str().into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_channel_error(res, 404);
    assert_eq!(text, format!("NOT_FOUND - no exchange '{x}' in vhost '/'"));
    let ch = ctx.channel().await;
    delete(&ch, &q, Default::default()).await.expect("delete");
}

#[tokio::test]
async fn bind_missing_queue_is_404() {
    let ctx = setup().await;
    let q = unique("q-bind-noq");
    let res = within(ctx.ch.queue_bind(
        q.as_str().into(),
        "amq.direct".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_channel_error(res, 404);
    assert_eq!(text, format!("NOT_FOUND - no queue '{q}' in vhost '/'"));
}

#[tokio::test]
async fn bind_is_idempotent_and_unbind_stops_routing() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "q-unbind-x", ExchangeKind::Direct).await;
    let q = declare_queue(&ctx.ch, "q-unbind").await;
    bind(&ctx.ch, &q, &x, "k", FieldTable::default()).await;
    // Binding twice creates no second binding: one copy per publish.
    bind(&ctx.ch, &q, &x, "k", FieldTable::default()).await;
    publish(&ctx.ch, &x, "k", b"one").await;
    wait_message_count(&ctx.ch, &q, 1).await;

    within(ctx.ch.queue_unbind(
        q.as_str().into(),
        x.as_str().into(),
        "k".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind");
    publish(&ctx.ch, &x, "k", b"two").await;
    send(&ctx.ch, &q, b"marker").await;
    wait_message_count(&ctx.ch, &q, 2).await;
    assert_eq!(drain(&ctx.ch, &q).await, vec!["one", "marker"]);
    delete(&ctx.ch, &q, Default::default())
        .await
        .expect("delete");
    within(
        ctx.ch
            .exchange_delete(x.as_str().into(), Default::default()),
    )
    .await
    .expect("delete x");
}

#[tokio::test]
async fn deleting_queue_removes_its_bindings() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "q-delbind-x", ExchangeKind::Fanout).await;
    let q = declare_queue(&ctx.ch, "q-delbind").await;
    bind(&ctx.ch, &q, &x, "", FieldTable::default()).await;
    delete(&ctx.ch, &q, Default::default())
        .await
        .expect("delete");
    // Recreate with the same name: the old binding is gone.
    declare_named_queue(&ctx.ch, &q).await;
    publish(&ctx.ch, &x, "", b"lost").await;
    send(&ctx.ch, &q, b"marker").await;
    wait_message_count(&ctx.ch, &q, 1).await;
    assert_eq!(drain(&ctx.ch, &q).await, vec!["marker"]);
    delete(&ctx.ch, &q, Default::default())
        .await
        .expect("delete");
    within(
        ctx.ch
            .exchange_delete(x.as_str().into(), Default::default()),
    )
    .await
    .expect("delete x");
}
