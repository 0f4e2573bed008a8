//! A raw-socket AMQP 0-9-1 client for tests that need to see or send exact
//! frames: malformed or out-of-order input, byte-exact content, frame sizes.
//!
//! Frames are encoded and decoded with amq-protocol (`gen_frame` /
//! `parse_frame`), but nothing stops a test from sending arbitrary bytes, and
//! [`Raw::next_raw`] hands back frames exactly as the broker wrote them. Every
//! read is bounded by a timeout so a broken broker fails a test instead of
//! hanging it.
//!
//! [`RawConn`] is the older, smaller helper for looking at the handshake.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{basic, channel, connection, queue, AMQPClass, BasicProperties};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{unique, within};

/// Upper bound for any single wait on the broker.
pub const TIMEOUT: Duration = Duration::from_secs(4);

/// How long we listen to convince ourselves that the broker says nothing.
pub const QUIET: Duration = Duration::from_millis(300);

/// The only protocol header RabbitMQ answers with when it rejects a client's.
pub const AMQP_0_9_1_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

/// Serializes a frame with amq-protocol's own encoder.
pub fn encode(frame: &AMQPFrame) -> Vec<u8> {
    let ctx = WriteContext::from(Vec::new());
    let (bytes, _) = gen_frame(frame)(ctx)
        .expect("amq-protocol encodes the frame")
        .into_inner();
    bytes
}

pub fn method(ch: u16, class: AMQPClass) -> AMQPFrame {
    AMQPFrame::Method(ch, class)
}

pub fn queue_declare(ch: u16, name: &str, passive: bool) -> AMQPFrame {
    method(
        ch,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: name.into(),
            passive,
            ..Default::default()
        })),
    )
}

pub fn publish(ch: u16, routing_key: &str, immediate: bool) -> AMQPFrame {
    method(
        ch,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: routing_key.into(),
            mandatory: false,
            immediate,
        })),
    )
}

pub fn content_header(ch: u16, body_size: u64) -> AMQPFrame {
    AMQPFrame::Header(
        ch,
        AMQPContentHeader {
            class_id: 60,
            body_size,
            properties: BasicProperties::default(),
        },
    )
}

pub fn body(ch: u16, data: &[u8]) -> AMQPFrame {
    AMQPFrame::Body(ch, data.to_vec())
}

/// Re-frames `frame` with its payload cut to `keep` bytes (and a matching size
/// field), i.e. a method whose arguments end early but whose framing is intact.
pub fn truncate_payload(frame: &AMQPFrame, keep: usize) -> Vec<u8> {
    let full = encode(frame);
    let mut out = full[..7 + keep].to_vec();
    out[3..7].copy_from_slice(&(keep as u32).to_be_bytes());
    out.push(0xCE);
    out
}

/// Knobs for the handshake; the defaults are a plain, well-behaved client.
#[derive(Clone)]
pub struct Handshake {
    pub user: &'static str,
    pub password: &'static str,
    pub vhost: &'static str,
    /// `None` echoes the server's proposal from connection.tune.
    pub channel_max: Option<u16>,
    pub frame_max: Option<u32>,
    pub heartbeat: u16,
    /// Announce `authentication_failure_close` so a refused login gets a close frame.
    pub auth_failure_close: bool,
    /// Announce `connection.blocked` to hear about resource alarms.
    pub connection_blocked: bool,
    /// Announce `consumer_cancel_notify` to hear of consumers the server cancels.
    pub consumer_cancel_notify: bool,
}

impl Default for Handshake {
    fn default() -> Self {
        Handshake {
            user: "guest",
            password: "guest",
            vhost: "/",
            channel_max: None,
            frame_max: None,
            heartbeat: 0,
            auth_failure_close: true,
            connection_blocked: false,
            consumer_cancel_notify: false,
        }
    }
}

