//! Connection-level behaviour: handshake, negotiation, authentication, vhosts,
//! channel lifecycle.

mod common;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use common::*;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::ExchangeKind;

#[tokio::test]
async fn connect_with_default_credentials() {
    let broker = TestBroker::start();
    let conn = connect(&broker).await;
    assert!(conn.status().connected());
    assert_eq!(conn.status().vhost().as_str(), "/");
    assert_eq!(conn.status().username(), "guest");
    let ch = within(conn.create_channel()).await.expect("channel");
    assert!(ch.status().connected());
    // close resolves once the broker answered close-ok.
    within(conn.close(200, "bye".into()))
        .await
        .expect("close connection");
    wait_disconnected(&conn).await;
}

#[tokio::test]
async fn server_properties_and_capabilities() {
    let broker = TestBroker::start();
    let mut raw = raw::RawConn::open(broker.addr()).await;
    let start = raw.read_start().await;
    assert_eq!(start.version_major, 0);
    assert_eq!(start.version_minor, 9);

    let props = &start.server_properties;
    for key in ["product", "version", "platform", "copyright", "information"] {
        match props.inner().get(key) {
            Some(AMQPValue::LongString(s)) => assert!(!s.as_bytes().is_empty(), "{key} empty"),
            other => panic!("server property {key}: {other:?}"),
        }
    }
    let caps = match props.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(t)) => t.clone(),
        other => panic!("capabilities: {other:?}"),
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        assert_eq!(
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap}"
        );
    }

    let mechanisms = start.mechanisms.to_string();
    let mechanisms: Vec<&str> = mechanisms.split_whitespace().collect();
    assert!(mechanisms.contains(&"PLAIN"), "mechanisms {mechanisms:?}");
    assert!(
        mechanisms.contains(&"AMQPLAIN"),
        "mechanisms {mechanisms:?}"
    );
    assert_eq!(start.locales.to_string(), "en_US");
}

#[tokio::test]
async fn server_tune_proposes_rabbitmq_defaults() {
    let broker = TestBroker::start();
    let mut raw = raw::RawConn::open(broker.addr()).await;
    raw.read_start().await;
    match raw.start_ok_plain("guest", "guest").await {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) => {
            assert_eq!(tune.channel_max, 2047);
            assert_eq!(tune.frame_max, 131072);
            assert_eq!(tune.heartbeat, 60);
        }
        other => panic!("expected connection.tune, got {other:?}"),
    }
}

/// Sends `header` and asserts the server answers with the 0-9-1 protocol header and
/// then closes the socket.
async fn assert_header_rejected(header: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = TestBroker::start();
    let mut stream = within(tokio::net::TcpStream::connect(broker.addr()))
        .await
        .expect("tcp connect");
    within(stream.write_all(header)).await.expect("write");
    let mut buf = [0u8; 8];
    within(stream.read_exact(&mut buf)).await.expect("read");
    assert_eq!(&buf, b"AMQP\x00\x00\x09\x01");
    // ...and then the server closes the socket.
    let mut rest = Vec::new();
    let n = within(stream.read_to_end(&mut rest)).await.unwrap_or(0);
    assert_eq!(n, 0, "nothing after the protocol header");
}

#[tokio::test]
async fn unsupported_protocol_version_gets_supported_header_back() {
    assert_header_rejected(b"AMQP\x00\x00\x0a\x00").await;
}

#[tokio::test]
async fn garbage_header_gets_supported_header_back() {
    assert_header_rejected(b"GET / HTTP/1.1\r\n\r\n").await;
}

