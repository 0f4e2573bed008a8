//! Protocol-level error handling, pinned to what RabbitMQ 3.10 does on the wire.
//!
//! Client libraries never send malformed or out-of-order frames, so these cases
//! can only be reached over a raw socket. Each test provokes one fault and
//! asserts the exact `connection.close` / `channel.close` RabbitMQ answers with
//! (reply code, class id and method id, and the reply text wherever it does not
//! embed an Erlang term dump), then checks that the damage is contained: a
//! channel error leaves its connection usable, and no error ever affects an
//! unrelated connection.
//!
//! Every expectation here was observed on a real RabbitMQ 3.10.8 node (run the
//! file with `HARE_TEST_URL=amqp://guest:guest@127.0.0.1:5680/%2f`). Some of
//! them are surprising — e.g. most "channel" faults are connection errors in
//! RabbitMQ, an unknown method id kills the socket without any close frame,
//! and channel_max limits the *count* of open channels rather than the channel
//! numbers — but clients depend on these details, so Hare must match them.
//!
//! Every read is bounded by a timeout so a broken broker fails a test instead
//! of hanging it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, channel, connection, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use common::raw::*;
use hare_suite::TestBroker;

/// RabbitMQ 3.10's default `max_message_size` (128 MiB).
const MAX_MESSAGE_SIZE: u64 = 128 * 1024 * 1024;

/// A queue name no other test (or earlier run against a shared broker) uses.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "hare-test.errors.{prefix}.{}.{nanos}.{n}",
        std::process::id()
    )
}

/// The standard fixture: a broker, a victim connection with channel 1 open,
/// and a bystander connection (opened first, so it is alive while the victim
/// misbehaves) that must be unaffected.
async fn setup() -> (TestBroker, Raw, Raw) {
    let broker = TestBroker::start();
    let mut bystander = Raw::open(broker.addr()).await;
    bystander.open_channel(1).await;
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    (broker, victim, bystander)
}

/// Asserts the bystander still works, then closes it.
async fn bystander_unaffected(mut bystander: Raw) {
    bystander.declare(1, &unique("bystander"), false).await;
    bystander.assert_healthy(2).await;
    bystander.close().await;
}

// ---------------------------------------------------------------------------
// Protocol header and framing errors (all connection-level 501 FRAME_ERROR).
// ---------------------------------------------------------------------------

/// A client speaking another protocol (version) must learn which one we speak:
/// the broker answers with its own header and hangs up, sending nothing else.
#[tokio::test]
async fn wrong_protocol_header_gets_amqp_0_9_1_header_and_close() {
    let broker = TestBroker::start();
    for header in [
        &b"AMQP\x00\x00\x09\x00"[..],
        b"HTTP/1.1",
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut raw = Raw::connect(broker.addr()).await;
        raw.send_raw(header).await;
        let got = raw.read_to_close().await;
        assert_eq!(
            got,
            AMQP_0_9_1_HEADER,
            "reply to header {:?}",
            String::from_utf8_lossy(header)
        );
    }
    let mut bystander = Raw::open(broker.addr()).await;
    bystander.assert_healthy(1).await;
    bystander.close().await;
}

/// A frame over the negotiated frame_max is rejected from its size field alone
/// (RabbitMQ reports the payload size against frame_max minus the 8 framing
/// octets: `{frame_too_large,5005,4088}`).
#[tokio::test]
async fn frame_larger_than_frame_max_is_501() {
    let broker = TestBroker::start();
    let mut bystander = Raw::open(broker.addr()).await;
    let opts = Handshake {
        frame_max: Some(4096),
        ..Handshake::default()
    };
    let mut victim = Raw::open_with(broker.addr(), &opts).await;
    victim.open_channel(1).await;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-padding".into(),
        AMQPValue::LongString(vec![b'x'; 5000].into()),
    );
    victim
        .send(&method(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: unique("too-large").as_str().into(),
                arguments,
                ..Default::default()
            })),
        ))
        .await;
    victim
        .expect_connection_close(
            501,
            "FRAME_ERROR - type 1, all octets = <<>>: {frame_too_large,*",
            0,
            0,
        )
        .await;
    bystander.assert_healthy(1).await;
    bystander.close().await;
}