/// Minimal AMQP client over a raw socket: it frames with amq-protocol but
/// otherwise lets a test send anything, in any order, and observe every frame.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Set once the peer closed or reset the socket.
    pub closed: bool,
    /// The frame_max we sent in tune-ok.
    pub frame_max: u32,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            buf: Vec::new(),
            closed: false,
            frame_max: 0,
        }
    }

    /// Connects and runs the handshake up to (but not including) reading the
    /// reply to connection.open, which is returned for the test to judge.
    pub async fn handshake(addr: SocketAddr, opts: &Handshake) -> (Raw, Option<AMQPFrame>) {
        let mut raw = Raw::connect(addr).await;
        raw.send_raw(AMQP_0_9_1_HEADER).await;
        match raw.next().await {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))) => {
            }
            other => panic!("expected connection.start, got {other:?}"),
        }
        let mut client_properties = FieldTable::default();
        client_properties.insert(
            "product".into(),
            AMQPValue::LongString("hare raw test client".into()),
        );
        let mut caps = FieldTable::default();
        if opts.auth_failure_close {
            caps.insert(
                "authentication_failure_close".into(),
                AMQPValue::Boolean(true),
            );
        }
        if opts.connection_blocked {
            caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        }
        if opts.consumer_cancel_notify {
            caps.insert("consumer_cancel_notify".into(), AMQPValue::Boolean(true));
        }
        if !caps.inner().is_empty() {
            client_properties.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        }
        let response = format!("\0{}\0{}", opts.user, opts.password);
        raw.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties,
                mechanism: "PLAIN".into(),
                response: LongString::from(response.into_bytes()),
                locale: "en_US".into(),
            })),
        ))
        .await;
        let tune = match raw.next().await {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(t)))) => t,
            other => return (raw, other),
        };
        raw.frame_max = opts.frame_max.unwrap_or(tune.frame_max);
        raw.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: opts.channel_max.unwrap_or(tune.channel_max),
                frame_max: raw.frame_max,
                heartbeat: opts.heartbeat,
            })),
        ))
        .await;
        raw.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: opts.vhost.into(),
            })),
        ))
        .await;
        let reply = raw.next().await;
        (raw, reply)
    }

    /// A fully open connection with the given handshake options.
    pub async fn open_with(addr: SocketAddr, opts: &Handshake) -> Raw {
        let (raw, reply) = Raw::handshake(addr, opts).await;
        match reply {
            Some(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)),
            )) => raw,
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
    }

    pub async fn open(addr: SocketAddr) -> Raw {
        Raw::open_with(addr, &Handshake::default()).await
    }

    pub async fn open_channel(&mut self, ch: u16) {
        self.send(&method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ))
        .await;
        match self.next().await {
            Some(AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
                if c == ch => {}
            other => panic!("expected channel.open-ok on {ch}, got {other:?}"),
        }
    }

    /// Writes raw bytes. Write errors are ignored: the broker may legitimately
    /// close the socket while we are still sending the offending data; what
    /// matters is what it sent back, which `next` still reads.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let write = tokio::time::timeout(TIMEOUT, self.stream.write_all(bytes));
        match write.await {
            Ok(_) => {}
            Err(_) => panic!("write of {} bytes timed out", bytes.len()),
        }
    }

    pub async fn send(&mut self, frame: &AMQPFrame) {
        self.send_raw(&encode(frame)).await;
    }

    /// The next frame, or `None` once the peer closed or reset the socket.
    /// Panics if nothing happens within [`TIMEOUT`].
    pub async fn next(&mut self) -> Option<AMQPFrame> {
        self.next_within(TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no frame and no close within {TIMEOUT:?}"))
    }

    /// Like `next`, but `None` (instead of a panic) when `wait` passes silently.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Option<AMQPFrame>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if !self.buf.is_empty() {
                match parse_frame(&self.buf[..]) {
                    Ok((rest, frame)) => {
                        let used = self.buf.len() - rest.len();
                        self.buf.drain(..used);
                        return Some(Some(frame));
                    }
                    Err(e) if e.is_incomplete() => {}
                    Err(e) => panic!("unparsable bytes from broker {:?}: {e:?}", self.buf),
                }
            }
            if self.closed {
                assert!(
                    self.buf.is_empty(),
                    "socket closed mid-frame: {:?}",
                    self.buf
                );
                return Some(None);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next frame exactly as the broker wrote it (type, channel and payload
    /// bytes, nothing decoded), or `None` once the peer closed the socket.
    /// Panics if nothing arrives within [`TIMEOUT`] or the frame-end octet is wrong.
    pub async fn next_raw(&mut self) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() > 7 + size {
                    assert_eq!(
                        self.buf[7 + size],
                        0xCE,
                        "bad frame-end octet after a {size}-byte payload"
                    );
                    let frame = RawFrame {
                        kind: self.buf[0],
                        channel: u16::from_be_bytes([self.buf[1], self.buf[2]]),
                        payload: self.buf[7..7 + size].to_vec(),
                    };
                    self.buf.drain(..7 + size + 1);
                    return Some(frame);
                }
            }
            if self.closed {
                assert!(
                    self.buf.is_empty(),
                    "socket closed mid-frame: {:?}",
                    self.buf
                );
                return None;
            }
            let mut chunk = [0u8; 65536];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("no frame and no close within {TIMEOUT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads every remaining byte until the peer closes the socket.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !self.closed {
            let mut chunk = [0u8; 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("socket still open after {TIMEOUT:?}; got {out:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
            }
        }
        out
    }

    /// Asserts that the broker sends nothing at all for [`QUIET`].
    pub async fn expect_silence(&mut self, why: &str) {
        if let Some(got) = self.next_within(QUIET).await {
            panic!("expected silence ({why}), got {got:?}");
        }
    }

    /// Asserts the socket is closed without the broker sending another frame.
    pub async fn expect_closed_without_frame(&mut self) {
        match self.next().await {
            None => {}
            Some(frame) => panic!("expected the socket to close silently, got {frame:?}"),
        }
    }

    /// Asserts the next frame is connection.close with these fields, answers it
    /// with close-ok and asserts the broker then closes the socket.
    /// `text` is a pattern for [`assert_text`].
    pub async fn expect_connection_close(&mut self, code: u16, text: &str, class: u16, meth: u16) {
        match self.next().await {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                assert_eq!(
                    (c.reply_code, c.class_id, c.method_id),
                    (code, class, meth),
                    "connection.close (code, class, method); text {:?}",
                    c.reply_text.as_str()
                );
                assert_text(c.reply_text.as_str(), text);
            }
            other => panic!("expected connection.close {code}, got {other:?}"),
        }
        self.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        ))
        .await;
        self.expect_closed_without_frame().await;
    }

    /// Asserts the next frame is channel.close on `ch` with these fields and
    /// answers it with close-ok (see `expect_connection_close` for `text`).
    pub async fn expect_channel_close(
        &mut self,
        ch: u16,
        code: u16,
        text: &str,
        class: u16,
        meth: u16,
    ) {
        match self.next().await {
            Some(AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::Close(close))))
                if c == ch =>
            {
                assert_eq!(
                    (close.reply_code, close.class_id, close.method_id),
                    (code, class, meth),
                    "channel.close (code, class, method); text {:?}",
                    close.reply_text.as_str()
                );
                assert_text(close.reply_text.as_str(), text);
            }
            other => panic!("expected channel.close {code} on {ch}, got {other:?}"),
        }
        self.send(&method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        ))
        .await;
    }

    /// Declares a queue on `ch` and returns its message count: proof that the
    /// connection and channel still do real work.
    pub async fn declare(&mut self, ch: u16, name: &str, passive: bool) -> u32 {
        self.send(&queue_declare(ch, name, passive)).await;
        match self.next().await {
            Some(AMQPFrame::Method(c, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))))
                if c == ch =>
            {
                ok.message_count
            }
            other => panic!("expected queue.declare-ok on {ch}, got {other:?}"),
        }
    }

    /// Opens channel `ch` and declares a fresh queue on it.
    pub async fn assert_healthy(&mut self, ch: u16) {
        self.open_channel(ch).await;
        self.declare(ch, &unique("raw.healthy"), false).await;
    }

    /// Politely closes the connection so the broker does not log a dropped peer.
    pub async fn close(mut self) {
        self.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        ))
        .await;
        loop {
            match self.next().await {
                Some(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)),
                ))
                | None => break,
                Some(_) => {}
            }
        }
    }
}

