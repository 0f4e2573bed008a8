//! The happy paths: tasks kept before any worker exists, RPC with progress,
//! events fanned out to groups, status events, batches.

use std::time::Duration;

use hare_worker::{Client, Context, Error, Event, JobState, Task, TaskError, Update, Worker};
use serde::{Deserialize, Serialize};

use crate::on_both;
use crate::support::{self, spawn, watch_status, Log, Target};

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Double {
    n: u32,
}

impl Task for Double {
    const NAME: &'static str = "sdk-test.double";
    type Output = u32;
}

async fn double(task: Double, ctx: Context) -> Result<u32, TaskError> {
    if task.n == 99 {
        for percent in [10.0, 50.0, 90.0] {
            ctx.progress(percent, format!("at {percent}")).await;
        }
    }
    Ok(task.n * 2)
}

/// A task enqueued before any worker started is kept (producers declare the
/// queue too), runs once a worker comes, and its status events say so, in
/// order, with the output. RPC returns the handler's output and progress
/// arrives in order before the result.
async fn enqueued_before_workers_runs_and_reports(target: Target) {
    let url = target.url();
    let (_watch, mut status) = watch_status(&url, "sdk-test.double.*").await;
    let client = Client::connect(&url).await.expect("client");
    let early = client.enqueue(&Double { n: 7 }).await.expect("enqueue");
    assert_eq!(
        support::ready(&url, Double::QUEUE).await,
        1,
        "kept with no worker"
    );

    let worker = spawn(
        Worker::builder(&url, &support::unique("doubler"))
            .concurrency(2)
            .task::<Double, _>(double),
    );
    let started = support::next_status(&mut status).await;
    assert_eq!(
        (started.job_id.as_str(), started.state),
        (early.as_str(), JobState::Started)
    );
    let done = support::next_status(&mut status).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.output, Some(serde_json::json!(14)));

    let answer = client
        .call(&Double { n: 21 }, Duration::from_secs(10))
        .await
        .expect("call");
    assert_eq!(answer, 42);

    let mut submitted = client.submit(&Double { n: 99 }).await.expect("submit");
    let mut seen = Vec::new();
    while let Some(update) = tokio::time::timeout(Duration::from_secs(10), submitted.next())
        .await
        .expect("update in time")
    {
        match update {
            Update::Progress { percent, .. } => seen.push(percent),
            Update::Done(result) => {
                assert_eq!(result.expect("result"), 198);
                break;
            }
        }
    }
    assert_eq!(
        seen,
        vec![10.0, 50.0, 90.0],
        "progress in order, before the result"
    );
    worker.stop().await.expect("clean stop");
    client.close().await;
}
on_both!(enqueued_before_workers_runs_and_reports);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Uploaded {
    id: String,
}