/// The frame-end octet is the only framing check AMQP has; a wrong one means
/// the stream is desynchronised, so the whole connection goes.
#[tokio::test]
async fn bad_frame_end_octet_is_501() {
    let (_broker, mut victim, bystander) = setup().await;
    let mut bytes = encode(&queue_declare(1, &unique("bad-end"), false));
    *bytes.last_mut().expect("non-empty frame") = 0x00;
    victim.send_raw(&bytes).await;
    victim
        .expect_connection_close(
            501,
            "FRAME_ERROR - type 1, *: {invalid_frame_end_marker,*0}",
            0,
            0,
        )
        .await;
    bystander_unaffected(bystander).await;
}

/// Client and server closing the same channel at once (amqp091-go's
/// TestChannelExceptionWithCloseIssue43): the server answers the client's
/// close with close-ok and still takes the client's close-ok for its own,
/// so the connection and its other channels go on, and the channel number
/// can be opened again.
#[tokio::test]
async fn crossing_channel_closes_leave_the_connection_working() {
    let (_broker, mut victim, bystander) = setup().await;
    let mut bytes = encode(&queue_declare(1, &unique("missing"), true));
    bytes.extend(encode(&method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )));
    victim.send_raw(&bytes).await;
    victim
        .expect_channel_close(1, 404, "NOT_FOUND - no queue '*' in vhost '/'", 50, 10)
        .await;
    match victim.next().await {
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected channel.close-ok on 1, got {other:?}"),
    }
    victim.assert_healthy(1).await;
    victim.assert_healthy(2).await;
    victim.close().await;
    bystander_unaffected(bystander).await;
}

/// After connection.close-ok the client closes the socket, not the server
/// (amqplib still writes what it buffered after its connection.close, and
/// gets EPIPE and no close callback from a server that hung up first).
#[tokio::test]
async fn the_client_closes_the_socket_after_connection_close_ok() {
    let broker = TestBroker::start();
    let mut raw = Raw::open(broker.addr()).await;
    raw.send(&method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    ))
    .await;
    match raw.next().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected connection.close-ok, got {other:?}"),
    }
    raw.send(&queue_declare(1, "written-after-close", false))
        .await;
    assert!(
        raw.next_within(Duration::from_millis(500)).await.is_none(),
        "the broker answered or hung up after its close-ok"
    );
}

/// A heartbeat frame is empty and belongs to the connection: one with a
/// payload is a framing error (501), one on a channel an unexpected frame
/// (505), with RabbitMQ 3.10's texts.
#[tokio::test]
async fn heartbeat_with_payload_or_on_a_channel_closes_the_connection() {
    let (broker, mut victim, bystander) = setup().await;
    let heartbeat = |channel: u16, payload: &[u8]| {
        let mut frame = vec![8];
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(0xCE);
        frame
    };
    victim.send_raw(&heartbeat(0, b"ab")).await;
    victim
        .expect_connection_close(
            501,
            "FRAME_ERROR - type 8, all octets = <<\"ab\">>: unknown_frame",
            0,
            0,
        )
        .await;
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    victim.send_raw(&heartbeat(1, b"")).await;
    victim
        .expect_connection_close(505, "UNEXPECTED_FRAME - type 8, all octets = <<>>", 0, 0)
        .await;
    bystander_unaffected(bystander).await;
}

