//! The worker's life: concurrency, graceful shutdown (both branches), a
//! worker killed mid-task, a task that kills every worker, a broker that
//! dies and comes back, and periodic jobs across processes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hare_suite::BrokerProcess;
use hare_worker::header_names as h;
use hare_worker::{Client, Context, RetryPolicy, Schedule, Task, TaskError, Worker};
use serde::{Deserialize, Serialize};

use crate::on_both;
use crate::support::{self, header, spawn, Log, Target};

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Sleep {
    ms: u64,
    id: u32,
}

impl Task for Sleep {
    const NAME: &'static str = "sdk-test.sleep";
    type Output = ();
}

/// Sleeps, counting how many run at once; logs (id, end time).
fn sleeper(
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    done: Log<(u32, Instant)>,
) -> impl Fn(Sleep, Context) -> futures::future::BoxFuture<'static, Result<(), TaskError>> {
    move |t: Sleep, _ctx: Context| {
        let (running, peak, done) = (running.clone(), peak.clone(), done.clone());
        Box::pin(async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(t.ms)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            done.push((t.id, Instant::now()));
            Ok(())
        })
    }
}

/// Concurrency 4: never more than 4 handlers at once, all 4 slots used,
/// and one slow task does not hold up the fast ones behind it.
async fn concurrency_bounds_and_no_head_of_line(target: Target) {
    let url = target.url();
    let client = Client::connect(&url).await.expect("client");
    client
        .enqueue(&Sleep { ms: 2000, id: 0 })
        .await
        .expect("enqueue");
    for id in 1..=12 {
        client
            .enqueue(&Sleep { ms: 50, id })
            .await
            .expect("enqueue");
    }
    let (running, peak, done) = (
        Arc::default(),
        Arc::new(AtomicUsize::new(0)),
        Log::default(),
    );
    let worker = spawn(
        Worker::builder(&url, &support::unique("sleeper"))
            .concurrency(4)
            .task::<Sleep, _>(sleeper(running, peak.clone(), done.clone())),
    );
    let finished = done.wait_for(13, Duration::from_secs(15)).await;
    let slow_end = finished.iter().find(|(id, _)| *id == 0).unwrap().1;
    assert!(
        finished
            .iter()
            .filter(|(id, _)| *id != 0)
            .all(|(_, end)| *end < slow_end),
        "fast tasks waited behind the slow one"
    );
    assert_eq!(peak.load(Ordering::SeqCst), 4, "peak concurrency");
    worker.stop().await.expect("stop");
}
on_both!(concurrency_bounds_and_no_head_of_line);

/// SIGTERM-style stop, first branch: in-flight handlers finish within the
/// grace and are acked; prefetched tasks that never started go back to the
/// queue; `run_until` returns Ok.
async fn shutdown_finishes_in_flight_and_requeues_the_rest(target: Target) {
    let url = target.url();
    let client = Client::connect(&url).await.expect("client");
    for id in 0..6 {
        client
            .enqueue(&Sleep { ms: 700, id })
            .await
            .expect("enqueue");
    }
    let (running, peak, done) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::default(),
        Log::default(),
    );
    let worker = spawn(
        Worker::builder(&url, &support::unique("graceful"))
            .concurrency(2)
            .shutdown_grace(Duration::from_secs(10))
            .task::<Sleep, _>(sleeper(running.clone(), peak, done.clone())),
    );
    support::eventually(Duration::from_secs(5), || {
        running.load(Ordering::SeqCst) == 2
    })
    .await;
    let stopping = Instant::now();
    worker.stop().await.expect("clean stop");
    assert_eq!(done.len(), 2, "the two in-flight tasks finished");
    assert!(stopping.elapsed() < Duration::from_secs(5));
    assert_eq!(
        support::ready(&url, Sleep::QUEUE).await,
        4,
        "the rest is back in the queue"
    );
}
on_both!(shutdown_finishes_in_flight_and_requeues_the_rest);

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Transcode;

impl Task for Transcode {
    const NAME: &'static str = "sdk-test.transcode";
    type Output = ();
}