/// Matches `got` against `pattern`, where each `*` stands for any text
/// (used where RabbitMQ embeds Erlang term dumps, whose formatting we do not pin).
#[track_caller]
pub fn assert_text(got: &str, pattern: &str) {
    let parts: Vec<&str> = pattern.split('*').collect();
    let matches = match parts.as_slice() {
        [exact] => got == *exact,
        [first, middle @ .., last] => {
            let mut ok = got.len() >= first.len() + last.len()
                && got.starts_with(first)
                && got.ends_with(last);
            let mut rest = &got[first.len().min(got.len())..got.len().saturating_sub(last.len())];
            for part in middle {
                match rest.find(part) {
                    Some(at) if ok => rest = &rest[at + part.len()..],
                    _ => ok = false,
                }
            }
            ok
        }
        [] => unreachable!("split yields at least one part"),
    };
    assert!(matches, "reply text {got:?} should match {pattern:?}");
}

/// Frame types (AMQP 0-9-1 section 4.2.3).
pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;

/// One frame as it was on the wire, undecoded.
#[derive(Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The complete frame: header, payload and frame-end octet.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 8);
        out.push(self.kind);
        out.extend_from_slice(&self.channel.to_be_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
        out.push(0xCE);
        out
    }

    /// Decodes the frame with amq-protocol.
    pub fn parse(&self) -> AMQPFrame {
        let bytes = self.to_bytes();
        match parse_frame(&bytes[..]) {
            Ok(([], frame)) => frame,
            Ok((rest, _)) => panic!("{} bytes left after parsing {self:?}", rest.len()),
            Err(e) => panic!("cannot parse {self:?}: {e:?}"),
        }
    }
}