/// tune-ok values past the server's limits are refused with 530 before the
/// connection opens, 0 ("no limit") included, since the server has limits:
/// RabbitMQ 3.10 refuses the same values (it resets the socket; Hare sends
/// the close that says why).
#[tokio::test]
async fn tune_ok_past_the_servers_limits_is_530() {
    let broker = TestBroker::start();
    for (channel_max, frame_max, text) in [
        (Some(0), None, "NOT_ALLOWED - channel_max=0 > 2047 max"),
        (
            Some(3000),
            None,
            "NOT_ALLOWED - channel_max=3000 > 2047 max",
        ),
        (None, Some(0), "NOT_ALLOWED - frame_max=0 > 131072 max size"),
        (
            None,
            Some(1000),
            "NOT_ALLOWED - frame_max=1000 < 4096 min size",
        ),
    ] {
        let opts = Handshake {
            channel_max,
            frame_max,
            ..Handshake::default()
        };
        let (_raw, reply) = Raw::handshake(broker.addr(), &opts).await;
        match reply {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                assert_eq!((c.reply_code, c.reply_text.as_str()), (530, text))
            }
            other => panic!("{text}: expected connection.close, got {other:?}"),
        }
    }
}

/// Frame types other than 1, 2, 3 and 8 are a framing error.
#[tokio::test]
async fn unknown_frame_type_is_501() {
    let (_broker, mut victim, bystander) = setup().await;
    let mut bytes = encode(&body(1, b"abc"));
    bytes[0] = 9;
    victim.send_raw(&bytes).await;
    victim
        .expect_connection_close(
            501,
            "FRAME_ERROR - type 9, all octets = <<\"abc\">>: unknown_frame",
            0,
            0,
        )
        .await;
    bystander_unaffected(bystander).await;
}

/// RabbitMQ 3.10 has no reply for a class or method id it does not know: its
/// connection process exits (`unknown_method_id`) and the socket is closed
/// without any connection.close frame. We pin that exactly.
#[tokio::test]
async fn unknown_class_or_method_id_closes_the_connection() {
    let (broker, mut victim, bystander) = setup().await;
    // Unknown class 99 (method 10) on an open channel.
    let mut bytes = encode(&queue_declare(1, &unique("unknown-class"), false));
    bytes[7..9].copy_from_slice(&99u16.to_be_bytes());
    victim.send_raw(&bytes).await;
    expect_unknown_method_refused(&broker, &mut victim, 99, 10).await;

    // Known class (queue, 50), unknown method 99.
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    let mut bytes = encode(&queue_declare(1, &unique("unknown-method"), false));
    bytes[9..11].copy_from_slice(&99u16.to_be_bytes());
    victim.send_raw(&bytes).await;
    expect_unknown_method_refused(&broker, &mut victim, 50, 99).await;

    // Unknown connection-class method on channel 0.
    let mut victim = Raw::open(broker.addr()).await;
    let mut bytes = encode(&method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
    ));
    bytes[9..11].copy_from_slice(&99u16.to_be_bytes());
    victim.send_raw(&bytes).await;
    expect_unknown_method_refused(&broker, &mut victim, 10, 99).await;

    bystander_unaffected(bystander).await;
}

/// RabbitMQ 3.10 drops the socket on an unknown method without a frame (its
/// connection process crashes); Hare sends connection.close 540 naming the
/// method first, so the client learns why.
async fn expect_unknown_method_refused(
    broker: &TestBroker,
    victim: &mut Raw,
    class: u16,
    meth: u16,
) {
    if broker.is_hare() {
        let text = format!("NOT_IMPLEMENTED - unknown method: class {class}, method {meth}");
        victim
            .expect_connection_close(540, &text, class, meth)
            .await;
    } else {
        victim.expect_closed_without_frame().await;
    }
}