#[tokio::test]
async fn negotiated_limits_when_client_asks_for_more() {
    let broker = TestBroker::start();
    let url = url_with_query(broker.url(), "frame_max=1048576&channel_max=65535");
    let conn = connect_url(&url).await.expect("connect");
    assert_eq!(conn.configuration().frame_max(), 131072);
    assert_eq!(conn.configuration().channel_max(), 2047);
    // The connection is usable with the negotiated values.
    let ch = within(conn.create_channel()).await.expect("channel");
    let q = within(ch.queue_declare(
        "".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("declare");
    assert!(q.name().as_str().starts_with("amq.gen-"));
}

#[tokio::test]
async fn negotiated_limits_when_client_asks_for_zero() {
    let broker = TestBroker::start();
    let url = url_with_query(broker.url(), "frame_max=0&channel_max=0");
    let conn = connect_url(&url).await.expect("connect");
    assert_eq!(conn.configuration().frame_max(), 131072);
    assert_eq!(conn.configuration().channel_max(), 2047);
    assert_eq!(conn.configuration().heartbeat(), 60);
}

#[tokio::test]
async fn client_lower_limits_win() {
    let broker = TestBroker::start();
    let url = url_with_query(broker.url(), "heartbeat=5&frame_max=16384&channel_max=10");
    let conn = connect_url(&url).await.expect("connect");
    assert_eq!(conn.configuration().heartbeat(), 5);
    assert_eq!(conn.configuration().frame_max(), 16384);
    assert_eq!(conn.configuration().channel_max(), 10);

    // A body bigger than the negotiated frame_max is split into several frames and
    // still arrives intact.
    let ch = within(conn.create_channel()).await.expect("channel");
    let q = declare_queue(&ch, "small-frames").await;
    let body: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    send(&ch, &q, &body).await;
    let got = within(ch.basic_get(
        q.as_str().into(),
        lapin::options::BasicGetOptions { no_ack: true },
    ))
    .await
    .expect("get")
    .expect("message");
    assert_eq!(got.delivery.data, body);
    within(ch.queue_delete(q.as_str().into(), Default::default()))
        .await
        .expect("delete");
}

#[tokio::test]
async fn open_many_channels() {
    let broker = TestBroker::start();
    let conn = connect(&broker).await;
    let mut channels = Vec::new();
    for _ in 0..200 {
        channels.push(within(conn.create_channel()).await.expect("channel"));
    }
    let mut ids: Vec<u16> = channels.iter().map(|c| c.id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200, "channel ids are distinct");
    for ch in &channels {
        within(ch.exchange_declare(
            "amq.fanout".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .expect("passive declare on every channel");
    }
    for ch in &channels {
        within(ch.close(200, "OK".into())).await.expect("close");
    }
    // The connection is still healthy after closing all those channels.
    let ch = within(conn.create_channel()).await.expect("channel");
    sync_probe(&ch).await.expect("probe");
}

#[tokio::test]
async fn close_channel_cleanly_then_use_connection() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "chclose").await;
    within(ctx.ch.close(200, "OK".into()))
        .await
        .expect("channel close");
    assert!(!ctx.ch.status().connected());
    // Using a closed channel fails locally; the connection stays up.
    assert!(sync_probe(&ctx.ch).await.is_err());
    assert!(ctx.conn.status().connected());
    let ch2 = ctx.channel().await;
    assert_eq!(message_count(&ch2, &q).await, 0);
    within(ch2.queue_delete(q.as_str().into(), Default::default()))
        .await
        .expect("delete");
    within(ctx.conn.close(200, "OK".into()))
        .await
        .expect("connection close");
    wait_disconnected(&ctx.conn).await;
}

#[tokio::test]
async fn channel_error_leaves_connection_and_other_channels_usable() {
    let ctx = setup().await;
    let other = ctx.channel().await;
    let missing = unique("missing");
    let res = within(ctx.ch.queue_declare(
        missing.as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    expect_channel_error(res, 404);
    assert!(ctx.conn.status().connected());
    sync_probe(&other).await.expect("other channel still works");
    let fresh = ctx.channel().await;
    sync_probe(&fresh).await.expect("new channel works");
}

#[tokio::test]
async fn wrong_password_is_refused_with_403() {
    let broker = TestBroker::start();
    let url = url_with_password(broker.url(), "definitely-wrong");
    let res = connect_url(&url).await;
    let text = expect_connection_error(res, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. \
         For details see the broker logfile."
    );
}

#[tokio::test]
async fn unknown_user_is_refused_with_403() {
    let broker = TestBroker::start();
    let url = broker
        .url()
        .replacen("guest:", &format!("{}:", unique("nobody")), 1);
    let res = connect_url(&url).await;
    let text = expect_connection_error(res, 403);
    assert!(text.starts_with("ACCESS_REFUSED - "), "{text}");
}

#[tokio::test]
async fn unknown_vhost_is_refused_with_530() {
    let broker = TestBroker::start();
    let url = url_with_vhost(broker.url(), "nosuchvhost");
    let res = connect_url(&url).await;
    let text = expect_connection_error(res, 530);
    assert_eq!(text, "NOT_ALLOWED - vhost nosuchvhost not found");
}

#[tokio::test]
async fn amqplain_authentication_works() {
    let broker = TestBroker::start();
    let url = url_with_query(broker.url(), "auth_mechanism=amqplain");
    let conn = connect_url(&url).await.expect("AMQPLAIN connect");
    assert!(conn.status().connected());
    let ch = within(conn.create_channel()).await.expect("channel");
    sync_probe(&ch).await.expect("probe");
}

#[tokio::test]
async fn amqplain_wrong_password_is_refused() {
    let broker = TestBroker::start();
    let url = url_with_query(
        &url_with_password(broker.url(), "nope"),
        "auth_mechanism=amqplain",
    );
    let res = connect_url(&url).await;
    let text = expect_connection_error(res, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - Login was refused using authentication mechanism AMQPLAIN. \
         For details see the broker logfile."
    );
}

#[tokio::test]
async fn connection_level_error_closes_all_channels() {
    // A hard error (here: unknown exchange type -> 503) takes down the whole
    // connection, including its other channels.
    let ctx = setup().await;
    let other = ctx.channel().await;
    let res = within(ctx.ch.exchange_declare(
        unique("bad-type").as_str().into(),
        ExchangeKind::Custom("x-no-such-type".into()),
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await;
    expect_connection_error(res, 503);
    // The connection goes down, and the other channel with it.
    wait_disconnected(&ctx.conn).await;
    assert!(sync_probe(&other).await.is_err());
}
