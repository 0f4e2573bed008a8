//! Inputs that once took the whole broker down or pinned a runtime thread.
//!
//! amq-protocol parses field tables and arrays recursively, so a few kilobytes
//! of nested `A`/`F` values used to overflow the stack and abort the broker
//! process — before login (connection.start-ok's client_properties) or after
//! it (method arguments, message headers). Hare refuses any field table nested
//! deeper than 64 levels with connection.close 501 before amq-protocol sees it.
//! RabbitMQ has no such limit (its parser is not bounded by a native stack), so
//! these expectations are Hare's own.
//!
//! The topic test pins the cost of matching a binding key full of `#` words:
//! a backtracking matcher took tens of seconds for one publish.
//!
//! Deeply nested values are encoded by hand here: amq-protocol's encoder is
//! recursive too, and the test's own threads must not overflow.

mod common;

use std::time::{Duration, Instant};

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, connection, exchange, queue, AMQPClass};
use common::raw::*;
use common::unique;
use hare_suite::TestBroker;

/// Far beyond what amq-protocol's recursive parser survives on a runtime thread.
const DEEP: usize = 5000;

/// Hare's limit: the outermost table counts as level 1.
const MAX_DEPTH: usize = 64;

const TOO_DEEP: &str = "FRAME_ERROR - field table nesting deeper than 64 levels";

// ---------------------------------------------------------------------------
// Hand encoding.
// ---------------------------------------------------------------------------

fn short_str(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).expect("short string fits 255 bytes"));
    out.extend_from_slice(s.as_bytes());
}

fn long_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A field value made of `depth` field arrays, each holding the next one
/// (the innermost is empty). Built front to back: every level is 5 octets.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 * depth);
    for level in (1..=depth).rev() {
        out.push(b'A');
        out.extend_from_slice(&(5 * (level - 1) as u32).to_be_bytes());
    }
    out
}

/// A field value made of `depth` field tables, each holding the next one
/// under the key `k` (the innermost is empty): 7 octets per level.
fn nested_tables(depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(7 * depth);
    for level in (1..=depth).rev() {
        out.push(b'F');
        out.extend_from_slice(&(7 * (level - 1) as u32).to_be_bytes());
        if level > 1 {
            short_str(&mut out, "k");
        }
    }
    out
}

/// A field table's entries (no length prefix): a harmless entry, then `key`
/// holding the encoded field value `value`.
fn table_entries(key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    short_str(&mut out, "product");
    out.push(b'S');
    long_str(&mut out, b"hare limits test");
    short_str(&mut out, key);
    out.extend_from_slice(value);
    out
}

/// A complete field table (with its length prefix) holding `value` under `key`.
fn table_with(key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    long_str(&mut out, &table_entries(key, value));
    out
}

fn method_payload(class_id: u16, method_id: u16, arguments: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + arguments.len());
    out.extend_from_slice(&class_id.to_be_bytes());
    out.extend_from_slice(&method_id.to_be_bytes());
    out.extend_from_slice(arguments);
    out
}

fn frame(kind: u8, channel: u16, payload: Vec<u8>) -> Vec<u8> {
    RawFrame {
        kind,
        channel,
        payload,
    }
    .to_bytes()
}

/// `class` encoded by amq-protocol with an empty arguments table (which must be
/// its last argument), that table replaced by `table`.
fn with_last_table(ch: u16, class: AMQPClass, table: &[u8]) -> Vec<u8> {
    let encoded = encode(&method(ch, class));
    let mut payload = encoded[7..encoded.len() - 1].to_vec();
    assert!(
        payload.ends_with(&[0, 0, 0, 0]),
        "the arguments table should be the method's last argument"
    );
    payload.truncate(payload.len() - 4);
    payload.extend_from_slice(table);
    frame(FRAME_METHOD, ch, payload)
}

/// connection.start-ok with these client_properties and SASL settings.
fn start_ok(client_properties: &[u8], mechanism: &str, response: &[u8]) -> Vec<u8> {
    let mut args = client_properties.to_vec();
    short_str(&mut args, mechanism);
    long_str(&mut args, response);
    short_str(&mut args, "en_US");
    frame(FRAME_METHOD, 0, method_payload(10, 11, &args))
}

