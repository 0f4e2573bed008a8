//! Message content on the wire: the content header a consumer receives must be
//! byte-for-byte the one the publisher sent, and bodies must arrive intact,
//! re-split into body frames that respect the consumer's negotiated frame_max.
//!
//! Client libraries decode and re-encode properties (amq-protocol's FieldTable
//! is a BTreeMap, so it would even sort header keys), which hides exactly the
//! mistakes these tests look for. So everything here is built and inspected
//! as raw bytes over a raw socket.
//!
//! Observed on RabbitMQ 3.10 (run with
//! `HARE_TEST_URL=amqp://guest:guest@127.0.0.1:5680/%2f`): the properties are
//! passed through untouched (RabbitMQ keeps the encoded property list it
//! received), the body is re-framed into chunks of exactly frame_max - 8 bytes
//! whatever chunking the publisher used, and an empty body is sent as a content
//! header with no body frame at all.

mod common;

use std::time::Duration;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, queue, AMQPClass};
use common::raw::*;
use common::unique;
use hare_suite::TestBroker;

/// The frame_max the body tests negotiate (the smallest a peer may propose).
const FRAME_MAX: u32 = 4096;

/// Largest body-frame payload under [`FRAME_MAX`]: the frame minus its 7-octet
/// header and the frame-end octet.
const BODY_MAX: usize = FRAME_MAX as usize - 8;

const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Hand encoding (AMQP 0-9-1 section 4.2.5 and the RabbitMQ field-value types).
// ---------------------------------------------------------------------------

fn short_str(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).expect("short string fits 255 bytes"));
    out.extend_from_slice(s.as_bytes());
}

fn long_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A field value: its type octet followed by its encoding.
fn value(tag: u8, encoded: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(encoded);
    out
}

/// A field table (size-prefixed), keys in exactly the given order.
fn table(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut inner = Vec::new();
    for (key, val) in entries {
        short_str(&mut inner, key);
        inner.extend_from_slice(val);
    }
    let mut out = Vec::new();
    long_str(&mut out, &inner);
    out
}

/// A field array (size-prefixed).
fn array(values: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    long_str(&mut out, &values.concat());
    out
}

fn long_string_value(s: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::new();
    long_str(&mut encoded, s);
    value(b'S', &encoded)
}

/// A headers table holding every field-value type RabbitMQ knows, with keys in
/// deliberately unsorted order (a sorted map would reorder them) and a nested
/// table and array that are unsorted and nested themselves.
fn every_type_headers() -> Vec<u8> {
    let nested_table = table(&[
        ("zz-inner", value(b'I', &(-7i32).to_be_bytes())),
        (
            "Inner-array",
            value(
                b'A',
                &array(&[
                    value(b't', &[0]),
                    long_string_value(b"in an array in a table"),
                ]),
            ),
        ),
        ("aa-inner", long_string_value(b"")),
        ("mm-void", value(b'V', &[])),
    ]);
    let nested_array = array(&[
        value(b'b', &[0x80]),
        long_string_value(b"second"),
        value(
            b'F',
            &table(&[("y", value(b'B', &[1])), ("x", value(b'B', &[2]))]),
        ),
        value(b'A', &array(&[value(b'l', &i64::MIN.to_be_bytes())])),
        value(b'V', &[]),
        value(b'd', &f64::MAX.to_be_bytes()),
    ]);
    let mut decimal = vec![3u8];
    decimal.extend_from_slice(&123_456u32.to_be_bytes());
    let mut bytes = Vec::new();
    long_str(&mut bytes, &[0x00, 0xFF, 0x01, 0xCE, 0x00]);
    table(&[
        ("zulu-bool", value(b't', &[1])),
        ("alpha-i8", value(b'b', &(-5i8).to_be_bytes())),
        ("Mike-u8", value(b'B', &[250])),
        ("echo-i16", value(b's', &(-12_345i16).to_be_bytes())),
        ("yankee-u16", value(b'u', &54_321u16.to_be_bytes())),
        ("bravo-i32", value(b'I', &(-123_456_789i32).to_be_bytes())),
        ("xray-u32", value(b'i', &3_000_000_000u32.to_be_bytes())),
        (
            "charlie-i64",
            value(b'l', &(-1_234_567_890_123i64).to_be_bytes()),
        ),
        ("whiskey-f32", value(b'f', &1.5f32.to_be_bytes())),
        ("delta-f64", value(b'd', &(-2.25f64).to_be_bytes())),
        ("victor-decimal", value(b'D', &decimal)),
        (
            "foxtrot-longstr",
            long_string_value("utf-8 ✓ and a NUL \0 inside".as_bytes()),
        ),
        ("uniform-array", value(b'A', &nested_array)),
        (
            "golf-timestamp",
            value(b'T', &1_700_000_000u64.to_be_bytes()),
        ),
        ("tango-table", value(b'F', &nested_table)),
        ("hotel-void", value(b'V', &[])),
        ("sierra-bytes", value(b'x', &bytes)),
        ("", long_string_value(b"empty key")),
    ])
}

