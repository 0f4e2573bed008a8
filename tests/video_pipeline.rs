//! The video pipeline example (`examples/video_pipeline/`) end to end: its
//! processes against Hare over TCP, real ffmpeg and PocketSphinx, the HTTP
//! API through a real client and the job page in Debian's headless Chromium.
//! The tools are installed when missing (Debian's ffmpeg, pocketsphinx,
//! pocketsphinx-en-us, chromium, nodejs; playwright-core from npm).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hare_suite::TestBroker;
use serde_json::Value;

/// What the sample clip says (`demo::SCRIPT` in the example).
const SCRIPT: &str = "the quick brown fox jumps over the lazy dog every message is written to \
                      disk before the broker says yes workers turn one upload into many small videos";

const JOB_LIMIT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// Tools.
// ---------------------------------------------------------------------------

fn run_ok(program: &str, args: &[&str], dir: Option<&Path>) {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// ffmpeg, PocketSphinx with its model, Chromium, Node and playwright-core.
fn ensure_tools() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let model = Path::new("/usr/share/pocketsphinx/model/en-us/en-us");
    let missing = [
        "ffmpeg",
        "ffprobe",
        "pocketsphinx_continuous",
        "chromium",
        "node",
        "npm",
    ]
    .iter()
    .any(|p| !on_path(p))
        || !model.exists();
    if missing {
        run_ok("apt-get", &["update", "-qq"], None);
        run_ok(
            "apt-get",
            &[
                "install",
                "-y",
                "-qq",
                "ffmpeg",
                "pocketsphinx",
                "pocketsphinx-en-us",
                "chromium",
                "nodejs",
                "npm",
            ],
            None,
        );
    }
    let browser = repo_path("tests/browser");
    if !browser
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        run_ok(
            "npm",
            &["install", "--no-audit", "--no-fund", "--silent"],
            Some(&browser),
        );
    }
    *done = true;
}

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The example, built by `cargo test` before the tests run.
fn example() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("examples/video_pipeline");
    assert!(
        path.exists(),
        "{} is missing: run through `cargo test`, which builds the examples",
        path.display()
    );
    path
}

/// The 10 s sample clip with speech, made once per test run.
fn sample() -> PathBuf {
    static SAMPLE: OnceLock<PathBuf> = OnceLock::new();
    SAMPLE
        .get_or_init(|| {
            ensure_tools();
            let out =
                std::env::temp_dir().join(format!("hare-video-{}/in.mp4", std::process::id()));
            let status = Command::new(example())
                .args(["sample", "--out"])
                .arg(&out)
                .status()
                .expect("run the example");
            assert!(status.success(), "making the sample clip failed");
            out
        })
        .clone()
}

// ---------------------------------------------------------------------------
// Processes.
// ---------------------------------------------------------------------------

