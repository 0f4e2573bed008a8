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
/// How deep field tables and arrays may nest (the outermost table is level
/// one). amq-protocol's parser recurses once per level, and a few thousand
/// levels overflow a runtime thread's stack, aborting the whole broker.
/// RabbitMQ has no such limit, but no real client comes anywhere near it.
pub const MAX_TABLE_DEPTH: usize = 64;

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
                // Content only follows basic.publish, so that is the method we name.
                check_header_nesting(&payload).map_err(|e| e.in_method(60, 40))?;
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
            // A heartbeat is empty and belongs to the connection, as RabbitMQ checks.
            _ if !payload.is_empty() => {
                return Err(frame_error(format!(
                    "type {frame_type}, {}: unknown_frame",
                    describe_octets(&payload)
                )))
            }
            _ if channel != 0 => {
                return Err(AmqpError::connection(
                    code::UNEXPECTED_FRAME,
                    format!("type {frame_type}, {}", describe_octets(&payload)),
                ))
            }
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
    check_method_nesting(class_id, method_id, &payload[4..])
        .map_err(|e| e.in_method(class_id, method_id))?;
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

fn nesting_too_deep() -> AmqpError {
    frame_error(format!(
        "field table nesting deeper than {MAX_TABLE_DEPTH} levels"
    ))
}

/// Reads a method's (or content header's) fields in order. Every read is
/// bounded by the payload; `None` means the input ends early, which is
/// amq-protocol's to report.
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len())?;
        let taken = &self.bytes[self.pos..end];
        self.pos = end;
        Some(taken)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<usize> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn short_str(&mut self) -> Option<&'a [u8]> {
        let len = self.take(1)?[0] as usize;
        self.take(len)
    }

    /// A long string, or a field table's content: 4-octet length, then bytes.
    fn long_str(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()?;
        self.take(len)
    }
}

/// Checks every field table among a method's arguments (`args`: the payload
/// after class and method ids).
fn check_method_nesting(class_id: u16, method_id: u16, args: &[u8]) -> AmqpResult<()> {
    let mut f = Fields::new(args);
    if skip_to_table(class_id, method_id, &mut f) != Some(true) {
        return Ok(());
    }
    let Some(table) = f.long_str() else {
        return Ok(());
    };
    check_table_content(table)?;
    if (class_id, method_id) == (10, 11) {
        // start-ok goes on with mechanism and response; an AMQPLAIN response
        // is a field table's content, which the handshake parses.
        let mechanism = f.short_str();
        let response = f.long_str();
        if let (Some(b"AMQPLAIN"), Some(response)) = (mechanism, response) {
            check_table_content(response)?;
        }
    }
    Ok(())
}

/// Moves `f` to the field table among a method's arguments: `Some(false)` for
/// methods without one, `None` when the arguments end before it. These are all
/// the methods amq-protocol parses a table for; connection.start is only sent
/// by servers, but a client's copy is parsed all the same.
fn skip_to_table(class_id: u16, method_id: u16, f: &mut Fields) -> Option<bool> {
    match (class_id, method_id) {
        // connection.start: version-major, version-minor, server-properties.
        (10, 10) => {
            f.take(2)?;
        }
        // connection.start-ok: client-properties comes first.
        (10, 11) => {}
        // exchange.declare: reserved-1, exchange, type, 5 bits, arguments.
        // basic.consume: reserved-1, queue, consumer-tag, 4 bits, arguments.
        (40, 10) | (60, 20) => {
            f.u16()?;
            f.short_str()?;
            f.short_str()?;
            f.take(1)?;
        }
        // exchange.bind / exchange.unbind: reserved-1, destination, source,
        // routing-key, no-wait, arguments. queue.bind: reserved-1, queue,
        // exchange, routing-key, no-wait, arguments.
        (40, 30) | (40, 40) | (50, 20) => {
            f.u16()?;
            f.short_str()?;
            f.short_str()?;
            f.short_str()?;
            f.take(1)?;
        }
        // queue.declare: reserved-1, queue, 5 bits, arguments.
        (50, 10) => {
            f.u16()?;
            f.short_str()?;
            f.take(1)?;
        }
        // queue.unbind: reserved-1, queue, exchange, routing-key, arguments (no bits).
        (50, 50) => {
            f.u16()?;
            f.short_str()?;
            f.short_str()?;
            f.short_str()?;
        }
        _ => return Some(false),
    }
    Some(true)
}

