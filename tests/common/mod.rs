//! Shared helpers for the black-box AMQP tests.
//!
//! Every test talks to the broker only over the wire (lapin, or a raw socket for
//! the handshake), so the same test can be pointed at RabbitMQ with
//! `HARE_TEST_URL` to check that it pins down RabbitMQ's behaviour.

#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, BasicProperties};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

pub use hare_suite::TestBroker;

pub mod args;
pub mod crash;
pub mod process;
pub mod rabbitmq;
pub mod raw;

/// Upper bound for any single wait on the broker.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// How long we wait to convince ourselves that something does *not* arrive.
pub const QUIET: Duration = Duration::from_millis(300);

/// Awaits `fut`, panicking (instead of hanging) if the broker does not answer in time.
#[track_caller]
pub fn within<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(TIMEOUT, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out after {TIMEOUT:?} (waiting at {caller})"),
        }
    }
}

/// A name nobody else uses: tests run in parallel against one shared broker.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("hare-test.{prefix}.{}.{nanos}.{n}", std::process::id())
}

/// A broker, one connection and one channel on it.
///
/// Field order matters: the connection is dropped (closed) before the broker.
pub struct Ctx {
    pub ch: Channel,
    /// Errors reported on `conn` (channel and connection closes), from the start.
    pub errors: tokio::sync::Mutex<ErrorWatch>,
    pub conn: Connection,
    pub broker: TestBroker,
}

impl Ctx {
    /// Waits for the next channel close with an error on this context's connection
    /// (e.g. after an ack of an unknown tag, which has no reply) and asserts its code.
    /// Returns the reply text.
    pub async fn channel_closed(&self, code: u16) -> String {
        let err = self.errors.lock().await.next().await;
        expect_channel_error::<()>(Err(err), code)
    }

    /// Like [`Ctx::channel_closed`] for a connection close.
    pub async fn connection_closed(&self, code: u16) -> String {
        let err = self.errors.lock().await.next().await;
        expect_connection_error::<()>(Err(err), code)
    }

    /// Opens another connection to the same broker.
    pub async fn connect(&self) -> Connection {
        connect(&self.broker).await
    }

    /// Opens another channel on this context's connection.
    pub async fn channel(&self) -> Channel {
        within(self.conn.create_channel())
            .await
            .expect("create channel")
    }
}

/// Starts (or points at) a broker and opens a connection plus a channel.
pub async fn setup() -> Ctx {
    let broker = TestBroker::start();
    let conn = connect(&broker).await;
    let ch = within(conn.create_channel()).await.expect("create channel");
    let errors = tokio::sync::Mutex::new(ErrorWatch::new(&conn));
    Ctx {
        ch,
        errors,
        conn,
        broker,
    }
}

/// A context whose channel is in confirm mode: every publish helper waits for
/// its confirm, which RabbitMQ sends once the queue has taken the message. Its
/// queue process answers passive declares and acks ahead of queued publishes,
/// so without that barrier counts and orders would race.
pub async fn setup_confirmed() -> Ctx {
    let ctx = setup().await;
    confirm_select(&ctx.ch).await;
    ctx
}

/// Puts `ch` in confirm mode.
pub async fn confirm_select(ch: &Channel) {
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
}

/// Collects the errors lapin reports for a connection (channel.close /
/// connection.close received with an error code). Methods without a reply (ack,
/// reject, publish) can only be checked this way.
pub struct ErrorWatch {
    events: std::pin::Pin<Box<dyn futures::Stream<Item = lapin::Event> + Send>>,
}

impl ErrorWatch {
    /// Starts watching; only errors after this call are seen.
    pub fn new(conn: &Connection) -> Self {
        ErrorWatch {
            events: Box::pin(conn.events_listener()),
        }
    }

    /// The next reported error; panics after [`TIMEOUT`].
    pub async fn next(&mut self) -> lapin::Error {
        let fut = async {
            loop {
                match self.events.next().await {
                    Some(lapin::Event::Error(e)) => return e,
                    Some(_) => continue,
                    None => panic!("connection event stream ended without an error"),
                }
            }
        };
        match tokio::time::timeout(TIMEOUT, fut).await {
            Ok(e) => e,
            Err(_) => panic!("no channel/connection error reported within {TIMEOUT:?}"),
        }
    }
}