/// Second branch: a handler still running after the grace is cancelled, its
/// child process is killed, the delivery goes back to the queue, and the
/// worker still exits cleanly.
async fn shutdown_cancels_after_the_grace_and_kills_children(target: Target) {
    let url = target.url();
    let client = Client::connect(&url).await.expect("client");
    client.enqueue(&Transcode).await.expect("enqueue");
    let pids = Log::default();
    let log = pids.clone();
    let worker = spawn(
        Worker::builder(&url, &support::unique("cancel"))
            .shutdown_grace(Duration::from_millis(300))
            .task::<Transcode, _>(move |_t: Transcode, ctx: Context| {
                let log = log.clone();
                async move {
                    let mut child = ctx.command("sleep").arg("60").spawn()?;
                    log.push(child.id().expect("pid"));
                    child.wait().await?;
                    Ok::<(), TaskError>(())
                }
            }),
    );
    let pid = pids.wait_for(1, Duration::from_secs(5)).await[0];
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let stopping = Instant::now();
    worker.stop().await.expect("exits cleanly");
    assert!(stopping.elapsed() < Duration::from_secs(5));
    support::eventually(Duration::from_secs(3), || !alive(pid)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while support::ready(&url, Transcode::QUEUE).await != 1 {
        assert!(
            Instant::now() < deadline,
            "the cancelled task is not back in the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
on_both!(shutdown_cancels_after_the_grace_and_kills_children);

/// A process that exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// The task a child worker hangs on until it is killed.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Hang;

impl Task for Hang {
    const NAME: &'static str = "sdk-test.hang";
    type Output = ();
}

/// The task that aborts whichever worker runs it.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Abort;

impl Task for Abort {
    const NAME: &'static str = "sdk-test.abort";
    type Output = ();
}

/// The worker process the tests kill: this test binary, re-run with only
/// [`child_worker`] and its settings in the environment.
struct ChildWorker {
    child: Child,
}

impl ChildWorker {
    fn start(url: &str, mode: &str, log: &Path) -> ChildWorker {
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "lifecycle::child_worker",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("HARE_SDK_CHILD_URL", url)
            .env("HARE_SDK_CHILD_MODE", mode)
            .env("HARE_SDK_CHILD_LOG", log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn child worker");
        ChildWorker { child }
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `limit` for the child to exit by itself.
    fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Not a test by itself: the body of [`ChildWorker`]. A worker whose
/// handler logs "start <job> <redelivered>" and then hangs (`Hang`) or
/// aborts the process (`Abort`).
#[test]
#[ignore = "run by the tests that kill workers"]
fn child_worker() {
    let (Ok(url), Ok(mode), Ok(log)) = (
        std::env::var("HARE_SDK_CHILD_URL"),
        std::env::var("HARE_SDK_CHILD_MODE"),
        std::env::var("HARE_SDK_CHILD_LOG"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let worker = Worker::builder(&url, "sdk-test-crashers")
        .concurrency(1)
        .retry(RetryPolicy::exponential(3, Duration::from_millis(50)))
        .crash_limit(3);
    let worker = match mode.as_str() {
        "abort" => worker.task::<Abort, _>(child_handler::<Abort>(log.into())),
        _ => worker.task::<Hang, _>(child_handler::<Hang>(log.into())),
    };
    rt.block_on(worker.run()).expect("child worker");
}

fn child_handler<T: Task>(
    log: PathBuf,
) -> impl Fn(T, Context) -> futures::future::BoxFuture<'static, Result<T::Output, TaskError>> {
    move |_t: T, ctx: Context| {
        let log = log.clone();
        Box::pin(async move {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            writeln!(f, "start {} {}", ctx.job_id(), ctx.redelivered())?;
            f.sync_all()?;
            if T::NAME == Abort::NAME {
                std::process::abort();
            }
            tokio::time::sleep(Duration::from_secs(120)).await;
            Err(TaskError::fatal("should have been killed"))
        })
    }
}

/// At least once: a worker killed with SIGKILL mid-task loses nothing;
/// another worker completes the task exactly once, marked redelivered.
async fn killed_worker_task_completes_once_elsewhere(target: Target) {
    let url = target.url();
    let dir = hare_suite::temp_data_dir("sdk-kill");
    let log = dir.join("starts.log");
    let client = Client::connect(&url).await.expect("client");
    let job = client.enqueue(&Hang).await.expect("enqueue");
    let child = ChildWorker::start(&url, "slow", &log);
    support::eventually(Duration::from_secs(20), || !log_lines(&log).is_empty()).await;
    assert_eq!(log_lines(&log), vec![format!("start {job} false")]);
    child.kill9();

    let completions = Log::default();
    let record = completions.clone();
    let survivor = spawn(Worker::builder(&url, "sdk-test-survivor").task::<Hang, _>(
        move |_t: Hang, ctx: Context| {
            let record = record.clone();
            async move {
                record.push((ctx.job_id().to_owned(), ctx.redelivered()));
                Ok::<(), TaskError>(())
            }
        },
    ));
    completions.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(completions.snapshot(), vec![(job.to_string(), true)]);
    survivor.stop().await.expect("stop");
    assert_eq!(support::ready(&url, Hang::QUEUE).await, 0);
    let _ = std::fs::remove_dir_all(dir);
}
on_both!(killed_worker_task_completes_once_elsewhere);

/// A task that kills its worker every time is dead-lettered after the crash
/// limit (3 deliveries) instead of taking down workers forever.
async fn crash_loops_end_in_the_dead_letter_queue(target: Target) {
    let url = target.url();
    let dir = hare_suite::temp_data_dir("sdk-crashloop");
    let log = dir.join("starts.log");
    let client = Client::connect(&url).await.expect("client");
    let job = client.enqueue(&Abort).await.expect("enqueue");
    let dlq = format!("{}.dlq", Abort::QUEUE);
    let mut workers_started = 0;
    while support::ready(&url, &dlq).await == 0 {
        assert!(
            workers_started < 8,
            "still looping after {workers_started} workers"
        );
        let mut child = ChildWorker::start(&url, "abort", &log);
        workers_started += 1;
        child.exited_within(Duration::from_secs(10));
    }
    let starts = log_lines(&log);
    assert_eq!(starts.len(), 3, "ran exactly crash-limit times: {starts:?}");
    let (props, _) = support::get_one(&url, &dlq, Duration::from_secs(2)).await;
    assert_eq!(header(&props, h::ERROR_KIND).as_deref(), Some("crash-loop"));
    assert_eq!(
        props.message_id().as_ref().map(|s| s.to_string()),
        Some(job.to_string())
    );
    let _ = std::fs::remove_dir_all(dir);
}
on_both!(crash_loops_end_in_the_dead_letter_queue);

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Tick;

impl Task for Tick {
    const NAME: &'static str = "sdk-test.tick";
    type Output = ();
}

/// Two workers with the same one-second schedule: each tick is enqueued
/// once, not once per worker; when one stops, the other carries on.
async fn periodic_jobs_run_once_per_tick(target: Target) {
    let url = target.url();
    let ticks = Log::default();
    let worker = |ticks: &Log<String>| {
        let ticks = ticks.clone();
        spawn(
            Worker::builder(&url, &support::unique("cron"))
                .every::<Tick, _>(Schedule::interval(Duration::from_secs(1)), || Tick)
                .task::<Tick, _>(move |_t: Tick, ctx: Context| {
                    let ticks = ticks.clone();
                    async move {
                        ticks.push(ctx.job_id().to_owned());
                        Ok::<(), TaskError>(())
                    }
                }),
        )
    };
    let (a, b) = (worker(&ticks), worker(&ticks));
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let seen = ticks.snapshot();
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a tick ran twice: {seen:?}");
    assert!((3..=6).contains(&seen.len()), "ticks in 4.5 s: {seen:?}");
    for id in &seen {
        let ms: i64 = id.strip_prefix("sdk-test.tick@").unwrap().parse().unwrap();
        assert_eq!(ms % 1000, 0, "ticks fall on whole seconds: {id}");
    }
    a.stop().await.expect("stop a");
    let before = ticks.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        ticks.len() > before,
        "the remaining worker took over the schedule"
    );
    b.stop().await.expect("stop b");
}
on_both!(periodic_jobs_run_once_per_tick);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Note {
    n: u32,
}

impl Task for Note {
    const NAME: &'static str = "sdk-test.note";
    type Output = ();
}

/// The broker is killed and restarted on the same port and data dir: an
/// enqueue during the outage fails (never Ok without a confirm), and the
/// worker and the client reconnect by themselves and carry on. (Hare only:
/// it kills the broker.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnects_after_the_broker_restarts() {
    let data = hare_suite::temp_data_dir("sdk-reconnect");
    let hare = env!("CARGO_BIN_EXE_hare");
    let broker = BrokerProcess::start(hare, &data, &[]).expect("start hare");
    let (url, addr) = (broker.url(), broker.addr());
    let seen = Log::default();
    let record = seen.clone();
    let worker = spawn(Worker::builder(&url, "sdk-test-notes").task::<Note, _>(
        move |t: Note, _ctx: Context| {
            let record = record.clone();
            async move {
                record.push(t.n);
                Ok::<(), TaskError>(())
            }
        },
    ));
    let client = Client::connect(&url).await.expect("client");
    client
        .enqueue(&Note { n: 1 })
        .await
        .expect("enqueue before");
    seen.wait_for(1, Duration::from_secs(10)).await;

    broker.kill9();
    assert!(
        client.enqueue(&Note { n: 2 }).await.is_err(),
        "an enqueue with the broker down must fail"
    );
    let restarted = BrokerProcess::start_on(hare, &data, addr, &[]).expect("restart hare");
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.enqueue(&Note { n: 3 }).await.is_err() {
        assert!(Instant::now() < deadline, "the client never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    support::eventually(Duration::from_secs(20), || seen.snapshot().contains(&3)).await;
    worker.stop().await.expect("stop");
    drop(restarted);
    let _ = std::fs::remove_dir_all(data);
}
