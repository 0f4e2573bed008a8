//! `worker_cluster` — shows that hare-worker's quorum queues keep every task
//! when a RabbitMQ cluster loses a node mid-run.
//!
//! ```text
//! cargo build --release --example worker_cluster
//! urls=$(tests/support/rabbitmq-cluster.sh start /tmp/hare-cluster 5701)
//! target/release/examples/worker_cluster --urls "$urls" \
//!     --kill-cmd "tests/support/rabbitmq-cluster.sh kill-leader /tmp/hare-cluster cluster.demo"
//! tests/support/rabbitmq-cluster.sh stop /tmp/hare-cluster
//! ```
//!
//! Producers (`--producers`, each its own [`Client`] and connection) enqueue
//! `--tasks` tasks of type `cluster.demo`, with job ids `{run}-{n}`, spread
//! over `--enqueue-secs`, into a quorum queue (`QueueKind::Quorum`). Workers
//! (`--workers`, each a [`Worker`] with its own connection, `.quorum_queues()`)
//! handle them, sleeping `--task-ms` per task and recording each job id they
//! completed; they also run a periodic job (`--tick-ms`), whose leader is
//! chosen by single active consumer on a quorum token queue. By default
//! producer/worker `i` is given the node list rotated by `i`, so the
//! connections are spread over the nodes (`--same-node` puts them all on the
//! first node). Once `--kill-at` of the tasks are done, `--kill-cmd` runs
//! (through `sh -c`): above, kill -9 of the node that leads the task queue.
//! The run ends when every job id was completed (or after `--timeout-secs`)
//! and prints: tasks enqueued, distinct job ids completed, duplicates
//! (completed more than once: at-least-once allows that, e.g. a task done on
//! the lost node whose ack never reached the cluster), missing, and the time
//! taken. It exits 1 if any task is missing.
//!
//! An enqueue counts as sent only once the broker confirmed it; one that
//! fails (the node went away, a nack, or no confirm within 10 s) is retried
//! with the same job id, so a retry can at worst duplicate a task, never lose
//! one.
//!
//! `--fail-every N` fails the first attempt of every Nth task, so that its
//! retry waits in the broker: on RabbitMQ without the delayed-message plugin,
//! in the SDK's TTL ladder of (here quorum) queues, whose expired messages
//! move on by at-least-once dead-lettering. RabbitMQ before 3.12 can hold
//! such a message until the lost node is back (its dead-letter worker keeps
//! asking the lost node: fixed upstream by rabbitmq-server commit 27886dd9a2),
//! so give `--restore-cmd "tests/support/rabbitmq-cluster.sh restart-down
//! /tmp/hare-cluster"` too; nothing is lost either way.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hare_worker::{
    Client, Context, EnqueueOptions, QueueKind, RetryPolicy, Schedule, Task, TaskError, Worker,
};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

