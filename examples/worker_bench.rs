//! `worker_bench` — tasks per second through `hare-worker` with a no-op
//! handler, against a bare lapin consumer doing the same acks, on any broker.
//!
//! ```text
//! cargo run --release --example worker_bench -- --url amqp://guest:guest@127.0.0.1:5672/%2f \
//!     [--tasks 20000] [--concurrency 1,8,64] [--no-status]
//! ```
//!
//! For each concurrency it fills a durable task queue with `--tasks`
//! persistent tasks (pipelined confirms, not timed), then times how long the
//! consumer takes to run them all:
//!
//! * `sdk`: a `hare-worker` worker with a no-op handler (JSON decode, the
//!   status events unless `--no-status`, ack after the handler);
//! * `lapin`: a bare lapin consumer with the same prefetch that decodes and
//!   acks each delivery from a spawned task, the floor any framework on
//!   this client pays.
//!
//! Prints one line per run: `mode concurrency tasks seconds tasks_per_sec`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hare_worker::{Context, Task, TaskError, Worker};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Noop {
    n: u64,
}

impl Task for Noop {
    const NAME: &'static str = "bench.noop";
    type Output = ();
}

struct Args {
    url: String,
    tasks: u64,
    concurrency: Vec<usize>,
    status: bool,
}

fn args() -> Args {
    let mut out = Args {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        tasks: 20_000,
        concurrency: vec![1, 8, 64],
        status: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--url" => out.url = it.next().expect("--url URL"),
            "--tasks" => out.tasks = it.next().and_then(|v| v.parse().ok()).expect("--tasks N"),
            "--concurrency" => {
                out.concurrency = it
                    .next()
                    .expect("--concurrency 1,8,64")
                    .split(',')
                    .map(|v| v.parse().expect("a number"))
                    .collect()
            }
            "--no-status" => out.status = false,
            other => panic!("unknown flag {other}"),
        }
    }
    out
}

/// Puts `n` tasks in the SDK's queue the way `Client::enqueue` would
/// (same body and headers), with many confirms outstanding, untimed.
async fn fill(url: &str, n: u64) {
    let client = hare_worker::Client::connect(url).await.expect("client");
    // Declares the queue and the topology exactly as producers do.
    client.enqueue(&Noop { n: 0 }).await.expect("enqueue");
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let mut pending = Vec::with_capacity(1000);
    for i in 1..n {
        let body = serde_json::to_vec(&Noop { n: i }).expect("json");
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(format!("bench-{i}").as_str().into());
        let confirm = ch
            .basic_publish(
                "".into(),
                Noop::QUEUE.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() == 1000 {
            for c in pending.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in pending {
        c.await.expect("confirm");
    }
    let _ = conn.close(200, "filled".into()).await;
    client.close().await;
}

async fn run_sdk(url: &str, tasks: u64, concurrency: usize, status: bool) -> Duration {
    let done = Arc::new(AtomicU64::new(0));
    let counter = done.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let began = Instant::now();
    let worker = tokio::spawn(
        Worker::builder(url, "bench")
            .concurrency(concurrency)
            .status_events(status)
            .task::<Noop, _>(move |_t: Noop, _ctx: Context| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                    Ok::<(), TaskError>(())
                }
            })
            .run_until(async {
                let _ = stopped.await;
            }),
    );
    while done.load(Ordering::Relaxed) < tasks {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = began.elapsed();
    let _ = stop.send(());
    worker.await.expect("worker task").expect("worker");
    took
}

async fn run_lapin(url: &str, tasks: u64, concurrency: usize) -> Duration {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(concurrency as u16, BasicQosOptions::default())
        .await
        .expect("qos");
    let began = Instant::now();
    let mut consumer = ch
        .basic_consume(
            Noop::QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut acks = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let d = consumer.next().await.expect("stream").expect("delivery");
        // Acks go out concurrently, as the SDK's do: an awaited ack per
        // delivery would serialize the consumer on the client's I/O loop.
        acks.spawn(async move {
            let _: Noop = serde_json::from_slice(&d.data).expect("json");
            d.ack(BasicAckOptions::default()).await.expect("ack");
        });
        while acks.try_join_next().is_some() {}
    }
    while acks.join_next().await.is_some() {}
    let took = began.elapsed();
    let _ = conn.close(200, "done".into()).await;
    took
}

#[tokio::main]
async fn main() {
    let a = args();
    for &c in &a.concurrency {
        for mode in ["lapin", "sdk"] {
            fill(&a.url, a.tasks).await;
            let took = match mode {
                "sdk" => run_sdk(&a.url, a.tasks, c, a.status).await,
                _ => run_lapin(&a.url, a.tasks, c).await,
            };
            println!(
                "{mode} {c} {} {:.2} {:.0}",
                a.tasks,
                took.as_secs_f64(),
                a.tasks as f64 / took.as_secs_f64()
            );
        }
    }
    // Leave the broker as we found it.
    if let Ok(conn) = Connection::connect(&a.url, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            for queue in [Noop::QUEUE, "bench.noop.dlq"] {
                let _ = ch
                    .queue_delete(queue.into(), QueueDeleteOptions::default())
                    .await;
            }
        }
    }
}
