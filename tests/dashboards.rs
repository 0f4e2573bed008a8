//! The Grafana dashboards in `grafana/dashboards` against the real thing: a
//! `hare` process with real traffic, scraped every second by a real
//! Prometheus (Debian's `prometheus` package, installed when missing). Every
//! panel query of every dashboard must be valid PromQL and return data, and
//! every metric name a dashboard mentions must be one Hare exports.
//!
//! The workers dashboard reads a `hare-worker` worker's own `/metrics` (in this
//! test process, with real tasks that succeed, retry and dead-letter) next to
//! Hare's, as Prometheus would scrape both.
//!
//! Histograms (confirm latency, store flushes) must give numbers once Hare has
//! observations for them; while a histogram has none at all (its `_count` is
//! 0 on /metrics) its panels only have to be valid and find the series.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::args::table as args;
use futures::StreamExt;
use hare_suite::{temp_data_dir, BrokerProcess};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::Value;

const VHOST: &str = "/";
/// The queue the `$queue` variable is set to; no regex metacharacters, so it
/// stands for itself in `queue=~"$queue"` as Grafana would substitute it.
const WORK: &str = "hare-dash-work";
const TTL_QUEUE: &str = "hare-dash-ttl";
const BACKLOG: &str = "hare-dash-backlog";
const DEAD: &str = "hare-dash-dead";
const DLX: &str = "hare-dash-dlx";
/// Messages through WORK; every 10th is rejected (dead-lettered).
const WORK_MESSAGES: usize = 200;
const TTL_MESSAGES: usize = 20;
const BACKLOG_MESSAGES: usize = 30;
/// Delivered to the consumer on WORK and left unacknowledged.
const HELD: usize = 5;
/// What `$__rate_interval` becomes: dozens of 1 s scrapes.
const RATE_INTERVAL: &str = "30s";
/// The task the worker traffic runs (its queue has the same name), and what
/// `$task` is set to.
const WORKER_TASK: &str = "hare-dash-task";
const WORKER_TASKS: u32 = 40;

// ---------------------------------------------------------------------------
// Processes and files, cleaned up even when an assertion fails.
// ---------------------------------------------------------------------------

/// Owns the temp dirs and the Prometheus process; the broker is a
/// `BrokerProcess`, which kills itself on drop.
struct Cleanup {
    prometheus: Option<Child>,
    paths: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.prometheus.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for path in &self.paths {
            let _ = std::fs::remove_dir_all(path);
            let _ = std::fs::remove_file(path);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The `prometheus` binary, installing Debian's package when it is missing.
fn prometheus_binary() -> PathBuf {
    if let Some(path) = on_path("prometheus") {
        return path;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "prometheus"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let mut attempt = install();
    if !matches!(&attempt, Ok(out) if out.status.success()) {
        // A fresh machine may have no package lists yet.
        let _ = Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
        attempt = install();
    }
    match attempt {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`apt-get install -y prometheus` failed ({}); this test needs Prometheus:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("could not run apt-get to install prometheus: {e}"),
    }
    on_path("prometheus")
        .or_else(|| Some(PathBuf::from("/usr/bin/prometheus")).filter(|p| p.is_file()))
        .expect("apt-get installed prometheus but no `prometheus` binary is on PATH")
}

// ---------------------------------------------------------------------------
// HTTP.
// ---------------------------------------------------------------------------

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

/// GET `url` with `query` pairs: (status, body), or the transport error.
fn get(agent: &ureq::Agent, url: &str, query: &[(&str, &str)]) -> Result<(u16, String), String> {
    let mut request = agent.get(url);
    for (k, v) in query {
        request = request.query(*k, *v);
    }
    let mut response = request.call().map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| e.to_string())?;
    Ok((status, body))
}

/// Polls `ready` until it is true, panicking with `what` after `limit`.
fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Hare's /metrics text.
// ---------------------------------------------------------------------------

struct Exposition {
    /// Sample values by metric name (labels dropped, values summed).
    totals: BTreeMap<String, f64>,
    /// Sample values by the whole series text, e.g. `x{a="b"}`.
    series: BTreeMap<String, f64>,
    histograms: BTreeSet<String>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut totals = BTreeMap::new();
        let mut series = BTreeMap::new();
        let mut histograms = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.strip_suffix(" histogram") {
                    histograms.insert(name.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (id, value) = line.rsplit_once(' ').expect("sample line has a value");
            let value: f64 = value.parse().expect("sample value is a number");
            let name = id.split('{').next().unwrap_or(id);
            *totals.entry(name.to_owned()).or_insert(0.0) += value;
            series.insert(id.to_owned(), value);
        }
        Exposition {
            totals,
            series,
            histograms,
        }
    }

    /// Adds another process's metrics (a worker's next to Hare's).
    fn merge(&mut self, other: Exposition) {
        for (name, value) in other.totals {
            *self.totals.entry(name).or_insert(0.0) += value;
        }
        self.series.extend(other.series);
        self.histograms.extend(other.histograms);
    }

    fn queue_value(&self, name: &str, queue: &str, extra: &str) -> f64 {
        let id = format!("{name}{{vhost=\"{VHOST}\",queue=\"{queue}\"{extra}}}");
        self.series.get(&id).copied().unwrap_or(0.0)
    }
}

fn scrape(agent: &ureq::Agent, metrics_url: &str) -> Exposition {
    let (status, body) = get(agent, metrics_url, &[]).expect("scrape hare /metrics");
    assert_eq!(status, 200, "GET {metrics_url}: {body}");
    Exposition::parse(&body)
}

// ---------------------------------------------------------------------------
// Traffic.
// ---------------------------------------------------------------------------

async fn declare(ch: &Channel, name: &str, arguments: FieldTable) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        arguments,
    )
    .await
    .unwrap_or_else(|e| panic!("declare {name}: {e}"));
}

