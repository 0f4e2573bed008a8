//! Publishing that is only reported done once the broker has taken
//! responsibility: every call here waits for the publisher confirm.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};

use crate::error::{Error, Result};
use crate::headers;
use crate::topology::{self, DelayPath};

/// Publishes and waits for the confirm. With `mandatory`, a message no
/// queue took comes back as [`Error::Unroutable`].
pub async fn confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
    mandatory: bool,
) -> Result<()> {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            body,
            props,
        )
        .await?;
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(Error::Unroutable(format!("{exchange:?}/{key}"))),
        Confirmation::Nack(_) => Err(Error::Nacked(format!("{exchange:?}/{key}"))),
        // The SDK only ever publishes on confirm channels.
        Confirmation::NotRequested => Err(Error::Nacked(format!(
            "{exchange:?}/{key} (channel not in confirm mode)"
        ))),
    }
}

/// Puts a message into `queue` after `delay` (at once for zero), through the
/// delayed-message exchange or the TTL ladder, and waits for the confirm.
/// Mandatory, so a missing queue or binding is an error rather than a loss.
pub async fn to_queue_after(
    ch: &Channel,
    path: DelayPath,
    queue: &str,
    delay: Duration,
    body: &[u8],
    props: BasicProperties,
) -> Result<()> {
    if delay.is_zero() {
        return confirmed(ch, "", queue, body, props, true).await;
    }
    match path {
        DelayPath::Plugin => {
            let mut table = headers::table(&props);
            headers::set_int(&mut table, headers::X_DELAY, delay.as_millis() as i64);
            let props = props.with_headers(table);
            confirmed(ch, topology::DELAYED_EXCHANGE, queue, body, props, true).await
        }
        DelayPath::Ladder => {
            let key = topology::ladder_key(delay, queue);
            confirmed(ch, &topology::ladder_entry(), &key, body, props, true).await
        }
    }
}
