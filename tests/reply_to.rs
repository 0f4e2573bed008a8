//! Direct reply-to (`amq.rabbitmq.reply-to`): RPC replies that reach the
//! requesting channel without a reply queue, with RabbitMQ 3.10's errors.

mod common;

use common::*;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Consumer};

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Starts the channel's reply consumer (no-ack, as direct reply-to demands).
async fn consume_replies(ch: &Channel) -> Consumer {
    consume(ch, REPLY_TO, true).await
}

fn asking_for_reply() -> BasicProperties {
    BasicProperties::default().with_reply_to(REPLY_TO.into())
}

/// The next message of `queue`, waiting for it: a request published on
/// another connection without confirms may still be on its way.
async fn get_request(reader: &Channel, queue: &str) -> lapin::message::Delivery {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let got = within(reader.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
            .await
            .expect("basic.get");
        if let Some(m) = got {
            return m.delivery;
        }
        assert!(tokio::time::Instant::now() < deadline, "no request arrived");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Sends a request asking for a direct reply to `queue` and returns the
/// reply name the broker put in its `reply_to`.
async fn request_reply_name(requester: &Channel, reader: &Channel, queue: &str) -> String {
    publish_with(requester, "", queue, b"request", asking_for_reply()).await;
    let request = get_request(reader, queue).await;
    let reply_to = request.properties.reply_to().clone().expect("reply_to");
    reply_to.as_str().to_owned()
}

/// Publishes a reply on a confirm channel and returns its confirmation.
async fn reply(ch: &Channel, name: &str, body: &[u8], mandatory: bool) -> Confirmation {
    let confirm = within(ch.basic_publish(
        "".into(),
        name.into(),
        BasicPublishOptions {
            mandatory,
            ..Default::default()
        },
        body,
        BasicProperties::default(),
    ))
    .await
    .expect("basic.publish");
    within(confirm).await.expect("publisher confirm")
}

fn returned_as_no_route(confirmation: Confirmation, name: &str) {
    match confirmation {
        Confirmation::Ack(Some(returned)) => {
            assert_eq!(returned.reply_code, 312);
            assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
            assert_eq!(returned.delivery.routing_key.as_str(), name);
        }
        other => panic!("expected an ack with a basic.return, got {other:?}"),
    }
}

/// Publishes on a fresh connection, which the broker answers with a channel
/// error `code`: returns its text.
async fn publish_fails(
    ctx: &Ctx,
    exchange: &str,
    key: &str,
    props: BasicProperties,
    code: u16,
) -> String {
    let conn = ctx.connect().await;
    let mut errors = ErrorWatch::new(&conn);
    let ch = within(conn.create_channel()).await.expect("channel");
    within(ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        b"request",
        props,
    ))
    .await
    .expect("publish");
    expect_channel_error::<()>(Err(errors.next().await), code)
}

async fn declare_fails_with_404(ctx: &Ctx, name: &str) {
    let ch = ctx.channel().await;
    let res = within(ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    assert_eq!(
        expect_channel_error(res, 404),
        format!("NOT_FOUND - no queue '{name}' in vhost '/'")
    );
}

#[tokio::test]
async fn rpc_round_trip_through_a_private_reply_name() {
    let ctx = setup().await;
    let requests = declare_queue(&ctx.ch, "rt-requests").await;
    let mut replies = consume_replies(&ctx.ch).await;

    // The responder is another connection; it reads the request and answers
    // the name it finds in reply_to.
    let responder_conn = ctx.connect().await;
    let responder = within(responder_conn.create_channel()).await.unwrap();
    confirm_select(&responder).await;
    let mut headers = FieldTable::default();
    headers.insert("kept".into(), AMQPValue::LongString("yes".into()));
    let props = asking_for_reply()
        .with_correlation_id("call-1".into())
        .with_headers(headers);
    publish_with(&ctx.ch, "", &requests, b"2+2", props).await;
    let request = get_request(&responder, &requests).await;
    let p = &request.properties;
    let name = p.reply_to().clone().expect("reply_to").to_string();
    assert!(
        name.starts_with("amq.rabbitmq.reply-to.") && name.len() > REPLY_TO.len() + 16,
        "a private reply name, got {name}"
    );
    assert_eq!(
        p.correlation_id().as_ref().map(|c| c.as_str()),
        Some("call-1")
    );
    let kept = p
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("kept").cloned());
    assert_eq!(kept, Some(AMQPValue::LongString("yes".into())));

    // While the requester listens, the name and the pseudo-queue "exist":
    // empty, with one consumer.
    for queue in [name.as_str(), REPLY_TO] {
        let declared = passive_declare(&responder, queue).await;
        assert_eq!(
            (declared.message_count(), declared.consumer_count()),
            (0, 1)
        );
    }

    // Replies reach the requester in order, as no-ack deliveries.
    for n in 1..=3 {
        let props = BasicProperties::default().with_correlation_id("call-1".into());
        let confirm = within(responder.basic_publish(
            "".into(),
            name.as_str().into(),
            BasicPublishOptions::default(),
            format!("4 (#{n})").as_bytes(),
            props,
        ))
        .await
        .unwrap();
        assert_eq!(within(confirm).await.unwrap(), Confirmation::Ack(None));
    }
    for n in 1..=3 {
        let d = next_delivery(&mut replies).await;
        assert_eq!(d.data, format!("4 (#{n})").as_bytes());
        assert_eq!(d.exchange.as_str(), "");
        assert_eq!(d.routing_key.as_str(), name);
        assert!(!d.redelivered);
        let correlation = d
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string());
        assert_eq!(correlation.as_deref(), Some("call-1"));
    }

    // RabbitMQ 3.10 counts a reply as routed to no queue: a mandatory reply
    // is delivered and also comes back as NO_ROUTE.
    returned_as_no_route(reply(&responder, &name, b"mandatory", true).await, &name);
    assert_eq!(next_delivery(&mut replies).await.data, b"mandatory");

    // Only the default exchange knows reply names.
    let x = declare_exchange(&responder, "rt-direct", lapin::ExchangeKind::Direct).await;
    let confirm = within(responder.basic_publish(
        x.as_str().into(),
        name.as_str().into(),
        BasicPublishOptions::default(),
        b"via an exchange",
        BasicProperties::default(),
    ))
    .await
    .unwrap();
    assert_eq!(within(confirm).await.unwrap(), Confirmation::Ack(None));
    assert_no_delivery(&mut replies).await;

    delete_exchange(&responder, &x).await;
    delete_queue(&ctx.ch, &requests).await;
}