/// Truncated method arguments cannot be decoded; RabbitMQ calls this a
/// FRAME_ERROR (501, not 502 SYNTAX_ERROR) and names the method it tried to
/// decode in class/method id.
#[tokio::test]
async fn malformed_method_arguments_are_501_with_method_ids() {
    let (broker, mut victim, bystander) = setup().await;
    // queue.declare cut inside the queue name: reserved-1 + length 5 + "ab" would
    // need 3 more bytes. Payload = class(2) + method(2) + args.
    let declare = queue_declare(1, "abcde", false);
    victim.send_raw(&truncate_payload(&declare, 4 + 5)).await;
    victim
        .expect_connection_close(501, "FRAME_ERROR - cannot decode <<0,0,5,97,98>>", 50, 10)
        .await;

    // basic.qos with only two of its seven argument octets.
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    let qos = method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 10,
            global: false,
        })),
    );
    victim.send_raw(&truncate_payload(&qos, 4 + 2)).await;
    victim
        .expect_connection_close(501, "FRAME_ERROR - cannot decode <<0,0>>", 60, 10)
        .await;

    // A method frame too short to even hold class and method ids.
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    victim.send_raw(&truncate_payload(&declare, 2)).await;
    victim
        .expect_connection_close(
            501,
            "FRAME_ERROR - type 1, all octets = <<0,50>>: unknown_frame",
            0,
            0,
        )
        .await;
    bystander_unaffected(bystander).await;
}

// ---------------------------------------------------------------------------
// Channel state errors. In RabbitMQ these are all hard (connection) errors.
// ---------------------------------------------------------------------------

/// Any method other than channel.open on a channel that was never opened is a
/// connection-level 504 naming the offending method.
#[tokio::test]
async fn method_on_unopened_channel_is_504() {
    let (broker, mut victim, bystander) = setup().await;
    victim
        .send(&queue_declare(2, &unique("unopened"), false))
        .await;
    victim
        .expect_connection_close(504, "CHANNEL_ERROR - expected 'channel.open'", 50, 10)
        .await;

    // Even channel.close on a never-opened channel.
    let mut victim = Raw::open(broker.addr()).await;
    victim
        .send(&method(
            3,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        ))
        .await;
    victim
        .expect_connection_close(504, "CHANNEL_ERROR - expected 'channel.open'", 20, 40)
        .await;
    bystander_unaffected(bystander).await;
}

/// Re-opening an open channel is a connection-level 504.
#[tokio::test]
async fn channel_open_on_open_channel_is_504() {
    let (_broker, mut victim, bystander) = setup().await;
    victim
        .send(&method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ))
        .await;
    victim
        .expect_connection_close(504, "CHANNEL_ERROR - second 'channel.open' seen", 20, 10)
        .await;
    bystander_unaffected(bystander).await;
}

/// Content frames are only legal after basic.publish; a stray header (or body)
/// is 505 with no method named, on an open channel or a never-opened one.
#[tokio::test]
async fn content_header_without_publish_is_505() {
    const TEXT: &str = "UNEXPECTED_FRAME - expected method frame, got non method frame instead";
    let (broker, mut victim, bystander) = setup().await;
    victim.send(&content_header(1, 3)).await;
    victim.expect_connection_close(505, TEXT, 0, 0).await;

    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    victim.send(&body(1, b"abc")).await;
    victim.expect_connection_close(505, TEXT, 0, 0).await;

    let mut victim = Raw::open(broker.addr()).await;
    victim.send(&content_header(5, 3)).await;
    victim.expect_connection_close(505, TEXT, 0, 0).await;

    // A body after a complete zero-length message is just as stray.
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    victim.send(&publish(1, &unique("nowhere"), false)).await;
    victim.send(&content_header(1, 0)).await;
    victim.send(&body(1, b"abc")).await;
    victim.expect_connection_close(505, TEXT, 0, 0).await;
    bystander_unaffected(bystander).await;
}

/// While a publish still expects its header or body, any other frame on that
/// channel is 505 naming basic.publish (60/40).
#[tokio::test]
async fn method_while_publish_expects_content_is_505() {
    let (broker, mut victim, bystander) = setup().await;
    // Header expected, method arrives.
    victim.send(&publish(1, &unique("x"), false)).await;
    victim.send(&queue_declare(1, "", false)).await;
    victim
        .expect_connection_close(
            505,
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
            60,
            40,
        )
        .await;

    // Header expected, body arrives.
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    victim.send(&publish(1, &unique("x"), false)).await;
    victim.send(&body(1, b"abc")).await;
    victim
        .expect_connection_close(
            505,
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
            60,
            40,
        )
        .await;

    // Body expected, method arrives.
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    victim.send(&publish(1, &unique("x"), false)).await;
    victim.send(&content_header(1, 10)).await;
    victim.send(&queue_declare(1, "", false)).await;
    victim
        .expect_connection_close(
            505,
            "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
            60,
            40,
        )
        .await;
    bystander_unaffected(bystander).await;
}