#[derive(Parser, Debug)]
#[command(about = "Quorum-queue workers on a RabbitMQ cluster that loses a node mid-run")]
struct Args {
    /// The cluster's nodes, comma-separated AMQP URLs.
    #[arg(long, env = "HARE_CLUSTER_URLS")]
    urls: String,
    /// Tasks to enqueue.
    #[arg(long, default_value_t = 2000)]
    tasks: u32,
    /// Producer connections.
    #[arg(long, default_value_t = 2)]
    producers: usize,
    /// Worker connections (each a `Worker`).
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Handlers at once per worker.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// How long a task takes.
    #[arg(long, default_value_t = 50)]
    task_ms: u64,
    /// Spread the enqueues over this many seconds.
    #[arg(long, default_value_t = 15.0)]
    enqueue_secs: f64,
    /// The first attempt of every Nth task fails on purpose, so that its retry
    /// waits in the broker (the TTL ladder on plain RabbitMQ); 0: never. On
    /// RabbitMQ before 3.12 a retry waiting when a node is lost may be held
    /// until that node is back: pair it with --restore-cmd.
    #[arg(long, default_value_t = 0)]
    fail_every: u32,
    /// The backoff before such a retry.
    #[arg(long, default_value_t = 200)]
    retry_ms: u64,
    /// A periodic job ticks this often (leader by single active consumer on a
    /// quorum token queue); 0: none.
    #[arg(long, default_value_t = 500)]
    tick_ms: u64,
    /// Run --kill-cmd once this fraction of the tasks was completed.
    #[arg(long, default_value_t = 0.3)]
    kill_at: f64,
    /// Shell command that takes a node down, e.g.
    /// "tests/support/rabbitmq-cluster.sh kill-leader /tmp/hare-cluster cluster.demo".
    #[arg(long)]
    kill_cmd: Option<String>,
    /// Shell command run --restore-after-secs after --kill-cmd, e.g.
    /// "tests/support/rabbitmq-cluster.sh restart-down /tmp/hare-cluster".
    #[arg(long)]
    restore_cmd: Option<String>,
    #[arg(long, default_value_t = 20.0)]
    restore_after_secs: f64,
    /// Connect every producer and worker to the first node first (default:
    /// client i starts at node i, modulo the node count).
    #[arg(long)]
    same_node: bool,
    /// The quorum queue's x-delivery-limit (and the workers' crash limit).
    #[arg(long, default_value_t = 5)]
    delivery_limit: u32,
    /// Give up (exit 1) if not every task completed by then.
    #[arg(long, default_value_t = 180)]
    timeout_secs: u64,
}

#[derive(Serialize, Deserialize)]
struct Work {
    run: String,
    n: u32,
}

impl Task for Work {
    const NAME: &'static str = "cluster.demo";
    type Output = ();
}

/// The periodic job.
#[derive(Serialize, Deserialize)]
struct Tick {}

impl Task for Tick {
    const NAME: &'static str = "cluster.tick";
    type Output = ();
}

/// What the handlers did.
struct Tally {
    run: String,
    started: Instant,
    /// Completions per task number.
    done: Mutex<HashMap<u32, u32>>,
    /// When each completion happened, for the longest pause.
    times: Mutex<Vec<Duration>>,
    /// Completions per worker.
    per_worker: Vec<AtomicU64>,
    /// Deliveries flagged as redelivered.
    redelivered: AtomicU64,
    /// Tasks of an earlier run still in the queue.
    foreign: AtomicU64,
    /// First attempts failed on purpose.
    failed_on_purpose: AtomicU64,
    /// Periodic ticks handled: tick time (ms since the epoch) → runs.
    ticks: Mutex<std::collections::BTreeMap<i64, u32>>,
    changed: Notify,
}

impl Tally {
    fn distinct(&self) -> usize {
        self.done.lock().len()
    }
}

fn job_id(run: &str, n: u32) -> String {
    format!("{run}-{n}")
}

/// `urls` rotated so that node `i` (modulo the count) comes first.
fn rotated(urls: &[String], i: usize) -> String {
    let k = i % urls.len();
    let mut list = urls[k..].to_vec();
    list.extend_from_slice(&urls[..k]);
    list.join(",")
}

/// How a producer fared.
#[derive(Default)]
struct Sent {
    confirmed: u64,
    failed_attempts: u64,
    first_errors: Vec<String>,
}

