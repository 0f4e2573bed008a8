//! How the model's durable things look as bytes, for the store to keep.
//! Definitions are JSON (rare, small, readable when debugging) under keys
//! that make them unique; messages are a compact binary record that keeps
//! the content header exactly as it arrived.

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::types::FieldTable;
use bytes::{Buf, Bytes};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::delayed;
use super::exchange::{ExchangeKind, ExchangeOptions};
use super::message::Message;
use super::queue::QueueOptions;

/// The store key of a durable exchange's definition.
pub fn exchange_key(vhost: &str, name: &str) -> Vec<u8> {
    [b"e\0", vhost.as_bytes(), b"\0", name.as_bytes()].concat()
}

/// The store key of a durable queue's definition.
pub fn queue_key(vhost: &str, name: &str) -> Vec<u8> {
    [b"q\0", vhost.as_bytes(), b"\0", name.as_bytes()].concat()
}

#[derive(Serialize, Deserialize)]
pub struct ExchangeRecord {
    pub vhost: String,
    pub name: String,
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

impl ExchangeRecord {
    pub fn new(vhost: &str, name: &str, o: &ExchangeOptions) -> Self {
        ExchangeRecord {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            kind: o.type_name().to_owned(),
            durable: o.durable,
            auto_delete: o.auto_delete,
            internal: o.internal,
            arguments: o.arguments.clone(),
        }
    }

    pub fn options(&self) -> Option<ExchangeOptions> {
        let delayed = self.kind == delayed::EXCHANGE_TYPE;
        let kind = if delayed {
            delayed::routing_kind(&self.arguments).ok()?
        } else {
            ExchangeKind::parse(&self.kind)?
        };
        Some(ExchangeOptions {
            kind,
            delayed,
            durable: self.durable,
            auto_delete: self.auto_delete,
            internal: self.internal,
            arguments: self.arguments.clone(),
        })
    }
}

#[derive(Serialize, Deserialize)]
pub struct QueueRecord {
    pub vhost: String,
    pub name: String,
    /// Stable id: the prefix of this queue's entries in the index tree.
    pub id: u64,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

impl QueueRecord {
    pub fn new(vhost: &str, name: &str, id: u64, o: &QueueOptions) -> Self {
        QueueRecord {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            id,
            auto_delete: o.auto_delete,
            arguments: o.arguments.clone(),
        }
    }

    pub fn options(&self) -> QueueOptions {
        QueueOptions {
            durable: true,
            exclusive: false,
            auto_delete: self.auto_delete,
            arguments: self.arguments.clone(),
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct BindingRecord {
    pub vhost: String,
    pub source: String,
    pub destination_is_queue: bool,
    pub destination: String,
    pub routing_key: String,
    pub arguments: FieldTable,
}

impl BindingRecord {
    /// Unique per (source, destination, key, arguments), as bindings are.
    pub fn key(&self) -> Vec<u8> {
        let args = serde_json::to_vec(&self.arguments).unwrap_or_default();
        [
            b"b\0".as_slice(),
            self.vhost.as_bytes(),
            b"\0",
            self.source.as_bytes(),
            b"\0",
            if self.destination_is_queue {
                b"q"
            } else {
                b"e"
            },
            self.destination.as_bytes(),
            b"\0",
            self.routing_key.as_bytes(),
            b"\0",
            &args,
        ]
        .concat()
    }
}

pub fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("definitions always serialize")
}

pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("unreadable definition: {e}"))
}

/// The part of a message record before its content header and body:
/// `[exchange len u8][exchange][routing key len u8][routing key][header len u32]`.
/// The record is this, the header, then the body, so the store can write
/// them in one go without the model copying the body first. Short strings
/// bound it, so it lives on the stack: no allocation per persistent message.
pub struct MessagePrefix {
    buf: [u8; 2 + 2 * 255 + 4],
    len: usize,
}

impl MessagePrefix {
    pub fn of(m: &Message) -> Self {
        let mut prefix = MessagePrefix {
            buf: [0; 2 + 2 * 255 + 4],
            len: 0,
        };
        let header_len = (m.raw_header.len() as u32).to_be_bytes();
        for short in [m.exchange.as_str(), m.routing_key.as_str()] {
            let bytes = &short.as_bytes()[..short.len().min(255)];
            prefix.push(&[bytes.len() as u8]);
            prefix.push(bytes);
        }
        prefix.push(&header_len);
        prefix
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The whole record of a message, as one buffer.
pub fn encode_message(m: &Message) -> Vec<u8> {
    let prefix = MessagePrefix::of(m);
    let mut out = Vec::with_capacity(prefix.len + m.raw_header.len() + m.body.len());
    out.extend_from_slice(prefix.as_slice());
    out.extend_from_slice(&m.raw_header);
    out.extend_from_slice(&m.body);
    out
}

pub fn decode_message(mut bytes: Bytes) -> Option<Message> {
    let short = |bytes: &mut Bytes| -> Option<String> {
        let len = *bytes.first()? as usize;
        if bytes.len() < 1 + len {
            return None;
        }
        bytes.advance(1);
        let s = String::from_utf8(bytes.split_to(len).to_vec()).ok()?;
        Some(s)
    };
    let exchange = short(&mut bytes)?;
    let routing_key = short(&mut bytes)?;
    if bytes.len() < 4 {
        return None;
    }
    let header_len = bytes.get_u32() as usize;
    if bytes.len() < header_len {
        return None;
    }
    let raw_header = bytes.split_to(header_len);
    let (_, header) = parse_content_header(&raw_header[..]).ok()?;
    Some(Message {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        properties: header.properties,
        raw_header,
        body: bytes,
    })
}

/// A held delayed message:
/// `[vhost len u16][vhost][exchange len u8][exchange][message as encode_message]`
pub fn encode_delayed(vhost: &str, exchange: &str, m: &Message) -> Vec<u8> {
    let message = encode_message(m);
    let (vhost, exchange) = (vhost.as_bytes(), exchange.as_bytes());
    let mut out = Vec::with_capacity(3 + vhost.len() + exchange.len() + message.len());
    out.extend_from_slice(&(vhost.len() as u16).to_be_bytes());
    out.extend_from_slice(vhost);
    out.push(exchange.len() as u8);
    out.extend_from_slice(exchange);
    out.extend_from_slice(&message);
    out
}

/// (vhost, exchange, message) of a held delayed message.
pub fn decode_delayed(mut bytes: Bytes) -> Option<(String, String, Message)> {
    if bytes.len() < 2 {
        return None;
    }
    let vhost_len = bytes.get_u16() as usize;
    if bytes.len() < vhost_len + 1 {
        return None;
    }
    let vhost = String::from_utf8(bytes.split_to(vhost_len).to_vec()).ok()?;
    let exchange_len = bytes.get_u8() as usize;
    if bytes.len() < exchange_len {
        return None;
    }
    let exchange = String::from_utf8(bytes.split_to(exchange_len).to_vec()).ok()?;
    Some((vhost, exchange, decode_message(bytes)?))
}

/// Durable bindings record their arguments too, so a restart rebuilds them exactly.
pub fn binding_record(
    vhost: &str,
    source: &str,
    destination_is_queue: bool,
    destination: &str,
    routing_key: &str,
    arguments: &FieldTable,
) -> BindingRecord {
    BindingRecord {
        vhost: vhost.to_owned(),
        source: source.to_owned(),
        destination_is_queue,
        destination: destination.to_owned(),
        routing_key: routing_key.to_owned(),
        arguments: arguments.clone(),
    }
}