/// A content header for class basic with content-type, content-encoding and
/// the given headers table (the property flags 0xE000).
fn header_with_headers(ch: u16, body_size: u64, headers: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&body_size.to_be_bytes());
    payload.extend_from_slice(&0xE000u16.to_be_bytes());
    short_str(&mut payload, "text/plain");
    short_str(&mut payload, "identity");
    payload.extend_from_slice(headers);
    frame(FRAME_HEADER, ch, payload)
}

// ---------------------------------------------------------------------------
// Talking to the broker.
// ---------------------------------------------------------------------------

/// Connects and reads connection.start, leaving start-ok to the test.
async fn until_start(broker: &TestBroker) -> Raw {
    let mut raw = Raw::connect(broker.addr()).await;
    raw.send_raw(AMQP_0_9_1_HEADER).await;
    match raw.next().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))) => raw,
        other => panic!("expected connection.start, got {other:?}"),
    }
}

/// An open connection with channel 1 open.
async fn open(broker: &TestBroker) -> Raw {
    let mut raw = Raw::open(broker.addr()).await;
    raw.open_channel(1).await;
    raw
}

/// Proof that the broker process is alive and serving: a brand-new connection
/// does real work, and so does `bystander` if there is one.
async fn assert_alive(broker: &TestBroker, bystander: Option<&mut Raw>) {
    let mut fresh = Raw::open(broker.addr()).await;
    fresh.assert_healthy(1).await;
    fresh.close().await;
    if let Some(raw) = bystander {
        raw.declare(1, &unique("limits.bystander"), false).await;
    }
}

fn declare_exclusive(name: &str) -> AMQPFrame {
    method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: name.into(),
            exclusive: true,
            ..Default::default()
        })),
    )
}

/// basic.get (no-ack) on channel 1; the body of the message, or `None` for get-empty.
async fn get(raw: &mut Raw, queue_name: &str) -> Option<Vec<u8>> {
    raw.send(&method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: queue_name.into(),
            no_ack: true,
        })),
    ))
    .await;
    match raw.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_)))) => None,
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(_)))) => {
            Some(read_content(raw).await)
        }
        other => panic!("expected basic.get-ok or get-empty, got {other:?}"),
    }
}

/// Reads a content header and its body frames on channel 1.
async fn read_content(raw: &mut Raw) -> Vec<u8> {
    let size = match raw.next().await {
        Some(AMQPFrame::Header(1, header)) => header.body_size,
        other => panic!("expected a content header, got {other:?}"),
    };
    let mut body = Vec::new();
    while (body.len() as u64) < size {
        match raw.next().await {
            Some(AMQPFrame::Body(1, chunk)) => body.extend_from_slice(&chunk),
            other => panic!("expected a body frame, got {other:?}"),
        }
    }
    body
}

// ---------------------------------------------------------------------------
// Nesting limits.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn deeply_nested_client_properties_are_refused_before_login() {
    let broker = TestBroker::start();
    let mut victim = until_start(&broker).await;
    let properties = table_with("deep", &nested_arrays(DEEP));
    victim
        .send_raw(&start_ok(&properties, "PLAIN", b"\0guest\0guest"))
        .await;
    victim.expect_connection_close(501, TOO_DEEP, 10, 11).await;
    assert_alive(&broker, None).await;
}

#[tokio::test]
async fn deeply_nested_tables_in_client_properties_are_refused() {
    let broker = TestBroker::start();
    let mut victim = until_start(&broker).await;
    let properties = table_with("deep", &nested_tables(DEEP));
    victim
        .send_raw(&start_ok(&properties, "PLAIN", b"\0guest\0guest"))
        .await;
    victim.expect_connection_close(501, TOO_DEEP, 10, 11).await;
    assert_alive(&broker, None).await;
}

/// AMQPLAIN's response is itself a field table (without its length prefix).
#[tokio::test]
async fn deeply_nested_amqplain_response_is_refused() {
    let broker = TestBroker::start();
    let mut victim = until_start(&broker).await;
    let mut response = Vec::new();
    short_str(&mut response, "LOGIN");
    response.push(b'S');
    long_str(&mut response, b"guest");
    short_str(&mut response, "PASSWORD");
    response.push(b'S');
    long_str(&mut response, b"guest");
    short_str(&mut response, "deep");
    response.extend_from_slice(&nested_tables(DEEP));
    let properties = table_with("product", b"S\0\0\0\0");
    victim
        .send_raw(&start_ok(&properties, "AMQPLAIN", &response))
        .await;
    victim.expect_connection_close(501, TOO_DEEP, 10, 11).await;
    assert_alive(&broker, None).await;
}

