//! The channel's side of direct reply-to: consuming the pseudo-queue
//! `amq.rabbitmq.reply-to` registers the channel with its vhost's reply
//! routes, requests published with `reply_to = amq.rabbitmq.reply-to` carry
//! the channel's private reply name instead, and the name is given up when
//! the reply consumer is cancelled or the channel closes. Errors and answers
//! are RabbitMQ 3.10's, codes and texts.

use std::sync::Arc;

use amq_protocol::protocol::{basic, queue, AMQPClass, BasicProperties};
use amq_protocol::types::ShortString;

use super::{Channel, Context};
use crate::error::{AmqpError, AmqpResult};
use crate::model::direct_reply::{self, PSEUDO_QUEUE};
use crate::model::vhost::{generated_name, VHost};
use crate::protocol::delivery::ReplyConsumer;

impl Channel {
    /// basic.consume of the pseudo-queue. Replies are not queued anywhere,
    /// so they cannot be redelivered: the consumer must be no-ack, and one
    /// per channel is all a reply name can point at.
    pub(super) fn consume_replies(
        &mut self,
        ctx: &Context<'_>,
        c: &basic::Consume,
    ) -> AmqpResult<()> {
        // Checked in RabbitMQ's order: an acknowledging second consumer is
        // refused for acknowledging.
        if !c.no_ack {
            return Err(AmqpError::precondition("reply consumer cannot acknowledge"));
        }
        if self.shared.reply_consumer().is_some() {
            return Err(AmqpError::precondition("reply consumer already set"));
        }
        let tag: ShortString = if c.consumer_tag.as_str().is_empty() {
            generated_name("amq.ctag-").into()
        } else {
            c.consumer_tag.clone()
        };
        self.check_tag_unused(&tag)?;
        let sink = Arc::downgrade(&self.shared);
        let name = ctx.vhost.replies().register(sink);
        self.shared.set_reply_consumer(ReplyConsumer {
            tag: tag.clone(),
            name,
        });
        if !c.nowait {
            self.reply(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(
                basic::ConsumeOk { consumer_tag: tag },
            )));
        }
        Ok(())
    }

    /// basic.cancel of the reply consumer: its name stops working at once.
    /// False when `tag` is not the reply consumer's.
    pub(super) fn cancel_replies(&mut self, ctx: &Context<'_>, tag: &ShortString) -> bool {
        match self.shared.take_reply_consumer(Some(tag)) {
            Some(reply) => {
                ctx.vhost.replies().unregister(&reply.name);
                true
            }
            None => false,
        }
    }

    /// A request asking for a direct reply gets this channel's reply name
    /// in its `reply_to`. Returns whether the properties changed (the
    /// content header must then be encoded anew).
    pub(super) fn fill_in_reply_to(&self, properties: &mut BasicProperties) -> AmqpResult<bool> {
        let asks = properties
            .reply_to()
            .as_ref()
            .is_some_and(|r| r.as_str() == PSEUDO_QUEUE);
        if !asks {
            return Ok(false);
        }
        let reply = self
            .shared
            .reply_consumer()
            .ok_or_else(|| AmqpError::precondition("fast reply consumer does not exist"))?;
        *properties = properties.clone().with_reply_to(reply.name.into());
        Ok(true)
    }

    /// queue.declare of a direct reply-to name, passive or not: the
    /// pseudo-queue and live reply names exist (empty, with their one
    /// consumer), any other name under the prefix does not.
    pub(super) fn declare_reply_queue(
        &mut self,
        ctx: &Context<'_>,
        name: &str,
    ) -> AmqpResult<queue::DeclareOk> {
        debug_assert!(direct_reply::is_reserved(name));
        if name != PSEUDO_QUEUE && !ctx.vhost.replies().is_live(name) {
            return Err(AmqpError::not_found(format!(
                "no queue '{name}' in vhost '{}'",
                ctx.vhost.name
            )));
        }
        self.last_queue = Some(name.to_owned());
        Ok(queue::DeclareOk {
            queue: name.into(),
            message_count: 0,
            consumer_count: 1,
        })
    }
}

/// Gives up a closed channel's reply name: later replies to it are dropped.
pub(super) fn release_reply_name(vhost: &VHost, reply: Option<ReplyConsumer>) {
    if let Some(reply) = reply {
        vhost.replies().unregister(&reply.name);
    }
}
