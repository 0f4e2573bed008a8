//! The blog fan-out example (`examples/blog_fanout.rs`) end to end: its
//! consumer and publisher processes against Hare over TCP. The counter is
//! killed with SIGKILL while posts are applied but not yet acked, a new one
//! takes over on the same store, and the counts must still be exact: every
//! post counted once, despite the duplicates the publisher sent and the
//! redeliveries the crash caused. The search index, never killed, must hold
//! every post and answer a search with exactly the posts containing the word.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use hare_suite::TestBroker;
use serde_json::Value;

const POSTS: usize = 40;
const AUTHORS: usize = 5;
const REPEAT: usize = 2;
const LINGER_MS: &str = "200";
/// How long any one wait in this test may take.
const WAIT: Duration = Duration::from_secs(20);

/// The example binary, next to the test's (`target/<profile>/examples`).
/// Plain `cargo test` builds the examples before the tests run, but
/// `cargo test --test blog_fanout` does not: so when run by cargo, the test
/// first brings the example up to date itself (a no-op when it is).
fn example() -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> dir");
    BUILD.call_once(|| {
        let Some(cargo) = std::env::var_os("CARGO") else {
            return;
        };
        let mut build = Command::new(cargo);
        build
            .args(["build", "--quiet", "--example", "blog_fanout"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("run cargo build --example blog_fanout");
        assert!(status.success(), "cargo build --example blog_fanout failed");
    });
    let path = profile_dir.join("examples/blog_fanout");
    assert!(
        path.exists(),
        "{} is missing: run through `cargo test` (which builds the examples) or \
         `cargo build --example blog_fanout` first",
        path.display()
    );
    path
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        TempDir(hare_suite::temp_data_dir(label))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a process wrote, collected by reader threads.
#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    stderr: Mutex<String>,
    changed: Condvar,
}

/// An example process; killed on drop, whatever path the test leaves by.
struct Proc {
    name: String,
    child: Child,
    out: Arc<Output>,
}

impl Proc {
    fn spawn(name: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(example())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let out = Arc::new(Output::default());
        let stdout = child.stdout.take().expect("piped stdout");
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                o.lines.lock().unwrap().push(line);
                o.changed.notify_all();
            }
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let o = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                o.stderr
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc {
            name: name.to_owned(),
            child,
            out,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.out.lines.lock().unwrap().clone()
    }

    fn report(&self) -> String {
        let lines = self.lines();
        let tail = &lines[lines.len().saturating_sub(20)..];
        format!(
            "{}: {} stdout lines, last: {tail:#?}\nstderr: {}",
            self.name,
            lines.len(),
            self.out.stderr.lock().unwrap()
        )
    }

    /// Waits until `done` holds for the stdout lines so far.
    fn wait_until(&mut self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut lines = self.out.lines.lock().unwrap();
        while !done(&lines) {
            let now = Instant::now();
            let exited = self.child.try_wait().ok().flatten();
            if now > deadline || exited.is_some() {
                drop(lines);
                panic!(
                    "{}: {what}: not within {WAIT:?} (exit status {exited:?})\n{}",
                    self.name,
                    self.report()
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            lines = self.out.changed.wait_timeout(lines, wait).unwrap().0;
        }
    }

    /// Waits until no new stdout line came for `quiet`.
    fn wait_quiet(&self, quiet: Duration) {
        let deadline = Instant::now() + WAIT;
        let mut seen = self.lines().len();
        let mut since = Instant::now();
        while since.elapsed() < quiet {
            assert!(Instant::now() < deadline, "{} never went quiet", self.name);
            std::thread::sleep(Duration::from_millis(50));
            let now = self.lines().len();
            if now != seen {
                (seen, since) = (now, Instant::now());
            }
        }
    }

    /// SIGKILL: no flush, no close, no ack.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, the worker's graceful stop; the exit status.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                panic!("{} did not exit on SIGTERM\n{}", self.name, self.report());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The post ids of `kind` lines (`applied`, `duplicate`, `redelivered`).
fn ids(lines: &[String], kind: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))
        .map(str::to_owned)
        .collect()
}

/// Posts applied or recognised as duplicates (handled either way).
fn handled(lines: &[String]) -> usize {
    ids(lines, "applied").len() + ids(lines, "duplicate").len()
}

fn query(data: &TempDir, args: &[&str]) -> Value {
    let out = Command::new(example())
        .args(["query", "--data", data.arg()])
        .args(args)
        .output()
        .expect("run query");
    assert!(
        out.status.success(),
        "query {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "query {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Ready messages in `queue`, by a passive declare.
fn ready_messages(broker: &TestBroker, queue: &str) -> u32 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let conn = broker.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"));
        let _ = conn.close(200, "done".into()).await;
        q.message_count()
    })
}

#[test]
fn counter_killed_mid_stream_still_counts_every_post_once() {
    let began = Instant::now();
    let broker = TestBroker::start();
    let url = broker.url().to_owned();
    let search_dir = TempDir::new("blog-search");
    let counter_dir = TempDir::new("blog-counter");
    let consumer = |name: &str, kind: &str, dir: &TempDir| {
        Proc::spawn(
            name,
            &[
                kind,
                "--amqp-url",
                &url,
                "--data",
                dir.arg(),
                "--linger-ms",
                LINGER_MS,
            ],
        )
    };

    let mut search = consumer("search", "search", &search_dir);
    let mut counter = consumer("counter", "counter", &counter_dir);
    let ready = |lines: &[String]| lines.iter().any(|l| l == "ready");
    search.wait_until("ready", ready);
    counter.wait_until("ready", ready);

    // The publisher runs while the consumers work; it prints its posts.
    let (count, authors, repeat) = (POSTS.to_string(), AUTHORS.to_string(), REPEAT.to_string());
    let mut publisher = Proc::spawn(
        "publish",
        &[
            "publish",
            "--amqp-url",
            &url,
            "--count",
            &count,
            "--author-count",
            &authors,
            "--repeat",
            &repeat,
        ],
    );

    // Mid-stream, with posts applied but unacked (lingering): SIGKILL.
    counter.wait_until("10 posts applied", |l| ids(l, "applied").len() >= 10);
    counter.kill9();
    let before = counter.lines();
    let mut counter = consumer("counter (restarted)", "counter", &counter_dir);

    let status = publisher.child.wait().expect("wait for the publisher");
    assert!(status.success(), "publish failed\n{}", publisher.report());
    let posts: Vec<Value> = publisher
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).expect("a post per line"))
        .collect();
    assert_eq!(posts.len(), POSTS, "{}", publisher.report());
    let field = |p: &Value, k: &str| p[k].as_str().expect("string field").to_owned();
    let all_ids: BTreeSet<String> = posts.iter().map(|p| field(p, "post_id")).collect();
    assert_eq!(all_ids.len(), POSTS, "post ids are unique");

    // Everything handled: the search group saw all copies; every post went
    // through a counter, and the counter's queue stays empty and quiet.
    search.wait_until("all copies handled", |l| handled(l) >= POSTS * REPEAT);
    counter.wait_until("every post handled", |l| {
        let mut covered: BTreeSet<String> = ids(&before, "applied").into_iter().collect();
        covered.extend(ids(l, "applied"));
        covered.extend(ids(l, "duplicate"));
        covered == all_ids
    });
    let deadline = Instant::now() + WAIT;
    loop {
        counter.wait_quiet(Duration::from_millis(800));
        if ready_messages(&broker, "author-counter.events") == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", counter.report());
    }
    let after = counter.lines();
    assert!(counter.terminate().success(), "{}", counter.report());
    assert!(search.terminate().success(), "{}", search.report());

    // The crash really caused redeliveries, and an applied one was skipped.
    let redelivered = ids(&after, "redelivered");
    assert!(
        !redelivered.is_empty(),
        "the restarted counter saw no redelivery\n{}",
        counter.report()
    );
    let duplicates: BTreeSet<String> = ids(&after, "duplicate").into_iter().collect();
    assert!(
        redelivered.iter().any(|id| duplicates.contains(id)),
        "no redelivered post was recognised as already applied\n{}",
        counter.report()
    );

    // Counts: exactly one per post, per author as published.
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for post in &posts {
        *expected.entry(field(post, "author")).or_default() += 1;
    }
    let counts = query(&counter_dir, &["--counts"]);
    let got: BTreeMap<String, u64> = serde_json::from_value(counts["counts"].clone())
        .unwrap_or_else(|e| panic!("counts: {e}: {counts}"));
    assert_eq!(counts["total"], POSTS as u64, "{counts}");
    assert_eq!(counts["seen"], POSTS as u64, "{counts}");
    assert_eq!(got, expected, "per-author counts");
    assert_eq!(expected.len(), AUTHORS, "every author wrote something");

    // Search: pick a word in some posts but not all, and expect exactly those.
    let words = |p: &Value| -> BTreeSet<String> {
        format!("{} {}", field(p, "title"), field(p, "body"))
            .split_whitespace()
            .map(str::to_lowercase)
            .collect()
    };
    let mut df: BTreeMap<String, usize> = BTreeMap::new();
    for post in &posts {
        for w in words(post) {
            *df.entry(w).or_default() += 1;
        }
    }
    let (word, _) = df
        .iter()
        .filter(|(_, n)| **n > 0 && **n < POSTS)
        .min_by_key(|(_, n)| n.abs_diff(POSTS / 2))
        .expect("a word in some posts");
    let want: Vec<String> = posts
        .iter()
        .filter(|p| words(p).contains(word))
        .map(|p| field(p, "post_id"))
        .collect();
    let found = query(&search_dir, &["--search", word]);
    assert_eq!(found["posts"], POSTS as u64, "{found}");
    let matches: Vec<String> = serde_json::from_value(found["matches"].clone())
        .unwrap_or_else(|e| panic!("matches: {e}: {found}"));
    assert_eq!(matches, want, "search {word:?}");
    let none = query(&search_dir, &["--search", "nosuchword"]);
    assert_eq!(none["matches"], serde_json::json!([]), "{none}");

    eprintln!(
        "blog fan-out: counter killed after {} applied; restarted one saw {} redelivered, {} \
         duplicates; search {word:?} → {} posts; {:.1} s",
        ids(&before, "applied").len(),
        redelivered.len(),
        duplicates.len(),
        matches.len(),
        began.elapsed().as_secs_f64()
    );
}
