//! RabbitMQ's sender-selected distribution: a publisher lists extra routing
//! keys in the `CC` and `BCC` headers (arrays of strings), and the message
//! is routed through the same exchange with each of them as well, one copy
//! per queue however many keys reach it. `BCC` is removed before delivery,
//! so receivers do not learn the other recipients; `CC` stays.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable};

use super::args::type_name;
use super::message::{encode_header, Message};
use crate::error::{AmqpError, AmqpResult};

const HEADERS: [&str; 2] = ["CC", "BCC"];

/// Refuses a `CC` or `BCC` header that is not an array, as RabbitMQ does
/// (entries that are not strings are ignored).
pub fn check(message: &Message) -> AmqpResult<()> {
    let Some(headers) = message.headers() else {
        return Ok(());
    };
    for name in HEADERS {
        match headers.inner().get(name) {
            None | Some(AMQPValue::FieldArray(_)) => {}
            Some(other) => {
                return Err(AmqpError::precondition(format!(
                    "invalid message: {{unacceptable_type_in_header,\"{name}\",{}}}",
                    type_name(other)
                )))
            }
        }
    }
    Ok(())
}

/// The routing keys `CC` and `BCC` add to the message's own.
pub fn extra_keys(headers: Option<&FieldTable>) -> Vec<&str> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    HEADERS
        .iter()
        .filter_map(|name| match headers.inner().get(*name) {
            Some(AMQPValue::FieldArray(keys)) => Some(keys.as_slice()),
            _ => None,
        })
        .flatten()
        .filter_map(|key| match key {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            _ => None,
        })
        .collect()
}

/// The message as its receivers see it: without `BCC` (the same message,
/// not a copy, when it has none).
pub fn without_bcc(message: Arc<Message>) -> Arc<Message> {
    let has_bcc = message
        .headers()
        .is_some_and(|h| h.inner().contains_key("BCC"));
    if !has_bcc {
        return message;
    }
    let mut headers = message
        .headers()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    headers.remove("BCC");
    let properties = message
        .properties
        .clone()
        .with_headers(FieldTable::from(headers));
    Arc::new(Message {
        exchange: message.exchange.clone(),
        routing_key: message.routing_key.clone(),
        raw_header: encode_header(&properties, message.body.len() as u64),
        properties,
        body: message.body.clone(),
    })
}