/// RabbitMQ does not notice a body that overshoots the header's body-size: it
/// subtracts each body frame from the remaining size and only completes the
/// message at exactly zero, so after an overshoot the channel waits for more
/// body forever. Nothing is routed, nothing is sent; the next method on that
/// channel is then a 505 "expected content body".
#[tokio::test]
async fn body_larger_than_declared_size_never_completes() {
    let (broker, mut victim, mut bystander) = setup().await;
    let q = unique("overshoot");
    assert_eq!(bystander.declare(1, &q, false).await, 0);

    victim.send(&publish(1, &q, false)).await;
    victim.send(&content_header(1, 3)).await;
    victim.send(&body(1, b"abcdef")).await;
    victim
        .expect_silence("oversized body is not an error by itself")
        .await;
    assert_eq!(
        bystander.declare(1, &q, true).await,
        0,
        "the oversized message must not be enqueued"
    );
    victim.send(&queue_declare(1, &q, true)).await;
    victim
        .expect_connection_close(
            505,
            "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
            60,
            40,
        )
        .await;

    // Same with the overshoot spread over two body frames (5 declared, 6 sent).
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    victim.send(&publish(1, &q, false)).await;
    victim.send(&content_header(1, 5)).await;
    victim.send(&body(1, b"abc")).await;
    victim.send(&body(1, b"abc")).await;
    victim
        .expect_silence("oversized body is not an error by itself")
        .await;
    victim.send(&queue_declare(1, &q, true)).await;
    victim
        .expect_connection_close(
            505,
            "UNEXPECTED_FRAME - expected content body, got non content body frame instead",
            60,
            40,
        )
        .await;
    assert_eq!(bystander.declare(1, &q, true).await, 0);
    bystander_unaffected(bystander).await;
}

/// RabbitMQ checks max_message_size only once the whole body has arrived (a
/// header announcing 128 MiB + 1 alone draws no reply), then rejects the
/// publish with a channel-level 406. It is a soft error: the connection and
/// its other channels go on working.
#[tokio::test]
async fn message_larger_than_max_message_size_is_channel_406() {
    let (_broker, mut victim, bystander) = setup().await;
    let q = unique("too-big");
    victim.open_channel(2).await;
    victim.declare(2, &q, false).await;

    let size = MAX_MESSAGE_SIZE + 1;
    victim.send(&publish(1, &q, false)).await;
    victim.send(&content_header(1, size)).await;
    let expected_text =
        "PRECONDITION_FAILED - message size 134217729 is larger than configured max size 134217728";
    if _broker.is_hare() {
        // Hare refuses at the content header instead of buffering 128 MiB first
        // (RabbitMQ checks after the body); the reply is the same.
        victim
            .expect_channel_close(1, 406, expected_text, 60, 40)
            .await;
        assert_eq!(
            victim.declare(2, &q, true).await,
            0,
            "rejected message not enqueued"
        );
        victim.assert_healthy(1).await;
        victim.close().await;
        bystander_unaffected(bystander).await;
        return;
    }
    victim
        .expect_silence("the size is checked only after the body")
        .await;

    let chunk_len = (victim.frame_max - 8) as usize;
    let full = encode(&body(1, &vec![b'x'; chunk_len]));
    let mut sent = 0u64;
    let started = Instant::now();
    while sent + chunk_len as u64 <= size {
        victim.send_raw(&full).await;
        sent += chunk_len as u64;
    }
    let rest = (size - sent) as usize;
    victim.send(&body(1, &vec![b'x'; rest])).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "sending 128 MiB took {:?}",
        started.elapsed()
    );

    victim
        .expect_channel_close(
            1,
            406,
            "PRECONDITION_FAILED - message size 134217729 is larger than configured max size 134217728",
            60,
            40,
        )
        .await;
    // The connection, its surviving channel, and a reopened channel 1 all work.
    assert_eq!(
        victim.declare(2, &q, true).await,
        0,
        "rejected message not enqueued"
    );
    victim.assert_healthy(1).await;
    victim.close().await;
    bystander_unaffected(bystander).await;
}

