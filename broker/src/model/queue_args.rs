//! Queue arguments, parsed once at declare time (placeholder: lenient parse,
//! replaced by the validating parser).

use amq_protocol::types::FieldTable;

use super::args;
use crate::error::AmqpResult;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueArgs {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub max_priority: Option<u8>,
    pub single_active_consumer: bool,
    pub consumer_timeout: Option<u64>,
}

impl QueueArgs {
    pub fn parse(arguments: &FieldTable, _queue: &str, _vhost: &str) -> AmqpResult<QueueArgs> {
        let a = arguments.inner();
        let int = |k: &str| a.get(k).and_then(args::integer).map(|v| v.max(0) as u64);
        let text = |k: &str| a.get(k).and_then(args::text);
        Ok(QueueArgs {
            message_ttl: int("x-message-ttl"),
            expires: int("x-expires"),
            max_length: int("x-max-length"),
            max_length_bytes: int("x-max-length-bytes"),
            overflow: match text("x-overflow").as_deref() {
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                _ => Overflow::DropHead,
            },
            dead_letter_exchange: text("x-dead-letter-exchange"),
            dead_letter_routing_key: text("x-dead-letter-routing-key"),
            max_priority: int("x-max-priority")
                .map(|p| p.min(255) as u8)
                .filter(|p| *p > 0),
            single_active_consumer: matches!(
                a.get("x-single-active-consumer"),
                Some(amq_protocol::types::AMQPValue::Boolean(true))
            ),
            consumer_timeout: int("x-consumer-timeout"),
        })
    }
}