/// A basic-class property list (flags + values) setting all 14 properties.
fn every_property() -> Vec<u8> {
    let mut out = Vec::new();
    // Bits 15..2: content-type .. cluster-id; bits 1 and 0 unused (no continuation).
    out.extend_from_slice(&0xFFFCu16.to_be_bytes());
    short_str(&mut out, "application/x-hare; charset=utf-8"); // content-type
    short_str(&mut out, "identity"); // content-encoding
    out.extend_from_slice(&every_type_headers()); // headers
    out.push(2); // delivery-mode
    out.push(7); // priority
    short_str(&mut out, "correlation-7f3a"); // correlation-id
    short_str(&mut out, "amq.rabbitmq.reply-to.not-really"); // reply-to
    short_str(&mut out, "86400000"); // expiration (one day: must not expire)
    short_str(&mut out, "message-0001"); // message-id
    out.extend_from_slice(&1_234_567_890u64.to_be_bytes()); // timestamp
    short_str(&mut out, "hare.test.type"); // type
    short_str(&mut out, "guest"); // user-id (must match the login)
    short_str(&mut out, "hare-content-test"); // app-id
    short_str(&mut out, "cluster-zero"); // cluster-id (deprecated, still legal)
    out
}

/// A basic-class content-header payload.
fn header_payload(body_size: u64, properties: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&60u16.to_be_bytes()); // class-id: basic
    out.extend_from_slice(&0u16.to_be_bytes()); // weight
    out.extend_from_slice(&body_size.to_be_bytes());
    out.extend_from_slice(properties);
    out
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    RawFrame {
        kind,
        channel,
        payload: payload.to_vec(),
    }
    .to_bytes()
}

/// A deterministic, non-repeating-looking body, so that a dropped, duplicated
/// or reordered chunk cannot go unnoticed.
fn body_bytes(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Talking to the broker.
// ---------------------------------------------------------------------------

/// Opens a connection (with `frame_max`, or the server's proposal) and channel 1.
async fn open(broker: &TestBroker, frame_max: Option<u32>) -> Raw {
    let opts = Handshake {
        frame_max,
        ..Handshake::default()
    };
    let mut raw = Raw::open_with(broker.addr(), &opts).await;
    raw.open_channel(1).await;
    raw
}

/// The next frame, which must be a method frame on `ch`, decoded.
async fn next_method(raw: &mut Raw, ch: u16) -> AMQPFrame {
    match raw.next_raw().await {
        Some(f) if f.kind == FRAME_METHOD && f.channel == ch => f.parse(),
        other => panic!("expected a method frame on channel {ch}, got {other:?}"),
    }
}

/// Declares an exclusive queue (gone when the connection closes) on channel 1.
async fn declare_exclusive(raw: &mut Raw, prefix: &str) -> String {
    let name = unique(&format!("content.{prefix}"));
    raw.send(&method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: name.as_str().into(),
            exclusive: true,
            ..Default::default()
        })),
    ))
    .await;
    match next_method(raw, 1).await {
        AMQPFrame::Method(1, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))) => name,
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
}

/// Publishes to `queue` via the default exchange on channel 1: the method, the
/// given header payload, then `body` cut into frames of at most `chunk` bytes
/// (no body frame at all for an empty body).
async fn publish_content(raw: &mut Raw, queue: &str, header: &[u8], body: &[u8], chunk: usize) {
    let mut bytes = encode(&publish(1, queue, false));
    bytes.extend_from_slice(&frame(FRAME_HEADER, 1, header));
    for piece in body.chunks(chunk) {
        bytes.extend_from_slice(&frame(FRAME_BODY, 1, piece));
    }
    raw.send_raw(&bytes).await;
}

/// One delivered message as it came over the wire.
struct Delivered {
    method: AMQPFrame,
    /// The content-header frame's payload.
    header: Vec<u8>,
    /// Each body frame's payload, in order.
    body_frames: Vec<Vec<u8>>,
}

impl Delivered {
    fn body(&self) -> Vec<u8> {
        self.body_frames.concat()
    }
}

