//! exchange.declare / delete / bind / unbind semantics.

mod common;

use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, ExchangeUnbindOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, ExchangeKind};

fn passive() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

async fn declare(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    options: ExchangeDeclareOptions,
) -> lapin::Result<()> {
    within(ch.exchange_declare(name.into(), kind, options, FieldTable::default())).await
}

async fn delete(ch: &Channel, name: &str, if_unused: bool) -> lapin::Result<()> {
    within(ch.exchange_delete(
        name.into(),
        ExchangeDeleteOptions {
            if_unused,
            ..Default::default()
        },
    ))
    .await
}

async fn exists(ctx: &Ctx, name: &str) -> bool {
    let ch = ctx.channel().await;
    match declare(&ch, name, ExchangeKind::Direct, passive()).await {
        Ok(()) => true,
        Err(e) => {
            let (code, _, _) = amqp_error(&e);
            assert_eq!(code, 404, "passive declare of {name}");
            false
        }
    }
}

#[tokio::test]
async fn declare_each_type_and_passive_declare_them() {
    let ctx = setup().await;
    for kind in [
        ExchangeKind::Direct,
        ExchangeKind::Fanout,
        ExchangeKind::Topic,
        ExchangeKind::Headers,
    ] {
        let name = unique("x-type");
        declare(&ctx.ch, &name, kind.clone(), Default::default())
            .await
            .unwrap_or_else(|e| panic!("declare {kind:?}: {e}"));
        // Redeclaring with identical settings is a no-op.
        declare(&ctx.ch, &name, kind.clone(), Default::default())
            .await
            .expect("identical redeclare");
        // Passive declare ignores the type.
        declare(&ctx.ch, &name, ExchangeKind::Fanout, passive())
            .await
            .expect("passive declare");
        delete(&ctx.ch, &name, false).await.expect("delete");
    }
}

#[tokio::test]
async fn durable_exchange_declare_and_delete() {
    let ctx = setup().await;
    let name = unique("x-durable");
    declare(
        &ctx.ch,
        &name,
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
    )
    .await
    .expect("durable declare");
    assert!(exists(&ctx, &name).await);
    delete(&ctx.ch, &name, false).await.expect("delete");
    assert!(!exists(&ctx, &name).await);
}

#[tokio::test]
async fn passive_declare_of_missing_exchange_is_404() {
    let ctx = setup().await;
    let name = unique("x-missing");
    let text = expect_channel_error(
        declare(&ctx.ch, &name, ExchangeKind::Direct, passive()).await,
        404,
    );
    assert_eq!(
        text,
        format!("NOT_FOUND - no exchange '{name}' in vhost '/'")
    );
    // Only the channel died.
    assert!(ctx.conn.status().connected());
}

#[tokio::test]
async fn redeclare_with_different_type_is_406() {
    let ctx = setup().await;
    let name = declare_exchange(&ctx.ch, "x-retype", ExchangeKind::Direct).await;
    let res = declare(&ctx.ch, &name, ExchangeKind::Fanout, Default::default()).await;
    let text = expect_channel_error(res, 406);
    assert_eq!(
        text,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{name}' in vhost '/': \
             received 'fanout' but current is 'direct'"
        )
    );
    let ch = ctx.channel().await;
    delete(&ch, &name, false).await.expect("delete");
}

#[tokio::test]
async fn redeclare_with_different_durability_is_406() {
    let ctx = setup().await;
    let name = declare_exchange(&ctx.ch, "x-redurable", ExchangeKind::Direct).await;
    let res = declare(
        &ctx.ch,
        &name,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
    )
    .await;
    let text = expect_channel_error(res, 406);
    assert_eq!(
        text,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange '{name}' in vhost '/': \
             received 'true' but current is 'false'"
        )
    );
    let ch = ctx.channel().await;
    delete(&ch, &name, false).await.expect("delete");
}

#[tokio::test]
async fn redeclare_with_different_auto_delete_is_406() {
    let ctx = setup().await;
    let name = declare_exchange(&ctx.ch, "x-readel", ExchangeKind::Direct).await;
    let res = declare(
        &ctx.ch,
        &name,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await;
    let text = expect_channel_error(res, 406);
    assert_eq!(
        text,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for exchange '{name}' in vhost '/': \
             received 'true' but current is 'false'"
        )
    );
    let ch = ctx.channel().await;
    delete(&ch, &name, false).await.expect("delete");
}

