//! The store under stress: crashes (`kill -9`) right after the broker said
//! "ok", crashes in the middle of a large delete or purge, big deletes and
//! purges while other clients are waiting, a full disk, and alarms that must
//! clear by themselves.
//!
//! Every test runs `hare` as a process ([`hare_suite::BrokerProcess`]) on its
//! own data dir (`<tmp>/hare-crash-…/data`, the broker's stderr in
//! `…/data.log`; kept and its tail printed when a test fails). The tests that
//! need a small or full file system mount a tmpfs as the data dir, which
//! needs root; they are skipped (with a message) otherwise.
//!
//! The expected behaviour is RabbitMQ's: an `-ok` reply means the change is
//! on disk (RabbitMQ's durable metadata is committed before the reply), a
//! failure to write is an error to the client (RabbitMQ answers a failed
//! metadata write with `541 INTERNAL_ERROR`) and never a silent success,
//! and the broker recovers by itself once the disk or memory is available.
//!
//! The heavy tests (100,000 messages) take [`HEAVY`] exclusively, so the two
//! that measure latency do not measure the other tests of this file.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::crash::*;
use common::within;
use futures::StreamExt;
use hare_suite::BrokerProcess;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, Consumer, Event, ExchangeKind};

const NOT_FOUND: u16 = 404;
const INTERNAL_ERROR: u16 = 541;

/// Taken exclusively by the tests that measure latency, shared by the
/// others, so timings are not disturbed by this file's other tests.
static HEAVY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

async fn open(broker: &BrokerProcess) -> (Connection, Channel) {
    common::process::open(&broker.url()).await
}

async fn channel(conn: &Connection) -> Channel {
    within(conn.create_channel()).await.expect("create channel")
}

