//! Durability: what survives a broker restart on the same data dir, and what
//! must not.
//!
//! These tests run `hare` as a separate process (see
//! [`hare_suite::BrokerProcess`]) so they can stop it the way production does:
//! SIGTERM for a clean shutdown, SIGKILL for a crash, then start it again on the
//! same `--data-dir`. Each restart listens on a new port, so every reconnect
//! uses the new URL.
//!
//! The expected behaviour is RabbitMQ's:
//!
//! * durable exchanges and queues (with their arguments) and the bindings
//!   between durable objects are recovered; transient ones and exclusive queues
//!   are not;
//! * persistent messages (delivery_mode 2) on durable queues are recovered in
//!   queue order with their properties; transient messages are not;
//! * deliveries that were not acknowledged come back, flagged `redelivered`;
//!   acked, rejected, purged and deleted messages stay gone;
//! * a publisher confirm is a promise: a confirmed message survives even
//!   `kill -9`;
//! * a data dir is owned by one broker at a time, and a damaged one makes the
//!   broker refuse to start with a clear error rather than a panic;
//! * SIGTERM closes client connections with 320 CONNECTION_FORCED and exits 0.
//!
//! Every test uses its own temporary directory (`<tmp>/hare-dur-…/data`, the
//! broker's stderr in `…/data.log`); it is removed when the test passes and kept
//! (and its log printed) when it fails.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use hare_suite::BrokerProcess;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

/// Upper bound for a single AMQP round trip.
const TIMEOUT: Duration = Duration::from_secs(5);

/// How long a SIGTERM'd broker may take to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a broker that must refuse to start may take to give up.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(15);

const NOT_FOUND: u16 = 404;
const PRECONDITION_FAILED: u16 = 406;
const CONNECTION_FORCED: u16 = 320;

// ---------------------------------------------------------------------------
// Local helpers (deliberately not shared with tests/common).
// ---------------------------------------------------------------------------

/// Awaits `fut`, panicking (instead of hanging) if it takes longer than [`TIMEOUT`].
#[track_caller]
fn within<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(TIMEOUT, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out after {TIMEOUT:?} (waiting at {caller})"),
        }
    }
}

