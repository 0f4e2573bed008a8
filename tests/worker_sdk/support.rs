//! Shared pieces: a broker to run against, workers in the background, status
//! and dead-letter readers, and the child-process worker that tests kill.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hare_suite::TestBroker;
use hare_worker::{Error, StatusEvent, WorkerBuilder};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Where a test runs: Hare started for the test, or the test binary's
/// private RabbitMQ node.
pub enum Target {
    Hare(TestBroker),
    Rabbit(&'static super::common::rabbitmq::RabbitNode),
}

impl Target {
    pub fn hare() -> Target {
        Target::Hare(TestBroker::start())
    }

    pub fn rabbit() -> Target {
        Target::Rabbit(super::common::rabbitmq::shared())
    }

    pub fn url(&self) -> String {
        match self {
            Target::Hare(b) => b.url().to_owned(),
            Target::Rabbit(n) => n.url().to_owned(),
        }
    }

    pub fn is_hare(&self) -> bool {
        matches!(self, Target::Hare(_))
    }
}

/// One test body, run once against Hare and once against RabbitMQ.
#[macro_export]
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn hare() {
                super::$name($crate::support::Target::hare()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn rabbitmq() {
                super::$name($crate::support::Target::rabbit()).await
            }
        }
    };
}

/// A test-unique name (tests share one RabbitMQ node).
pub fn unique(prefix: &str) -> String {
    super::common::unique(prefix)
}

/// A worker running in the background until [`Running::stop`].
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<hare_worker::Result<()>>,
}

pub fn spawn(builder: WorkerBuilder) -> Running {
    // The SDK's logs go to the test's captured output, shown when it fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "hare_worker=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(builder.run_until(async {
        let _ = rx.await;
    }));
    Running {
        stop: Some(tx),
        handle,
    }
}

impl Running {
    /// Signals the stop and waits (bounded: the default grace is 30 s, then
    /// 10 s for cancelled handlers) for `run_until` to return.
    pub async fn stop(mut self) -> hare_worker::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(50), &mut self.handle)
            .await
            .expect("worker did not stop within 50 s")
            .expect("worker task panicked")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// A shared, growable log the handlers write to.
pub struct Log<T>(Arc<Mutex<Vec<T>>>);

impl<T> Default for Log<T> {
    fn default() -> Self {
        Log(Arc::default())
    }
}

impl<T> Clone for Log<T> {
    fn clone(&self) -> Self {
        Log(self.0.clone())
    }
}

impl<T: Clone> Log<T> {
    pub fn push(&self, v: T) {
        self.0.lock().push(v);
    }

    pub fn snapshot(&self) -> Vec<T> {
        self.0.lock().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    /// Waits up to `limit` until the log holds at least `n` entries.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<T> {
        eventually(limit, || self.len() >= n).await;
        self.snapshot()
    }
}

/// Polls `cond` every 20 ms until it holds; panics after `limit`.
#[track_caller]
pub fn eventually(limit: Duration, cond: impl Fn() -> bool) -> impl Future<Output = ()> {
    let caller = std::panic::Location::caller();
    async move {
        let deadline = Instant::now() + limit;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "condition not met within {limit:?} (at {caller})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Status events on `hare.status` matching `pattern`, as they arrive.
pub async fn watch_status(
    url: &str,
    pattern: &str,
) -> (lapin::Connection, mpsc::UnboundedReceiver<StatusEvent>) {
    let conn = super::common::connect_url(url).await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        hare_worker::topology::STATUS_EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare hare.status");
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("status queue");
    ch.queue_bind(
        q.name().clone(),
        hare_worker::topology::STATUS_EXCHANGE.into(),
        pattern.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind status queue");
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume status");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            if let Ok(event) = serde_json::from_slice(&d.data) {
                let _ = tx.send(event);
            }
        }
    });
    (conn, rx)
}

/// The next status event, bounded.
pub async fn next_status(rx: &mut mpsc::UnboundedReceiver<StatusEvent>) -> StatusEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no status event within 10 s")
        .expect("status stream ended")
}

/// Takes one message from `queue` (acked), waiting up to `limit` for one.
pub async fn get_one(url: &str, queue: &str, limit: Duration) -> (BasicProperties, Vec<u8>) {
    let conn = super::common::connect_url(url).await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(msg) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let _ = conn.close(200, "done".into()).await;
            return (msg.delivery.properties.clone(), msg.delivery.data.clone());
        }
        assert!(
            Instant::now() < deadline,
            "nothing arrived in {queue} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to 10 s) until `queue` exists and has a consumer.
pub async fn wait_consumed(url: &str, queue: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if consumers(url, queue).await.unwrap_or(0) > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nobody consumes {queue} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Consumers of `queue`, or `None` if it does not exist.
async fn consumers(url: &str, queue: &str) -> Option<u32> {
    passive(url, queue).await.map(|q| q.consumer_count())
}

/// Messages ready in `queue`.
pub async fn ready(url: &str, queue: &str) -> u32 {
    passive(url, queue)
        .await
        .unwrap_or_else(|| panic!("queue {queue} does not exist"))
        .message_count()
}

/// A passive declare of `queue` on a connection of its own (a failed one
/// closes the channel), `None` if the queue does not exist.
async fn passive(url: &str, queue: &str) -> Option<lapin::Queue> {
    let conn = super::common::connect_url(url).await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok();
    let _ = conn.close(200, "done".into()).await;
    q
}

/// A header of a message, as text (strings) or a number rendered as text.
pub fn header(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(v) => Some(v.to_string()),
        AMQPValue::LongInt(v) => Some(v.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Asserts that an SDK call failed the way the test expects.
#[track_caller]
pub fn expect_err<T: std::fmt::Debug>(r: hare_worker::Result<T>, what: impl Fn(&Error) -> bool) {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => assert!(what(&e), "unexpected error: {e}"),
    }
}