/// Checks the `headers` property of a content header payload: class-id,
/// weight, body-size, property flags, then content-type (flag bit 15),
/// content-encoding (bit 14) and headers (bit 13).
fn check_header_nesting(payload: &[u8]) -> AmqpResult<()> {
    let mut f = Fields::new(payload);
    let Some(flags) = f.take(12).and_then(|_| f.u16()) else {
        return Ok(());
    };
    if flags & 0x2000 == 0 {
        return Ok(());
    }
    if flags & 0x8000 != 0 && f.short_str().is_none() {
        return Ok(());
    }
    if flags & 0x4000 != 0 && f.short_str().is_none() {
        return Ok(());
    }
    match f.long_str() {
        Some(headers) => check_table_content(headers),
        None => Ok(()),
    }
}

/// Walks a field table's content (the bytes after its length), refusing
/// tables and arrays nested deeper than [`MAX_TABLE_DEPTH`], with an explicit
/// stack instead of recursion. It follows amq-protocol's parser exactly as far
/// as the input is well-formed (RabbitMQ's type codes, each nested value
/// bounded by its container) and stops quietly at the first malformed octet:
/// amq-protocol stops there too, before nesting any deeper, and reports it.
fn check_table_content(bytes: &[u8]) -> AmqpResult<()> {
    struct Container {
        end: usize,
        table: bool,
    }
    // Level 1 is the table we were given.
    let mut open = vec![Container {
        end: bytes.len(),
        table: true,
    }];
    let mut pos = 0usize;
    // Whether `n` octets from `pos` stay within a container ending at `end`.
    let fits = |pos: usize, n: usize, end: usize| pos.checked_add(n).is_some_and(|e| e <= end);
    let read_u32 = |pos: usize| {
        u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]) as usize
    };
    while let Some(top) = open.last() {
        let (end, table) = (top.end, top.table);
        if pos >= end {
            open.pop();
            continue;
        }
        if table {
            // The entry's name: a short string.
            let name_len = bytes[pos] as usize;
            if !fits(pos, 1 + name_len, end) {
                return Ok(());
            }
            pos += 1 + name_len;
        }
        if !fits(pos, 1, end) {
            return Ok(());
        }
        let kind = bytes[pos];
        pos += 1;
        let fixed = match kind {
            b'V' => 0,
            b't' | b'b' | b'B' => 1,
            b's' | b'U' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'D' => 5,
            b'l' | b'L' | b'd' | b'T' => 8,
            b'S' | b'x' | b'A' | b'F' => {
                if !fits(pos, 4, end) {
                    return Ok(());
                }
                let len = read_u32(pos);
                pos += 4;
                if !fits(pos, len, end) {
                    return Ok(());
                }
                if kind == b'A' || kind == b'F' {
                    if open.len() >= MAX_TABLE_DEPTH {
                        return Err(nesting_too_deep());
                    }
                    open.push(Container {
                        end: pos + len,
                        table: kind == b'F',
                    });
                    continue;
                }
                len
            }
            // Not a type amq-protocol knows: it fails here.
            _ => return Ok(()),
        };
        if !fits(pos, fixed, end) {
            return Ok(());
        }
        pos += fixed;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
    use amq_protocol::protocol::{basic, connection, exchange, queue};
    use amq_protocol::types::{AMQPValue, FieldArray, FieldTable};

    /// A field value `levels` deep: arrays and tables alternating, innermost empty.
    fn nested(levels: usize) -> AMQPValue {
        let mut value = AMQPValue::FieldArray(FieldArray::default());
        for level in 1..levels {
            value = if level % 2 == 0 {
                AMQPValue::FieldArray(vec![AMQPValue::Boolean(true), value].into())
            } else {
                let mut t = FieldTable::default();
                t.insert("n".into(), AMQPValue::LongLongInt(7));
                t.insert("v".into(), value);
                AMQPValue::FieldTable(t)
            };
        }
        value
    }

    /// A table whose deepest value sits at nesting level `depth` (the table is level 1).
    fn table(depth: usize) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("a-string".into(), AMQPValue::LongString("text".into()));
        t.insert("a-timestamp".into(), AMQPValue::Timestamp(12));
        t.insert("deep".into(), nested(depth - 1));
        t
    }

    /// The payload of `frame` as amq-protocol encodes it.
    fn payload(frame: AMQPFrame) -> Vec<u8> {
        let (bytes, _) = gen_frame(&frame)(WriteContext::from(Vec::new()))
            .expect("encodes")
            .into_inner();
        bytes[7..bytes.len() - 1].to_vec()
    }

    fn methods(arguments: FieldTable) -> Vec<AMQPClass> {
        vec![
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: arguments.clone(),
                mechanisms: "PLAIN".into(),
                locales: "en_US".into(),
            })),
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: arguments.clone(),
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: "x".into(),
                kind: "topic".into(),
                durable: true,
                internal: true,
                arguments: arguments.clone(),
                ..Default::default()
            })),
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: "d".into(),
                source: "s".into(),
                routing_key: "r.k".into(),
                nowait: true,
                arguments: arguments.clone(),
            })),
            AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                destination: "d".into(),
                source: "s".into(),
                routing_key: "r.k".into(),
                nowait: false,
                arguments: arguments.clone(),
            })),
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "q".into(),
                exclusive: true,
                arguments: arguments.clone(),
                ..Default::default()
            })),
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: "q".into(),
                exchange: "x".into(),
                routing_key: "#".into(),
                nowait: true,
                arguments: arguments.clone(),
            })),
            AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
                queue: "q".into(),
                exchange: "x".into(),
                routing_key: "#".into(),
                arguments: arguments.clone(),
            })),
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "q".into(),
                consumer_tag: "tag".into(),
                no_ack: true,
                exclusive: true,
                arguments,
                ..Default::default()
            })),
        ]
    }

    fn header(headers: FieldTable) -> Vec<u8> {
        let properties = BasicProperties::default()
            .with_content_type("text/plain".into())
            .with_content_encoding("gzip".into())
            .with_headers(headers)
            .with_priority(3)
            .with_app_id("app".into());
        payload(AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: 5,
                properties,
            },
        ))
    }

    fn is_too_deep(result: AmqpResult<impl std::fmt::Debug>) -> bool {
        match result {
            Err(e) => {
                assert_eq!(e.code, code::FRAME_ERROR);
                assert_eq!(
                    e.text,
                    "FRAME_ERROR - field table nesting deeper than 64 levels"
                );
                true
            }
            Ok(_) => false,
        }
    }

    #[test]
    fn nesting_up_to_the_limit_parses() {
        for class in methods(table(MAX_TABLE_DEPTH)) {
            let bytes = payload(AMQPFrame::Method(1, class.clone()));
            assert_eq!(parse_method(&bytes).expect("parses"), class);
        }
        let bytes = header(table(MAX_TABLE_DEPTH));
        assert!(check_header_nesting(&bytes).is_ok());
        assert!(parse_content_header(&bytes[..]).is_ok());
    }

    /// Also proves each method's layout is right: the table is found where
    /// amq-protocol's encoder put it.
    #[test]
    fn one_level_more_is_refused_in_every_table() {
        for class in methods(table(MAX_TABLE_DEPTH + 1)) {
            let bytes = payload(AMQPFrame::Method(1, class.clone()));
            let (class_id, method_id) = (class.get_amqp_class_id(), class.get_amqp_method_id());
            let error = parse_method(&bytes).expect_err("too deep");
            assert!(is_too_deep(Err::<(), _>(error.clone())), "{class:?}");
            assert_eq!((error.class_id, error.method_id), (class_id, method_id));
        }
        assert!(is_too_deep(check_header_nesting(&header(table(
            MAX_TABLE_DEPTH + 1
        )))));
    }

    #[test]
    fn amqplain_response_is_checked() {
        let response = |depth| {
            let mut t = table(depth);
            t.insert("LOGIN".into(), AMQPValue::LongString("guest".into()));
            let full = payload(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                    client_properties: t,
                    ..Default::default()
                })),
            ));
            // The client_properties table's content, after class, method and length.
            // (An empty mechanism, response and locale follow: 1 + 4 + 1 octets.)
            full[8..full.len() - 6].to_vec()
        };
        let start_ok = |mechanism: &str, response: Vec<u8>| {
            payload(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                    client_properties: table(3),
                    mechanism: mechanism.into(),
                    response: response.into(),
                    locale: "en_US".into(),
                })),
            ))
        };
        assert!(parse_method(&start_ok("AMQPLAIN", response(MAX_TABLE_DEPTH))).is_ok());
        assert!(is_too_deep(parse_method(&start_ok(
            "AMQPLAIN",
            response(MAX_TABLE_DEPTH + 1)
        ))));
        // Other mechanisms' responses are opaque bytes.
        assert!(parse_method(&start_ok("PLAIN", response(MAX_TABLE_DEPTH + 1))).is_ok());
    }

    /// Thousands of levels: refused without recursing (a recursive walk
    /// would overflow this test thread's stack just like amq-protocol).
    #[test]
    fn very_deep_input_is_refused_iteratively() {
        let mut content = Vec::new();
        for level in (1..=100_000u32).rev() {
            content.extend_from_slice(b"\x01kF");
            content.extend_from_slice(&(7 * (level - 1)).to_be_bytes());
        }
        assert!(is_too_deep(check_table_content(&content)));
        let arrays: Vec<u8> = (1..=100_000u32)
            .rev()
            .flat_map(|level| {
                let mut v = vec![b'A'];
                v.extend_from_slice(&(5 * (level - 1)).to_be_bytes());
                v
            })
            .collect();
        let mut content = b"\x01k".to_vec();
        content.extend_from_slice(&arrays);
        assert!(is_too_deep(check_table_content(&content)));
    }

    fn depth_of_table(t: &FieldTable) -> usize {
        1 + t.inner().values().map(depth_of).max().unwrap_or(0)
    }

    fn depth_of(v: &AMQPValue) -> usize {
        match v {
            AMQPValue::FieldTable(t) => depth_of_table(t),
            AMQPValue::FieldArray(a) => 1 + a.as_slice().iter().map(depth_of).max().unwrap_or(0),
            _ => 0,
        }
    }

    #[test]
    fn depth_helper_counts_levels() {
        assert_eq!(depth_of_table(&table(MAX_TABLE_DEPTH)), MAX_TABLE_DEPTH);
    }

    /// Truncated, corrupted and random input never panics, and deep input
    /// that amq-protocol would stop at before nesting is not refused.
    #[test]
    fn malformed_input_is_left_to_amq_protocol() {
        assert!(check_table_content(&[]).is_ok());
        // A container claiming more than its parent holds: amq-protocol fails
        // at the length, before looking inside.
        let mut content = b"\x01kA".to_vec();
        content.extend_from_slice(&u32::MAX.to_be_bytes());
        content.extend_from_slice(&[b'A', 0, 0, 0, 0]);
        assert!(check_table_content(&content).is_ok());
        // An unknown type code before the deep part.
        let mut content = b"\x01kZ".to_vec();
        content.extend_from_slice(&[b'A', 0, 0, 0, 0].repeat(100));
        assert!(check_table_content(&content).is_ok());

        let deep = payload(AMQPFrame::Method(
            1,
            methods(table(MAX_TABLE_DEPTH + 1)).remove(5),
        ));
        let good = header(table(MAX_TABLE_DEPTH));
        let deep_header = header(table(MAX_TABLE_DEPTH + 1));
        let mut x: u32 = 0x9E37_79B9;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for source in [&deep, &good, &deep_header] {
            for cut in 0..source.len() {
                let _ = check_method_nesting(50, 10, &source[4..cut.max(4)]);
                let _ = check_header_nesting(&source[..cut]);
                let _ = check_table_content(&source[cut..]);
            }
            for _ in 0..5_000 {
                let mut bytes = source.clone();
                for _ in 0..1 + rand() % 4 {
                    let at = rand() as usize % bytes.len();
                    bytes[at] = rand() as u8;
                }
                let _ = check_method_nesting(50, 10, &bytes[4..]);
                let _ = check_header_nesting(&bytes);
                let _ = check_table_content(&bytes);
                // Whatever we let through, amq-protocol parses to at most 64 levels.
                if check_method_nesting(50, 10, &bytes[4..]).is_ok() {
                    if let Ok((_, AMQPClass::Queue(queue::AMQPMethod::Declare(d)))) =
                        parse_class(&bytes[..])
                    {
                        assert!(depth_of_table(&d.arguments) <= MAX_TABLE_DEPTH);
                    }
                }
                if check_header_nesting(&bytes).is_ok() {
                    if let Ok((_, h)) = parse_content_header(&bytes[..]) {
                        if let Some(headers) = h.properties.headers() {
                            assert!(depth_of_table(headers) <= MAX_TABLE_DEPTH);
                        }
                    }
                }
            }
        }
        for len in 0..2_000 {
            let bytes: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
            for (class_id, method_id) in [(10, 10), (10, 11), (40, 10), (40, 30), (50, 50)] {
                let _ = check_method_nesting(class_id, method_id, &bytes);
            }
            let _ = check_header_nesting(&bytes);
            let _ = check_table_content(&bytes);
        }
    }
}