/// Waits (bounded) until lapin no longer considers `conn` connected; lapin updates
/// its status asynchronously after close-ok / connection.close.
pub async fn wait_disconnected(conn: &Connection) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while conn.status().connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection still open after {TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects with default properties, bounded by [`TIMEOUT`].
pub async fn connect(broker: &TestBroker) -> Connection {
    connect_url(broker.url())
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", broker.url()))
}

/// Connects to `url` with default properties, bounded by [`TIMEOUT`].
pub async fn connect_url(url: &str) -> lapin::Result<Connection> {
    within(Connection::connect(url, ConnectionProperties::default())).await
}

/// `url` with its vhost (the path) replaced by `vhost` (already percent-encoded).
pub fn url_with_vhost(url: &str, vhost: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    let mut out = format!("{}/{vhost}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// `url` with `query` (e.g. `heartbeat=5`) appended to its query string.
pub fn url_with_query(url: &str, query: &str) -> String {
    if url.contains('?') {
        format!("{url}&{query}")
    } else {
        format!("{url}?{query}")
    }
}

/// `url` with its password replaced.
pub fn url_with_password(url: &str, password: &str) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).expect("scheme");
    let at = url.rfind('@').expect("credentials in URL");
    let userinfo = &url[scheme_end..at];
    let user = userinfo.split(':').next().unwrap_or(userinfo);
    format!("{}{user}:{password}{}", &url[..scheme_end], &url[at..])
}

/// The AMQP reply code and text of a protocol error, and whether it was a
/// connection-level (hard) error. Panics for non-protocol errors.
pub fn amqp_error(err: &lapin::Error) -> (u16, String, bool) {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => (
            e.get_id(),
            e.get_message().to_string(),
            matches!(e.kind(), AMQPErrorKind::Hard(_)),
        ),
        other => panic!("expected an AMQP protocol error, got {other:?} ({err})"),
    }
}

/// Asserts that `res` failed with a channel-level error `code`; returns the reply text.
#[track_caller]
pub fn expect_channel_error<T: std::fmt::Debug>(res: lapin::Result<T>, code: u16) -> String {
    let err = match res {
        Ok(v) => panic!("expected channel error {code}, got success: {v:?}"),
        Err(e) => e,
    };
    let (got, text, hard) = amqp_error(&err);
    assert_eq!(got, code, "reply code (text: {text:?})");
    assert!(
        !hard,
        "expected a channel (soft) error, got a connection error: {text:?}"
    );
    text
}

/// Asserts that `res` failed with the connection-level error `code` (connection.close);
/// returns the reply text.
#[track_caller]
pub fn expect_connection_error<T: std::fmt::Debug>(res: lapin::Result<T>, code: u16) -> String {
    let err = match res {
        Ok(v) => panic!("expected connection error {code}, got success: {v:?}"),
        Err(e) => e,
    };
    // lapin classifies by reply code, not by the carrying method: 403 on
    // connection.close (failed login) still counts as "soft" there.
    let (got, text, _hard) = amqp_error(&err);
    assert_eq!(got, code, "reply code (text: {text:?})");
    text
}

/// For methods without a reply (ack, reject, publish...): after `ch` sent one, issue a
/// harmless synchronous method; if the broker closed the channel, that call fails with
/// the channel's close reason. Returns the result of the probe.
pub async fn sync_probe(ch: &Channel) -> lapin::Result<()> {
    within(ch.exchange_declare(
        "amq.direct".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

/// Declares a plain (non-durable, non-exclusive, non-auto-delete) queue with a unique name.
pub async fn declare_queue(ch: &Channel, prefix: &str) -> String {
    let name = unique(prefix);
    declare_named_queue(ch, &name).await;
    name
}

/// Declares the plain queue `name`.
pub async fn declare_named_queue(ch: &Channel, name: &str) {
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
}

/// Declares a non-durable queue with `arguments` and a unique name.
pub async fn declare_with(ch: &Channel, prefix: &str, arguments: &[(&str, AMQPValue)]) -> String {
    let name = unique(prefix);
    within(ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions::default(),
        args::table(arguments),
    ))
    .await
    .unwrap_or_else(|e| panic!("declare {name}: {e}"));
    name
}

/// Deletes queue `q` (tests against the shared RabbitMQ clean up after themselves).
pub async fn delete_queue(ch: &Channel, q: &str) {
    within(ch.queue_delete(q.into(), QueueDeleteOptions::default()))
        .await
        .expect("queue.delete");
}

/// Deletes exchange `x`.
pub async fn delete_exchange(ch: &Channel, x: &str) {
    within(ch.exchange_delete(x.into(), Default::default()))
        .await
        .expect("exchange.delete");
}

/// Declares an exchange of `kind` with a unique name (non-durable, auto-delete off).
pub async fn declare_exchange(ch: &Channel, prefix: &str, kind: ExchangeKind) -> String {
    let name = unique(prefix);
    within(ch.exchange_declare(
        name.as_str().into(),
        kind,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
    name
}

/// Binds `queue` to `exchange` with `key` and `args`.
pub async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    within(ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        args,
    ))
    .await
    .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {key:?}: {e}"));
}

/// Publishes `body` (non-mandatory, default properties) and waits for the publish
/// (and its confirm, if the channel is in confirm mode).
pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    publish_with(ch, exchange, key, body, BasicProperties::default()).await;
}

/// Publishes `body` with `props` and waits for the publish (and confirm, if any).
pub async fn publish_with(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let confirm = within(ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    ))
    .await
    .expect("basic.publish");
    within(confirm).await.expect("publisher confirm");
}

