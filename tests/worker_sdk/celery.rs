//! Celery interop with the real `celery` package from PyPI, both ways:
//! Python's `send_task` + `AsyncResult.get()` (the `rpc://` backend) against
//! a Rust worker, and a Rust client against a Celery worker.
//!
//! Never skipped: a missing `celery` is installed with pip first, so a
//! machine without it fails loudly instead of passing vacuously.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hare_worker::{CeleryTask, Client, Context, Error, RetryPolicy, TaskError, Worker};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::OnceCell;

use crate::on_both;
use crate::support::{self, spawn, Target};

/// Bound for the Python checks script (it has its own 90 s watchdog).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for installing celery, the only step that touches the network.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);
/// The Celery major version the interop is written against.
const CELERY: &str = "celery>=5,<6";

fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

/// Runs `cmd` to completion within `limit`, killing it after that:
/// (success, status + stdout + stderr). Plain `std::process` on a blocking
/// thread, so the tests' runtimes never see these children.
async fn run(mut cmd: Command, limit: Duration) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let what = format!("{cmd:?}");
        let out_file = tempfile(&what, "out");
        let err_file = tempfile(&what, "err");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out_file.1.try_clone().expect("log"))
            .stderr(err_file.1.try_clone().expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let began = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status.to_string();
            }
            if began.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break format!("killed after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let ok = status == "exit status: 0";
        let read = |p: &PathBuf| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let _ = std::fs::remove_file(p);
            text
        };
        let text = format!(
            "{status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            read(&out_file.0),
            read(&err_file.0)
        );
        (ok, text)
    })
    .await
    .expect("the command's thread")
}

/// A fresh file for a child's output.
fn tempfile(_what: &str, kind: &str) -> (PathBuf, std::fs::File) {
    let path = std::env::temp_dir().join(format!("{}.{kind}", support::unique("celery-run")));
    let file = std::fs::File::create(&path).expect("output file");
    (path, file)
}

async fn celery_importable() -> bool {
    let mut probe = Command::new("python3");
    probe.args(["-c", "import celery; assert celery.VERSION[0] == 5"]);
    run(probe, SCRIPT_TIMEOUT).await.0
}

/// Makes sure `import celery` (5.x) works, installing it with pip if not;
/// once per test binary.
async fn ensure_celery() {
    static READY: OnceCell<()> = OnceCell::const_new();
    READY
        .get_or_init(|| async {
            if celery_importable().await {
                return;
            }
            let mut install = Command::new("python3");
            install.args(["-m", "pip", "install", "--quiet", CELERY]);
            let (ok, text) = run(install, INSTALL_TIMEOUT).await;
            assert!(
                ok,
                "celery is missing and `pip install {CELERY}` failed\n{text}"
            );
            assert!(
                celery_importable().await,
                "celery 5 is still not importable after installing it"
            );
        })
        .await;
}

/// The environment `tests/python/celery_interop.py` reads.
fn celery_env(cmd: &mut Command, url: &str, queue: &str) {
    cmd.current_dir(python_dir())
        .env("HARE_CELERY_BROKER", url)
        .env("HARE_CELERY_QUEUE", queue)
        .env("PYTHONPATH", python_dir());
}

// --- Python calls Rust ------------------------------------------------------

const RUST_QUEUE: &str = "celery-test.rust";

#[derive(Deserialize)]
struct AddArgs {
    x: i64,
    y: i64,
}

struct Add;
impl CeleryTask for Add {
    const NAME: &'static str = "rust.add";
    const QUEUE: &'static str = RUST_QUEUE;
    type Args = AddArgs;
    type Output = i64;
}

#[derive(Serialize)]
struct Description {
    name: String,
    total: i64,
    task_id: String,
}

struct Describe;
impl CeleryTask for Describe {
    const NAME: &'static str = "rust.describe";
    const QUEUE: &'static str = RUST_QUEUE;
    type Args = (String, Vec<i64>);
    type Output = Description;
}

struct Fail;
impl CeleryTask for Fail {
    const NAME: &'static str = "rust.fail";
    const QUEUE: &'static str = RUST_QUEUE;
    type Args = String;
    type Output = ();
}

struct Flaky;
impl CeleryTask for Flaky {
    const NAME: &'static str = "rust.flaky";
    const QUEUE: &'static str = RUST_QUEUE;
    type Args = ();
    type Output = u32;
}

struct Progress;
impl CeleryTask for Progress {
    const NAME: &'static str = "rust.progress";
    const QUEUE: &'static str = RUST_QUEUE;
    type Args = (i64,);
    type Output = i64;
}