/// Nesting up to the limit is fine, before and after login.
#[tokio::test]
async fn nesting_at_the_limit_is_accepted() {
    let broker = TestBroker::start();
    let mut raw = until_start(&broker).await;
    // The client_properties table is level 1, so 63 arrays inside it make 64.
    let properties = table_with("deep", &nested_arrays(MAX_DEPTH - 1));
    raw.send_raw(&start_ok(&properties, "PLAIN", b"\0guest\0guest"))
        .await;
    match raw.next().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))) => {}
        other => panic!("expected connection.tune, got {other:?}"),
    }

    let mut raw = open(&broker).await;
    let name = unique("limits.at-limit");
    raw.send(&declare_exclusive(&name)).await;
    match raw.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)))) => {}
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
    let mut bytes = encode(&publish(1, &name, false));
    let headers = table_with("deep", &nested_tables(MAX_DEPTH - 1));
    bytes.extend_from_slice(&header_with_headers(1, 2, &headers));
    bytes.extend_from_slice(&encode(&body(1, b"ok")));
    raw.send_raw(&bytes).await;
    assert_eq!(get(&mut raw, &name).await.as_deref(), Some(&b"ok"[..]));
    raw.close().await;
}

#[tokio::test]
async fn one_level_past_the_limit_is_refused() {
    let broker = TestBroker::start();
    let mut bystander = open(&broker).await;
    let mut victim = open(&broker).await;
    victim
        .send_raw(&encode(&publish(1, "nowhere", false)))
        .await;
    let headers = table_with("deep", &nested_arrays(MAX_DEPTH));
    victim.send_raw(&header_with_headers(1, 0, &headers)).await;
    victim.expect_connection_close(501, TOO_DEEP, 60, 40).await;
    assert_alive(&broker, Some(&mut bystander)).await;
}

#[tokio::test]
async fn deeply_nested_queue_declare_arguments_are_501() {
    let broker = TestBroker::start();
    let mut bystander = open(&broker).await;
    let mut victim = open(&broker).await;
    let declare = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: unique("limits.deep").as_str().into(),
        ..Default::default()
    }));
    let arguments = table_with("x-deep", &nested_tables(DEEP));
    victim
        .send_raw(&with_last_table(1, declare, &arguments))
        .await;
    victim.expect_connection_close(501, TOO_DEEP, 50, 10).await;
    assert_alive(&broker, Some(&mut bystander)).await;
}

#[tokio::test]
async fn deeply_nested_message_headers_are_501() {
    let broker = TestBroker::start();
    let mut bystander = open(&broker).await;
    let mut victim = open(&broker).await;
    let mut bytes = encode(&publish(1, "nowhere", false));
    let headers = table_with("deep", &nested_arrays(DEEP));
    bytes.extend_from_slice(&header_with_headers(1, 3, &headers));
    bytes.extend_from_slice(&encode(&body(1, b"abc")));
    victim.send_raw(&bytes).await;
    victim.expect_connection_close(501, TOO_DEEP, 60, 40).await;
    assert_alive(&broker, Some(&mut bystander)).await;
}