// ---------------------------------------------------------------------------
// Negotiated limits, heartbeats, authentication, vhosts.
// ---------------------------------------------------------------------------

/// A peer that negotiated heartbeats and then goes silent is dropped: RabbitMQ
/// sends its own heartbeats every heartbeat/2 and closes the socket (no close
/// frame) after about three intervals (observed: ~3 s for heartbeat=1). A peer
/// that keeps sending heartbeats stays connected over the same period.
#[tokio::test]
async fn heartbeat_timeout_closes_silent_connection() {
    let broker = TestBroker::start();
    let opts = Handshake {
        heartbeat: 1,
        ..Handshake::default()
    };
    let silent = async {
        let mut raw = Raw::open_with(broker.addr(), &opts).await;
        let started = Instant::now();
        let mut heartbeats = 0;
        loop {
            match raw.next_within(Duration::from_millis(4500)).await {
                None => panic!("silent peer still connected after 4.5 s"),
                Some(Some(AMQPFrame::Heartbeat)) => heartbeats += 1,
                Some(Some(other)) => panic!("unexpected frame {other:?}"),
                Some(None) => break,
            }
        }
        let lived = started.elapsed();
        assert!(
            lived >= Duration::from_millis(1500),
            "dropped too early: {lived:?}"
        );
        assert!(
            heartbeats >= 2,
            "broker sent only {heartbeats} heartbeats in {lived:?}"
        );
    };
    let chatty = async {
        let mut raw = Raw::open_with(broker.addr(), &opts).await;
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(4500) {
            raw.send(&AMQPFrame::Heartbeat).await;
            match raw.next_within(Duration::from_millis(400)).await {
                None | Some(Some(AMQPFrame::Heartbeat)) => {}
                Some(other) => panic!("heartbeating peer got {other:?}"),
            }
        }
        raw.assert_healthy(1).await;
        raw.close().await;
    };
    tokio::join!(silent, chatty);
}

/// RabbitMQ's channel_max limits how many channels are open at once, not the
/// channel numbers: with channel_max=2, channels 5 and 70 (above the limit)
/// open fine, and the third open is refused with a connection-level 530.
#[tokio::test]
async fn channel_max_limits_open_channel_count() {
    let broker = TestBroker::start();
    let mut bystander = Raw::open(broker.addr()).await;
    let opts = Handshake {
        channel_max: Some(2),
        ..Handshake::default()
    };
    let mut victim = Raw::open_with(broker.addr(), &opts).await;
    victim.open_channel(5).await;
    victim.open_channel(70).await;
    victim
        .send(&method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ))
        .await;
    victim
        .expect_connection_close(
            530,
            "NOT_ALLOWED - number of channels opened (2) has reached the negotiated channel_max (2)",
            0,
            0,
        )
        .await;

    // With the default channel_max (2047) any u16 channel number opens.
    let mut raw = Raw::open(broker.addr()).await;
    raw.open_channel(2048).await;
    raw.open_channel(65535).await;
    raw.declare(65535, &unique("ch65535"), false).await;
    raw.close().await;

    bystander.assert_healthy(1).await;
    bystander.close().await;
}