/// `tests/python/celery_interop.py` sends `rust.*` tasks with Celery's
/// `send_task` and checks each `AsyncResult.get()`: values, keyword
/// arguments, errors raised as Python exceptions (fatal → RuntimeError,
/// bad arguments → TypeError, unknown task → NotRegistered), a retry that
/// succeeds, chains and pickle refused with NotImplementedError, countdown
/// and expiry, progress states. Then a Rust client calls the same worker
/// through the Celery protocol.
async fn python_calls_a_rust_worker(target: Target) {
    ensure_celery().await;
    let url = target.url();
    let worker = spawn(
        Worker::builder(&url, &support::unique("celery-rust"))
            .concurrency(4)
            .retry(RetryPolicy::exponential(2, Duration::from_millis(100)))
            .celery_task::<Add, _>(|a: AddArgs, _ctx: Context| async move {
                Ok::<_, TaskError>(a.x + a.y)
            })
            .celery_task::<Describe, _>(|(name, xs): (String, Vec<i64>), ctx: Context| async move {
                Ok::<_, TaskError>(Description {
                    name,
                    total: xs.iter().sum(),
                    task_id: ctx.job_id().to_owned(),
                })
            })
            .celery_task::<Fail, _>(|why: String, _ctx: Context| async move {
                Err::<(), _>(TaskError::fatal(why))
            })
            .celery_task::<Flaky, _>(|(): (), ctx: Context| async move {
                if ctx.attempt() < 2 {
                    return Err(TaskError::retry("not yet"));
                }
                Ok(ctx.attempt())
            })
            .celery_task::<Progress, _>(|(n,): (i64,), ctx: Context| async move {
                ctx.progress(50.0, "halfway").await;
                Ok::<_, TaskError>(n * n)
            }),
    );
    support::wait_consumed(&url, RUST_QUEUE).await;

    let mut checks = Command::new("python3");
    checks.arg(python_dir().join("celery_interop.py"));
    celery_env(&mut checks, &url, RUST_QUEUE);
    let (ok, text) = run(checks, SCRIPT_TIMEOUT).await;
    assert!(ok, "the Python checks failed against {url}\n{text}");
    println!("{text}");

    // The Rust client speaks the same protocol to the same worker.
    let client = Client::connect(&url).await.expect("client");
    let sum = client
        .call_celery("rust.add", (2, 3), (), RUST_QUEUE, Duration::from_secs(10))
        .await
        .expect("rust.add through the Celery protocol");
    assert_eq!(sum, json!(5));
    let err = client
        .call_celery(
            "rust.fail",
            ["boom"],
            (),
            RUST_QUEUE,
            Duration::from_secs(10),
        )
        .await;
    support::expect_err(
        err,
        |e| matches!(e, Error::TaskFailed { kind, message } if kind == "RuntimeError" && message == "boom"),
    );
    client.close().await;
    worker.stop().await.expect("stop");
}
on_both!(python_calls_a_rust_worker);

// --- Rust calls Python ------------------------------------------------------

/// A Celery worker (`celery -A celery_interop worker -P solo`), killed when
/// dropped; its output goes to a file shown when a check fails.
struct CeleryWorker {
    child: Child,
    log: PathBuf,
}

impl CeleryWorker {
    fn start(url: &str, queue: &str) -> CeleryWorker {
        let log = std::env::temp_dir().join(format!("{}.log", support::unique("celery-worker")));
        let file = std::fs::File::create(&log).expect("worker log");
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "celery", "-A", "celery_interop", "worker"])
            .args(["-P", "solo", "-Q", queue, "-l", "info", "-n"])
            .arg(format!("{}@%h", support::unique("py")))
            .args([
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
            ])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        celery_env(&mut cmd, url, queue);
        let child = cmd.spawn().expect("start the celery worker");
        CeleryWorker { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Rust client calls `py.*` tasks of a real Celery worker (`rpc://`
/// results): the value comes back, a Python exception is
/// `Error::TaskFailed` with its type and text, and a task sent with
/// `send_celery_task` runs without anyone waiting.
async fn rust_calls_a_celery_worker(target: Target) {
    ensure_celery().await;
    let url = target.url();
    let queue = "celery-test.python";
    let client = Client::connect(&url).await.expect("client");
    // Sent before the worker exists: the client declared the queue.
    let marker = std::env::temp_dir().join(support::unique("celery-touch"));
    let marker_text = marker.to_string_lossy().into_owned();
    let id = client
        .send_celery_task("py.touch", [&marker_text], (), queue)
        .await
        .expect("send_celery_task");
    assert!(!id.is_empty());
    let worker = CeleryWorker::start(&url, queue);

    let sum = client
        .call_celery("py.add", (2, 3), (), queue, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("py.add(2, 3): {e}\n{}", worker.output()));
    assert_eq!(sum, json!(5));
    let joined = client
        .call_celery(
            "py.add",
            ["a"],
            json!({"y": "b"}),
            queue,
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|e| panic!("py.add('a', y='b'): {e}\n{}", worker.output()));
    assert_eq!(joined, json!("ab"));
    let err = client
        .call_celery("py.divide", (1, 0), (), queue, Duration::from_secs(10))
        .await;
    support::expect_err(err, |e| {
        matches!(e, Error::TaskFailed { kind, message }
            if kind == "ZeroDivisionError" && message.contains("division by zero"))
    });
    support::eventually(Duration::from_secs(10), || marker.exists()).await;
    let _ = std::fs::remove_file(&marker);
    client.close().await;
    worker.stop();
}
on_both!(rust_calls_a_celery_worker);
