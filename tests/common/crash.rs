//! Helpers for `tests/store_crash.rs`: `hare` as a process with extra flags
//! (to `kill -9` it and restart it on the same data dir), a scratch dir per
//! test, a tmpfs mounted as a small data dir, metrics scrapes, the data dir's
//! allocated size, and bulk publishing and counting.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hare_suite::BrokerProcess;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions};
use lapin::protocol::BasicProperties;
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection};

use super::within;

/// A directory for one test: `root/data` is the broker's data dir (or the
/// mount point of its tmpfs), `root/data.log` the broker's stderr. Removed
/// when the test passes; kept, with the tail of the log printed, when it fails.
pub struct Scratch {
    root: PathBuf,
}

impl Scratch {
    pub fn new(test: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let root =
            std::env::temp_dir().join(format!("hare-crash-{test}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&root).expect("create the scratch dir");
        Scratch { root }
    }

    /// The broker's `--data-dir`.
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The broker's stderr (appended to by every start on this data dir).
    pub fn log(&self) -> PathBuf {
        self.data().with_extension("log")
    }

    /// A path beside the data dir (not inside it).
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read(self.log())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let chars: Vec<char> = strip_ansi(&log).chars().collect();
            let tail: String = chars[chars.len().saturating_sub(4000)..].iter().collect();
            eprintln!(
                "test failed; keeping {} — tail of the broker log:\n{tail}",
                self.root.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// `text` without its ANSI colour sequences (the broker's log has them).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts `hare` on `data` with `extra` flags after ours. Off the runtime
/// (starting blocks until the broker listens) and bounded.
pub async fn start_hare(data: &Path, extra: &[&str]) -> BrokerProcess {
    let dir = data.to_owned();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let job = tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        BrokerProcess::start(env!("CARGO_BIN_EXE_hare"), &dir, &extra)
    });
    match tokio::time::timeout(Duration::from_secs(60), job).await {
        Ok(Ok(Ok(broker))) => broker,
        Ok(Ok(Err(e))) => panic!("start hare on {}: {e}", data.display()),
        Ok(Err(e)) => panic!("start task failed: {e}"),
        Err(_) => panic!("starting hare took more than 60 s"),
    }
}

/// SIGKILL: the broker gets no chance to flush or close anything.
pub async fn kill9(broker: BrokerProcess) {
    let job = tokio::task::spawn_blocking(move || broker.kill9());
    tokio::time::timeout(Duration::from_secs(10), job)
        .await
        .expect("kill -9 hung")
        .expect("kill task");
}

/// SIGTERM (a clean stop that flushes everything), bounded.
pub async fn terminate(broker: BrokerProcess) {
    let job = tokio::task::spawn_blocking(move || broker.terminate(Duration::from_secs(20)));
    let status = tokio::time::timeout(Duration::from_secs(25), job)
        .await
        .expect("terminate hung")
        .expect("terminate task");
    assert!(status.is_some(), "hare did not exit within 20 s of SIGTERM");
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// True when the tests run as root (needed to mount a tmpfs).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A tmpfs mounted on a directory for the life of the guard. Declare it
/// after the [`Scratch`] and before the broker, so that on any exit (panics
/// included) the broker is killed first, then the tmpfs unmounted, then the
/// scratch dir removed.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it, e.g. `64m`) on `dir`.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            // Something still has a file open there: detach it anyway.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
    }
}

/// Writes `path` in 1 MiB, then 4 KiB chunks until the file system refuses
/// with ENOSPC; returns the bytes written. Panics on any other error.
pub fn fill_until_full(path: &Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create the filler file");
    let mut written = 0u64;
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0x5au8; chunk];
        loop {
            match file.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("writing the filler file: {e}"),
            }
        }
    }
    let _ = file.sync_all();
    written
}

/// Bytes allocated on disk for everything under `dir` (what `du` counts:
/// 512-byte blocks, so sparse files count what they really use).
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// The value of the unlabelled series `name` at `url` (a `/metrics` page),
/// or `None` if the page could not be fetched or has no such series.
pub async fn scrape(url: &str, name: &str) -> Option<f64> {
    let url = url.to_owned();
    let name = name.to_owned();
    let job = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(3)))
            .build()
            .into();
        let mut response = agent.get(&url).call().ok()?;
        let text = response.body_mut().read_to_string().ok()?;
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series == name).then(|| value.trim().parse().ok())?
        })
    });
    tokio::time::timeout(Duration::from_secs(5), job)
        .await
        .ok()?
        .ok()?
}

/// delivery_mode 2.
pub fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Publishes `n` persistent messages of `size` bytes to `queue` (default
/// exchange) on `ch`, which must be in confirm mode: all of them first, then
/// every confirm, which must be an ack. Bounded by `limit` overall.
pub async fn publish_persistent(ch: &Channel, queue: &str, n: usize, size: usize, limit: Duration) {
    let body = vec![b'm'; size];
    let work = async {
        let mut confirms = Vec::with_capacity(n);
        for _ in 0..n {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body,
                    persistent(),
                )
                .await
                .expect("basic.publish");
            confirms.push(confirm);
        }
        for (i, confirm) in confirms.into_iter().enumerate() {
            let confirmation = confirm.await.expect("publisher confirm");
            assert!(
                matches!(confirmation, Confirmation::Ack(_)),
                "message {i} of {n} to {queue} was not acked: {confirmation:?}"
            );
        }
    };
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        panic!("publishing {n} confirmed messages to {queue} took more than {limit:?}")
    });
}

/// Consumes `queue` (auto-ack) on a new channel of `conn` until `idle`
/// passes without a delivery (or `limit` overall), and returns how many
/// messages arrived, plus what basic.get still finds after that.
pub async fn count_by_consuming(
    conn: &Connection,
    queue: &str,
    idle: Duration,
    limit: Duration,
) -> u64 {
    let ch = within(conn.create_channel()).await.expect("channel");
    within(ch.basic_qos(0, BasicQosOptions::default()))
        .await
        .expect("basic.qos");
    let mut consumer = within(ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap_or_else(|e| panic!("basic.consume from {queue}: {e}"));
    let deadline = Instant::now() + limit;
    let mut n = 0u64;
    loop {
        assert!(
            Instant::now() < deadline,
            "consuming {queue} still got messages after {limit:?} ({n} so far)"
        );
        match tokio::time::timeout(idle, consumer.next()).await {
            Err(_) => break,
            Ok(Some(Ok(_))) => n += 1,
            Ok(Some(Err(e))) => panic!("consumer error on {queue} after {n} messages: {e}"),
            Ok(None) => panic!("consumer stream of {queue} ended after {n} messages"),
        }
    }
    within(ch.basic_cancel(consumer.tag(), Default::default()))
        .await
        .expect("basic.cancel");
    // Whatever the consumer did not get, basic.get may still find.
    while within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
        .await
        .unwrap_or_else(|e| panic!("basic.get from {queue}: {e}"))
        .is_some()
    {
        n += 1;
        assert!(
            Instant::now() < deadline,
            "basic.get on {queue} never runs empty"
        );
    }
    n
}
