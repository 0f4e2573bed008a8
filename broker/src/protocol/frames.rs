//! Reading frames: amq-protocol parses methods and content headers; this module
//! cuts frames out of the read buffer without copying, enforces frame_max
//! before buffering a whole frame (amq-protocol's parser does not), and turns
//! every malformed input into the connection exception RabbitMQ would raise.

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::protocol::{parse_class, AMQPClass, BasicProperties};
use bytes::{Buf, Bytes, BytesMut};

use crate::error::{code, AmqpError, AmqpResult};

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size: what we can check before the payload arrives.
const FRAME_HEADER_LEN: usize = 7;
/// Header plus the frame-end octet.
pub const FRAME_OVERHEAD: usize = 8;

/// A frame as the connection's state machine consumes it.
#[derive(Debug)]
pub enum Inbound {
    Method(u16, Box<AMQPClass>),
    Header {
        channel: u16,
        class_id: u16,
        body_size: u64,
        properties: Box<BasicProperties>,
        /// The header payload as received, replayed verbatim on delivery.
        raw: Bytes,
    },
    Body(u16, Bytes),
    Heartbeat(u16),
}

/// Accumulates socket reads and yields whole frames.
pub struct FrameReader {
    buf: BytesMut,
    frame_max: u32,
}

impl FrameReader {
    pub fn new(frame_max: u32) -> Self {
        FrameReader {
            buf: BytesMut::with_capacity(64 * 1024),
            frame_max,
        }
    }

    /// The buffer socket reads go into.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Set once tune-ok is in; until then the broker's own maximum applies.
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    /// The next complete frame, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> AmqpResult<Option<Inbound>> {
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let frame_type = self.buf[0];
        let channel = u16::from_be_bytes([self.buf[1], self.buf[2]]);
        let size =
            u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]]) as usize;
        if self.frame_max != 0 && size + FRAME_OVERHEAD > self.frame_max as usize {
            // Refused before buffering: a peer must not make us hold an oversized frame.
            return Err(frame_error(format!(
                "type {frame_type}, all octets = <<>>: {{frame_too_large,{size},{}}}",
                self.frame_max as usize - FRAME_OVERHEAD
            )));
        }
        let total = size + FRAME_OVERHEAD;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total).freeze();
        frame.advance(FRAME_HEADER_LEN);
        let end_marker = frame[size];
        frame.truncate(size);
        let payload = frame;
        if end_marker != FRAME_END {
            return Err(frame_error(format!(
                "type {frame_type}, {}: {{invalid_frame_end_marker,{end_marker}}}",
                describe_octets(&payload)
            )));
        }
        let known = matches!(
            frame_type,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        );
        if !known || (frame_type == FRAME_METHOD && payload.len() < 4) {
            return Err(frame_error(format!(
                "type {frame_type}, {}: unknown_frame",
                describe_octets(&payload)
            )));
        }
        Ok(Some(match frame_type {
            FRAME_METHOD => Inbound::Method(channel, Box::new(parse_method(&payload)?)),
            FRAME_HEADER => {
                let (_, header) = parse_content_header(&payload[..]).map_err(|_| {
                    frame_error(format!(
                        "type 2, {}: malformed content header",
                        describe_octets(&payload)
                    ))
                })?;
                Inbound::Header {
                    channel,
                    class_id: header.class_id,
                    body_size: header.body_size,
                    properties: Box::new(header.properties),
                    raw: payload,
                }
            }
            FRAME_BODY => Inbound::Body(channel, payload),
            _ => Inbound::Heartbeat(channel),
        }))
    }
}

fn frame_error(detail: String) -> AmqpError {
    AmqpError::connection(code::FRAME_ERROR, detail)
}

/// Parses a method frame's payload (at least 4 bytes: class and method ids).
fn parse_method(payload: &[u8]) -> AmqpResult<AMQPClass> {
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let method_id = u16::from_be_bytes([payload[2], payload[3]]);
    match parse_class(payload) {
        Ok((&[], class)) => {
            check_qos_prefetch_size(class_id, method_id, payload)?;
            Ok(class)
        }
        // RabbitMQ drops the connection without a word here; a close that names
        // the method tells the client what went wrong.
        _ if !is_known_method(class_id, method_id) => Err(AmqpError::connection(
            code::NOT_IMPLEMENTED,
            format!("unknown method: class {class_id}, method {method_id}"),
        )
        .in_method(class_id, method_id)),
        _ => Err(
            frame_error(format!("cannot decode {}", erlang_binary(&payload[4..])))
                .in_method(class_id, method_id),
        ),
    }
}

/// basic.qos's prefetch_size is parsed and dropped by amq-protocol, but a
/// non-zero value is something RabbitMQ refuses (540), so we read it here.
fn check_qos_prefetch_size(class_id: u16, method_id: u16, payload: &[u8]) -> AmqpResult<()> {
    if (class_id, method_id) != (60, 10) || payload.len() < 8 {
        return Ok(());
    }
    let prefetch_size = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
    if prefetch_size == 0 {
        return Ok(());
    }
    Err(AmqpError::connection(
        code::NOT_IMPLEMENTED,
        format!("prefetch_size!=0 ({prefetch_size})"),
    )
    .in_method(60, 10))
}

/// RabbitMQ quotes offending frames in its error texts; so do we, the same way.
fn describe_octets(payload: &[u8]) -> String {
    if payload.len() <= 16 {
        format!("all octets = {}", erlang_binary(payload))
    } else {
        format!("first 16 octets = {}", erlang_binary(&payload[..16]))
    }
}

/// Formats bytes as Erlang prints a binary: `<<"text">>` or `<<0,50>>`.
fn erlang_binary(bytes: &[u8]) -> String {
    let printable = |b: &u8| (0x20..0x7f).contains(b) && *b != b'"' && *b != b'\\';
    if !bytes.is_empty() && bytes.iter().all(printable) {
        return format!("<<\"{}\">>", String::from_utf8_lossy(bytes));
    }
    let numbers: Vec<String> = bytes.iter().map(|b| b.to_string()).collect();
    format!("<<{}>>", numbers.join(","))
}

/// Class and method ids of AMQP 0-9-1 (with RabbitMQ's extensions).
fn is_known_method(class_id: u16, method_id: u16) -> bool {
    let methods: &[u16] = match class_id {
        10 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
        20 => &[10, 11, 20, 21, 40, 41],
        30 => &[10, 11],
        40 => &[10, 11, 20, 21, 30, 31, 40, 51],
        50 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        60 => &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
        85 => &[10, 11],
        90 => &[10, 11, 20, 21, 30, 31],
        _ => &[],
    };
    methods.contains(&method_id)
}