#[tokio::test]
async fn misuse_is_refused_as_rabbitmq_does() {
    let ctx = setup().await;

    // The reply consumer must be no-ack: replies are never queued to
    // redeliver. That is checked first, before "already set".
    for with_reply_consumer in [false, true] {
        let ch = ctx.channel().await;
        if with_reply_consumer {
            consume_replies(&ch).await;
        }
        let res = try_consume(&ch, REPLY_TO, false).await;
        assert_eq!(
            expect_channel_error(res, 406),
            "PRECONDITION_FAILED - reply consumer cannot acknowledge"
        );
    }

    // One reply consumer per channel.
    let ch = ctx.channel().await;
    consume_replies(&ch).await;
    let res = try_consume(&ch, REPLY_TO, true).await;
    assert_eq!(
        expect_channel_error(res, 406),
        "PRECONDITION_FAILED - reply consumer already set"
    );

    // Asking for a direct reply needs a reply consumer on the publishing
    // channel. That is checked after the exchange lookup and before user_id.
    let queue = declare_queue(&ctx.ch, "rt-no-consumer").await;
    let no_consumer = "PRECONDITION_FAILED - fast reply consumer does not exist";
    let impostor = BasicProperties::default().with_user_id("mallory".into());
    let missing = "NOT_FOUND - no exchange 'rt-missing-exchange' in vhost '/'";
    for (exchange, props, code, text) in [
        ("", asking_for_reply(), 406, no_consumer),
        (
            "",
            impostor.with_reply_to(REPLY_TO.into()),
            406,
            no_consumer,
        ),
        ("rt-missing-exchange", asking_for_reply(), 404, missing),
    ] {
        assert_eq!(
            publish_fails(&ctx, exchange, &queue, props, code).await,
            text
        );
    }
    assert_eq!(
        message_count(&ctx.ch, &queue).await,
        0,
        "nothing was routed"
    );

    // The pseudo-queue cannot be read with basic.get.
    let ch = ctx.channel().await;
    let res = within(ch.basic_get(REPLY_TO.into(), BasicGetOptions { no_ack: true })).await;
    assert_eq!(
        expect_channel_error(res, 404),
        format!("NOT_FOUND - no queue '{REPLY_TO}' in vhost '/'")
    );

    // Declaring the pseudo-queue answers declare-ok, even without a reply
    // consumer; a made-up reply name does not exist.
    let ch = ctx.channel().await;
    let declared = passive_declare(&ch, REPLY_TO).await;
    assert_eq!(declared.name().as_str(), REPLY_TO);
    assert_eq!(
        (declared.message_count(), declared.consumer_count()),
        (0, 1)
    );
    declare_fails_with_404(&ctx, "amq.rabbitmq.reply-to.made-up").await;
    declare_fails_with_404(&ctx, "amq.rabbitmq.reply-toX").await;

    // A reply name is not a queue to consume from.
    let ch = ctx.channel().await;
    let res = try_consume(&ch, "amq.rabbitmq.reply-to.made-up", true).await;
    assert_eq!(
        expect_channel_error(res, 404),
        "NOT_FOUND - no queue 'amq.rabbitmq.reply-to.made-up' in vhost '/'"
    );

    delete_queue(&ctx.ch, &queue).await;
}