impl std::fmt::Debug for RawFrame {
    /// Long payloads (bodies) are abbreviated to keep panic messages readable.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 64;
        let shown = &self.payload[..self.payload.len().min(SHOWN)];
        write!(
            f,
            "RawFrame {{ kind: {}, channel: {}, len: {}, payload: {:?}{} }}",
            self.kind,
            self.channel,
            self.payload.len(),
            shown,
            if self.payload.len() > SHOWN {
                "…"
            } else {
                ""
            }
        )
    }
}

/// A bare AMQP socket that only frames and unframes (used to inspect the
/// handshake itself: server properties, tune values).
pub struct RawConn {
    pub stream: TcpStream,
}

impl RawConn {
    /// Connects and sends the AMQP 0-9-1 protocol header.
    pub async fn open(addr: std::net::SocketAddr) -> RawConn {
        let mut stream = within(TcpStream::connect(addr)).await.expect("tcp connect");
        within(stream.write_all(b"AMQP\x00\x00\x09\x01"))
            .await
            .expect("write protocol header");
        RawConn { stream }
    }

    /// Reads one complete frame.
    pub async fn read_frame(&mut self) -> AMQPFrame {
        let mut header = [0u8; 7];
        within(self.stream.read_exact(&mut header))
            .await
            .expect("read frame header");
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let mut buf = header.to_vec();
        buf.resize(7 + size + 1, 0);
        within(self.stream.read_exact(&mut buf[7..]))
            .await
            .expect("read frame body");
        let (_, frame) = parse_frame(buf.as_slice()).expect("parse frame");
        frame
    }

    /// Writes one frame.
    pub async fn write_frame(&mut self, frame: &AMQPFrame) {
        let buf = Vec::new();
        let (buf, _) = gen_frame(frame)(buf.into())
            .expect("serialise frame")
            .into_inner();
        within(self.stream.write_all(&buf))
            .await
            .expect("write frame");
    }

    /// Reads connection.start.
    pub async fn read_start(&mut self) -> connection::Start {
        match self.read_frame().await {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => s,
            other => panic!("expected connection.start, got {other:?}"),
        }
    }

    /// Answers connection.start with PLAIN guest/guest and reads connection.tune.
    pub async fn start_ok_plain(&mut self, user: &str, pass: &str) -> AMQPFrame {
        let start_ok = connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: format!("\0{user}\0{pass}").into(),
            locale: "en_US".into(),
        };
        self.write_frame(&AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
        ))
        .await;
        self.read_frame().await
    }
}
