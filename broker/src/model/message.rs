//! A published message as the broker holds it: parsed properties for routing
//! decisions, plus the content header exactly as received so deliveries replay
//! it byte for byte (amq-protocol's FieldTable is a BTreeMap and would reorder
//! header keys on re-encoding).

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{FieldTable, ShortString};
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