/// Reads the content header and exactly as many body frames as it announces.
async fn read_content(raw: &mut Raw, ch: u16, method: AMQPFrame) -> Delivered {
    let header = match raw.next_raw().await {
        Some(f) if f.kind == FRAME_HEADER && f.channel == ch => f.payload,
        other => {
            panic!("expected a content header on channel {ch} after {method:?}, got {other:?}")
        }
    };
    assert!(header.len() >= 14, "short content header {header:?}");
    let body_size = u64::from_be_bytes(header[4..12].try_into().expect("8 bytes"));
    let mut body_frames = Vec::new();
    let mut received = 0u64;
    while received < body_size {
        match raw.next_raw().await {
            Some(f) if f.kind == FRAME_BODY && f.channel == ch => {
                received += f.payload.len() as u64;
                body_frames.push(f.payload);
            }
            other => panic!(
                "expected a body frame on channel {ch} ({received} of {body_size} bytes so far), got {other:?}"
            ),
        }
    }
    assert_eq!(received, body_size, "body frames overshoot the body size");
    Delivered {
        method,
        header,
        body_frames,
    }
}

/// basic.get (no-ack) on channel 1, retried while the queue is still empty.
async fn get(raw: &mut Raw, queue: &str) -> Delivered {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        raw.send(&method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: queue.into(),
                no_ack: true,
            })),
        ))
        .await;
        match next_method(raw, 1).await {
            m @ AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::GetOk(_))) => {
                return read_content(raw, 1, m).await;
            }
            AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_)))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("expected basic.get-ok from {queue}, got {other:?}"),
        }
    }
}

/// basic.get that must find the queue empty, as the very next frame.
async fn expect_get_empty(raw: &mut Raw, queue: &str) {
    raw.send(&method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: queue.into(),
            no_ack: true,
        })),
    ))
    .await;
    match next_method(raw, 1).await {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_))) => {}
        other => panic!("expected basic.get-empty from {queue}, got {other:?}"),
    }
}

/// basic.consume (no-ack) on channel 1; returns once consume-ok arrived.
async fn consume(raw: &mut Raw, queue: &str) {
    raw.send(&method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.into(),
            consumer_tag: "content-test".into(),
            no_ack: true,
            ..Default::default()
        })),
    ))
    .await;
    match next_method(raw, 1).await {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))) => {}
        other => panic!("expected basic.consume-ok, got {other:?}"),
    }
}

/// The next basic.deliver on channel 1 with its content.
async fn next_delivery(raw: &mut Raw) -> Delivered {
    match next_method(raw, 1).await {
        m @ AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(_))) => {
            read_content(raw, 1, m).await
        }
        other => panic!("expected basic.deliver, got {other:?}"),
    }
}