/// Publishes `n` persistent messages with confirms and checks every one is acked.
async fn publish_confirmed(ch: &Channel, exchange: &str, key: &str, n: usize) {
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        let confirm = ch
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                format!("dashboard message {i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        assert_eq!(
            confirm.await.expect("confirm"),
            Confirmation::Ack(None),
            "publish to {exchange:?} / {key:?} was not confirmed"
        );
    }
}

/// Everything a panel shows: confirmed persistent publishes to durable
/// queues, deliveries with acks, a requeue (redelivery), rejects into a
/// dead-letter exchange, TTL expiries (dead-lettered too), unroutable
/// publishes, a backlog, and a consumer left holding unacked messages. The
/// connection and consumer are returned open so connections, channels,
/// consumers and unacked counts stay up while Prometheus is asked.
/// A `hare-worker` worker serving `/metrics` on `metrics_addr`, through which
/// tasks succeed, fail once and retry, or fail for good (dead-lettered), so
/// every worker panel has data. Returns the worker's stop signal.
async fn worker_traffic(url: &str, metrics_addr: &str) -> tokio::sync::oneshot::Sender<()> {
    use hare_worker::{Client, Context, RetryPolicy, Task, TaskError, Worker};
    #[derive(serde::Serialize, serde::Deserialize)]
    struct DashTask {
        n: u32,
    }
    impl Task for DashTask {
        const NAME: &'static str = WORKER_TASK;
        type Output = ();
    }
    async fn handle(task: DashTask, ctx: Context) -> Result<(), TaskError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        match task.n % 10 {
            0 => Err(TaskError::fatal("every tenth task is broken")),
            3 if ctx.attempt() == 1 => Err(TaskError::retry("a transient failure")),
            _ => Ok(()),
        }
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::builder(url, "hare-dash-workers")
        .concurrency(4)
        .retry(RetryPolicy::exponential(3, Duration::from_millis(50)))
        .metrics_listen(metrics_addr.parse().expect("metrics address"))
        .task::<DashTask, _>(handle);
    tokio::spawn(worker.run_until(async {
        let _ = stopped.await;
    }));
    let client = Client::connect(url).await.expect("worker client");
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    // Two waves, a few scrapes apart: a rate needs the series to grow
    // between two samples, and the histograms appear only with the first.
    for wave in 1..=2 {
        for n in 0..WORKER_TASKS / 2 {
            client.enqueue(&DashTask { n }).await.expect("enqueue");
        }
        wait_for_worker(&ch, wave * WORKER_TASKS / 20).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let _ = conn.close(200, "done".into()).await;
    client.close().await;
    stop
}

/// Waits until the worker's queue is empty and `dead` tasks are in its
/// dead-letter queue.
async fn wait_for_worker(ch: &Channel, dead: u32) {
    let count = |queue: String| async move {
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let in_dlq = count(format!("{WORKER_TASK}.dlq")).await;
        let waiting = count(WORKER_TASK.to_owned()).await;
        if in_dlq == dead && waiting == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker traffic unfinished: {in_dlq} dead, {waiting} waiting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn traffic(url: &str) -> (Connection, lapin::Consumer) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect to hare");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    ch.exchange_declare(
        DLX.into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare the dead-letter exchange");
    declare(&ch, DEAD, FieldTable::default()).await;
    ch.queue_bind(
        DEAD.into(),
        DLX.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let dlx = || ("x-dead-letter-exchange", AMQPValue::LongString(DLX.into()));
    declare(&ch, WORK, args(&[dlx()])).await;
    declare(
        &ch,
        TTL_QUEUE,
        args(&[dlx(), ("x-message-ttl", AMQPValue::LongInt(100))]),
    )
    .await;
    declare(&ch, BACKLOG, FieldTable::default()).await;

    publish_confirmed(&ch, "", WORK, WORK_MESSAGES).await;
    publish_confirmed(&ch, "", TTL_QUEUE, TTL_MESSAGES).await;
    publish_confirmed(&ch, "", BACKLOG, BACKLOG_MESSAGES).await;
    // Routed nowhere (confirmed all the same).
    publish_confirmed(&ch, "amq.direct", "hare-dash-nowhere", 3).await;

    let consumer_ch = conn.create_channel().await.expect("channel");
    consumer_ch
        .basic_qos(50, BasicQosOptions::default())
        .await
        .expect("basic.qos");
    let mut consumer = consumer_ch
        .basic_consume(
            WORK.into(),
            "hare-dashboards".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut settled = 0;
    let mut requeued = false;
    let mut seen = 0;
    while settled < WORK_MESSAGES {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .expect("consumer open")
            .expect("delivery");
        seen += 1;
        let acker = &delivery.acker;
        if !requeued && seen == 7 {
            requeued = true;
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .expect("nack");
        } else if seen % 10 == 0 {
            acker
                .reject(BasicRejectOptions { requeue: false })
                .await
                .expect("reject");
            settled += 1;
        } else {
            acker.ack(BasicAckOptions::default()).await.expect("ack");
            settled += 1;
        }
    }
    // A few more, delivered and held unacknowledged.
    publish_confirmed(&ch, "", WORK, HELD).await;
    for _ in 0..HELD {
        tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .expect("consumer open")
            .expect("delivery");
    }
    (conn, consumer)
}

// ---------------------------------------------------------------------------
// Dashboards.
// ---------------------------------------------------------------------------

struct PanelQuery {
    dashboard: String,
    panel: String,
    expr: String,
}

/// Panels, including those nested in collapsed rows.
fn walk_panels<'a>(panels: &'a [Value], out: &mut Vec<&'a Value>) {
    for panel in panels {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            walk_panels(nested, out);
        }
    }
}

/// Reads every dashboard, checks its shape, and returns its panel queries and
/// template variable queries. Shape problems go into `failures`.
fn load_dashboards(
    dir: &Path,
    failures: &mut Vec<String>,
) -> (Vec<PanelQuery>, Vec<(String, String)>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("grafana/dashboards exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let names: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "hare-overview.json",
        "hare-queues.json",
        "hare-workers.json",
    ] {
        assert!(
            names.contains(expected),
            "grafana/dashboards/{expected} is missing"
        );
    }
    let mut queries = Vec::new();
    let mut variables = Vec::new();
    let mut uids = BTreeSet::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(file).expect("read dashboard");
        let board: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        let mut fail = |what: String| failures.push(format!("{name}: {what}"));
        match board["uid"].as_str() {
            Some(uid) if !uid.is_empty() => {
                if !uids.insert(uid.to_owned()) {
                    fail(format!("uid {uid} is used twice"));
                }
            }
            _ => fail("no uid".into()),
        }
        if board["title"].as_str().is_none_or(str::is_empty) {
            fail("no title".into());
        }
        if board["schemaVersion"].as_u64().is_none() {
            fail("no schemaVersion".into());
        }
        for var in board["templating"]["list"].as_array().into_iter().flatten() {
            let var_name = var["name"].as_str().unwrap_or("?");
            if var["type"] == "query" {
                if var["datasource"]["uid"] != "hare-prometheus" {
                    fail(format!("variable {var_name} does not use hare-prometheus"));
                }
                let query = var["query"]
                    .as_str()
                    .or_else(|| var["query"]["query"].as_str())
                    .unwrap_or_default();
                variables.push((format!("{name} ${var_name}"), query.to_owned()));
            }
        }
        let mut panels = Vec::new();
        walk_panels(board["panels"].as_array().expect("panels"), &mut panels);
        let mut ids = BTreeSet::new();
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            if !ids.insert(panel["id"].as_u64()) {
                fail(format!("panel {title:?}: id missing or repeated"));
            }
            if panel["gridPos"]["w"].as_u64().is_none() {
                fail(format!("panel {title:?}: no gridPos"));
            }
            if panel["type"] == "row" {
                continue;
            }
            if panel["datasource"]["uid"] != "hare-prometheus" {
                fail(format!("panel {title:?} does not use hare-prometheus"));
            }
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                fail(format!("panel {title:?} has no query"));
            }
            for target in targets {
                match target["expr"].as_str() {
                    Some(expr) if !expr.trim().is_empty() => queries.push(PanelQuery {
                        dashboard: name.clone(),
                        panel: title.clone(),
                        expr: expr.to_owned(),
                    }),
                    _ => fail(format!("panel {title:?}: a target without expr")),
                }
            }
        }
    }
    (queries, variables)
}