async fn confirm_select(ch: &Channel) {
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

async fn declare_durable(ch: &Channel, name: &str) {
    within(ch.queue_declare(name.into(), durable(), FieldTable::default()))
        .await
        .unwrap_or_else(|e| panic!("declare durable queue {name}: {e}"));
}

/// A manual-ack consumer of `queue` on a new channel with `prefetch`.
async fn manual_ack_consumer(conn: &Connection, queue: &str, prefetch: u16) -> (Channel, Consumer) {
    let ch = channel(conn).await;
    within(ch.basic_qos(prefetch, BasicQosOptions::default()))
        .await
        .expect("basic.qos");
    let consumer = within(ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("basic.consume");
    (ch, consumer)
}

/// Passive queue.declare on a fresh channel (a 404 closes the channel).
async fn passive_queue(conn: &Connection, name: &str) -> lapin::Result<lapin::Queue> {
    let ch = channel(conn).await;
    within(ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

/// Passive exchange.declare on a fresh channel.
async fn passive_exchange(conn: &Connection, name: &str) -> lapin::Result<()> {
    let ch = channel(conn).await;
    within(ch.exchange_declare(
        name.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

/// The message count of `name`, panicking if the queue does not exist.
async fn message_count(conn: &Connection, name: &str) -> u32 {
    passive_queue(conn, name)
        .await
        .unwrap_or_else(|e| panic!("passive declare of {name}: {e}"))
        .message_count()
}

/// The reply code of a protocol error.
fn code_of(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Asserts that `name` does not exist (passive declare answers 404).
#[track_caller]
fn assert_gone(res: lapin::Result<lapin::Queue>, what: &str) {
    match res {
        Ok(q) => panic!(
            "{what}: it still exists with {} messages",
            q.message_count()
        ),
        Err(e) => assert_eq!(code_of(&e), Some(NOT_FOUND), "{what}: {e}"),
    }
}

/// One persistent publish on a confirm channel: the confirmation, or the
/// error that closed the channel or connection first.
async fn try_publish_one(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
) -> lapin::Result<Confirmation> {
    let confirm = within(ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        persistent(),
    ))
    .await?;
    within(confirm).await
}

/// One persistent publish on a confirm channel: the confirmation.
async fn publish_one(ch: &Channel, exchange: &str, key: &str, body: &[u8]) -> Confirmation {
    try_publish_one(ch, exchange, key, body)
        .await
        .unwrap_or_else(|e| panic!("persistent publish to {exchange:?}/{key:?}: {e}"))
}

/// A small xorshift generator for kill timings; the seed is printed.
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

    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }
}

/// How long a big fill may take in a debug build on a busy 2-core machine.
const FILL_LIMIT: Duration = Duration::from_secs(120);
/// How long a consumer may go without a delivery before a queue counts as drained.
const IDLE: Duration = Duration::from_secs(3);
/// Upper bound for a delete or purge of a big queue, so a broken broker fails
/// the test instead of hanging it.
const SLOW_OP_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// 1. Durable declarations are durable once acknowledged.
// ---------------------------------------------------------------------------

/// A client that got exchange.declare-ok, queue.declare-ok and queue.bind-ok
/// for durable objects may rely on them: RabbitMQ commits durable metadata
/// before it replies. So a `kill -9` right after the last `-ok` (no sleep,
/// nothing published that could trigger a flush) must leave all three on
/// disk, and the binding must route after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_durable_declarations_survive_an_immediate_kill9() {
    let _shared = HEAVY.read().await;
    let scratch = Scratch::new("declare");
    let broker = start_hare(&scratch.data(), &[]).await;
    {
        let (_conn, ch) = open(&broker).await;
        within(ch.exchange_declare(
            "crash.x".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .expect("exchange.declare");
        declare_durable(&ch, "crash.q").await;
        within(ch.queue_bind(
            "crash.q".into(),
            "crash.x".into(),
            "crash.key".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await
        .expect("queue.bind");
        kill9(broker).await;
    }
    let broker = start_hare(&scratch.data(), &[]).await;
    let (conn, ch) = open(&broker).await;
    passive_exchange(&conn, "crash.x")
        .await
        .expect("durable exchange crash.x lost by kill -9 after declare-ok");
    passive_queue(&conn, "crash.q")
        .await
        .expect("durable queue crash.q lost by kill -9 after declare-ok");
    confirm_select(&ch).await;
    let confirmation = publish_one(&ch, "crash.x", "crash.key", b"routed").await;
    assert!(confirmation.is_ack(), "publish not acked: {confirmation:?}");
    assert_eq!(
        message_count(&conn, "crash.q").await,
        1,
        "binding crash.x -> crash.q lost by kill -9 after bind-ok"
    );
    let got = within(ch.basic_get("crash.q".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
        .expect("the routed message");
    assert_eq!(got.delivery.data, b"routed");
}

/// The same promise under load: 500 durable queues declared over five
/// channels at once, each waiting for its declare-ok, then `kill -9` right
/// after the last one. Every acknowledged queue must exist after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_500_acknowledged_queue_declares_survives_kill9() {
    let _shared = HEAVY.read().await;
    let scratch = Scratch::new("storm");
    let broker = start_hare(&scratch.data(), &[]).await;
    let names: Vec<String> = (0..500).map(|i| format!("storm.{i:03}")).collect();
    {
        let conn = common::connect_url(&broker.url()).await.expect("connect");
        let mut lanes = Vec::new();
        for lane in names.chunks(100) {
            let ch = channel(&conn).await;
            let lane = lane.to_vec();
            lanes.push(async move {
                for name in &lane {
                    declare_durable(&ch, name).await;
                }
            });
        }
        futures::future::join_all(lanes).await;
        kill9(broker).await;
    }
    let broker = start_hare(&scratch.data(), &[]).await;
    let conn = common::connect_url(&broker.url()).await.expect("connect");
    let mut missing = Vec::new();
    for name in &names {
        if let Err(e) = passive_queue(&conn, name).await {
            assert_eq!(code_of(&e), Some(NOT_FOUND), "passive declare {name}: {e}");
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of 500 acknowledged durable queues lost by kill -9 (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Deletions are metadata changes like declarations: after exchange.delete-ok,
/// queue.unbind-ok and queue.delete-ok a `kill -9` must not bring back the
/// exchange, the binding or the queue. (The objects are made durable with a
/// clean restart first, so what is tested is only the deletes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_deletes_and_unbinds_survive_an_immediate_kill9() {
    let _shared = HEAVY.read().await;
    let scratch = Scratch::new("deletes");
    let broker = start_hare(&scratch.data(), &[]).await;
    {
        let (_conn, ch) = open(&broker).await;
        for x in ["del.gone-x", "del.kept-x"] {
            within(ch.exchange_declare(
                x.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ))
            .await
            .expect("exchange.declare");
        }
        declare_durable(&ch, "del.kept-q").await;
        declare_durable(&ch, "del.gone-q").await;
        within(ch.queue_bind(
            "del.kept-q".into(),
            "del.kept-x".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await
        .expect("queue.bind");
    }
    terminate(broker).await;
    let broker = start_hare(&scratch.data(), &[]).await;
    {
        let (conn, ch) = open(&broker).await;
        // The set-up really is on disk: all of it came back from a clean restart.
        passive_exchange(&conn, "del.gone-x").await.expect("set-up");
        passive_queue(&conn, "del.gone-q").await.expect("set-up");
        within(ch.exchange_delete("del.gone-x".into(), ExchangeDeleteOptions::default()))
            .await
            .expect("exchange.delete");
        within(ch.queue_unbind(
            "del.kept-q".into(),
            "del.kept-x".into(),
            "k".into(),
            FieldTable::default(),
        ))
        .await
        .expect("queue.unbind");
        within(ch.queue_delete("del.gone-q".into(), QueueDeleteOptions::default()))
            .await
            .expect("queue.delete");
        kill9(broker).await;
    }
    let broker = start_hare(&scratch.data(), &[]).await;
    let (conn, ch) = open(&broker).await;
    match passive_exchange(&conn, "del.gone-x").await {
        Ok(()) => panic!("exchange del.gone-x is back after exchange.delete-ok and kill -9"),
        Err(e) => assert_eq!(code_of(&e), Some(NOT_FOUND), "{e}"),
    }
    assert_gone(
        passive_queue(&conn, "del.gone-q").await,
        "queue del.gone-q after queue.delete-ok and kill -9",
    );
    passive_exchange(&conn, "del.kept-x")
        .await
        .expect("del.kept-x");
    confirm_select(&ch).await;
    let confirmation = publish_one(&ch, "del.kept-x", "k", b"unroutable").await;
    assert!(confirmation.is_ack(), "{confirmation:?}");
    assert_eq!(
        message_count(&conn, "del.kept-q").await,
        0,
        "binding del.kept-x -> del.kept-q is back after queue.unbind-ok and kill -9"
    );
}

// ---------------------------------------------------------------------------
// 2. Acks reach the disk within a bounded time.
// ---------------------------------------------------------------------------

/// RabbitMQ does not fsync each ack, but its queue index reaches the disk
/// within a bounded time even when no publisher asks for a flush. So 200
/// messages consumed and acked a full second before a `kill -9` must not
/// come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_reach_the_disk_within_a_second_without_other_traffic() {
    let _shared = HEAVY.read().await;
    let scratch = Scratch::new("acks");
    let broker = start_hare(&scratch.data(), &[]).await;
    {
        let (conn, ch) = open(&broker).await;
        declare_durable(&ch, "acks.q").await;
        confirm_select(&ch).await;
        publish_persistent(&ch, "acks.q", 200, 100, Duration::from_secs(30)).await;
        let (consume_ch, mut consumer) = manual_ack_consumer(&conn, "acks.q", 50).await;
        for _ in 0..200 {
            let delivery = within(consumer.next())
                .await
                .expect("consumer stream ended")
                .expect("delivery");
            within(delivery.ack(BasicAckOptions::default()))
                .await
                .expect("basic.ack");
        }
        // Acks have no reply: a round trip on the same channel shows they
        // were all processed.
        within(consume_ch.basic_cancel(consumer.tag(), Default::default()))
            .await
            .expect("basic.cancel");
        assert_eq!(message_count(&conn, "acks.q").await, 0);
        tokio::time::sleep(Duration::from_secs(1)).await;
        kill9(broker).await;
    }
    let broker = start_hare(&scratch.data(), &[]).await;
    let (conn, ch) = open(&broker).await;
    let count = message_count(&conn, "acks.q").await;
    let got = within(ch.basic_get("acks.q".into(), BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get");
    assert!(
        count == 0 && got.is_none(),
        "acked messages came back after kill -9: message_count {count}, basic.get found one: {}",
        got.is_some()
    );
}

// ---------------------------------------------------------------------------
// 3. and 4. A crash during queue.delete or queue.purge.
// ---------------------------------------------------------------------------

const BIG: usize = 30_000;

/// A broker with durable queue `queue` holding [`BIG`] confirmed 1 KiB
/// persistent messages.
async fn big_queue(scratch: &Scratch, queue: &str) -> (BrokerProcess, Connection, Channel) {
    let broker = start_hare(&scratch.data(), &[]).await;
    let (conn, ch) = open(&broker).await;
    declare_durable(&ch, queue).await;
    confirm_select(&ch).await;
    publish_persistent(&ch, queue, BIG, 1024, FILL_LIMIT).await;
    assert_eq!(message_count(&conn, queue).await, BIG as u32);
    (broker, conn, ch)
}

/// Which operation a crash test interrupts.
#[derive(Clone, Copy, Debug)]
enum Op {
    Delete,
    Purge,
}

impl Op {
    async fn run(self, ch: Channel, queue: String) -> lapin::Result<u32> {
        match self {
            Op::Delete => {
                ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
            }
            Op::Purge => {
                ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                    .await
            }
        }
    }
}

/// After a crash, a queue that exists must deliver exactly what it claims,
/// and claim either nothing or everything it held.
async fn assert_whole(conn: &Connection, queue: &str, allowed: &[u32], what: &str) {
    let claimed = message_count(conn, queue).await;
    let delivered = count_by_consuming(conn, queue, IDLE, Duration::from_secs(120)).await;
    assert!(
        allowed.contains(&claimed) && u64::from(claimed) == delivered,
        "{what}: the queue claims {claimed} messages (allowed: {allowed:?}) and delivers {delivered}"
    );
}

/// Runs `op` on a big queue and kills the broker right after its `-ok`.
async fn kill_after_ok(op: Op, label: &str) -> (Scratch, BrokerProcess, String) {
    let scratch = Scratch::new(label);
    let queue = format!("{label}.q");
    let (broker, _conn, ch) = big_queue(&scratch, &queue).await;
    let n = tokio::time::timeout(SLOW_OP_LIMIT, op.run(ch, queue.clone()))
        .await
        .unwrap_or_else(|_| panic!("{op:?} of {BIG} messages took more than {SLOW_OP_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("{op:?}: {e}"));
    assert_eq!(n as usize, BIG, "{op:?}-ok message count");
    kill9(broker).await;
    let broker = start_hare(&scratch.data(), &[]).await;
    (scratch, broker, queue)
}

/// Runs `op` on a big queue and kills the broker 0-300 ms after sending it.
/// Returns whether the `-ok` had arrived before the kill.
async fn kill_during(op: Op, label: &str) -> (Scratch, BrokerProcess, String, bool) {
    let scratch = Scratch::new(label);
    let queue = format!("{label}.q");
    let (broker, _conn, ch) = big_queue(&scratch, &queue).await;
    let delay = Duration::from_millis(XorShift::from_clock().below(301));
    let running = tokio::spawn(op.run(ch, queue.clone()));
    tokio::time::sleep(delay).await;
    let ok_before_kill = running.is_finished();
    kill9(broker).await;
    eprintln!("{op:?} killed after {delay:?}; -ok received before the kill: {ok_before_kill}");
    let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
    let broker = start_hare(&scratch.data(), &[]).await;
    (scratch, broker, queue, ok_before_kill)
}

/// queue.delete-ok means the queue is gone, and a crash right after it must
/// not bring it back, whole or (worse) as a queue whose index points at
/// message bodies that were already deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_delete_ok_leaves_no_queue() {
    let _shared = HEAVY.read().await;
    let (_scratch, broker, queue) = kill_after_ok(Op::Delete, "delete-ok").await;
    let (conn, _ch) = open(&broker).await;
    if let Ok(q) = passive_queue(&conn, &queue).await {
        let claimed = q.message_count();
        let delivered = count_by_consuming(&conn, &queue, IDLE, Duration::from_secs(120)).await;
        panic!(
            "queue {queue} is back after delete-ok and kill -9, claiming {claimed} messages and delivering {delivered}"
        );
    }
}

/// A `kill -9` at a random moment 0-300 ms into queue.delete of 30,000
/// messages: the delete is atomic as far as clients can see. Either the
/// queue is gone (always so if delete-ok had arrived), or it is there with
/// all 30,000 messages, every one of them deliverable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_queue_delete_leaves_all_or_nothing() {
    let _shared = HEAVY.read().await;
    let (_scratch, broker, queue, ok) = kill_during(Op::Delete, "delete-mid").await;
    let (conn, _ch) = open(&broker).await;
    match passive_queue(&conn, &queue).await {
        Err(e) => assert_eq!(code_of(&e), Some(NOT_FOUND), "{e}"),
        Ok(_) if ok => panic!("queue {queue} is back although delete-ok arrived before kill -9"),
        Ok(_) => {
            assert_whole(&conn, &queue, &[BIG as u32], "interrupted delete").await;
        }
    }
}

/// purge-ok means the queue is empty: after a `kill -9` right after it the
/// queue exists, claims 0 messages and delivers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_purge_ok_leaves_an_empty_queue() {
    let _shared = HEAVY.read().await;
    let (_scratch, broker, queue) = kill_after_ok(Op::Purge, "purge-ok").await;
    let (conn, _ch) = open(&broker).await;
    assert_whole(&conn, &queue, &[0], "purge-ok then kill -9").await;
}

/// A `kill -9` at a random moment 0-300 ms into queue.purge of 30,000
/// messages: the queue survives (purge never deletes it) with either none
/// or all of its messages (none if purge-ok had arrived), and delivers
/// exactly what it claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_queue_purge_leaves_all_or_nothing() {
    let _shared = HEAVY.read().await;
    let (_scratch, broker, queue, ok) = kill_during(Op::Purge, "purge-mid").await;
    let (conn, _ch) = open(&broker).await;
    let allowed: &[u32] = if ok { &[0] } else { &[0, BIG as u32] };
    assert_whole(&conn, &queue, allowed, "interrupted purge").await;
}

// ---------------------------------------------------------------------------
// 5. Big purges and deletes do not stall other clients.
// ---------------------------------------------------------------------------

const HUGE: usize = 100_000;

/// Round trips (basic.get on an empty queue) from their own connection every
/// 5 ms until `stop`: (start, duration) of each.
async fn probe_round_trips(url: String, stop: Arc<AtomicBool>) -> Vec<(Instant, Duration)> {
    let (_conn, ch) = common::process::open(&url).await;
    let probe = within(ch.queue_declare(
        "".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("declare the probe queue");
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let got = tokio::time::timeout(
            Duration::from_secs(30),
            ch.basic_get(probe.name().clone(), BasicGetOptions { no_ack: true }),
        )
        .await;
        let took = started.elapsed();
        samples.push((started, took));
        match got {
            Ok(Ok(None)) => {}
            Ok(other) => panic!("probe basic.get: {other:?}"),
            Err(_) => break, // recorded as a 30 s round trip
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    samples
}

/// RabbitMQ answers a purge or delete of a big queue promptly and keeps
/// serving other connections while it frees the messages. So with 100,000
/// persistent 1 KiB messages, purge-ok / delete-ok must arrive within 1 s
/// of the request, and another connection's round trips must stay under
/// 50 ms from the request until 3 s after the `-ok`.
async fn big_operation_does_not_stall_others(op: Op, label: &str) {
    let _exclusive = HEAVY.write().await;
    let scratch = Scratch::new(label);
    let queue = format!("{label}.q");
    let broker = start_hare(&scratch.data(), &[]).await;
    let (conn, ch) = open(&broker).await;
    declare_durable(&ch, &queue).await;
    confirm_select(&ch).await;
    publish_persistent(&ch, &queue, HUGE, 1024, FILL_LIMIT).await;
    assert_eq!(message_count(&conn, &queue).await, HUGE as u32);

    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe_round_trips(broker.url(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await; // the probe is running
    let sent = Instant::now();
    let result = tokio::time::timeout(SLOW_OP_LIMIT, op.run(ch.clone(), queue.clone())).await;
    let op_took = sent.elapsed();
    let n = result
        .unwrap_or_else(|_| panic!("{op:?} of {HUGE} messages: no -ok within {SLOW_OP_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("{op:?}: {e}"));
    assert_eq!(n as usize, HUGE, "{op:?}-ok message count");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = tokio::time::timeout(Duration::from_secs(40), probe)
        .await
        .expect("the probe stops")
        .expect("probe task");
    let window_end = sent + op_took + Duration::from_secs(3);
    let before: Duration = samples
        .iter()
        .filter(|(at, _)| *at < sent)
        .map(|(_, d)| *d)
        .max()
        .unwrap_or_default();
    let during: Vec<Duration> = samples
        .iter()
        .filter(|(at, d)| *at + *d >= sent && *at <= window_end)
        .map(|(_, d)| *d)
        .collect();
    let worst = during.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{op:?} of {HUGE}: -ok after {op_took:?}; other connection's worst round trip {worst:?} \
         over {} probes (before the {op:?}: {before:?})",
        during.len()
    );
    assert!(
        op_took <= Duration::from_secs(1) && worst < Duration::from_millis(50),
        "{op:?} of {HUGE} messages: -ok after {op_took:?} (limit 1 s), another connection's \
         worst round trip {worst:?} (limit 50 ms; {before:?} before the {op:?})"
    );
}

/// queue.purge of 100,000 persistent messages: purge-ok within 1 s, and
/// another connection's round trips stay under 50 ms meanwhile and for 3 s
/// after (see [`big_operation_does_not_stall_others`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_100k_messages_does_not_stall_other_clients() {
    big_operation_does_not_stall_others(Op::Purge, "stall-purge").await;
}

/// queue.delete of a queue with 100,000 persistent messages: delete-ok
/// within 1 s, and another connection's round trips stay under 50 ms
/// meanwhile and for 3 s after (see [`big_operation_does_not_stall_others`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_queue_of_100k_messages_does_not_stall_other_clients() {
    big_operation_does_not_stall_others(Op::Delete, "stall-delete").await;
}

// ---------------------------------------------------------------------------
// 6. A full disk.
// ---------------------------------------------------------------------------

/// When the disk is full the broker must not pretend: RabbitMQ answers a
/// durable declare it cannot write with `541 INTERNAL_ERROR` (it closes the
/// connection) and nacks a persistent publish it cannot write, without
/// enqueueing it. Nothing acknowledged before may be lost, and once space is
/// free again the broker works again without a restart.
///
/// A file system filled to ENOSPC still leaves the store the unused tail of
/// the last block of its files, so a small write may still legitimately
/// succeed. The test therefore first publishes 64 KiB persistent messages
/// until one is nacked: from then on the store has really run out of space
/// (and every ack before it counts as a promise, checked after the crash).
///
/// `--disk-free-limit 0` keeps the disk alarm out of the way (with `1B` a
/// file system filled to the last block, 0 bytes free, would raise it and
/// block the publishers this test needs to see nacked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_errors_loses_nothing_acked_and_recovers() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let _shared = HEAVY.read().await;
    let scratch = Scratch::new("full-disk");
    let _tmpfs = Tmpfs::mount(&scratch.data(), "64m");
    let flags = ["--disk-free-limit", "0"];
    let broker = start_hare(&scratch.data(), &flags).await;
    let filler = scratch.data().join("filler");
    let mut acked: u32 = 20;
    {
        let (_conn, ch) = open(&broker).await;
        declare_durable(&ch, "full.q1").await;
        confirm_select(&ch).await;
        publish_persistent(
            &ch,
            "full.q1",
            acked as usize,
            1024,
            Duration::from_secs(30),
        )
        .await;

        let path = filler.clone();
        let fill = tokio::task::spawn_blocking(move || fill_until_full(&path));
        let written = tokio::time::timeout(Duration::from_secs(60), fill)
            .await
            .expect("filling 64 MB took more than 60 s")
            .expect("fill task");
        eprintln!("filler: {written} bytes until ENOSPC");
        let big = vec![b'b'; 64 * 1024];
        let mut nacked = false;
        for _ in 0..64 {
            if publish_one(&ch, "", "full.q1", &big).await.is_ack() {
                acked += 1;
            } else {
                nacked = true;
                break;
            }
        }
        assert!(
            nacked,
            "4 MiB of persistent messages acked on a full file system ({acked} acked in all)"
        );

        // (a) A durable declare that cannot be written is an error.
        let (_conn, ch) = open(&broker).await;
        match within(ch.queue_declare("full.q2".into(), durable(), FieldTable::default())).await {
            Ok(_) => panic!(
                "declare-ok for durable queue full.q2 while the disk is full \
                 (the store had already nacked a publish for lack of space)"
            ),
            Err(e) => assert_eq!(
                code_of(&e),
                Some(INTERNAL_ERROR),
                "declaring a durable queue on a full disk: {e}"
            ),
        }
    }
    // (b) A persistent publish that cannot be written is nacked, not enqueued.
    {
        let (conn, ch) = open(&broker).await;
        confirm_select(&ch).await;
        let before = message_count(&conn, "full.q1").await;
        let confirmation = publish_one(&ch, "", "full.q1", b"no room").await;
        assert!(
            confirmation.is_nack(),
            "a persistent publish on a full disk got {confirmation:?}, not a nack"
        );
        let after = message_count(&conn, "full.q1").await;
        assert_eq!(after, before, "a nacked publish was enqueued");
    }
    // (c) Space comes back: the broker works again by itself.
    std::fs::remove_file(&filler).expect("remove the filler");
    let freed = Instant::now();
    loop {
        let attempt = async {
            let (conn, ch) = open(&broker).await;
            if let Err(e) =
                within(ch.queue_declare("full.q3".into(), durable(), FieldTable::default())).await
            {
                return Err(format!("declare full.q3: {e}"));
            }
            let ch = channel(&conn).await;
            confirm_select(&ch).await;
            match try_publish_one(&ch, "", "full.q1", b"after").await {
                Ok(c) if c.is_ack() => Ok(()),
                other => Err(format!("publish to full.q1: {other:?}")),
            }
        };
        match attempt.await {
            Ok(()) => {
                acked += 1;
                break;
            }
            Err(e) if freed.elapsed() > Duration::from_secs(10) => {
                panic!("10 s after space was freed the broker still fails: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    // (d) What was acknowledged is on disk; what was refused is not.
    kill9(broker).await;
    let broker = start_hare(&scratch.data(), &flags).await;
    let (conn, _ch) = open(&broker).await;
    assert_whole(&conn, "full.q1", &[acked], "full.q1 after kill -9").await;
    passive_queue(&conn, "full.q3")
        .await
        .expect("full.q3 (declare-ok after space came back) lost");
    assert_gone(
        passive_queue(&conn, "full.q2").await,
        "full.q2, refused on the full disk,",
    );
}

// ---------------------------------------------------------------------------
// 7. and 8. Alarms clear by themselves.
// ---------------------------------------------------------------------------

/// A broker with its metrics on a port we know: (broker, metrics URL).
async fn start_with_metrics(data: &std::path::Path, flags: &[&str]) -> (BrokerProcess, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut all = vec!["--metrics-listen", listen.as_str()];
    all.extend_from_slice(flags);
    let broker = start_hare(data, &all).await;
    (broker, format!("http://{listen}/metrics"))
}

/// Polls the gauge `name` until it equals `want` or `limit` passes; returns
/// how long it took, or `None` (with the last value seen) on timeout.
async fn wait_gauge(
    url: &str,
    name: &str,
    want: f64,
    limit: Duration,
) -> Result<Duration, Option<f64>> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < limit {
        last = scrape(url, name).await;
        if last == Some(want) {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

/// The next connection event other than `Connected`, within `limit`.
async fn next_event(
    events: &mut (impl futures::Stream<Item = Event> + Unpin),
    limit: Duration,
) -> Option<Event> {
    tokio::time::timeout(limit, async {
        loop {
            match events.next().await {
                Some(Event::Connected) => continue,
                other => return other,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Writes a file of `bytes` bytes at `path`.
fn write_filler(path: &std::path::Path, bytes: usize) {
    std::fs::write(path, vec![0x5au8; bytes]).expect("write the filler");
}

/// RabbitMQ's disk alarm clears as soon as free space is back above the
/// limit (it samples about once a second), and blocked publishers go on.
/// On a 64 MB tmpfs with `--disk-free-limit 40MB`, a 36 MiB filler raises
/// the alarm; removing it must clear the alarm, unblock the publisher and
/// confirm its held message within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_alarm_clears_once_space_is_free() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let _shared = HEAVY.read().await;
    let scratch = Scratch::new("disk-alarm");
    let _tmpfs = Tmpfs::mount(&scratch.data(), "64m");
    let (broker, metrics) =
        start_with_metrics(&scratch.data(), &["--disk-free-limit", "40MB"]).await;
    const GAUGE: &str = "hare_alarms_free_disk_space_watermark";
    wait_gauge(&metrics, GAUGE, 0.0, Duration::from_secs(10))
        .await
        .unwrap_or_else(|last| panic!("{GAUGE} is {last:?} on an empty 64 MB tmpfs"));

    let (conn, ch) = open(&broker).await;
    let mut events = conn.events_listener();
    declare_durable(&ch, "disk-alarm.q").await;
    confirm_select(&ch).await;

    let filler = scratch.data().join("filler");
    write_filler(&filler, 36 << 20);
    wait_gauge(&metrics, GAUGE, 1.0, Duration::from_secs(5))
        .await
        .unwrap_or_else(|last| panic!("no disk alarm with 36 MiB of 64 MB used: {GAUGE} {last:?}"));
    let held = {
        let ch = ch.clone();
        tokio::spawn(async move { publish_one(&ch, "", "disk-alarm.q", b"held").await })
    };
    match next_event(&mut events, Duration::from_secs(5)).await {
        Some(Event::ConnectionBlocked(reason)) => assert_eq!(reason, "low on disk"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }

    std::fs::remove_file(&filler).expect("remove the filler");
    let freed = Instant::now();
    let cleared = wait_gauge(&metrics, GAUGE, 0.0, Duration::from_secs(5)).await;
    assert!(
        cleared.is_ok(),
        "disk alarm still on 5 s after the filler was removed: {GAUGE} {:?}",
        cleared.err()
    );
    let left = Duration::from_secs(5).saturating_sub(freed.elapsed());
    match next_event(&mut events, left).await {
        Some(Event::ConnectionUnblocked) => {}
        other => panic!("expected connection.unblocked within 5 s, got {other:?}"),
    }
    let confirmation = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held publish is confirmed")
        .expect("publish task");
    assert!(confirmation.is_ack(), "{confirmation:?}");
}

/// RabbitMQ's memory alarm clears once memory use falls back under the
/// watermark, e.g. because consumers drained the queues; the broker gives
/// memory back rather than stay blocked forever. With
/// `--memory-high-watermark 300MB`, transient 64 KiB messages raise the
/// alarm; after the queue is purged from another connection the alarm must
/// clear and the publisher be unblocked within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_alarm_clears_once_queues_drain() {
    let _shared = HEAVY.read().await;
    let scratch = Scratch::new("memory-alarm");
    let (broker, metrics) =
        start_with_metrics(&scratch.data(), &["--memory-high-watermark", "300MB"]).await;
    const GAUGE: &str = "hare_alarms_memory_used_watermark";
    const RSS: &str = "hare_process_resident_memory_bytes";
    wait_gauge(&metrics, GAUGE, 0.0, Duration::from_secs(10))
        .await
        .unwrap_or_else(|last| panic!("{GAUGE} is {last:?} on an idle broker"));

    let (conn, ch) = open(&broker).await;
    let mut events = conn.events_listener();
    within(ch.queue_declare(
        "mem.q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("declare mem.q");
    confirm_select(&ch).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (ch, stop) = (ch.clone(), stop.clone());
        tokio::spawn(async move {
            let body = vec![b'm'; 64 * 1024];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 20_000 {
                let mut confirms = Vec::new();
                for _ in 0..16 {
                    let confirm = ch
                        .basic_publish(
                            "".into(),
                            "mem.q".into(),
                            BasicPublishOptions::default(),
                            &body,
                            Default::default(),
                        )
                        .await
                        .expect("basic.publish");
                    confirms.push(confirm);
                }
                for confirm in confirms {
                    confirm.await.expect("confirm");
                }
                sent += 16;
            }
            sent
        })
    };
    let raised = wait_gauge(&metrics, GAUGE, 1.0, Duration::from_secs(90)).await;
    stop.store(true, Ordering::Relaxed);
    let rss_high = scrape(&metrics, RSS).await;
    assert!(
        raised.is_ok(),
        "no memory alarm after publishing 64 KiB messages: {GAUGE} {:?}, rss {rss_high:?}",
        raised.err()
    );
    // One more publish after the alarm: the connection gets blocked.
    let held = {
        let ch = ch.clone();
        tokio::spawn(async move {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    "mem.q".into(),
                    BasicPublishOptions::default(),
                    b"held",
                    Default::default(),
                )
                .await
                .expect("basic.publish");
            confirm.await.expect("confirm")
        })
    };
    match next_event(&mut events, Duration::from_secs(5)).await {
        Some(Event::ConnectionBlocked(reason)) => assert_eq!(reason, "low on memory"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }

    let (_drainer, drain_ch) = open(&broker).await;
    let purged = within(drain_ch.queue_purge("mem.q".into(), QueuePurgeOptions::default()))
        .await
        .expect("queue.purge");
    let drained = Instant::now();
    let cleared = wait_gauge(&metrics, GAUGE, 0.0, Duration::from_secs(10)).await;
    let rss_after = scrape(&metrics, RSS).await;
    eprintln!(
        "memory alarm at rss {rss_high:?}; purged {purged} messages; rss 10 s later {rss_after:?}"
    );
    assert!(
        cleared.is_ok(),
        "memory alarm still on 10 s after {purged} messages were purged: rss {rss_high:?} \
         with the queue full, {rss_after:?} after the purge (watermark 300 MB)"
    );
    let left = Duration::from_secs(10).saturating_sub(drained.elapsed());
    match next_event(&mut events, left).await {
        Some(Event::ConnectionUnblocked) => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    let confirmation = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held publish is confirmed once unblocked")
        .expect("publish task");
    assert!(confirmation.is_ack(), "{confirmation:?}");
    tokio::time::timeout(Duration::from_secs(5), publisher)
        .await
        .expect("the publisher finishes once unblocked")
        .expect("publisher task");
}

// ---------------------------------------------------------------------------
// 9. Disk space comes back while running.
// ---------------------------------------------------------------------------

/// RabbitMQ's message store garbage-collects and deletes the files of
/// consumed messages while it runs, so a backlog that was drained does not
/// keep its disk space until a restart. After 100,000 persistent 1 KiB
/// messages are published and consumed, the data dir must shrink below
/// 30 MB within 20 s, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_space_of_a_drained_backlog_comes_back_while_running() {
    let _shared = HEAVY.read().await;
    let scratch = Scratch::new("space");
    let broker = start_hare(&scratch.data(), &[]).await;
    let (conn, ch) = open(&broker).await;
    declare_durable(&ch, "space.q").await;
    confirm_select(&ch).await;
    publish_persistent(&ch, "space.q", HUGE, 1024, FILL_LIMIT).await;
    let full = allocated_bytes(&scratch.data());

    let (_consume_ch, mut consumer) = manual_ack_consumer(&conn, "space.q", 1000).await;
    let drain = async {
        for i in 1..=HUGE {
            let delivery = within(consumer.next())
                .await
                .expect("consumer stream ended")
                .expect("delivery");
            if i % 250 == 0 {
                delivery
                    .ack(BasicAckOptions { multiple: true })
                    .await
                    .expect("basic.ack");
            }
        }
    };
    tokio::time::timeout(FILL_LIMIT, drain)
        .await
        .expect("draining 100,000 messages took too long");
    assert_eq!(message_count(&conn, "space.q").await, 0);
    let drained = allocated_bytes(&scratch.data());

    const LIMIT: u64 = 30 * 1000 * 1000;
    let started = Instant::now();
    let mut now = drained;
    while now >= LIMIT && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = allocated_bytes(&scratch.data());
    }
    eprintln!(
        "data dir: {full} bytes full, {drained} drained, {now} after {:?}",
        started.elapsed()
    );
    assert!(
        now < LIMIT,
        "the data dir still uses {now} bytes 20 s after its backlog was drained \
         ({full} with 100,000 KiB messages, {drained} right after draining; limit 30 MB)"
    );
}