/// A passive queue.declare whose declare-ok must be the very next frame: proof
/// that no further content frame was sent for what we already read.
async fn expect_next_is_reply(raw: &mut Raw, queue: &str) {
    raw.send(&queue_declare(1, queue, true)).await;
    match next_method(raw, 1).await {
        AMQPFrame::Method(1, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => {
            assert_eq!(ok.message_count, 0, "everything was delivered");
        }
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
}

/// Asserts the body arrived intact and in body frames of at most
/// `frame_max - 8` bytes, all of them full except the last.
#[track_caller]
fn assert_body_framing(got: &Delivered, sent: &[u8], frame_max: u32, what: &str) {
    let max = frame_max as usize - 8;
    let sizes: Vec<usize> = got.body_frames.iter().map(Vec::len).collect();
    assert!(
        got.body() == sent,
        "{what}: body differs (sent {} bytes, got {} in frames {sizes:?})",
        sent.len(),
        got.body().len()
    );
    assert!(
        sizes.iter().all(|&n| n <= max),
        "{what}: a body frame exceeds frame_max - 8 = {max}: {sizes:?}"
    );
    assert_eq!(
        sizes.len(),
        sent.len().div_ceil(max),
        "{what}: body frame count (sizes {sizes:?})"
    );
    if let Some((_last, full)) = sizes.split_last() {
        assert!(
            full.iter().all(|&n| n == max),
            "{what}: all body frames but the last must be full ({max}): {sizes:?}"
        );
    }
    assert!(!sizes.contains(&0), "{what}: empty body frame in {sizes:?}");
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// A content header setting all 14 basic properties, with a headers table that
/// holds every field-value type in unsorted key order (plus nested, unsorted
/// tables and arrays), comes back byte-for-byte identical from basic.get and
/// from basic.deliver; so does its body.
#[tokio::test]
async fn content_header_with_every_property_and_field_type_is_delivered_byte_exact() {
    let broker = TestBroker::start();
    let mut raw = open(&broker, None).await;
    let queue = declare_exclusive(&mut raw, "header").await;
    let body = b"every property, every field type".to_vec();
    let sent = header_payload(body.len() as u64, &every_property());

    // Self-check: amq-protocol can read this header, but re-encoding it does
    // not reproduce it (its FieldTable sorts keys), so a broker that decodes
    // and re-encodes properties that way cannot pass this test.
    let parsed = RawFrame {
        kind: FRAME_HEADER,
        channel: 1,
        payload: sent.clone(),
    }
    .parse();
    assert!(matches!(parsed, AMQPFrame::Header(1, _)), "{parsed:?}");
    assert_ne!(
        encode(&parsed),
        frame(FRAME_HEADER, 1, &sent),
        "the test header should not survive a decode/encode round trip"
    );

    publish_content(&mut raw, &queue, &sent, &body, body.len()).await;
    publish_content(&mut raw, &queue, &sent, &body, body.len()).await;

    let got = get(&mut raw, &queue).await;
    match &got.method {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok))) => {
            assert_eq!(ok.exchange.as_str(), "");
            assert_eq!(ok.routing_key.as_str(), queue);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        got.header == sent,
        "basic.get: content header differs\n sent: {sent:?}\n  got: {:?}",
        got.header
    );
    assert_eq!(got.body(), body, "basic.get body");

    consume(&mut raw, &queue).await;
    let got = next_delivery(&mut raw).await;
    assert!(
        got.header == sent,
        "basic.deliver: content header differs\n sent: {sent:?}\n  got: {:?}",
        got.header
    );
    assert_eq!(got.body(), body, "basic.deliver body");
    expect_next_is_reply(&mut raw, &queue).await;
    raw.close().await;
}

/// With frame_max = 4096 negotiated, bodies of 0, 1, 4088 (one full frame),
/// 4089 (two frames) and 1 MiB come back identical, in body frames of at most
/// frame_max - 8 = 4088 bytes with all but the last full: both when the
/// publisher sent full frames and when it sent small, uneven ones (the broker
/// re-frames the body; it does not forward the publisher's chunks). Checked
/// through basic.get and basic.deliver.
#[tokio::test]
async fn bodies_round_trip_and_are_split_at_negotiated_frame_max() {
    let broker = TestBroker::start();
    let mut raw = open(&broker, Some(FRAME_MAX)).await;
    assert_eq!(raw.frame_max, FRAME_MAX);
    let queue = declare_exclusive(&mut raw, "bodies").await;

    // (size, publisher's chunk size)
    let mut cases = Vec::new();
    for size in [0, 1, BODY_MAX, BODY_MAX + 1, MIB] {
        cases.push((size, BODY_MAX));
        cases.push((size, 1000));
    }
    let bodies: Vec<Vec<u8>> = cases
        .iter()
        .enumerate()
        .map(|(i, &(size, _))| body_bytes(size, i as u32))
        .collect();
    let headers: Vec<Vec<u8>> = bodies
        .iter()
        .map(|b| header_payload(b.len() as u64, &0u16.to_be_bytes()))
        .collect();
    let describe = |i: usize| format!("{} bytes published in chunks of {}", cases[i].0, cases[i].1);

    for (i, body) in bodies.iter().enumerate() {
        publish_content(&mut raw, &queue, &headers[i], body, cases[i].1).await;
    }
    for (i, body) in bodies.iter().enumerate() {
        let got = get(&mut raw, &queue).await;
        let what = format!("basic.get of {}", describe(i));
        assert!(got.header == headers[i], "{what}: header {:?}", got.header);
        assert_body_framing(&got, body, FRAME_MAX, &what);
    }
    expect_get_empty(&mut raw, &queue).await;

    for (i, body) in bodies.iter().enumerate() {
        publish_content(&mut raw, &queue, &headers[i], body, cases[i].1).await;
    }
    consume(&mut raw, &queue).await;
    for (i, body) in bodies.iter().enumerate() {
        let got = next_delivery(&mut raw).await;
        let what = format!("basic.deliver of {}", describe(i));
        assert!(got.header == headers[i], "{what}: header {:?}", got.header);
        assert_body_framing(&got, body, FRAME_MAX, &what);
    }
    expect_next_is_reply(&mut raw, &queue).await;
    raw.close().await;
}

/// A message with an empty body is a content header announcing body-size 0 and
/// no body frame at all (neither from basic.get nor from basic.deliver): the
/// frame after the header is already the reply to our next method.
#[tokio::test]
async fn empty_body_is_delivered_as_header_without_body_frame() {
    let broker = TestBroker::start();
    let mut raw = open(&broker, None).await;
    let queue = declare_exclusive(&mut raw, "empty").await;
    let header = header_payload(0, &0u16.to_be_bytes());

    publish_content(&mut raw, &queue, &header, b"", 1).await;
    let got = get(&mut raw, &queue).await;
    assert!(got.header == header, "header {:?}", got.header);
    assert!(got.body_frames.is_empty());
    expect_get_empty(&mut raw, &queue).await;

    publish_content(&mut raw, &queue, &header, b"", 1).await;
    consume(&mut raw, &queue).await;
    let got = next_delivery(&mut raw).await;
    assert!(got.header == header, "header {:?}", got.header);
    assert!(got.body_frames.is_empty());
    expect_next_is_reply(&mut raw, &queue).await;
    raw.close().await;
}