/// The expression as Grafana would send it with `$vhost` = "/" and `$queue` = WORK.
fn substitute(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (from, to) in [
        ("${__rate_interval}", RATE_INTERVAL),
        ("$__rate_interval", RATE_INTERVAL),
        ("${__interval}", "5s"),
        ("$__interval", "5s"),
        ("${vhost}", VHOST),
        ("$vhost", VHOST),
        ("${queue}", WORK),
        ("$queue", WORK),
        ("${task}", WORKER_TASK),
        ("$task", WORKER_TASK),
    ] {
        out = out.replace(from, to);
    }
    out
}

/// `hare_…` identifiers in an expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let token = &expr[start..i];
            // Not inside a string literal: the quote count before it is even.
            let quoted = expr[..start].matches('"').count() % 2 == 1;
            if token.starts_with("hare_") && !quoted {
                names.insert(token.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The histogram a metric name belongs to, if it is one.
fn histogram_of<'a>(name: &str, histograms: &'a BTreeSet<String>) -> Option<&'a String> {
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find_map(|base| histograms.get(base))
}

/// Sample values of an instant query's result (vector or scalar).
fn result_values(data: &Value) -> Vec<f64> {
    let parse = |v: &Value| v[1].as_str().and_then(|s| s.parse::<f64>().ok());
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| parse(&s["value"]))
            .collect(),
        Some("scalar") => parse(&data["result"]).into_iter().collect(),
        _ => Vec::new(),
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