/// A scratch directory for one test: `root/data` is the broker's data dir,
/// `root/data.log` its stderr. Removed on success, kept (with the log printed)
/// on failure so a red test can be investigated.
struct Scratch {
    root: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let root =
            std::env::temp_dir().join(format!("hare-dur-{test}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&root).expect("create scratch dir");
        Scratch { root }
    }

    /// The `--data-dir` (not created: the broker must create it).
    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    /// Where [`BrokerProcess`] appends the broker's stderr.
    fn log(&self) -> PathBuf {
        self.data().with_extension("log")
    }

    fn read_log(&self) -> String {
        read_lossy(&self.log())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.read_log();
            let tail: String = {
                let chars: Vec<char> = log.chars().collect();
                chars[chars.len().saturating_sub(6000)..].iter().collect()
            };
            eprintln!(
                "test failed; keeping {} — tail of {}:\n{tail}",
                self.root.display(),
                self.log().display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Starts `hare` on `data_dir` (blocking work off the runtime, bounded).
async fn start(data_dir: &Path) -> BrokerProcess {
    let dir = data_dir.to_owned();
    let job = tokio::task::spawn_blocking(move || {
        BrokerProcess::start(env!("CARGO_BIN_EXE_hare"), &dir, &[])
    });
    match tokio::time::timeout(Duration::from_secs(40), job).await {
        Ok(Ok(Ok(broker))) => broker,
        Ok(Ok(Err(e))) => panic!("start hare on {}: {e}", data_dir.display()),
        Ok(Err(e)) => panic!("start task failed: {e}"),
        Err(_) => panic!("starting hare took more than 40 s"),
    }
}

/// SIGTERM, bounded by [`STOP_TIMEOUT`]; returns the exit status, panicking if
/// the broker did not exit in time.
async fn stop(broker: BrokerProcess) -> ExitStatus {
    let job = tokio::task::spawn_blocking(move || broker.terminate(STOP_TIMEOUT));
    match tokio::time::timeout(STOP_TIMEOUT + Duration::from_secs(5), job).await {
        Ok(Ok(Some(status))) => status,
        Ok(Ok(None)) => panic!("hare did not exit within {STOP_TIMEOUT:?} of SIGTERM"),
        Ok(Err(e)) => panic!("terminate task failed: {e}"),
        Err(_) => panic!("terminate hung"),
    }
}

/// SIGKILL (no chance to flush anything), off the runtime.
async fn kill9(broker: BrokerProcess) {
    let job = tokio::task::spawn_blocking(move || broker.kill9());
    within(job).await.expect("kill task");
}

/// SIGTERM then start again on the same data dir.
async fn restart(broker: BrokerProcess, data_dir: &Path) -> BrokerProcess {
    stop(broker).await;
    start(data_dir).await
}

async fn connect(url: &str) -> Connection {
    within(Connection::connect(url, ConnectionProperties::default()))
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

async fn channel(conn: &Connection) -> Channel {
    within(conn.create_channel()).await.expect("create channel")
}

/// Opens a connection and a channel on it.
async fn open(broker: &BrokerProcess) -> (Connection, Channel) {
    let conn = connect(&broker.url()).await;
    let ch = channel(&conn).await;
    (conn, ch)
}

/// The AMQP reply code of a protocol error, if it is one.
fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Asserts `res` failed with AMQP reply `code`.
#[track_caller]
fn expect_code<T: std::fmt::Debug>(res: lapin::Result<T>, code: u16, what: &str) {
    match res {
        Ok(v) => panic!("{what}: expected reply {code}, got success {v:?}"),
        Err(e) => assert_eq!(reply_code(&e), Some(code), "{what}: got {e}"),
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

async fn declare_queue(
    ch: &Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> lapin::Result<lapin::Queue> {
    within(ch.queue_declare(name.into(), options, args)).await
}

/// Passive queue.declare on a fresh channel (a 404 closes the channel).
async fn passive_queue(conn: &Connection, name: &str) -> lapin::Result<lapin::Queue> {
    let ch = channel(conn).await;
    declare_queue(&ch, name, passive(), FieldTable::default()).await
}

/// Message count of an existing queue (passive declare), panicking if absent.
async fn message_count(conn: &Connection, name: &str) -> u32 {
    passive_queue(conn, name)
        .await
        .unwrap_or_else(|e| panic!("passive declare of {name}: {e}"))
        .message_count()
}

async fn declare_exchange(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    options: ExchangeDeclareOptions,
) -> lapin::Result<()> {
    within(ch.exchange_declare(name.into(), kind, options, FieldTable::default())).await
}

/// Passive exchange.declare on a fresh channel.
async fn passive_exchange(conn: &Connection, name: &str) -> lapin::Result<()> {
    let ch = channel(conn).await;
    declare_exchange(
        &ch,
        name,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
    )
    .await
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    within(ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {key:?}: {e}"));
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn confirm_select(ch: &Channel) {
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
}

/// Publishes and waits for the confirm (the channel must be in confirm mode);
/// asserts it is an ack.
async fn publish_confirmed(
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
    let confirmation = within(confirm).await.expect("publisher confirm");
    assert!(
        matches!(confirmation, Confirmation::Ack(_)),
        "publish to {exchange:?}/{key:?} was not acked: {confirmation:?}"
    );
}

/// Publishes many messages pipelined on a confirm channel, then waits for every
/// confirm and asserts they are all acks.
async fn publish_all_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    messages: Vec<(Vec<u8>, BasicProperties)>,
) {
    let mut confirms = Vec::with_capacity(messages.len());
    for (body, props) in messages {
        let confirm = within(ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            &body,
            props,
        ))
        .await
        .expect("basic.publish");
        confirms.push(confirm);
    }
    for (i, confirm) in confirms.into_iter().enumerate() {
        let confirmation = within(confirm).await.expect("publisher confirm");
        assert!(
            matches!(confirmation, Confirmation::Ack(_)),
            "message {i} was not acked: {confirmation:?}"
        );
    }
}

/// One message taken with basic.get.
struct Got {
    body: Vec<u8>,
    redelivered: bool,
    properties: BasicProperties,
}

/// Empties `queue` with basic.get (no-ack) and returns its messages in order.
async fn drain(ch: &Channel, queue: &str) -> Vec<Got> {
    let mut out = Vec::new();
    loop {
        assert!(out.len() < 1_000_000, "queue {queue} never runs empty");
        let msg = within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
            .await
            .unwrap_or_else(|e| panic!("basic.get from {queue}: {e}"));
        match msg {
            Some(m) => out.push(Got {
                body: m.delivery.data.clone(),
                redelivered: m.delivery.redelivered,
                properties: m.delivery.properties.clone(),
            }),
            None => return out,
        }
    }
}

fn bodies(msgs: &[Got]) -> Vec<String> {
    msgs.iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect()
}

/// A small xorshift generator: enough randomness for garbage bytes and kill
/// timings without a `rand` dependency. The seed is printed for reproduction.
struct XorShift(u64);

impl XorShift {
    fn from_clock() -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15)
            | 1;
        eprintln!("xorshift seed {seed}");
        XorShift(seed)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Runs `hare` directly (not through [`BrokerProcess`], which needs it to
/// listen) on `data_dir` with stderr into `log`, for a broker that is expected
/// to refuse to start. Returns its exit status, or `None` if it was still
/// running after [`REFUSE_TIMEOUT`] (it is then killed).
async fn run_expecting_exit(data_dir: &Path, log: &Path) -> Option<ExitStatus> {
    let data_dir = data_dir.to_owned();
    let log = log.to_owned();
    let job = tokio::task::spawn_blocking(move || {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open log");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hare"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data_dir)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn hare");
        let deadline = Instant::now() + REFUSE_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    tokio::time::timeout(REFUSE_TIMEOUT + Duration::from_secs(10), job)
        .await
        .expect("refusing broker hung")
        .expect("refusing broker task")
}

/// Asserts that the broker exited by itself with a non-zero code (not a signal,
/// not still running) and that its log explains why without panicking.
#[track_caller]
fn assert_refused(status: Option<ExitStatus>, log: &str, what: &str) {
    let status = status.unwrap_or_else(|| {
        panic!("{what}: hare was still running after {REFUSE_TIMEOUT:?}; log:\n{log}")
    });
    match status.code() {
        Some(0) => panic!("{what}: hare exited with status 0; log:\n{log}"),
        Some(_) => {}
        None => panic!("{what}: hare died from a signal ({status}); log:\n{log}"),
    }
    assert!(
        !log.contains("panicked"),
        "{what}: hare panicked instead of reporting an error:\n{log}"
    );
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// 1. Topology.
// ---------------------------------------------------------------------------

/// Durable exchanges, durable queues with their arguments, and bindings between
/// durable objects are recovered after a clean restart. We check this the ways
/// a client can observe it: passive declares succeed; an identical redeclare is
/// accepted while one with different arguments or durability is refused with
/// 406 (so the recovered arguments are the original ones, not defaults); and
/// messages published to the durable exchanges after the restart are routed
/// through the recovered bindings. (Hare compares `x-max-length` on redeclare
/// but does not enforce it, so enforcement is not checked here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_topology_survives_restart() {
    let scratch = Scratch::new("topology");
    let broker = start(&scratch.data()).await;

    let queue_args = || {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(10));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("dur.dlx".into()),
        );
        args
    };
    let durable_x = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };

    {
        let (_conn, ch) = open(&broker).await;
        declare_exchange(&ch, "dur.direct", ExchangeKind::Direct, durable_x)
            .await
            .expect("declare dur.direct");
        declare_exchange(&ch, "dur.topic", ExchangeKind::Topic, durable_x)
            .await
            .expect("declare dur.topic");
        declare_queue(&ch, "dur.q", durable(), queue_args())
            .await
            .expect("declare dur.q");
        declare_queue(&ch, "dur.q2", durable(), FieldTable::default())
            .await
            .expect("declare dur.q2");
        bind(&ch, "dur.q", "dur.direct", "k1").await;
        bind(&ch, "dur.q", "dur.topic", "a.*").await;
        bind(&ch, "dur.q2", "dur.direct", "k2").await;
        bind(&ch, "dur.q2", "dur.topic", "#.z").await;
    }

    let broker = restart(broker, &scratch.data()).await;
    let (conn, ch) = open(&broker).await;

    // Passive declares find everything.
    passive_exchange(&conn, "dur.direct")
        .await
        .expect("dur.direct recovered");
    passive_exchange(&conn, "dur.topic")
        .await
        .expect("dur.topic recovered");
    assert_eq!(message_count(&conn, "dur.q").await, 0);
    assert_eq!(message_count(&conn, "dur.q2").await, 0);

    // Identical redeclares are fine.
    declare_exchange(&ch, "dur.direct", ExchangeKind::Direct, durable_x)
        .await
        .expect("identical redeclare of dur.direct");
    declare_queue(&ch, "dur.q", durable(), queue_args())
        .await
        .expect("identical redeclare of dur.q (same arguments)");

    // Different ones are 406: the recovered definitions are the originals.
    let other = channel(&conn).await;
    expect_code(
        declare_exchange(&other, "dur.direct", ExchangeKind::Fanout, durable_x).await,
        PRECONDITION_FAILED,
        "redeclare dur.direct as fanout",
    );
    let other = channel(&conn).await;
    expect_code(
        declare_exchange(
            &other,
            "dur.topic",
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
        )
        .await,
        PRECONDITION_FAILED,
        "redeclare dur.topic as non-durable",
    );
    let other = channel(&conn).await;
    let mut different = queue_args();
    different.insert("x-max-length".into(), AMQPValue::LongInt(20));
    expect_code(
        declare_queue(&other, "dur.q", durable(), different).await,
        PRECONDITION_FAILED,
        "redeclare dur.q with x-max-length 20",
    );
    let other = channel(&conn).await;
    let mut different = queue_args();
    different.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("other.dlx".into()),
    );
    expect_code(
        declare_queue(&other, "dur.q", durable(), different).await,
        PRECONDITION_FAILED,
        "redeclare dur.q with another x-dead-letter-exchange",
    );
    let other = channel(&conn).await;
    expect_code(
        declare_queue(
            &other,
            "dur.q",
            QueueDeclareOptions::default(),
            queue_args(),
        )
        .await,
        PRECONDITION_FAILED,
        "redeclare dur.q as non-durable",
    );

    // The recovered bindings route.
    confirm_select(&ch).await;
    publish_confirmed(&ch, "dur.direct", "k1", b"direct-k1", persistent()).await;
    publish_confirmed(&ch, "dur.topic", "a.b", b"topic-a.b", persistent()).await;
    publish_confirmed(&ch, "dur.direct", "k2", b"direct-k2", persistent()).await;
    publish_confirmed(&ch, "dur.topic", "x.y.z", b"topic-x.y.z", persistent()).await;
    publish_confirmed(&ch, "dur.direct", "nope", b"unrouted", persistent()).await;
    assert_eq!(
        bodies(&drain(&ch, "dur.q").await),
        ["direct-k1", "topic-a.b"]
    );
    assert_eq!(
        bodies(&drain(&ch, "dur.q2").await),
        ["direct-k2", "topic-x.y.z"]
    );

    drop(conn);
    stop(broker).await;
}

/// Non-durable exchanges and queues, and every binding that involves one, are
/// gone after a restart (passive declare → 404), and so are exclusive queues
/// even when declared durable: they belong to a connection that no longer
/// exists. A durable exchange that had a binding to a transient queue
/// recovers without it. Most of this holds for a broker without any
/// persistence; it pins down that persistence does not over-reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_and_exclusive_objects_do_not_survive_restart() {
    let scratch = Scratch::new("transient");
    let broker = start(&scratch.data()).await;
    let durable_x = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    {
        let (_conn, ch) = open(&broker).await;
        declare_exchange(&ch, "tr.x", ExchangeKind::Direct, Default::default())
            .await
            .expect("declare tr.x");
        declare_exchange(&ch, "tr.dx", ExchangeKind::Direct, durable_x)
            .await
            .expect("declare tr.dx");
        declare_queue(&ch, "tr.q", Default::default(), FieldTable::default())
            .await
            .expect("declare tr.q");
        declare_queue(&ch, "tr.dq", durable(), FieldTable::default())
            .await
            .expect("declare tr.dq");
        let exclusive_durable = QueueDeclareOptions {
            durable: true,
            exclusive: true,
            ..Default::default()
        };
        declare_queue(&ch, "tr.excl", exclusive_durable, FieldTable::default())
            .await
            .expect("declare tr.excl");
        // transient queue <- transient exchange
        bind(&ch, "tr.q", "tr.x", "k").await;
        // transient queue <- durable exchange
        bind(&ch, "tr.q", "tr.dx", "k").await;
        // durable queue <- transient exchange
        bind(&ch, "tr.dq", "tr.x", "k").await;
        // exclusive queue <- durable exchange
        bind(&ch, "tr.excl", "tr.dx", "k").await;
    }

    let broker = restart(broker, &scratch.data()).await;
    let (conn, ch) = open(&broker).await;

    expect_code(
        passive_exchange(&conn, "tr.x").await,
        NOT_FOUND,
        "passive declare of transient exchange tr.x",
    );
    expect_code(
        passive_queue(&conn, "tr.q").await,
        NOT_FOUND,
        "passive declare of transient queue tr.q",
    );
    expect_code(
        passive_queue(&conn, "tr.excl").await,
        NOT_FOUND,
        "passive declare of exclusive (durable) queue tr.excl",
    );

    // If the durable objects came back (they do once durability exists), the
    // bindings to vanished objects must not: re-creating the transient queue
    // and exchange must not resurrect their old bindings.
    if passive_exchange(&conn, "tr.dx").await.is_ok() {
        declare_queue(&ch, "tr.q", Default::default(), FieldTable::default())
            .await
            .expect("re-declare tr.q");
        confirm_select(&ch).await;
        publish_confirmed(&ch, "tr.dx", "k", b"via-dx", BasicProperties::default()).await;
        assert_eq!(
            message_count(&conn, "tr.q").await,
            0,
            "binding tr.dx -> tr.q (transient queue) was recovered"
        );
    }
    if passive_queue(&conn, "tr.dq").await.is_ok() {
        let ch = channel(&conn).await;
        declare_exchange(&ch, "tr.x", ExchangeKind::Direct, Default::default())
            .await
            .expect("re-declare tr.x");
        confirm_select(&ch).await;
        publish_confirmed(&ch, "tr.x", "k", b"via-x", BasicProperties::default()).await;
        assert_eq!(
            message_count(&conn, "tr.dq").await,
            0,
            "binding tr.x (transient exchange) -> tr.dq was recovered"
        );
    }

    drop(conn);
    stop(broker).await;
}

// ---------------------------------------------------------------------------
// 2. Messages.
// ---------------------------------------------------------------------------

/// The properties of message `i` of [`persistent_messages_survive_in_order_with_properties`]:
/// every basic property a publisher may set (user_id must match the login, so
/// it is left out), headers of several field types including nested ones.
fn rich_properties(i: usize) -> BasicProperties {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongString("deep".into()));
    nested.insert("n".into(), AMQPValue::LongLongInt(-(i as i64)));
    let mut array = FieldArray::default();
    array.push(AMQPValue::LongString("a".into()));
    array.push(AMQPValue::LongInt(i as i32));
    array.push(AMQPValue::Boolean(true));
    let mut headers = FieldTable::default();
    headers.insert("seq".into(), AMQPValue::LongInt(i as i32));
    headers.insert(
        "name".into(),
        AMQPValue::LongString(format!("msg-{i}").into()),
    );
    headers.insert("odd".into(), AMQPValue::Boolean(i % 2 == 1));
    headers.insert("big".into(), AMQPValue::LongLongInt(1 << 40));
    headers.insert("ratio".into(), AMQPValue::Double(i as f64 / 4.0));
    headers.insert("nested".into(), AMQPValue::FieldTable(nested));
    headers.insert("list".into(), AMQPValue::FieldArray(array));
    headers.insert(
        "stamp".into(),
        AMQPValue::Timestamp(1_700_000_000 + i as u64),
    );
    headers.insert("void".into(), AMQPValue::Void);
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/octet-stream".into())
        .with_content_encoding("identity".into())
        .with_headers(headers)
        .with_priority((i % 10) as u8)
        .with_correlation_id(format!("corr-{i}").into())
        .with_reply_to("dur.replies".into())
        .with_message_id(format!("id-{i}").into())
        .with_timestamp(1_600_000_000 + i as u64)
        .with_type("dur.test".into())
        .with_app_id("hare-durability-test".into())
}

/// The body of message `i`: mostly small, but one empty and one larger than
/// frame_max (so it was sent in several body frames) to cover the edges of
/// message storage.
fn rich_body(i: usize) -> Vec<u8> {
    match i {
        0 => Vec::new(),
        1 => (0..300_000u32).map(|b| (b % 251) as u8).collect(),
        _ => format!("persistent-{i:04}").into_bytes(),
    }
}

/// Persistent messages confirmed on a durable queue are all there after a
/// clean restart, in their original order, with byte-identical bodies and
/// identical properties (headers included), and with `redelivered` false since
/// they were never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_messages_survive_in_order_with_properties() {
    const N: usize = 200;
    let scratch = Scratch::new("persistent");
    let broker = start(&scratch.data()).await;
    {
        let (_conn, ch) = open(&broker).await;
        declare_queue(&ch, "pm.q", durable(), FieldTable::default())
            .await
            .expect("declare pm.q");
        confirm_select(&ch).await;
        let messages = (0..N).map(|i| (rich_body(i), rich_properties(i))).collect();
        publish_all_confirmed(&ch, "", "pm.q", messages).await;
    }

    let broker = restart(broker, &scratch.data()).await;
    let (conn, ch) = open(&broker).await;
    assert_eq!(message_count(&conn, "pm.q").await, N as u32);
    let got = drain(&ch, "pm.q").await;
    assert_eq!(got.len(), N, "recovered message count");
    for (i, m) in got.iter().enumerate() {
        assert!(
            m.body == rich_body(i),
            "message {i}: body differs (got {} bytes, starting {:?})",
            m.body.len(),
            String::from_utf8_lossy(&m.body[..m.body.len().min(40)])
        );
        assert_eq!(m.properties, rich_properties(i), "message {i}: properties");
        assert!(!m.redelivered, "message {i} was never delivered");
    }

    drop(conn);
    stop(broker).await;
}

/// Only persistent messages on durable queues survive. On a durable queue,
/// messages published with delivery_mode 1 or without a delivery mode are
/// dropped at restart while the persistent ones around them stay, in order;
/// a non-durable queue disappears with its persistent messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_messages_and_non_durable_queues_are_gone() {
    let scratch = Scratch::new("transient-msgs");
    let broker = start(&scratch.data()).await;
    {
        let (_conn, ch) = open(&broker).await;
        declare_queue(&ch, "tm.mixed", durable(), FieldTable::default())
            .await
            .expect("declare tm.mixed");
        declare_queue(
            &ch,
            "tm.transient-q",
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare tm.transient-q");
        confirm_select(&ch).await;
        let mode1 = BasicProperties::default().with_delivery_mode(1);
        let unset = BasicProperties::default();
        let messages = vec![
            (b"p0".to_vec(), persistent()),
            (b"t1".to_vec(), mode1.clone()),
            (b"t2".to_vec(), unset.clone()),
            (b"p3".to_vec(), persistent()),
            (b"t4".to_vec(), unset),
            (b"t5".to_vec(), mode1),
            (b"p6".to_vec(), persistent()),
        ];
        publish_all_confirmed(&ch, "", "tm.mixed", messages).await;
        let on_transient_queue = (0..5)
            .map(|i| (format!("pt{i}").into_bytes(), persistent()))
            .collect();
        publish_all_confirmed(&ch, "", "tm.transient-q", on_transient_queue).await;
    }

    let broker = restart(broker, &scratch.data()).await;
    let (conn, ch) = open(&broker).await;
    expect_code(
        passive_queue(&conn, "tm.transient-q").await,
        NOT_FOUND,
        "non-durable queue after restart",
    );
    assert_eq!(
        bodies(&drain(&ch, "tm.mixed").await),
        ["p0", "p3", "p6"],
        "only the persistent messages of the durable queue survive, in order"
    );

    drop(conn);
    stop(broker).await;
}

// ---------------------------------------------------------------------------
// 3. Acknowledgement state.
// ---------------------------------------------------------------------------

/// Publishes `m0..m{n-1}` persistently to the durable queue `queue`, then takes
/// the first four with basic.get (manual ack): acks m0, rejects m1 without
/// requeue, and leaves m2 and m3 unacknowledged. Returns the connection and
/// channel holding the unacked deliveries (keep them open).
async fn setup_ack_states(broker: &BrokerProcess, queue: &str, n: usize) -> (Connection, Channel) {
    let (conn, ch) = open(broker).await;
    declare_queue(&ch, queue, durable(), FieldTable::default())
        .await
        .expect("declare queue");
    confirm_select(&ch).await;
    let messages = (0..n)
        .map(|i| (format!("m{i}").into_bytes(), persistent()))
        .collect();
    publish_all_confirmed(&ch, "", queue, messages).await;

    let consumer_ch = channel(&conn).await;
    let mut taken = Vec::new();
    for i in 0..4 {
        let m = within(consumer_ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }))
            .await
            .expect("basic.get")
            .unwrap_or_else(|| panic!("queue empty at get {i}"));
        assert_eq!(m.delivery.data, format!("m{i}").into_bytes());
        taken.push(m);
    }
    within(taken[0].delivery.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack m0");
    within(
        taken[1]
            .delivery
            .acker
            .reject(BasicRejectOptions { requeue: false }),
    )
    .await
    .expect("reject m1");
    // A synchronous method on the same channel is answered after the ack and
    // reject were processed: 4 unacked/settled, the rest ready.
    let ready = declare_queue(&consumer_ch, queue, passive(), FieldTable::default())
        .await
        .expect("passive declare")
        .message_count();
    assert_eq!(ready as usize, n - 4, "ready messages before the stop");
    (conn, consumer_ch)
}

/// What happens to acknowledgement state across a clean stop: messages that
/// were delivered but not acked when the broker stopped come back ready, with
/// redelivered=true, at their original position; messages never delivered come
/// back with redelivered=false; the acked one and the one rejected with
/// requeue=false do not come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_come_back_redelivered_settled_ones_do_not() {
    let scratch = Scratch::new("unacked");
    let broker = start(&scratch.data()).await;
    let (conn, ch) = setup_ack_states(&broker, "ack.q", 10).await;

    // Stop while m2 and m3 are still unacked on the open connection.
    let broker = restart(broker, &scratch.data()).await;
    drop((ch, conn));
    let (conn, ch) = open(&broker).await;
    let got = drain(&ch, "ack.q").await;
    let summary: Vec<(String, bool)> = got
        .iter()
        .map(|m| (String::from_utf8_lossy(&m.body).into_owned(), m.redelivered))
        .collect();
    let expected: Vec<(String, bool)> = (2..10).map(|i| (format!("m{i}"), i < 4)).collect();
    assert_eq!(
        summary, expected,
        "(body, redelivered) after restart: m0 acked and m1 rejected stay gone, \
         m2/m3 were delivered, m4.. were not"
    );

    drop(conn);
    stop(broker).await;
}

/// The same after `kill -9`, where the broker had no chance to requeue
/// anything: every message that was not settled (the delivered-but-unacked m2
/// and m3 and the never-delivered m4..m9) must come back — at-least-once. We do
/// not assert the `redelivered` flags or the absence of m0/m1 here: RabbitMQ
/// itself does not promise that an ack or a reject was on disk before a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsettled_messages_survive_kill9() {
    let scratch = Scratch::new("unacked-kill9");
    let broker = start(&scratch.data()).await;
    let (conn, ch) = setup_ack_states(&broker, "ack9.q", 10).await;
    kill9(broker).await;
    drop((ch, conn));