/// One example process, its output collected line by line; killed on drop.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn serve(url: &str, data: &Path, extra: &[&str]) -> Proc {
        let mut child = Command::new(example())
            .args([
                "serve",
                "--amqp-url",
                url,
                "--listen",
                "127.0.0.1:0",
                "--data",
            ])
            .arg(data)
            .args(extra)
            .env("RUST_LOG", "info,lapin=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the example");
        let lines = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("piped"), &lines);
        collect(child.stderr.take().expect("piped"), &lines);
        Proc { child, lines }
    }

    fn output(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// The API's base URL, once it printed it.
    fn api(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .expect("lines")
                .iter()
                .find_map(|l| l.strip_prefix("api: ").map(str::to_owned))
            {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no API address:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the graceful stop.
    fn terminate(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        assert!(
            status.success(),
            "stopped with {status}:\n{}",
            self.output()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn collect(pipe: impl Read + Send + 'static, lines: &Arc<Mutex<Vec<String>>>) {
    let lines = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            lines.lock().expect("lines").push(line);
        }
    });
}

struct DataDir(PathBuf);

impl DataDir {
    fn new(label: &str) -> DataDir {
        DataDir(hare_suite::temp_data_dir(label))
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// HTTP.
// ---------------------------------------------------------------------------

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// POSTs `body` to `/videos` (retrying 503s while the workers declare their
/// queues): the status, the body, the `Location` and how long the answer took.
fn post(base: &str, body: &[u8]) -> (u16, String, Option<String>, Duration) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let began = Instant::now();
        let mut response = agent()
            .post(format!("{base}/videos?name=sample.mp4"))
            .header("content-type", "video/mp4")
            .send(body)
            .expect("POST /videos");
        let took = began.elapsed();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().expect("body");
        if status == 503 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return (status, text, location, took);
    }
}

/// POSTs the sample: the job id, its `Location`, and how long the 202 took.
fn upload(base: &str) -> (String, String, Duration) {
    let bytes = std::fs::read(sample()).expect("sample");
    let (status, body, location, took) = post(base, &bytes);
    assert_eq!(status, 202, "{body}");
    let json: Value = serde_json::from_str(&body).expect("JSON");
    let id = json["id"].as_str().expect("id").to_owned();
    (id, location.expect("Location"), took)
}

fn job(base: &str, id: &str) -> Value {
    let mut response = agent()
        .get(format!("{base}/videos/{id}"))
        .header("accept", "application/json")
        .call()
        .expect("GET /videos/{id}");
    assert_eq!(response.status().as_u16(), 200);
    serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("JSON")
}

fn wait_job(base: &str, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + JOB_LIMIT;
    loop {
        let view = job(base, id);
        if done(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not within {JOB_LIMIT:?}: {view:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn state<'a>(view: &'a Value, part: &str) -> &'a str {
    view["parts"][part]["state"].as_str().unwrap_or("")
}

fn probe(path: &Path) -> String {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries"])
        .arg("format=duration:stream=codec_name,height")
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(path)
        .output()
        .expect("ffprobe");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn duration(probe: &str) -> f64 {
    probe
        .lines()
        .find_map(|l| l.strip_prefix("duration="))
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0)
}

fn chromium_dom(url: &str) -> String {
    let profile = hare_suite::temp_data_dir("chromium");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", url])
        .output()
        .expect("chromium");
    let _ = std::fs::remove_dir_all(profile);
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

/// The upload is answered 202 with a job id before any worker runs; a page
/// opened then in Chromium shows every part pending and, without a reload,
/// ends with every part done, rendition links and players with the captions
/// track. The renditions are H.264/AAC at 360 and 720 lines with the
/// source's duration; the captions are WebVTT with most of the words spoken.
#[test]
fn upload_answers_at_once_and_the_live_page_ends_with_every_part() {
    ensure_tools();
    let broker = TestBroker::start();
    let data = DataDir::new("video-e2e");
    // The groups' queues exist (as in a running system), then the workers stop.
    let mut workers = Proc::serve(broker.url(), &data.0, &["--roles", "transcoder,captioner"]);
    let api = Proc::serve(broker.url(), &data.0, &["--roles", "api,notifier"]);
    let base = api.api();
    std::thread::sleep(Duration::from_secs(2));
    workers.terminate();

    let (id, location, took) = upload(&base);
    assert_eq!(location, format!("/videos/{id}"));
    assert!(took < Duration::from_secs(1), "202 took {took:?}");
    let view = job(&base, &id);
    for part in ["360p", "720p", "captions"] {
        assert_eq!(state(&view, part), "pending", "{view:#}");
    }

    let shot = data.0.join("page.png");
    let page = std::thread::spawn({
        let url = format!("{base}/videos/{id}");
        let shot = shot.clone();
        move || {
            Command::new("node")
                .arg(repo_path("tests/browser/job_page.js"))
                .arg(url)
                .arg(shot)
                .output()
                .expect("node")
        }
    });
    std::thread::sleep(Duration::from_secs(3)); // the page is open, pending
    let _workers = Proc::serve(broker.url(), &data.0, &["--roles", "transcoder,captioner"]);
    let out = page.join().expect("browser thread");
    assert!(
        out.status.success(),
        "browser: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        api.output()
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("browser JSON");
    for part in ["360p", "720p", "captions"] {
        assert_eq!(seen["first"][part], "pending", "{seen:#}");
        assert_eq!(seen["last"][part], "done", "{seen:#}");
    }
    assert_eq!(
        seen["navigations"], 1,
        "updated live, not reloaded: {seen:#}"
    );
    let links: Vec<&str> = seen["links"]
        .as_array()
        .expect("links")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for key in [
        format!("/files/renditions/{id}/360p.mp4"),
        format!("/files/renditions/{id}/720p.mp4"),
        format!("/files/captions/{id}/captions.vtt"),
    ] {
        assert!(links.contains(&key.as_str()), "{key} not linked: {seen:#}");
    }
    let videos = seen["videos"].as_array().expect("videos");
    assert_eq!(videos.len(), 2, "{seen:#}");
    for v in videos {
        assert_eq!(v["track"], format!("/files/captions/{id}/captions.vtt"));
    }
    assert!(
        std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
        "screenshot"
    );

    let source = duration(&probe(&sample()));
    for height in [360, 720] {
        let file = data.0.join(format!("renditions/{id}/{height}p.mp4"));
        let p = probe(&file);
        assert!(
            p.contains("codec_name=h264") && p.contains("codec_name=aac"),
            "{p}"
        );
        assert!(p.contains(&format!("height={height}")), "{p}");
        assert!((duration(&p) - source).abs() < 0.5, "{p} vs {source}");
    }
    let vtt =
        std::fs::read_to_string(data.0.join(format!("captions/{id}/captions.vtt"))).expect("vtt");
    assert!(vtt.starts_with("WEBVTT\n"), "{vtt}");
    let mut cue_words = Vec::new();
    for block in vtt.split("\n\n").skip(1) {
        let lines: Vec<&str> = block.lines().collect();
        assert!(lines.len() >= 3, "cue {block:?}");
        let (start, end) = lines[1].split_once(" --> ").expect("cue timing");
        assert!(
            start.len() == 12 && end.len() == 12 && start < end,
            "{}",
            lines[1]
        );
        cue_words.extend(lines[2..].join(" ").split_whitespace().map(str::to_owned));
    }
    let found = SCRIPT
        .split_whitespace()
        .filter(|w| cue_words.iter().any(|c| c == w))
        .count();
    let accuracy = found as f64 / SCRIPT.split_whitespace().count() as f64;
    assert!(accuracy >= 0.6, "{accuracy:.2} of the words in {vtt}");
    let notified = job(&base, &id);
    assert_eq!(notified["notification"]["ok"], true, "{notified:#}");
}

/// A transcoder killed with -9 mid-job: its ffmpeg dies with it, another
/// transcoder takes the redelivered work, the job completes and the user is
/// notified exactly once.
#[test]
fn a_transcoder_killed_mid_job_is_replaced_and_the_user_is_notified_once() {
    ensure_tools();
    let broker = TestBroker::start();
    let data = DataDir::new("video-kill");
    let api = Proc::serve(
        broker.url(),
        &data.0,
        &["--roles", "api,captioner,notifier"],
    );
    let mut first = Proc::serve(
        broker.url(),
        &data.0,
        &["--roles", "transcoder", "--transcoder-concurrency", "2"],
    );
    let base = api.api();
    let (id, _, _) = upload(&base);
    let at_kill = wait_job(&base, &id, "a rendition in progress", |v| {
        ["360p", "720p"].iter().any(|p| state(v, p) == "processing")
    });
    first.kill9();
    let unfinished: Vec<&str> = ["360p", "720p"]
        .into_iter()
        .filter(|p| state(&at_kill, p) != "done")
        .collect();
    assert!(!unfinished.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let orphans: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| {
            c.starts_with("ffmpeg")
                && c.contains(&data.0.display().to_string())
                && c.contains("renditions")
        })
        .collect();
    assert!(
        orphans.is_empty(),
        "ffmpeg outlived its worker: {orphans:?}"
    );

    let _second = Proc::serve(broker.url(), &data.0, &["--roles", "transcoder"]);
    let done = wait_job(&base, &id, "the notification", |v| {
        v["notification"].is_object()
    });
    for part in ["360p", "720p", "captions"] {
        assert_eq!(state(&done, part), "done", "{done:#}");
    }
    for part in unfinished {
        assert!(
            data.0.join(format!("renditions/{id}/{part}.mp4")).exists(),
            "{part} was redone"
        );
    }
    assert_eq!(done["notification"]["ok"], true);
    std::thread::sleep(Duration::from_secs(1));
    let notified = api.output().matches("notified: ").count();
    assert_eq!(notified, 1, "{}", api.output());
    let mut response = agent()
        .get(format!("{base}/notifications"))
        .call()
        .expect("outbox");
    let outbox: Value =
        serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("JSON");
    let ours = outbox
        .as_array()
        .expect("list")
        .iter()
        .filter(|n| n["video_id"] == id.as_str())
        .count();
    assert_eq!(ours, 1, "{outbox:#}");
}

/// A captioner that fails every time (its model is missing) retries, then
/// dead-letters into its own DLQ with the error; the transcodes finish
/// untouched, the page (in Chromium) shows the captions failed with why, and
/// the user is told so once.
#[test]
fn a_failing_captioner_dead_letters_without_touching_the_transcoder() {
    ensure_tools();
    let broker = TestBroker::start();
    let data = DataDir::new("video-fail");
    let all = Proc::serve(
        broker.url(),
        &data.0,
        &[
            "--sphinx-model",
            "/nonexistent/model",
            "--retry-attempts",
            "2",
            "--retry-base-ms",
            "200",
        ],
    );
    let base = all.api();
    let (id, _, _) = upload(&base);
    let done = wait_job(&base, &id, "the notification", |v| {
        v["notification"].is_object()
    });
    assert_eq!(state(&done, "360p"), "done", "{done:#}");
    assert_eq!(state(&done, "720p"), "done", "{done:#}");
    assert_eq!(state(&done, "captions"), "failed", "{done:#}");
    let error = done["parts"]["captions"]["error"].as_str().unwrap_or("");
    assert!(error.contains("acoustic model"), "{error}");
    let note = &done["notification"];
    assert_eq!(note["ok"], false);
    assert!(
        note["message"]
            .as_str()
            .unwrap_or("")
            .contains("captions failed"),
        "{note}"
    );

    let dlq = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let conn = lapin::Connection::connect(broker.url(), Default::default())
                .await
                .expect("connect");
            let ch = conn.create_channel().await.expect("channel");
            let q = ch
                .queue_declare(
                    "video.caption.dlq".into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .expect("the captioner's DLQ");
            q.message_count()
        });
    assert_eq!(dlq, 1, "the caption task is dead-lettered once");

    let dom = chromium_dom(&format!("{base}/videos/{id}"));
    assert!(
        dom.contains("data-part=\"captions\" data-state=\"failed\""),
        "{dom}"
    );
    assert!(dom.contains("acoustic model"), "{dom}");
    assert!(
        dom.contains(&format!("/files/renditions/{id}/720p.mp4")),
        "{dom}"
    );
}

/// An empty upload is refused with 400 and a reason; bytes that are no
/// video are accepted (the API does not wait to look), then every part fails
/// for good with an error that says why, and the user is told.
#[test]
fn an_empty_or_broken_upload_gets_a_clear_answer() {
    ensure_tools();
    let broker = TestBroker::start();
    let data = DataDir::new("video-bad");
    let all = Proc::serve(broker.url(), &data.0, &["--retry-attempts", "1"]);
    let base = all.api();
    let (status, body, _, _) = post(&base, b"");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("the upload is empty"), "{body}");

    let (status, body, _, _) = post(&base, b"these bytes are not a video");
    assert_eq!(status, 202, "{body}");
    let id: Value = serde_json::from_str(&body).expect("JSON");
    let id = id["id"].as_str().expect("id");
    let done = wait_job(&base, id, "the notification", |v| {
        v["notification"].is_object()
    });
    for part in ["360p", "720p"] {
        assert_eq!(state(&done, part), "failed", "{done:#}");
        let error = done["parts"][part]["error"].as_str().unwrap_or("");
        assert!(error.starts_with("not a video"), "{error}");
    }
    assert_eq!(state(&done, "captions"), "failed", "{done:#}");
    let error = done["parts"]["captions"]["error"].as_str().unwrap_or("");
    assert!(error.starts_with("no audio to caption"), "{error}");
    assert_eq!(done["notification"]["ok"], false, "{done:#}");
}