/// Every method whose arguments amq-protocol parses as a field table, including
/// connection.start, which only a server should send but which is parsed all the same.
#[tokio::test]
async fn every_method_with_a_table_is_checked() {
    let broker = TestBroker::start();
    let mut bystander = open(&broker).await;
    let deep = table_with("x-deep", &nested_arrays(DEEP));
    let name = || unique("limits.every");
    let cases: Vec<(u16, u16, Vec<u8>)> = vec![
        (
            40,
            10,
            with_last_table(
                1,
                AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                    exchange: name().as_str().into(),
                    kind: "topic".into(),
                    durable: true,
                    ..Default::default()
                })),
                &deep,
            ),
        ),
        (
            40,
            30,
            with_last_table(
                1,
                AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                    destination: "amq.fanout".into(),
                    source: "amq.direct".into(),
                    routing_key: "rk".into(),
                    nowait: false,
                    ..Default::default()
                })),
                &deep,
            ),
        ),
        (
            40,
            40,
            with_last_table(
                1,
                AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                    destination: "amq.fanout".into(),
                    source: "amq.direct".into(),
                    routing_key: "rk".into(),
                    nowait: true,
                    ..Default::default()
                })),
                &deep,
            ),
        ),
        (
            50,
            10,
            with_last_table(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: name().as_str().into(),
                    durable: true,
                    exclusive: true,
                    ..Default::default()
                })),
                &deep,
            ),
        ),
        (
            50,
            20,
            with_last_table(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                    queue: name().as_str().into(),
                    exchange: "amq.direct".into(),
                    routing_key: "rk".into(),
                    nowait: false,
                    ..Default::default()
                })),
                &deep,
            ),
        ),
        (
            50,
            50,
            with_last_table(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
                    queue: name().as_str().into(),
                    exchange: "amq.direct".into(),
                    routing_key: "rk".into(),
                    ..Default::default()
                })),
                &deep,
            ),
        ),
        (
            60,
            20,
            with_last_table(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                    queue: name().as_str().into(),
                    consumer_tag: "ctag".into(),
                    no_ack: true,
                    ..Default::default()
                })),
                &deep,
            ),
        ),
        (10, 10, {
            let mut args = vec![0, 9];
            args.extend_from_slice(&deep);
            long_str(&mut args, b"PLAIN");
            long_str(&mut args, b"en_US");
            frame(FRAME_METHOD, 0, method_payload(10, 10, &args))
        }),
    ];
    for (class_id, method_id, bytes) in cases {
        let mut victim = open(&broker).await;
        victim.send_raw(&bytes).await;
        victim
            .expect_connection_close(501, TOO_DEEP, class_id, method_id)
            .await;
    }
    assert_alive(&broker, Some(&mut bystander)).await;
}

// ---------------------------------------------------------------------------
// Topic matching cost.
// ---------------------------------------------------------------------------

/// `#.a.` eight times then `#.b`: exponential for a backtracking matcher
/// against a long key of `a` words that does not end in `b`.
#[tokio::test]
async fn pathological_topic_binding_routes_quickly() {
    let broker = TestBroker::start();
    let mut raw = open(&broker).await;
    let exchange_name = unique("limits.topic");
    raw.send(&method(
        1,
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: exchange_name.as_str().into(),
            kind: "topic".into(),
            auto_delete: true,
            ..Default::default()
        })),
    ))
    .await;
    match raw.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)))) => {}
        other => panic!("expected exchange.declare-ok, got {other:?}"),
    }
    let queue_name = unique("limits.topic");
    raw.send(&declare_exclusive(&queue_name)).await;
    match raw.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_)))) => {}
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
    let binding = format!("{}#.b", "#.a.".repeat(8));
    raw.send(&method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: queue_name.as_str().into(),
            exchange: exchange_name.as_str().into(),
            routing_key: binding.as_str().into(),
            nowait: false,
            ..Default::default()
        })),
    ))
    .await;
    match raw.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Queue(queue::AMQPMethod::BindOk(_)))) => {}
        other => panic!("expected queue.bind-ok, got {other:?}"),
    }

    let publish_to = |key: &str, mandatory: bool, data: &[u8]| {
        let mut bytes = encode(&method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: exchange_name.as_str().into(),
                routing_key: key.into(),
                mandatory,
                immediate: false,
            })),
        ));
        bytes.extend_from_slice(&encode(&content_header(1, data.len() as u64)));
        bytes.extend_from_slice(&encode(&body(1, data)));
        bytes
    };
    let all_a = ["a"; 50].join(".");
    let ends_in_b = format!("{}.b", ["a"; 49].join("."));

    // No match: the mandatory message comes straight back, and fast.
    let started = Instant::now();
    raw.send_raw(&publish_to(&all_a, true, b"unroutable")).await;
    match raw.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Return(r)))) => {
            assert_eq!(r.reply_code, 312, "basic.return {r:?}");
        }
        other => panic!("expected basic.return, got {other:?}"),
    }
    assert_eq!(read_content(&mut raw).await, b"unroutable");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "routing one message took {elapsed:?}"
    );

    // A match: the message lands in the queue.
    let started = Instant::now();
    raw.send_raw(&publish_to(&ends_in_b, true, b"routed")).await;
    assert_eq!(
        get(&mut raw, &queue_name).await.as_deref(),
        Some(&b"routed"[..])
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "routing one message took {elapsed:?}"
    );
    assert_eq!(get(&mut raw, &queue_name).await, None);
    raw.close().await;
}