async fn produce(
    urls: String,
    kind: QueueKind,
    tasks: Vec<u32>,
    run: String,
    every: Duration,
    start: Instant,
) -> Sent {
    let mut sent = Sent::default();
    let note = |sent: &mut Sent, e: String| {
        sent.failed_attempts += 1;
        if sent.first_errors.len() < 3 {
            sent.first_errors.push(e);
        }
    };
    let client = loop {
        match Client::connect_with(&urls, kind).await {
            Ok(c) => break c,
            Err(e) => {
                note(&mut sent, format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    for (k, n) in tasks.into_iter().enumerate() {
        tokio::time::sleep_until((start + every * k as u32).into()).await;
        let task = Work {
            run: run.clone(),
            n,
        };
        let options = EnqueueOptions {
            job_id: Some(job_id(&run, n)),
            ..Default::default()
        };
        loop {
            match tokio::time::timeout(
                Duration::from_secs(10),
                client.enqueue_with(&task, options.clone()),
            )
            .await
            {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => note(&mut sent, e.to_string()),
                Err(_) => note(&mut sent, "no confirm within 10 s".into()),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        sent.confirmed += 1;
    }
    client.close().await;
    sent
}

async fn handle(
    tally: Arc<Tally>,
    worker: usize,
    args: (u64, u32),
    job: Work,
    ctx: Context,
) -> Result<(), TaskError> {
    let (task_ms, fail_every) = args;
    tokio::time::sleep(Duration::from_millis(task_ms)).await;
    if ctx.redelivered() {
        tally.redelivered.fetch_add(1, Ordering::Relaxed);
    }
    if job.run != tally.run {
        tally.foreign.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    if job.n.checked_rem(fail_every) == Some(0) && ctx.attempt() == 1 {
        tally.failed_on_purpose.fetch_add(1, Ordering::Relaxed);
        return Err(TaskError::retry("first attempt fails on purpose"));
    }
    *tally.done.lock().entry(job.n).or_default() += 1;
    tally.times.lock().push(tally.started.elapsed());
    tally.per_worker[worker].fetch_add(1, Ordering::Relaxed);
    tally.changed.notify_waiters();
    Ok(())
}

fn handle_tick(tally: &Tally, ctx: &Context) {
    // Job ids of ticks are `{task}@{tick ms}`.
    if let Some(at) = ctx.job_id().rsplit('@').next().and_then(|t| t.parse().ok()) {
        *tally.ticks.lock().entry(at).or_default() += 1;
    }
}

/// Messages in `queue` (ready ones), asked of the first node that answers.
async fn queue_depth(urls: &[String], queue: &str) -> Option<u32> {
    for url in urls {
        let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await else {
            continue;
        };
        let depth = match conn.create_channel().await {
            Ok(ch) => ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .ok()
                .map(|q| q.message_count()),
            Err(_) => None,
        };
        let _ = conn.close(200, "done".into()).await;
        if depth.is_some() {
            return depth;
        }
    }
    None
}

/// Runs `cmd` through `sh -c`, echoing what it printed.
async fn run_cmd(cmd: &str) -> String {
    match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .await
    {
        Ok(out) => format!(
            "{} (exit {}){}{}",
            cmd,
            out.status.code().unwrap_or(-1),
            prefixed("stdout", &out.stdout),
            prefixed("stderr", &out.stderr)
        ),
        Err(e) => format!("{cmd}: could not run: {e}"),
    }
}

fn prefixed(what: &str, bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("\n    {what}: {l}"))
        .collect()
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "hare_worker=warn".into()),
        )
        .with_target(false)
        .init();
    let args = Args::parse();
    let urls: Vec<String> = args
        .urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() || args.tasks == 0 || args.workers == 0 || args.producers == 0 {
        eprintln!("need --urls, and at least one task, worker and producer");
        return ExitCode::from(2);
    }
    let kind = QueueKind::Quorum {
        delivery_limit: args.delivery_limit,
    };
    let list_for = |i: usize| {
        if args.same_node {
            urls.join(",")
        } else {
            rotated(&urls, i)
        }
    };
    let run = format!("{:08x}", rand_u32());
    let started = Instant::now();
    let run_started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    let tally = Arc::new(Tally {
        run: run.clone(),
        started,
        done: Mutex::new(HashMap::new()),
        times: Mutex::new(Vec::new()),
        per_worker: (0..args.workers).map(|_| AtomicU64::new(0)).collect(),
        redelivered: AtomicU64::new(0),
        foreign: AtomicU64::new(0),
        failed_on_purpose: AtomicU64::new(0),
        ticks: Mutex::new(Default::default()),
        changed: Notify::new(),
    });
    println!(
        "run {run}: {} tasks, {} producer(s), {} worker(s) x {} at {} ms a task, {} node(s)",
        args.tasks,
        args.producers,
        args.workers,
        args.concurrency,
        args.task_ms,
        urls.len()
    );

    // Workers, each its own connection.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = Vec::new();
    for i in 0..args.workers {
        let (tally2, tally3) = (tally.clone(), tally.clone());
        let how = (args.task_ms, args.fail_every);
        let mut builder = Worker::builder(&list_for(i), "cluster-demo")
            .quorum_queues()
            .crash_limit(args.delivery_limit)
            .retry(RetryPolicy::exponential(
                5,
                Duration::from_millis(args.retry_ms),
            ))
            .concurrency(args.concurrency)
            .task::<Work, _>(move |job: Work, ctx: Context| {
                handle(tally2.clone(), i, how, job, ctx)
            });
        if args.tick_ms > 0 {
            builder = builder
                .task::<Tick, _>(move |_: Tick, ctx: Context| {
                    handle_tick(&tally3, &ctx);
                    async { Ok::<(), TaskError>(()) }
                })
                .every::<Tick, _>(
                    Schedule::interval(Duration::from_millis(args.tick_ms)),
                    || Tick {},
                );
        }
        let mut stop = stop_rx.clone();
        workers.push(tokio::spawn(builder.run_until(async move {
            let _ = stop.wait_for(|s| *s).await;
        })));
    }

    // Producers, each its own connection, spreading their share over the window.
    let total = args.tasks as usize;
    let mut producers = Vec::new();
    for p in 0..args.producers {
        let mine: Vec<u32> = (0..args.tasks)
            .filter(|n| *n as usize % args.producers == p)
            .collect();
        let every = Duration::from_secs_f64(args.enqueue_secs / mine.len().max(1) as f64);
        producers.push(tokio::spawn(produce(
            list_for(p),
            kind,
            mine,
            run.clone(),
            every,
            started,
        )));
    }

    // The node loss, once enough is done.
    let killer = args.kill_cmd.clone().map(|cmd| {
        let tally = tally.clone();
        let threshold = ((total as f64) * args.kill_at).ceil() as usize;
        let (restore, restore_after) = (args.restore_cmd.clone(), args.restore_after_secs);
        tokio::spawn(async move {
            loop {
                let changed = tally.changed.notified();
                if tally.distinct() >= threshold {
                    break;
                }
                changed.await;
            }
            let at = tally.started.elapsed();
            let done = tally.distinct();
            let report = run_cmd(&cmd).await;
            println!(
                "{:>6.1} s  killed a node after {done} completions: {report}",
                at.as_secs_f64()
            );
            if let Some(cmd) = restore {
                tokio::time::sleep(Duration::from_secs_f64(restore_after)).await;
                let report = run_cmd(&cmd).await;
                println!(
                    "{:>6.1} s  restored the node: {report}",
                    tally.started.elapsed().as_secs_f64()
                );
            }
            at
        })
    });

    // Progress, until every task was done once or the time is up.
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut last_print = Instant::now();
    loop {
        let distinct = tally.distinct();
        if distinct >= total || Instant::now() >= deadline {
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            println!(
                "{:>6.1} s  {distinct}/{total} completed",
                started.elapsed().as_secs_f64()
            );
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), tally.changed.notified()).await;
    }
    let all_done_at = started.elapsed();

    let mut sent = Sent::default();
    for p in producers {
        match tokio::time::timeout(Duration::from_secs(30), p).await {
            Ok(Ok(s)) => {
                sent.confirmed += s.confirmed;
                sent.failed_attempts += s.failed_attempts;
                sent.first_errors.extend(s.first_errors);
            }
            _ => eprintln!("a producer did not finish"),
        }
    }
    // Late redeliveries (duplicates) still count: let the queue settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    for w in workers {
        match tokio::time::timeout(Duration::from_secs(40), w).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("a worker ended with an error: {e}"),
            Ok(Err(e)) => eprintln!("a worker task failed: {e}"),
            Err(_) => eprintln!("a worker did not stop within 40 s"),
        }
    }
    // The killer finished unless the kill threshold was never reached (or a
    // restore is still pending: it runs before the report).
    let killed_at = match killer {
        Some(k) if k.is_finished() || args.restore_cmd.is_some() => {
            match tokio::time::timeout(Duration::from_secs_f64(args.restore_after_secs + 60.0), k)
                .await
            {
                Ok(Ok(at)) => Some(at),
                _ => None,
            }
        }
        Some(k) => {
            k.abort();
            None
        }
        None => None,
    };

    let done = tally.done.lock().clone();
    let distinct = done.len();
    let duplicates = done.values().filter(|c| **c > 1).count();
    let extra_runs: u32 = done.values().map(|c| c - 1).sum();
    let runs: u32 = done.values().sum();
    let missing: Vec<u32> = (0..args.tasks).filter(|n| !done.contains_key(n)).collect();
    let longest_pause = killed_at.map(|k| {
        let times = tally.times.lock();
        let after: Vec<Duration> = times.iter().copied().filter(|t| *t >= k).collect();
        let mut gap = after.first().map(|t| *t - k).unwrap_or_default();
        for pair in after.windows(2) {
            gap = gap.max(pair[1] - pair[0]);
        }
        gap
    });
    let queue = Work::QUEUE;
    let dlq = format!("{queue}.dlq");
    let left = queue_depth(&urls, queue).await;
    let dead = queue_depth(&urls, &dlq).await;
    let show = |d: Option<u32>| d.map_or("?".to_owned(), |d| d.to_string());

    println!();
    println!("tasks enqueued (confirmed)   {}", sent.confirmed);
    println!(
        "enqueue attempts retried     {}{}",
        sent.failed_attempts,
        sent.first_errors
            .iter()
            .map(|e| format!("\n    e.g. {e}"))
            .collect::<String>()
    );
    println!("distinct job ids completed   {distinct}");
    println!(
        "duplicates                   {duplicates} job ids ran more than once ({extra_runs} extra runs; allowed by at-least-once)"
    );
    println!(
        "missing                      {}{}",
        missing.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(" e.g. {:?}", &missing[..missing.len().min(10)])
        }
    );
    println!(
        "handler runs                 {runs} (redelivered flag on {})",
        tally.redelivered.load(Ordering::Relaxed)
    );
    println!(
        "per worker                   {:?}",
        tally
            .per_worker
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    );
    if args.fail_every > 0 {
        println!(
            "first attempts failed        {} on purpose, each retried after ~{} ms through the broker",
            tally.failed_on_purpose.load(Ordering::Relaxed),
            args.retry_ms
        );
    }
    if args.tick_ms > 0 {
        let ticks = tally.ticks.lock();
        // Ticks of this run only (the token queue outlives runs).
        let from = run_started_ms;
        let mine: Vec<(i64, u32)> = ticks.range(from..).map(|(t, c)| (*t, *c)).collect();
        let twice = mine.iter().filter(|(_, c)| *c > 1).count();
        let longest = mine.windows(2).map(|w| w[1].0 - w[0].0).max().unwrap_or(0);
        println!(
            "periodic ticks (every {} ms) {} handled, {} twice; longest gap between ticks {:.1} s",
            args.tick_ms,
            mine.len(),
            twice,
            longest as f64 / 1000.0
        );
    }
    if tally.foreign.load(Ordering::Relaxed) > 0 {
        println!(
            "tasks of earlier runs        {} (drained, not counted)",
            tally.foreign.load(Ordering::Relaxed)
        );
    }
    match (killed_at, longest_pause) {
        (Some(k), Some(p)) => println!(
            "node killed at               {:.1} s; longest pause in completions after it {:.1} s",
            k.as_secs_f64(),
            p.as_secs_f64()
        ),
        _ if args.kill_cmd.is_some() => {
            println!("node killed at               never (threshold not reached)")
        }
        _ => println!("node killed at               no --kill-cmd given"),
    }
    println!(
        "left in {queue}             {}; in {dlq} {}",
        show(left),
        show(dead)
    );
    println!(
        "time taken                   {:.1} s (all completed at {:.1} s)",
        started.elapsed().as_secs_f64(),
        all_done_at.as_secs_f64()
    );
    if missing.is_empty() && sent.confirmed == u64::from(args.tasks) {
        println!("OK: every task completed");
        ExitCode::SUCCESS
    } else {
        println!("FAILED: {} task(s) missing", missing.len());
        ExitCode::FAILURE
    }
}

/// A run id without another dependency: the clock's nanoseconds and the pid.
fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    nanos ^ std::process::id().rotate_left(16)
}