/// Publishes `body` to `queue` on a confirm channel and returns the
/// confirmation, for tests that look at the ack or nack itself.
pub async fn publish_confirmed(ch: &Channel, queue: &str, body: &[u8]) -> lapin::Confirmation {
    let confirm = within(ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    ))
    .await
    .expect("basic.publish");
    within(confirm).await.expect("publisher confirm")
}

/// Publishes to the default exchange (straight into `queue`).
pub async fn send(ch: &Channel, queue: &str, body: &[u8]) {
    publish(ch, "", queue, body).await;
}

/// Starts a consumer with a server-generated tag.
pub async fn consume(ch: &Channel, queue: &str, no_ack: bool) -> Consumer {
    try_consume(ch, queue, no_ack)
        .await
        .unwrap_or_else(|e| panic!("consume {queue}: {e}"))
}

/// basic.consume whose outcome the test judges.
pub async fn try_consume(ch: &Channel, queue: &str, no_ack: bool) -> lapin::Result<Consumer> {
    within(ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

/// Cancels `consumer` and waits for cancel-ok (dropping a lapin consumer only
/// cancels it in the background).
pub async fn cancel(ch: &Channel, consumer: Consumer) {
    within(ch.basic_cancel(consumer.tag(), Default::default()))
        .await
        .expect("basic.cancel");
}

/// Next delivery from `consumer`; panics on timeout, error or end of stream.
#[track_caller]
pub fn next_delivery(
    consumer: &mut Consumer,
) -> impl Future<Output = lapin::message::Delivery> + '_ {
    let fut = within(consumer.next());
    async move {
        match fut.await {
            Some(Ok(d)) => d,
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => panic!("consumer stream ended"),
        }
    }
}

/// Asserts that `consumer` receives nothing for [`QUIET`].
pub async fn assert_no_delivery(consumer: &mut Consumer) {
    if let Ok(item) = tokio::time::timeout(QUIET, consumer.next()).await {
        match item {
            Some(Ok(d)) => panic!(
                "unexpected delivery: {:?}",
                String::from_utf8_lossy(&d.data)
            ),
            Some(Err(e)) => panic!("unexpected consumer error: {e}"),
            None => panic!("consumer stream ended unexpectedly"),
        }
    }
}

/// Collects the bodies of `n` deliveries (acking nothing).
pub async fn collect_bodies(consumer: &mut Consumer, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let d = next_delivery(consumer).await;
        out.push(String::from_utf8_lossy(&d.data).into_owned());
    }
    out
}

/// Drains a queue with basic.get (no-ack) and returns the bodies in order.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        assert!(out.len() < 100_000, "queue {queue} never runs empty");
        let msg = within(ch.basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        ))
        .await
        .expect("basic.get");
        match msg {
            Some(m) => out.push(String::from_utf8_lossy(&m.delivery.data).into_owned()),
            None => return out,
        }
    }
}

/// A passive declare of `queue`: its message and consumer counts.
pub async fn passive_declare(ch: &Channel, queue: &str) -> lapin::Queue {
    within(ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"))
}

/// Message count of `queue` via a passive declare.
pub async fn message_count(ch: &Channel, queue: &str) -> u32 {
    passive_declare(ch, queue).await.message_count()
}

/// Polls `queue`'s message count until it equals `expected` (deliveries and requeues
/// are asynchronous), failing after [`TIMEOUT`].
pub async fn wait_message_count(ch: &Channel, queue: &str, expected: u32) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let n = message_count(ch, queue).await;
        if n == expected {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("queue {queue}: message count stayed {n}, expected {expected}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