impl Event for Uploaded {
    const NAME: &'static str = "sdk-test.video.uploaded";
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct NobodyListens;

impl Event for NobodyListens {
    const NAME: &'static str = "sdk-test.nobody.listens";
}

/// One event, published once, reaches each consumer group once; an event
/// no group subscribed to is an error, not a silent drop.
async fn events_reach_every_group_once(target: Target) {
    let url = target.url();
    let (transcoded, captioned) = (Log::default(), Log::default());
    let names = [support::unique("transcoder"), support::unique("captioner")];
    let group = |name: &str, log: &Log<String>| {
        let log = log.clone();
        spawn(
            Worker::builder(&url, name).on::<Uploaded, _>(move |e: Uploaded, _ctx: Context| {
                let log = log.clone();
                async move {
                    log.push(e.id);
                    Ok::<(), TaskError>(())
                }
            }),
        )
    };
    let (a, b) = (group(&names[0], &transcoded), group(&names[1], &captioned));
    // A group consumes once its queue is declared and bound.
    for name in &names {
        support::wait_consumed(&url, &format!("{name}.events")).await;
    }
    let client = Client::connect(&url).await.expect("client");
    client
        .publish(&Uploaded { id: "v1".into() })
        .await
        .expect("publish");
    support::eventually(Duration::from_secs(10), || {
        transcoded.len() + captioned.len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(transcoded.snapshot(), vec!["v1".to_owned()]);
    assert_eq!(captioned.snapshot(), vec!["v1".to_owned()]);

    support::expect_err(client.publish(&NobodyListens).await, |e| {
        matches!(e, Error::Unroutable(_))
    });
    a.stop().await.expect("stop a");
    b.stop().await.expect("stop b");
}
on_both!(events_reach_every_group_once);

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Index {
    n: u32,
}

impl Task for Index {
    const NAME: &'static str = "sdk-test.index";
    type Output = ();
}

/// A batch handler gets up to `max` tasks at once and all are acked.
async fn batches_collect_up_to_max(target: Target) {
    let url = target.url();
    let client = Client::connect(&url).await.expect("client");
    for n in 0..12 {
        client.enqueue(&Index { n }).await.expect("enqueue");
    }
    let sizes = Log::default();
    let seen = Log::default();
    let (s2, seen2) = (sizes.clone(), seen.clone());
    let worker = spawn(
        Worker::builder(&url, &support::unique("indexer")).batch::<Index, _, _>(
            5,
            Duration::from_millis(200),
            move |batch: Vec<Index>, _ctxs| {
                let (sizes, seen) = (s2.clone(), seen2.clone());
                async move {
                    sizes.push(batch.len());
                    for t in batch {
                        seen.push(t.n);
                    }
                    Ok(())
                }
            },
        ),
    );
    let mut all = seen.wait_for(12, Duration::from_secs(10)).await;
    all.sort();
    assert_eq!(all, (0..12).collect::<Vec<_>>());
    assert!(
        sizes.snapshot().iter().all(|s| *s <= 5),
        "batches: {:?}",
        sizes.snapshot()
    );
    assert!(
        sizes.snapshot().contains(&5),
        "full batches when tasks wait: {:?}",
        sizes.snapshot()
    );
    worker.stop().await.expect("stop");
    assert_eq!(support::ready(&url, Index::QUEUE).await, 0, "all acked");
}
on_both!(batches_collect_up_to_max);

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Ranked {
    label: String,
}

impl Task for Ranked {
    const NAME: &'static str = "sdk-test.ranked";
    const MAX_PRIORITY: Option<u8> = Some(9);
    type Output = ();
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Perishable;

impl Task for Perishable {
    const NAME: &'static str = "sdk-test.perishable";
    type Output = ();
}

/// `enqueue_with`: a given job id is the one handlers see, a higher priority
/// runs first, an expired task never runs, and a delayed or scheduled task
/// waits in the broker for its time. (Expiry is checked on a plain queue:
/// RabbitMQ's priority queues deliver an expired message that sits behind
/// an older, lower-priority one.)
async fn enqueue_options_are_honoured(target: Target) {
    use hare_worker::EnqueueOptions;
    use std::time::{Instant, SystemTime};
    let url = target.url();
    let client = Client::connect(&url).await.expect("client");
    let task = |label: &str| Ranked {
        label: label.into(),
    };
    let with = |job_id: &str, priority: u8| EnqueueOptions {
        job_id: Some(job_id.into()),
        priority: Some(priority),
        ..Default::default()
    };
    client
        .enqueue_with(&task("low"), with("job-low", 1))
        .await
        .expect("low");
    client
        .enqueue_with(
            &Perishable,
            EnqueueOptions {
                expires: Some(Duration::from_millis(50)),
                ..Default::default()
            },
        )
        .await
        .expect("expiring");
    client
        .enqueue_with(&task("high"), with("job-high", 8))
        .await
        .expect("high");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let seen = Log::default();
    let log = seen.clone();
    let began = Instant::now();
    let perished = Log::default();
    let perishable_log = perished.clone();
    let worker = spawn(
        Worker::builder(&url, &support::unique("ranked"))
            .concurrency(1)
            .task::<Ranked, _>(move |t: Ranked, ctx: Context| {
                let log = log.clone();
                async move {
                    log.push((t.label, ctx.job_id().to_owned(), began.elapsed()));
                    Ok::<(), TaskError>(())
                }
            })
            .task::<Perishable, _>(move |_t: Perishable, _ctx: Context| {
                let log = perishable_log.clone();
                async move {
                    log.push(());
                    Ok::<(), TaskError>(())
                }
            }),
    );
    let first = seen.wait_for(2, Duration::from_secs(10)).await;
    let order: Vec<(&str, &str)> = first
        .iter()
        .map(|(l, id, _)| (l.as_str(), id.as_str()))
        .collect();
    assert_eq!(order, vec![("high", "job-high"), ("low", "job-low")]);

    // Delays count from the broker's receipt, which is after these marks.
    let scheduled_from = began.elapsed();
    let at = SystemTime::now() + Duration::from_millis(700);
    client
        .schedule(&task("scheduled"), at)
        .await
        .expect("schedule");
    let delayed_from = began.elapsed();
    client
        .enqueue_with(
            &task("delayed"),
            EnqueueOptions {
                delay: Some(Duration::from_millis(400)),
                ..Default::default()
            },
        )
        .await
        .expect("delayed");
    let all = seen.wait_for(4, Duration::from_secs(10)).await;
    let ran = |label: &str| all.iter().find(|(l, _, _)| l == label).unwrap().2;
    let delayed = ran("delayed") - delayed_from;
    assert!(
        delayed >= Duration::from_millis(400),
        "delayed ran after {delayed:?}"
    );
    let scheduled = ran("scheduled") - scheduled_from;
    assert!(
        scheduled >= Duration::from_millis(700),
        "scheduled ran after {scheduled:?}"
    );
    assert_eq!(all[2].0, "delayed", "the shorter delay first");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(perished.len(), 0, "an expired task ran");
    worker.stop().await.expect("stop");
}
on_both!(enqueue_options_are_honoured);

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Settle {
    ok: bool,
}

impl Task for Settle {
    const NAME: &'static str = "sdk-test.settle";
    type Output = String;
}

/// A group that follows status events (`on_status`) hears of every job's
/// end once: the events wait in its durable `{group}.status` queue while it
/// is down, only the patterns it bound arrive, and handling them publishes no
/// status events of its own.
async fn status_followers_hear_every_end(target: Target) {
    let url = target.url();
    let (_watch, mut all_status) = watch_status(&url, "#").await;
    let follower_group = support::unique("notifier");
    let heard: Log<(String, JobState, Option<String>)> = Log::default();
    let follower = |heard: &Log<(String, JobState, Option<String>)>| {
        let heard = heard.clone();
        Worker::builder(&url, &follower_group).on_status(
            &["sdk-test.settle.succeeded", "sdk-test.settle.dead"],
            move |e: hare_worker::StatusEvent, _ctx: Context| {
                let heard = heard.clone();
                async move {
                    heard.push((e.job_id, e.state, e.error));
                    Ok::<(), TaskError>(())
                }
            },
        )
    };
    // Declare the follower's queue, then stop it: the ends must wait for it.
    let first = spawn(follower(&heard));
    let status_queue = hare_worker::topology::status_queue(&follower_group);
    support::wait_consumed(&url, &status_queue).await;
    first.stop().await.expect("clean stop");

    let worker = spawn(
        Worker::builder(&url, &support::unique("settler"))
            .retry(hare_worker::RetryPolicy::none())
            .task::<Settle, _>(|t: Settle, _ctx: Context| async move {
                if t.ok {
                    Ok("fine".to_owned())
                } else {
                    Err(TaskError::fatal("no good"))
                }
            }),
    );
    let client = Client::connect(&url).await.expect("client");
    let good = client.enqueue(&Settle { ok: true }).await.expect("enqueue");
    let bad = client
        .enqueue(&Settle { ok: false })
        .await
        .expect("enqueue");
    let mut ends = 0;
    while ends < 2 {
        let e = support::next_status(&mut all_status).await;
        ends += usize::from(matches!(e.state, JobState::Succeeded | JobState::Dead));
    }
    worker.stop().await.expect("clean stop");

    let follower = spawn(follower(&heard));
    let mut got = heard.wait_for(2, Duration::from_secs(10)).await;
    got.sort_by_key(|(_, state, _)| *state == JobState::Dead);
    assert_eq!(
        got,
        vec![
            (good.to_string(), JobState::Succeeded, None),
            (bad.to_string(), JobState::Dead, Some("no good".to_owned())),
        ]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(heard.len(), 2, "started events were not bound");
    while let Ok(e) = all_status.try_recv() {
        assert_ne!(
            e.task, "hare.status",
            "a status handler published status: {e:?}"
        );
    }
    follower.stop().await.expect("clean stop");
    client.close().await;
}
on_both!(status_followers_hear_every_end);