/// With `authentication_failure_close` announced, a refused login gets an
/// explicit 403 before the socket closes (the broker does not wait for
/// close-ok); without the capability the socket is just closed.
#[tokio::test]
async fn wrong_password_is_403_with_auth_failure_close() {
    const TEXT: &str = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.";
    let broker = TestBroker::start();
    let mut bystander = Raw::open(broker.addr()).await;
    for user in ["guest", "no-such-user"] {
        let opts = Handshake {
            user,
            password: "wrong-password",
            ..Handshake::default()
        };
        let (mut raw, reply) = Raw::handshake(broker.addr(), &opts).await;
        match reply {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                assert_eq!((c.reply_code, c.class_id, c.method_id), (403, 0, 0));
                assert_text(c.reply_text.as_str(), TEXT);
            }
            other => panic!("expected connection.close 403 for {user}, got {other:?}"),
        }
        raw.expect_closed_without_frame().await;
    }

    let opts = Handshake {
        password: "wrong-password",
        auth_failure_close: false,
        ..Handshake::default()
    };
    let (_raw, reply) = Raw::handshake(broker.addr(), &opts).await;
    assert_eq!(reply, None, "without the capability the socket just closes");

    bystander.assert_healthy(1).await;
    bystander.close().await;
}

/// Opening a vhost that does not exist is a 530 naming connection.open.
#[tokio::test]
async fn unknown_vhost_is_530() {
    let broker = TestBroker::start();
    let mut bystander = Raw::open(broker.addr()).await;
    let opts = Handshake {
        vhost: "hare-no-such-vhost",
        ..Handshake::default()
    };
    let (mut raw, reply) = Raw::handshake(broker.addr(), &opts).await;
    match reply {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
            assert_eq!((c.reply_code, c.class_id, c.method_id), (530, 10, 40));
            assert_text(
                c.reply_text.as_str(),
                "NOT_ALLOWED - vhost hare-no-such-vhost not found",
            );
        }
        other => panic!("expected connection.close 530, got {other:?}"),
    }
    // RabbitMQ waits for close-ok here, then hangs up.
    raw.expect_silence("the broker waits for close-ok").await;
    raw.send(&method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
    ))
    .await;
    raw.expect_closed_without_frame().await;
    bystander.assert_healthy(1).await;
    bystander.close().await;
}

// ---------------------------------------------------------------------------
// Features RabbitMQ refuses (540 NOT_IMPLEMENTED, a connection error).
// ---------------------------------------------------------------------------

/// basic.qos with prefetch_size != 0. amq-protocol always encodes
/// prefetch_size as 0, so we patch the first argument octets.
#[tokio::test]
async fn qos_prefetch_size_is_540() {
    let (_broker, mut victim, bystander) = setup().await;
    let mut bytes = encode(&method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 0,
            global: false,
        })),
    ));
    // Frame header (7) + class/method ids (4), then prefetch-size (long).
    bytes[11..15].copy_from_slice(&1000u32.to_be_bytes());
    victim.send_raw(&bytes).await;
    victim
        .expect_connection_close(540, "NOT_IMPLEMENTED - prefetch_size!=0 (1000)", 60, 10)
        .await;
    bystander_unaffected(bystander).await;
}

/// basic.publish with immediate=true is refused once its content is complete
/// (not when the method arrives).
#[tokio::test]
async fn publish_immediate_is_540() {
    let (broker, mut victim, bystander) = setup().await;
    let q = unique("immediate");
    victim.send(&publish(1, &q, true)).await;
    victim
        .expect_silence("refused only after the content")
        .await;
    victim.send(&content_header(1, 3)).await;
    victim.send(&body(1, b"abc")).await;
    victim
        .expect_connection_close(540, "NOT_IMPLEMENTED - immediate=true", 60, 40)
        .await;

    // Same with an empty body (complete right after the header).
    let mut victim = Raw::open(broker.addr()).await;
    victim.open_channel(1).await;
    victim.send(&publish(1, &q, true)).await;
    victim.send(&content_header(1, 0)).await;
    victim
        .expect_connection_close(540, "NOT_IMPLEMENTED - immediate=true", 60, 40)
        .await;
    bystander_unaffected(bystander).await;
}
