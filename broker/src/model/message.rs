//! A published message as the broker holds it: parsed properties for routing
//! decisions, plus the content header exactly as received so deliveries replay
//! it byte for byte (amq-protocol's FieldTable is a BTreeMap and would reorder
//! header keys on re-encoding).

use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::Bytes;

#[derive(Debug)]
pub struct Message {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: BasicProperties,
    /// The content header frame's payload (class, weight, body size, properties).
    pub raw_header: Bytes,
    /// The whole body; shared, never copied, by every queue the message reaches.
    pub body: Bytes,
}

impl Message {
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode() == &Some(2)
    }

    /// The `expiration` property in milliseconds. Invalid values were refused
    /// at publish, so one that does not parse here means no expiry.
    pub fn expiration_ms(&self) -> Option<u64> {
        self.properties.expiration().as_ref()?.as_str().parse().ok()
    }
}

/// The content header a quorum queue delivers `message` with: as published
/// plus `x-delivery-count`, how often it came back unsettled before, which
/// clients (Celery, MassTransit...) read to give up on a poison message.
/// RabbitMQ 3.10 leaves it out of a consumer's first delivery but puts it in
/// every basic.get-ok, 0 included; other deliveries keep their header bytes.
pub fn quorum_header(message: &Message, delivery_count: u32, for_get: bool) -> Bytes {
    if delivery_count == 0 && !for_get {
        return message.raw_header.clone();
    }
    let mut headers = message.headers().cloned().unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongLongInt(delivery_count.into()),
    );
    let properties = message.properties.clone().with_headers(headers);
    encode_header(&properties, message.body.len() as u64)
}

/// A content header payload (class, weight, size, properties) for a message
/// whose properties the broker changed (dead-lettering, direct reply-to);
/// the frame envelope is added at delivery.
pub fn encode_header(properties: &BasicProperties, body_size: u64) -> Bytes {
    let frame = AMQPFrame::Header(
        0,
        AMQPContentHeader {
            class_id: 60,
            body_size,
            properties: properties.clone(),
        },
    );
    let encoded = gen_frame(&frame)(WriteContext::from(Vec::new())).map(|ctx| ctx.into_inner().0);
    match encoded {
        // Strip the 7-byte frame header and the frame-end octet.
        Ok(buf) => Bytes::copy_from_slice(&buf[7..buf.len() - 1]),
        Err(error) => {
            tracing::error!(%error, "could not encode a rewritten message header");
            Bytes::new()
        }
    }
}