    let broker = start(&scratch.data()).await;
    let (conn, ch) = open(&broker).await;
    let got: HashSet<String> = bodies(&drain(&ch, "ack9.q").await).into_iter().collect();
    let missing: Vec<String> = (2..10)
        .map(|i| format!("m{i}"))
        .filter(|b| !got.contains(b))
        .collect();
    assert!(
        missing.is_empty(),
        "unsettled messages lost by kill -9: {missing:?} (got {got:?})"
    );

    drop(conn);
    stop(broker).await;
}

/// queue.purge and queue.delete are durable: a purged durable queue comes back
/// empty, a deleted one does not come back (and re-creating it does not revive
/// its messages), while an untouched durable queue next to them keeps its
/// persistent messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_and_deleted_messages_do_not_come_back() {
    let scratch = Scratch::new("purge-delete");
    let broker = start(&scratch.data()).await;
    {
        let (_conn, ch) = open(&broker).await;
        confirm_select(&ch).await;
        for q in ["pd.purged", "pd.deleted", "pd.kept"] {
            declare_queue(&ch, q, durable(), FieldTable::default())
                .await
                .expect("declare");
            let messages = (0..5)
                .map(|i| (format!("{q}-{i}").into_bytes(), persistent()))
                .collect();
            publish_all_confirmed(&ch, "", q, messages).await;
        }
        let purged = within(ch.queue_purge("pd.purged".into(), QueuePurgeOptions::default()))
            .await
            .expect("purge");
        assert_eq!(purged, 5, "purge-ok message count");
        let deleted = within(ch.queue_delete("pd.deleted".into(), QueueDeleteOptions::default()))
            .await
            .expect("delete");
        assert_eq!(deleted, 5, "delete-ok message count");
    }

    let broker = restart(broker, &scratch.data()).await;
    let (conn, ch) = open(&broker).await;
    assert_eq!(message_count(&conn, "pd.kept").await, 5, "untouched queue");
    assert_eq!(message_count(&conn, "pd.purged").await, 0, "purged queue");
    expect_code(
        passive_queue(&conn, "pd.deleted").await,
        NOT_FOUND,
        "deleted queue after restart",
    );
    let recreated = declare_queue(&ch, "pd.deleted", durable(), FieldTable::default())
        .await
        .expect("re-declare pd.deleted");
    assert_eq!(
        recreated.message_count(),
        0,
        "re-created queue must be empty"
    );
    assert_eq!(
        bodies(&drain(&ch, "pd.kept").await),
        (0..5).map(|i| format!("pd.kept-{i}")).collect::<Vec<_>>()
    );

    drop(conn);
    stop(broker).await;
}