#[tokio::test]
async fn predeclared_amq_exchanges_exist() {
    let ctx = setup().await;
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        declare(&ctx.ch, name, kind.clone(), passive())
            .await
            .unwrap_or_else(|e| panic!("passive declare {name}: {e}"));
        // A non-passive redeclare with the same (durable) settings is allowed too.
        declare(
            &ctx.ch,
            name,
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("equivalent redeclare {name}: {e}"));
    }
}

#[tokio::test]
async fn declaring_amq_prefixed_name_is_403() {
    let ctx = setup().await;
    let name = format!("amq.{}", unique("custom"));
    let res = declare(&ctx.ch, &name, ExchangeKind::Direct, Default::default()).await;
    let text = expect_channel_error(res, 403);
    assert_eq!(
        text,
        format!("ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'")
    );
}

#[tokio::test]
async fn deleting_amq_direct_is_403() {
    let ctx = setup().await;
    let text = expect_channel_error(delete(&ctx.ch, "amq.direct", false).await, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed"
    );
    assert!(exists(&ctx, "amq.direct").await);
}

#[tokio::test]
async fn default_exchange_cannot_be_declared_deleted_bound_or_unbound() {
    let ctx = setup().await;
    let text = expect_channel_error(
        declare(&ctx.ch, "", ExchangeKind::Direct, Default::default()).await,
        403,
    );
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );

    let ch = ctx.channel().await;
    let text = expect_channel_error(delete(&ch, "", false).await, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );

    let ch = ctx.channel().await;
    let q = declare_queue(&ch, "x-default-bind").await;
    let res = within(ch.queue_bind(
        q.as_str().into(),
        "".into(),
        q.as_str().into(),
        Default::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_channel_error(res, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );

    // Nor can a queue's implicit binding to it be removed.
    let ch = ctx.channel().await;
    let res = within(ch.queue_unbind(
        q.as_str().into(),
        "".into(),
        q.as_str().into(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_channel_error(res, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );

    // Even a passive declare of the default exchange is refused.
    let ch = ctx.channel().await;
    let text = expect_channel_error(declare(&ch, "", ExchangeKind::Direct, passive()).await, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );

    let ch = ctx.channel().await;
    within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .expect("delete queue");
}

#[tokio::test]
async fn delete_if_unused_with_bindings_is_406() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "x-inuse", ExchangeKind::Direct).await;
    let q = declare_queue(&ctx.ch, "x-inuse-q").await;
    bind(&ctx.ch, &q, &x, "k", FieldTable::default()).await;
    let text = expect_channel_error(delete(&ctx.ch, &x, true).await, 406);
    assert_eq!(
        text,
        format!("PRECONDITION_FAILED - exchange '{x}' in vhost '/' in use")
    );

    // After unbinding, if-unused delete succeeds.
    let ch = ctx.channel().await;
    within(ch.queue_unbind(
        q.as_str().into(),
        x.as_str().into(),
        "k".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind");
    delete(&ch, &x, true).await.expect("if-unused delete");
    assert!(!exists(&ctx, &x).await);
    within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .expect("delete queue");
}

#[tokio::test]
async fn delete_if_unused_counts_exchange_to_exchange_bindings_as_source_only() {
    let ctx = setup().await;
    let src = declare_exchange(&ctx.ch, "x-e2e-src", ExchangeKind::Fanout).await;
    let dst = declare_exchange(&ctx.ch, "x-e2e-dst", ExchangeKind::Fanout).await;
    within(ctx.ch.exchange_bind(
        dst.as_str().into(),
        src.as_str().into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("exchange.bind");
    // The source has a binding: in use.
    expect_channel_error(delete(&ctx.ch, &src, true).await, 406);
    // The destination has no outgoing bindings: deletable with if-unused.
    let ch = ctx.channel().await;
    delete(&ch, &dst, true).await.expect("delete destination");
    // Deleting the destination removed the binding, so the source is now unused.
    delete(&ch, &src, true).await.expect("delete source");
}

#[tokio::test]
async fn delete_of_missing_exchange_is_ok() {
    let ctx = setup().await;
    let name = unique("x-never-existed");
    delete(&ctx.ch, &name, false)
        .await
        .expect("RabbitMQ 3.x: deleting a missing exchange succeeds");
    delete(&ctx.ch, &name, true)
        .await
        .expect("...also with if-unused");
    sync_probe(&ctx.ch).await.expect("channel still open");
}

#[tokio::test]
async fn exchange_to_exchange_bind_and_unbind_route_messages() {
    let ctx = setup().await;
    let src = declare_exchange(&ctx.ch, "x-e2e-route-src", ExchangeKind::Direct).await;
    let dst = declare_exchange(&ctx.ch, "x-e2e-route-dst", ExchangeKind::Fanout).await;
    let q = declare_queue(&ctx.ch, "x-e2e-route-q").await;
    bind(&ctx.ch, &q, &dst, "", FieldTable::default()).await;
    within(ctx.ch.exchange_bind(
        dst.as_str().into(),
        src.as_str().into(),
        "k".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("exchange.bind");

    publish(&ctx.ch, &src, "k", b"via-binding").await;
    publish(&ctx.ch, &src, "other", b"not-matching").await;
    wait_message_count(&ctx.ch, &q, 1).await;
    let msg = within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("message");
    assert_eq!(msg.delivery.data, b"via-binding");
    // The delivery reports the exchange the message was published to.
    assert_eq!(msg.delivery.exchange.as_str(), src);
    assert_eq!(msg.delivery.routing_key.as_str(), "k");

    within(ctx.ch.exchange_unbind(
        dst.as_str().into(),
        src.as_str().into(),
        "k".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("exchange.unbind");
    publish(&ctx.ch, &src, "k", b"after-unbind").await;
    // A marker published directly shows the unbound message did not arrive.
    send(&ctx.ch, &q, b"marker").await;
    wait_message_count(&ctx.ch, &q, 1).await;
    assert_eq!(drain(&ctx.ch, &q).await, vec!["marker".to_string()]);

    within(
        ctx.ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete q");
    delete(&ctx.ch, &src, false).await.expect("delete src");
    delete(&ctx.ch, &dst, false).await.expect("delete dst");
}

#[tokio::test]
async fn exchange_bind_to_missing_exchange_is_404() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "x-bind-missing", ExchangeKind::Direct).await;
    let missing = unique("x-nope");
    let res = within(ctx.ch.exchange_bind(
        x.as_str().into(),
        missing.as_str().into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_channel_error(res, 404);
    assert_eq!(
        text,
        format!("NOT_FOUND - no exchange '{missing}' in vhost '/'")
    );

    let ch = ctx.channel().await;
    let res = within(ch.exchange_bind(
        missing.as_str().into(),
        x.as_str().into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let text = expect_channel_error(res, 404);
    assert_eq!(
        text,
        format!("NOT_FOUND - no exchange '{missing}' in vhost '/'")
    );

    let ch = ctx.channel().await;
    delete(&ch, &x, false).await.expect("delete");
}

#[tokio::test]
async fn publishing_to_internal_exchange_is_403() {
    let ctx = setup().await;
    let name = unique("x-internal");
    declare(
        &ctx.ch,
        &name,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare internal");
    within(ctx.ch.basic_publish(
        name.as_str().into(),
        "".into(),
        BasicPublishOptions::default(),
        b"nope",
        BasicProperties::default(),
    ))
    .await
    .expect("publish is sent");
    let text = ctx.channel_closed(403).await;
    assert_eq!(
        text,
        format!("ACCESS_REFUSED - cannot publish to internal exchange '{name}' in vhost '/'")
    );
    let ch = ctx.channel().await;
    delete(&ch, &name, false).await.expect("delete");
}

#[tokio::test]
async fn internal_exchange_receives_via_exchange_binding() {
    let ctx = setup().await;
    let front = declare_exchange(&ctx.ch, "x-front", ExchangeKind::Fanout).await;
    let internal = unique("x-internal-dst");
    declare(
        &ctx.ch,
        &internal,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare internal");
    let q = declare_queue(&ctx.ch, "x-internal-q").await;
    bind(&ctx.ch, &q, &internal, "", FieldTable::default()).await;
    within(ctx.ch.exchange_bind(
        internal.as_str().into(),
        front.as_str().into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind");
    publish(&ctx.ch, &front, "", b"through").await;
    wait_message_count(&ctx.ch, &q, 1).await;
    assert_eq!(drain(&ctx.ch, &q).await, vec!["through".to_string()]);
    within(
        ctx.ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete q");
    delete(&ctx.ch, &front, false).await.expect("delete");
    delete(&ctx.ch, &internal, false).await.expect("delete");
}

#[tokio::test]
async fn auto_delete_exchange_goes_when_last_queue_binding_removed() {
    let ctx = setup().await;
    let x = unique("x-autodel");
    declare(
        &ctx.ch,
        &x,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare");
    // Never bound: an auto-delete exchange stays.
    assert!(exists(&ctx, &x).await);

    let q1 = declare_queue(&ctx.ch, "x-autodel-q1").await;
    let q2 = declare_queue(&ctx.ch, "x-autodel-q2").await;
    bind(&ctx.ch, &q1, &x, "a", FieldTable::default()).await;
    bind(&ctx.ch, &q2, &x, "b", FieldTable::default()).await;

    within(ctx.ch.queue_unbind(
        q1.as_str().into(),
        x.as_str().into(),
        "a".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind q1");
    assert!(exists(&ctx, &x).await, "still has a binding");

    within(ctx.ch.queue_unbind(
        q2.as_str().into(),
        x.as_str().into(),
        "b".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind q2");
    assert!(!exists(&ctx, &x).await, "auto-deleted after last unbind");

    for q in [q1, q2] {
        within(
            ctx.ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
        )
        .await
        .expect("delete q");
    }
}

#[tokio::test]
async fn auto_delete_exchange_goes_when_bound_queue_is_deleted() {
    let ctx = setup().await;
    let x = unique("x-autodel-qdel");
    declare(
        &ctx.ch,
        &x,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare");
    let q = declare_queue(&ctx.ch, "x-autodel-qdel-q").await;
    bind(&ctx.ch, &q, &x, "", FieldTable::default()).await;
    within(
        ctx.ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete q");
    assert!(!exists(&ctx, &x).await);
}

#[tokio::test]
async fn auto_delete_exchange_goes_when_last_exchange_binding_removed() {
    let ctx = setup().await;
    let src = unique("x-autodel-src");
    declare(
        &ctx.ch,
        &src,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare");
    let dst = declare_exchange(&ctx.ch, "x-autodel-dst", ExchangeKind::Fanout).await;
    within(ctx.ch.exchange_bind(
        dst.as_str().into(),
        src.as_str().into(),
        "".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind");
    within(ctx.ch.exchange_unbind(
        dst.as_str().into(),
        src.as_str().into(),
        "".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind");
    assert!(!exists(&ctx, &src).await);
    assert!(exists(&ctx, &dst).await, "destination is not auto-delete");
    delete(&ctx.ch, &dst, false).await.expect("delete");
}

#[tokio::test]
async fn unbind_of_missing_binding_is_ok() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "x-unbind-none", ExchangeKind::Direct).await;
    let q = declare_queue(&ctx.ch, "x-unbind-none-q").await;
    within(ctx.ch.queue_unbind(
        q.as_str().into(),
        x.as_str().into(),
        "never-bound".into(),
        FieldTable::default(),
    ))
    .await
    .expect("unbinding a binding that does not exist succeeds");
    sync_probe(&ctx.ch).await.expect("channel still open");
    within(
        ctx.ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("delete q");
    delete(&ctx.ch, &x, false).await.expect("delete");
}

#[tokio::test]
async fn unknown_exchange_type_closes_connection_with_503() {
    let ctx = setup().await;
    let name = unique("x-badtype");
    let res = declare(
        &ctx.ch,
        &name,
        ExchangeKind::Custom("x-no-such-type".into()),
        Default::default(),
    )
    .await;
    let text = expect_connection_error(res, 503);
    assert_eq!(
        text,
        "COMMAND_INVALID - unknown exchange type 'x-no-such-type'"
    );
    wait_disconnected(&ctx.conn).await;
    // Nothing was created.
    let conn = ctx.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    let res = declare(&ch, &name, ExchangeKind::Direct, passive()).await;
    expect_channel_error(res, 404);
}

#[tokio::test]
async fn queue_unbind_from_missing_exchange_is_ok() {
    // RabbitMQ 3.10: unbinding from an exchange that does not exist succeeds.
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "x-unbind-missing-x").await;
    let missing = unique("x-gone");
    let res = within(ctx.ch.queue_unbind(
        q.as_str().into(),
        missing.as_str().into(),
        "k".into(),
        FieldTable::default(),
    ))
    .await;
    res.expect("unbind from a missing exchange succeeds in RabbitMQ 3.10");
    let ch = ctx.channel().await;
    within(ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()))
        .await
        .expect("delete q");
}
