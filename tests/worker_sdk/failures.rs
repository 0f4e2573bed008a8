//! Failures: retries with backoff on both delay paths, dead letters that
//! carry the error, panics and timeouts as failed attempts, replays, and a
//! configuration that would break a guarantee refused up front.

use std::time::{Duration, Instant};

use hare_worker::header_names as h;
use hare_worker::{Client, Context, Error, RetryPolicy, Task, TaskError, Worker};
use serde::{Deserialize, Serialize};

use crate::on_both;
use crate::support::{self, header, spawn, Log, Target};

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Flaky {
    /// Succeed from this attempt on (0: never).
    succeed_at: u32,
}

impl Task for Flaky {
    const NAME: &'static str = "sdk-test.flaky";
    type Output = u32;
}

/// A task failing twice is retried after the policy's backoff (300 ms, then
/// 600 ms), each attempt numbered, and then succeeds. On Hare the delay is
/// the delayed-message exchange; on Debian's RabbitMQ the TTL ladder.
async fn retries_wait_the_backoff(target: Target) {
    let url = target.url();
    let attempts = Log::default();
    let log = attempts.clone();
    let worker = spawn(
        Worker::builder(&url, &support::unique("flaky"))
            .retry(RetryPolicy::exponential(3, Duration::from_millis(300)).jitter(0.0))
            .task::<Flaky, _>(move |t: Flaky, ctx: Context| {
                let log = log.clone();
                async move {
                    log.push((ctx.attempt(), Instant::now()));
                    if ctx.attempt() < t.succeed_at {
                        return Err(TaskError::retry("not yet"));
                    }
                    Ok(ctx.attempt())
                }
            }),
    );
    let client = Client::connect(&url).await.expect("client");
    let result = client
        .call(&Flaky { succeed_at: 3 }, Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "third attempt succeeds: {e}; attempts {:?}",
                attempts.snapshot()
            )
        });
    assert_eq!(result, 3);
    let runs = attempts.snapshot();
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    for (i, want) in [(1, 300u64), (2, 600)] {
        let gap = runs[i].1 - runs[i - 1].1;
        assert!(
            gap >= Duration::from_millis(want) && gap < Duration::from_millis(want + 1500),
            "gap before attempt {}: {gap:?}, want {want} ms",
            i + 1
        );
    }
    worker.stop().await.expect("stop");
}
on_both!(retries_wait_the_backoff);

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Breaks {
    how: String,
}

impl Task for Breaks {
    const NAME: &'static str = "sdk-test.breaks";
    type Output = ();
}

async fn breaks(t: Breaks, _ctx: Context) -> Result<(), TaskError> {
    match t.how.as_str() {
        "fatal" => Err(TaskError::fatal("the input is corrupt")),
        "retry" => Err(std::io::Error::other("disk hiccup").into()),
        "panic" => panic!("handler bug"),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Each way of failing ends in `{queue}.dlq` with the error, its kind, the
/// attempts and the queue in headers, and the RPC caller gets the error:
/// `Fatal` at once, `?`-errors after the last attempt, panics and timeouts
/// as failed attempts. `replay_dead` moves a dead letter back as a first
/// attempt.
async fn failures_dead_letter_with_the_error(target: Target) {
    let url = target.url();
    let worker = spawn(
        Worker::builder(&url, &support::unique("breaker"))
            .concurrency(4)
            .retry(RetryPolicy::exponential(2, Duration::from_millis(50)))
            .timeout(Duration::from_millis(500))
            .task::<Breaks, _>(breaks),
    );
    let client = Client::connect(&url).await.expect("client");
    let dlq = format!("{}.dlq", Breaks::QUEUE);
    let cases = [
        ("fatal", "fatal", "the input is corrupt", "1"),
        ("retry", "exhausted", "disk hiccup", "2"),
        ("panic", "panic", "handler bug", "2"),
        ("slow", "timeout", "ran longer than", "2"),
    ];
    for (how, kind, text, attempts) in cases {
        let began = Instant::now();
        let err = client
            .call(&Breaks { how: how.into() }, Duration::from_secs(15))
            .await
            .expect_err("fails");
        match &err {
            Error::TaskFailed { kind: k, message } => {
                assert_eq!(k, kind, "{how}");
                assert!(message.contains(text), "{how}: {message}");
            }
            other => panic!("{how}: unexpected {other}"),
        }
        if how == "fatal" {
            assert!(
                began.elapsed() < Duration::from_secs(2),
                "fatal skips retries"
            );
        }
        let (props, body) = support::get_one(&url, &dlq, Duration::from_secs(5)).await;
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["how"],
            how
        );
        assert_eq!(header(&props, h::ERROR_KIND).as_deref(), Some(kind));
        assert!(header(&props, h::ERROR).unwrap().contains(text));
        assert_eq!(
            header(&props, h::ATTEMPTS).as_deref(),
            Some(attempts),
            "{how}"
        );
        assert_eq!(
            header(&props, h::ORIGINAL_QUEUE).as_deref(),
            Some(Breaks::QUEUE)
        );
        assert!(header(&props, h::FAILED_AT_MS).is_some());
    }

    // A dead letter replayed after the fix runs again, from attempt 1.
    client
        .enqueue(&Breaks {
            how: "fatal".into(),
        })
        .await
        .expect("enqueue");
    let deadline = Instant::now() + Duration::from_secs(5);
    while support::ready(&url, &dlq).await == 0 {
        assert!(Instant::now() < deadline, "fatal task never dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await.expect("stop");
    let reruns = Log::default();
    let log = reruns.clone();
    let fixed = spawn(
        Worker::builder(&url, &support::unique("fixed")).task::<Breaks, _>(
            move |t: Breaks, ctx: Context| {
                let log = log.clone();
                async move {
                    log.push((t.how, ctx.attempt()));
                    Ok::<(), TaskError>(())
                }
            },
        ),
    );
    assert_eq!(
        client.replay_dead(Breaks::QUEUE, 10).await.expect("replay"),
        1
    );
    assert_eq!(support::ready(&url, &dlq).await, 0);
    let rerun = reruns.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(rerun, vec![("fatal".to_owned(), 1)]);
    fixed.stop().await.expect("stop");
}
on_both!(failures_dead_letter_with_the_error);

/// A call nobody answers times out with `Error::Timeout`.
async fn calls_time_out(target: Target) {
    #[derive(Serialize, Deserialize)]
    struct Unserved;
    impl Task for Unserved {
        const NAME: &'static str = "sdk-test.unserved";
        type Output = ();
    }
    let client = Client::connect(&target.url()).await.expect("client");
    let began = Instant::now();
    support::expect_err(
        client.call(&Unserved, Duration::from_millis(400)).await,
        |e| matches!(e, Error::Timeout(_)),
    );
    assert!(began.elapsed() < Duration::from_secs(3));
}
on_both!(calls_time_out);

/// A handler timeout that the broker's consumer timeout would cut short is
/// refused before connecting.
#[tokio::test]
async fn timeouts_beyond_the_consumer_timeout_are_refused() {
    let refused = Worker::builder("amqp://127.0.0.1:1/%2f", "g")
        .timeout(Duration::from_secs(29 * 60))
        .shutdown_grace(Duration::from_secs(120))
        .task::<Breaks, _>(breaks)
        .run_until(async {})
        .await;
    support::expect_err(
        refused,
        |e| matches!(e, Error::Config(m) if m.contains("consumer timeout")),
    );
}