// ---------------------------------------------------------------------------
// 4. Publisher confirms vs kill -9.
// ---------------------------------------------------------------------------

/// Most confirms a publisher waits for at once.
const MAX_OUTSTANDING: usize = 500;

/// Most messages published per crash round (bounds the drain time).
const MAX_PER_ROUND: u64 = 30_000;

/// What a publisher saw before its broker died.
struct PublishOutcome {
    published: u64,
    confirmed: Vec<u64>,
}

/// Publishes persistent messages whose body is their id (u64 big-endian) to
/// `queue` on a confirm channel, keeping at most [`MAX_OUTSTANDING`] unconfirmed,
/// until publishing fails (the broker was killed) or `stop` is set. Every id
/// whose confirm is an ack is recorded (and counted in `acked`). Any ack lapin
/// hands us was sent by the broker before it died, so all recorded ids were
/// confirmed before the kill.
async fn publish_until_killed(
    ch: Channel,
    queue: String,
    acked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> PublishOutcome {
    type Pending = std::pin::Pin<Box<dyn Future<Output = (u64, Option<Confirmation>)> + Send>>;
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut confirmed = Vec::new();
    let record = |(id, res): (u64, Option<Confirmation>), confirmed: &mut Vec<u64>| {
        if let Some(Confirmation::Ack(_)) = res {
            confirmed.push(id);
            acked.fetch_add(1, Ordering::SeqCst);
        }
    };
    let mut id = 0u64;
    'publish: while !stop.load(Ordering::SeqCst) {
        // Harvest confirms that are already in, so `acked` is current.
        while let Some(Some(done)) = pending.next().now_or_never() {
            record(done, &mut confirmed);
        }
        while pending.len() >= MAX_OUTSTANDING {
            match tokio::time::timeout(TIMEOUT, pending.next()).await {
                Ok(Some(done)) => record(done, &mut confirmed),
                _ => break 'publish,
            }
        }
        if id >= MAX_PER_ROUND {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let body = id.to_be_bytes();
        let publish = ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            persistent(),
        );
        match tokio::time::timeout(TIMEOUT, publish).await {
            Ok(Ok(confirm)) => {
                let this = id;
                pending.push(Box::pin(async move {
                    let res = tokio::time::timeout(Duration::from_secs(10), confirm).await;
                    (this, res.ok().and_then(Result::ok))
                }));
                id += 1;
            }
            _ => break,
        }
    }
    // Collect whatever confirms lapin still has (acks already received, or
    // errors once it notices the connection is gone).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !pending.is_empty() {
        match tokio::time::timeout_at(deadline, pending.next()).await {
            Ok(Some(done)) => record(done, &mut confirmed),
            _ => break,
        }
    }
    PublishOutcome {
        published: id,
        confirmed,
    }
}