#[tokio::test]
async fn a_reply_name_dies_with_its_consumer_channel_and_connection() {
    let ctx = setup().await;
    let requests = declare_queue(&ctx.ch, "rt-dying").await;
    let responder = ctx.channel().await;
    confirm_select(&responder).await;

    // Cancelling the reply consumer ends its name; a new consumer on the
    // same channel gets a new name, and the old one does not reach it.
    let requester = ctx.channel().await;
    let first = consume_replies(&requester).await;
    let old = request_reply_name(&requester, &ctx.ch, &requests).await;
    cancel(&requester, first).await;
    declare_fails_with_404(&ctx, &old).await;
    let mut second = consume_replies(&requester).await;
    let new = request_reply_name(&requester, &ctx.ch, &requests).await;
    assert_ne!(old, new);
    assert_eq!(
        reply(&responder, &old, b"stale", false).await,
        Confirmation::Ack(None)
    );
    assert_eq!(
        reply(&responder, &new, b"fresh", false).await,
        Confirmation::Ack(None)
    );
    assert_eq!(next_delivery(&mut second).await.data, b"fresh");
    assert_no_delivery(&mut second).await;

    // Once the channel is closed, a late reply is dropped: confirmed all the
    // same, and returned when mandatory.
    within(requester.close(200, "done".into())).await.unwrap();
    assert_eq!(
        reply(&responder, &new, b"late", false).await,
        Confirmation::Ack(None)
    );
    returned_as_no_route(reply(&responder, &new, b"late", true).await, &new);
    declare_fails_with_404(&ctx, &new).await;

    // The same when the requester's whole connection goes.
    let conn = ctx.connect().await;
    let requester = within(conn.create_channel()).await.unwrap();
    let _replies = consume_replies(&requester).await;
    let name = request_reply_name(&requester, &ctx.ch, &requests).await;
    passive_declare(&responder, &name).await;
    within(conn.close(200, "done".into())).await.unwrap();
    assert_eq!(
        reply(&responder, &name, b"late", false).await,
        Confirmation::Ack(None)
    );
    returned_as_no_route(reply(&responder, &name, b"late", true).await, &name);
    declare_fails_with_404(&ctx, &name).await;

    // The responder's channel saw nothing but acks and returns.
    sync_probe(&responder)
        .await
        .expect("responder channel still open");
    delete_queue(&ctx.ch, &requests).await;
}