// ---------------------------------------------------------------------------
// The test.
// ---------------------------------------------------------------------------

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let started = Instant::now();
    let prometheus = prometheus_binary();
    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/dashboards");
    let mut failures = Vec::new();
    let (queries, variables) = load_dashboards(&dashboards, &mut failures);

    let data_dir = temp_data_dir("dashboards");
    let prom_dir = temp_data_dir("dashboards-prometheus");
    let mut cleanup = Cleanup {
        prometheus: None,
        paths: vec![
            data_dir.clone(),
            data_dir.with_extension("log"),
            prom_dir.clone(),
        ],
    };

    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let metrics_url = format!("http://{metrics_addr}/metrics");
    let worker_metrics_addr = format!("127.0.0.1:{}", free_port());
    let worker_metrics_url = format!("http://{worker_metrics_addr}/metrics");
    let broker = BrokerProcess::start(
        env!("CARGO_BIN_EXE_hare"),
        &data_dir,
        &["--metrics-listen", &metrics_addr],
    )
    .expect("start hare");
    let http = agent();
    wait_until(Duration::from_secs(10), "hare serves /metrics", || {
        matches!(get(&http, &metrics_url, &[]), Ok((200, _)))
    });

    let prom_addr = format!("127.0.0.1:{}", free_port());
    let prom_url = format!("http://{prom_addr}");
    let config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: hare\n    static_configs:\n      \
             - targets: [\"{metrics_addr}\"]\n  - job_name: hare-worker\n    \
             static_configs:\n      - targets: [\"{worker_metrics_addr}\"]\n"
        ),
    )
    .expect("write prometheus.yml");
    let log = std::fs::File::create(prom_dir.join("prometheus.log")).expect("prometheus log");
    cleanup.prometheus = Some(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", prometheus.display())),
    );
    let prom_log = || std::fs::read_to_string(prom_dir.join("prometheus.log")).unwrap_or_default();
    let ready = Instant::now() + Duration::from_secs(20);
    while !matches!(
        get(&http, &format!("{prom_url}/-/ready"), &[]),
        Ok((200, _))
    ) {
        if let Some(status) = cleanup.prometheus.as_mut().and_then(|c| c.try_wait().ok()?) {
            panic!("prometheus exited ({status}):\n{}", prom_log());
        }
        assert!(
            Instant::now() < ready,
            "prometheus not ready in 20 s:\n{}",
            prom_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Scraping runs before the traffic starts, so the rates see it happen.
    wait_until(
        Duration::from_secs(20),
        "prometheus scraped hare once",
        || {
            get(
                &http,
                &format!("{prom_url}/api/v1/query"),
                &[("query", "up{job=\"hare\"} == 1")],
            )
            .is_ok_and(|(_, body)| body.contains("\"value\""))
        },
    );

    // Traffic, on a runtime kept alive (and the connection open) until the end.
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    // Dropped before the runtime, inside its context, also when a check fails.
    let _context = runtime.enter();
    let client = runtime.block_on(traffic(&broker.url()));
    let worker = runtime.block_on(worker_traffic(&broker.url(), &worker_metrics_addr));

    // The traffic left its marks on /metrics (TTL expiry happens in the broker's own time).
    wait_until(Duration::from_secs(10), "every TTL message expired", || {
        let m = scrape(&http, &metrics_url);
        m.queue_value("hare_queue_messages_expired_total", TTL_QUEUE, "") >= TTL_MESSAGES as f64
    });
    let traffic_done = unix_now();
    let m = scrape(&http, &metrics_url);
    let rejected = (WORK_MESSAGES / 10) as f64;
    for (name, queue, extra, at_least) in [
        (
            "hare_queue_messages_published_total",
            WORK,
            "",
            WORK_MESSAGES as f64,
        ),
        (
            "hare_queue_messages_delivered_total",
            WORK,
            "",
            WORK_MESSAGES as f64,
        ),
        ("hare_queue_messages_redelivered_total", WORK, "", 1.0),
        (
            "hare_queue_messages_acked_total",
            WORK,
            "",
            WORK_MESSAGES as f64 - rejected,
        ),
        ("hare_queue_messages_unacked", WORK, "", HELD as f64),
        ("hare_queue_consumers", WORK, "", 1.0),
        (
            "hare_queue_messages_ready",
            BACKLOG,
            "",
            BACKLOG_MESSAGES as f64,
        ),
        ("hare_queue_messages_ready_bytes", BACKLOG, "", 1.0),
        (
            "hare_queue_messages_dead_lettered_total",
            WORK,
            ",reason=\"rejected\"",
            rejected,
        ),
        (
            "hare_queue_messages_dead_lettered_total",
            TTL_QUEUE,
            ",reason=\"expired\"",
            TTL_MESSAGES as f64,
        ),
        (
            "hare_queue_messages_ready",
            DEAD,
            "",
            rejected + TTL_MESSAGES as f64,
        ),
    ] {
        let value = m.queue_value(name, queue, extra);
        assert!(
            value >= at_least,
            "{name} of {queue}{extra} is {value}, expected at least {at_least}"
        );
    }
    let unroutable = m
        .series
        .get("hare_exchange_messages_unroutable_total{vhost=\"/\",exchange=\"amq.direct\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(unroutable >= 3.0, "amq.direct unroutable is {unroutable}");

    // Prometheus has scraped well past the traffic.
    let query = |expr: &str| -> Result<Value, String> {
        let (status, body) = get(
            &http,
            &format!("{prom_url}/api/v1/query"),
            &[("query", expr)],
        )?;
        let reply: Value =
            serde_json::from_str(&body).map_err(|e| format!("HTTP {status}, not JSON: {e}"))?;
        if reply["status"] != "success" {
            return Err(format!(
                "HTTP {status}: {} {}",
                reply["errorType"], reply["error"]
            ));
        }
        Ok(reply["data"].clone())
    };
    wait_until(
        Duration::from_secs(15),
        "prometheus scraped hare twice after the traffic",
        || {
            let value = |expr: &str| {
                query(expr)
                    .ok()
                    .and_then(|data| result_values(&data).first().copied())
                    .unwrap_or(0.0)
            };
            let work = "hare_queue_messages{queue=\"hare-dash-work\"}";
            let worker = "hare_worker_in_flight";
            value(&format!("min(timestamp({work}))")) > traffic_done + 1.5
                && value(&format!("min(timestamp({worker}))")) > traffic_done + 1.5
                && value(&format!("min(count_over_time({worker}[{RATE_INTERVAL}]))")) >= 3.0
                && value(&format!("min(count_over_time({work}[{RATE_INTERVAL}]))")) >= 3.0
        },
    );

    // Hare's and the worker's own view, now: names exported and histogram observations.
    let mut m = scrape(&http, &metrics_url);
    m.merge(scrape(&http, &worker_metrics_url));
    let mut empty_histograms = BTreeSet::new();
    for hist in &m.histograms {
        if m.totals
            .get(&format!("{hist}_count"))
            .copied()
            .unwrap_or(0.0)
            == 0.0
        {
            empty_histograms.insert(hist.clone());
        }
    }

    for (what, definition) in &variables {
        // label_values(selector, label) → the label values API.
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'));
        let Some((selector, label)) = inner.and_then(|s| s.rsplit_once(',')) else {
            failures.push(format!(
                "{what}: not a label_values(metric, label) query: {definition}"
            ));
            continue;
        };
        let (selector, label) = (substitute(selector.trim()), label.trim());
        let expected = match label {
            "vhost" => VHOST,
            "queue" => WORK,
            "task" => WORKER_TASK,
            other => {
                failures.push(format!("{what}: unexpected label {other}"));
                continue;
            }
        };
        let url = format!("{prom_url}/api/v1/label/{label}/values");
        match get(&http, &url, &[("match[]", &selector)]) {
            Ok((200, body)) => {
                let reply: Value = serde_json::from_str(&body).unwrap_or_default();
                let found = reply["data"]
                    .as_array()
                    .is_some_and(|values| values.iter().any(|v| v == expected));
                if !found {
                    failures.push(format!("{what}: {definition} lacks {expected:?}: {body}"));
                }
            }
            other => failures.push(format!("{what}: {definition}: {other:?}")),
        }
    }

    let mut noted_empty = BTreeSet::new();
    for q in &queries {
        let at = format!("{} / {:?}: {}", q.dashboard, q.panel, q.expr);
        let expr = substitute(&q.expr);
        if expr.contains('$') {
            failures.push(format!("{at}: unknown template variable left in {expr}"));
            continue;
        }
        let names = metric_names(&expr);
        if names.is_empty() {
            failures.push(format!("{at}: mentions no hare_ metric"));
        }
        let mut waiting_for = None;
        for name in &names {
            if !m.totals.contains_key(name) {
                failures.push(format!("{at}: hare does not export {name}"));
            }
            if let Some(hist) = histogram_of(name, &m.histograms) {
                if empty_histograms.contains(hist) {
                    waiting_for = Some(hist.clone());
                }
            }
        }
        let data = match query(&expr) {
            Ok(data) => data,
            Err(e) => {
                failures.push(format!("{at}: query failed: {e}"));
                continue;
            }
        };
        let values = result_values(&data);
        if values.is_empty() {
            failures.push(format!("{at}: no data"));
        } else if !values.iter().any(|v| v.is_finite()) {
            match waiting_for {
                // Valid and the series exist; numbers come with the first observation.
                Some(hist) => {
                    noted_empty.insert(hist);
                }
                None => failures.push(format!("{at}: only NaN/Inf: {values:?}")),
            }
        }
    }
    for hist in &noted_empty {
        eprintln!("note: {hist} has no observations yet; its panels were checked for validity and series only");
    }
    eprintln!(
        "checked {} panel queries and {} variables in {:.1} s",
        queries.len(),
        variables.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} dashboard problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    let _ = worker.send(());
    let (conn, _consumer) = client;
    let _ = runtime.block_on(conn.close(200, "done".into()));
    drop(broker);
    drop(cleanup);
}