/// How a crash round decides when to pull the plug.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// After this long.
    Millis(u64),
    /// Once this many confirms arrived (or after 8 s, whichever is first).
    Confirms(usize),
}

/// The hard way: a publisher streams persistent messages with confirms
/// (up to 500 outstanding) into a durable queue and the broker is killed with
/// SIGKILL mid-stream. After a restart every id that was confirmed before the
/// kill must be in the queue; duplicates and unconfirmed extras are fine (the
/// publisher would resend those), a missing confirmed id is data loss, and an
/// id that was never published is corruption.
///
/// Four rounds, at different points (early and later by time, and after a
/// number of confirms), all on the SAME data dir: each round's broker recovers
/// a store that was itself recovered from a crash, so torn writes from one
/// crash must not hurt later rounds. Each round uses its own queue, and the
/// earlier rounds' queues must still exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn confirmed_messages_survive_kill9() {
    let scratch = Scratch::new("kill9");
    let mut rng = XorShift::from_clock();
    let rounds = [
        KillAt::Millis(50 + rng.below(100)),
        KillAt::Confirms(300),
        KillAt::Millis(150 + rng.below(250)),
        KillAt::Confirms(2_000),
    ];
    let started = Instant::now();
    let mut broker = start(&scratch.data()).await;
    let mut total_confirmed = 0usize;

    for (round, kill_at) in rounds.iter().enumerate() {
        let queue = format!("crash.{round}");
        let (conn, ch) = open(&broker).await;
        declare_queue(&ch, &queue, durable(), FieldTable::default())
            .await
            .expect("declare crash queue");
        confirm_select(&ch).await;

        let acked = Arc::new(AtomicUsize::new(0));
        let stop_flag = Arc::new(AtomicBool::new(false));
        let publisher = tokio::spawn(publish_until_killed(
            ch,
            queue.clone(),
            acked.clone(),
            stop_flag.clone(),
        ));

        match *kill_at {
            KillAt::Millis(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            KillAt::Confirms(n) => {
                let deadline = Instant::now() + Duration::from_secs(8);
                while acked.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        let acked_at_kill = acked.load(Ordering::SeqCst);
        kill9(broker).await;
        stop_flag.store(true, Ordering::SeqCst);
        let outcome = tokio::time::timeout(Duration::from_secs(20), publisher)
            .await
            .expect("publisher did not stop after the kill")
            .expect("publisher task");
        drop(conn);
        eprintln!(
            "round {round} ({kill_at:?}): published {}, {} acked at kill, {} confirmed in total",
            outcome.published,
            acked_at_kill,
            outcome.confirmed.len()
        );
        total_confirmed += outcome.confirmed.len();

        broker = start(&scratch.data()).await;
        let (conn, ch) = open(&broker).await;
        for earlier in 0..round {
            passive_queue(&conn, &format!("crash.{earlier}"))
                .await
                .unwrap_or_else(|e| panic!("queue crash.{earlier} lost after round {round}: {e}"));
        }
        passive_queue(&conn, &queue)
            .await
            .unwrap_or_else(|e| panic!("durable queue {queue} lost by kill -9: {e}"));
        let mut present = HashSet::new();
        for m in drain(&ch, &queue).await {
            let bytes: [u8; 8] =
                m.body.as_slice().try_into().unwrap_or_else(|_| {
                    panic!("round {round}: recovered a corrupt body {:?}", m.body)
                });
            let id = u64::from_be_bytes(bytes);
            assert!(
                id < outcome.published,
                "round {round}: recovered id {id} that was never published (published {})",
                outcome.published
            );
            present.insert(id);
        }
        let mut missing: Vec<u64> = outcome
            .confirmed
            .iter()
            .copied()
            .filter(|id| !present.contains(id))
            .collect();
        missing.sort_unstable();
        assert!(
            missing.is_empty(),
            "round {round} ({kill_at:?}): {} confirmed messages lost by kill -9 \
             (of {} confirmed, {} recovered), first: {:?}",
            missing.len(),
            outcome.confirmed.len(),
            present.len(),
            &missing[..missing.len().min(20)]
        );
        drop(conn);
    }

    assert!(
        total_confirmed > 0,
        "no publish was ever confirmed: the test proved nothing"
    );
    stop(broker).await;
    eprintln!("kill -9 rounds took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------
// 5–6. Owning and validating the data dir.
// ---------------------------------------------------------------------------

/// Two brokers on one data dir would corrupt it, so the second must refuse:
/// exit by itself with a non-zero status and say in its log that the data dir
/// is in use / locked (not panic). The first broker keeps serving, and its
/// store is intact afterwards (a restart still finds its durable queue and
/// persistent messages, including one published after the second attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_broker_on_same_data_dir_refuses_to_start() {
    let scratch = Scratch::new("lock");
    let broker = start(&scratch.data()).await;
    let (conn, ch) = open(&broker).await;
    declare_queue(&ch, "lock.q", durable(), FieldTable::default())
        .await
        .expect("declare lock.q");
    confirm_select(&ch).await;
    publish_confirmed(&ch, "", "lock.q", b"before", persistent()).await;

    // The second broker's stderr goes to its own file so we read only its words.
    let second_log = scratch.root.join("second.log");
    let status = run_expecting_exit(&scratch.data(), &second_log).await;
    let log = read_lossy(&second_log);
    assert_refused(status, &log, "second broker on a data dir in use");
    let lower = log.to_lowercase();
    assert!(
        lower.contains("lock") || lower.contains("in use"),
        "the second broker's log should say the data dir is locked / in use:\n{log}"
    );

    // The first broker is unaffected: same connection, and a new one.
    publish_confirmed(&ch, "", "lock.q", b"after", persistent()).await;
    let conn2 = connect(&broker.url()).await;
    assert_eq!(message_count(&conn2, "lock.q").await, 2);
    drop((conn2, ch, conn));

    let broker = restart(broker, &scratch.data()).await;
    let (conn, ch) = open(&broker).await;
    assert_eq!(bodies(&drain(&ch, "lock.q").await), ["before", "after"]);
    drop(conn);
    stop(broker).await;
}

/// A data dir whose store files were overwritten with garbage (names and sizes
/// as a clean run left them, contents random) makes the broker exit by itself
/// with a non-zero status and an error in its log, and never panic: silently
/// starting empty would lose data, and a panic is not an operator-friendly
/// diagnosis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_store_files_make_the_broker_refuse_to_start() {
    let scratch = Scratch::new("corrupt");
    let broker = start(&scratch.data()).await;
    {
        let (_conn, ch) = open(&broker).await;
        declare_queue(&ch, "corrupt.q", durable(), FieldTable::default())
            .await
            .expect("declare");
        confirm_select(&ch).await;
        publish_confirmed(&ch, "", "corrupt.q", b"payload", persistent()).await;
    }
    stop(broker).await;

    let files = files_under(&scratch.data());
    assert!(
        !files.is_empty(),
        "a clean run with a durable queue left no files in {}",
        scratch.data().display()
    );
    let mut rng = XorShift::from_clock();
    for file in &files {
        let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        let len = if len < 64 { 4096 } else { len as usize };
        std::fs::write(file, rng.bytes(len))
            .unwrap_or_else(|e| panic!("overwrite {}: {e}", file.display()));
    }
    eprintln!("overwrote with garbage: {files:?}");

    let restart_log = scratch.root.join("corrupt-start.log");
    let status = run_expecting_exit(&scratch.data(), &restart_log).await;
    let log = read_lossy(&restart_log);
    assert_refused(status, &log, "broker on a corrupt data dir");
    let lower = log.to_lowercase();
    assert!(
        ["error", "corrupt", "invalid", "failed"]
            .iter()
            .any(|w| lower.contains(w)),
        "the log should report the corrupt store as an error:\n{log}"
    );
}

/// Bytes under `dir`, as `du -sb` counts them.
fn dir_size(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// A purged backlog's space comes back at once (its segment files go with
/// the flush after the purge), stays gone across a restart, and what is
/// still live in another queue survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_space_comes_back_and_survivors_stay() {
    let scratch = Scratch::new("reclaim");
    let broker = start(&scratch.data()).await;
    let full = {
        let (conn, ch) = open(&broker).await;
        declare_queue(&ch, "reclaim.kept", durable(), FieldTable::default())
            .await
            .expect("declare kept");
        declare_queue(&ch, "reclaim.bulk", durable(), FieldTable::default())
            .await
            .expect("declare bulk");
        confirm_select(&ch).await;
        publish_confirmed(&ch, "", "reclaim.kept", b"survivor", persistent()).await;
        for _ in 0..40 {
            let batch = (0..2000)
                .map(|_| (vec![b'x'; 1024], persistent()))
                .collect();
            publish_all_confirmed(&ch, "", "reclaim.bulk", batch).await;
        }
        assert_eq!(message_count(&conn, "reclaim.bulk").await, 80_000);
        let full = dir_size(&scratch.data());
        assert!(
            full > 80 * 1024 * 1024,
            "80,000 KiB messages take only {full} bytes"
        );
        ch.queue_purge("reclaim.bulk".into(), QueuePurgeOptions::default())
            .await
            .expect("purge");
        full
    };
    stop(broker).await;
    let purged = dir_size(&scratch.data());
    assert!(
        purged < full / 4,
        "data dir still {purged} bytes after the purge (was {full})"
    );

    let broker = start(&scratch.data()).await;
    let after = dir_size(&scratch.data());
    assert!(
        after < full / 4,
        "data dir {after} bytes after restart (was {full})"
    );
    let (conn, ch) = open(&broker).await;
    assert_eq!(message_count(&conn, "reclaim.bulk").await, 0);
    assert_eq!(bodies(&drain(&ch, "reclaim.kept").await), vec!["survivor"]);
    stop(broker).await;
}

/// Garbage in the database log alone (its config and our format marker intact)
/// reads to sled like a torn write, i.e. an empty database. The broker must
/// notice that the data dir used to hold a store and refuse to start, rather
/// than start empty and silently lose every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_database_log_is_refused_not_read_as_empty() {
    let scratch = Scratch::new("garbage-log");
    let broker = start(&scratch.data()).await;
    {
        let (_conn, ch) = open(&broker).await;
        declare_queue(&ch, "garbage.q", durable(), FieldTable::default())
            .await
            .expect("declare");
        confirm_select(&ch).await;
        publish_confirmed(&ch, "", "garbage.q", b"payload", persistent()).await;
    }
    stop(broker).await;

    let logs: Vec<_> = files_under(&scratch.data())
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "db"))
        .collect();
    assert!(!logs.is_empty(), "no database log file found");
    let mut rng = XorShift::from_clock();
    for file in &logs {
        let len = std::fs::metadata(file)
            .map(|m| m.len())
            .unwrap_or(0)
            .max(4096) as usize;
        std::fs::write(file, rng.bytes(len)).expect("overwrite the database log");
    }

    let restart_log = scratch.root.join("garbage-log-start.log");
    let status = run_expecting_exit(&scratch.data(), &restart_log).await;
    let log = read_lossy(&restart_log);
    assert_refused(status, &log, "broker whose database log is garbage");
    assert!(
        log.to_lowercase().contains("corrupt"),
        "the log should say the data dir is corrupt:\n{log}"
    );
}

/// A `--data-dir` that is a file full of garbage (not a directory) cannot hold
/// a store: the broker must exit non-zero with an error, not panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_that_is_a_garbage_file_makes_the_broker_refuse_to_start() {
    let scratch = Scratch::new("garbage-file");
    let mut rng = XorShift::from_clock();
    std::fs::write(scratch.data(), rng.bytes(8192)).expect("write garbage data dir");

    let status = run_expecting_exit(&scratch.data(), &scratch.log()).await;
    let log = scratch.read_log();
    assert_refused(status, &log, "broker whose data dir is a file");
    let lower = log.to_lowercase();
    assert!(
        ["error", "failed", "invalid", "not a directory"]
            .iter()
            .any(|w| lower.contains(w)),
        "the log should report the unusable data dir as an error:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 7. Clean shutdown.
// ---------------------------------------------------------------------------

/// SIGTERM is the orderly stop: the broker tells each connected client with
/// connection.close 320 CONNECTION_FORCED (lapin reports it as a protocol error
/// on the connection), exits with status 0 within 10 s, and what it confirmed
/// before is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_with_320_and_exits_cleanly() {
    let scratch = Scratch::new("sigterm");
    let broker = start(&scratch.data()).await;
    let (conn, ch) = open(&broker).await;
    declare_queue(&ch, "term.q", durable(), FieldTable::default())
        .await
        .expect("declare term.q");
    confirm_select(&ch).await;
    let messages = (0..50)
        .map(|i| (format!("t{i}").into_bytes(), persistent()))
        .collect();
    publish_all_confirmed(&ch, "", "term.q", messages).await;
    let mut events = conn.events_listener();

    let sent = Instant::now();
    let stopping = tokio::task::spawn_blocking(move || broker.terminate(STOP_TIMEOUT));

    // Wait for the connection.close the broker must send.
    let mut seen = Vec::new();
    let forced = tokio::time::timeout(STOP_TIMEOUT, async {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(e) = event {
                if reply_code(&e) == Some(CONNECTION_FORCED) {
                    return true;
                }
                seen.push(e.to_string());
            }
        }
        false
    })
    .await
    .unwrap_or(false);

    let status = tokio::time::timeout(STOP_TIMEOUT + Duration::from_secs(5), stopping)
        .await
        .expect("terminate hung")
        .expect("terminate task");
    let took = sent.elapsed();
    let status =
        status.unwrap_or_else(|| panic!("hare did not exit within {STOP_TIMEOUT:?} of SIGTERM"));
    assert!(
        status.success(),
        "hare should exit 0 on SIGTERM, got {status}"
    );
    assert!(took < STOP_TIMEOUT, "shutdown took {took:?}");
    assert!(
        forced,
        "the client should get connection.close 320 CONNECTION_FORCED; it saw {seen:?}"
    );
    assert!(
        !conn.status().connected(),
        "lapin still thinks it is connected"
    );
    drop((ch, conn));

    let broker = start(&scratch.data()).await;
    let (conn, ch) = open(&broker).await;
    assert_eq!(
        bodies(&drain(&ch, "term.q").await),
        (0..50).map(|i| format!("t{i}")).collect::<Vec<_>>()
    );
    drop(conn);
    stop(broker).await;
}
