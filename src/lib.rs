//! Test and example support for Hare: start a broker in-process on an ephemeral
//! port and hand out its AMQP URL, so black-box tests talk to it over real TCP.
//!
//! Set `HARE_TEST_URL` (e.g. `amqp://guest:guest@127.0.0.1:5680/%2f`) to run the
//! same tests against another broker such as RabbitMQ; that is how we check that
//! a test asserts RabbitMQ's behaviour and not just ours.

use std::net::SocketAddr;

pub use hare_broker::config::{Config, MemoryWatermark};
pub use hare_broker::RunningBroker;

/// A broker for one test: Hare on 127.0.0.1:0 unless `HARE_TEST_URL` points elsewhere.
pub struct TestBroker {
    url: String,
    addr: Option<SocketAddr>,
    _running: Option<RunningBroker>,
    /// A fresh data dir per broker, removed when the broker is dropped.
    data_dir: Option<std::path::PathBuf>,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self._running.take();
        if let Some(dir) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A unique, empty directory under the system temp dir.
pub fn temp_data_dir(label: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hare-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp data dir");
    dir
}

impl TestBroker {
    /// Starts Hare with default settings (or uses `HARE_TEST_URL`).
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// Starts Hare after `tweak` adjusted its configuration (ignored for `HARE_TEST_URL`).
    pub fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        if let Ok(url) = std::env::var("HARE_TEST_URL") {
            return TestBroker {
                url,
                addr: None,
                _running: None,
                data_dir: None,
            };
        }
        let data_dir = temp_data_dir("test");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("static address"),
            metrics_listen: Some("127.0.0.1:0".parse().expect("static address")),
            data_dir: data_dir.clone(),
            // The test's own runtime is blocked while the broker is dropped, so
            // its clients could not answer a close: stop at once instead.
            shutdown_grace: std::time::Duration::ZERO,
            ..Config::default()
        };
        tweak(&mut config);
        let running = RunningBroker::start(config).expect("start broker");
        let addr = running.local_addr();
        TestBroker {
            url: format!("amqp://guest:guest@{addr}/%2f"),
            addr: Some(addr),
            _running: Some(running),
            data_dir: Some(data_dir),
        }
    }

    /// `http://host:port/metrics` of an in-process Hare (None for `HARE_TEST_URL`).
    pub fn metrics_url(&self) -> Option<String> {
        let addr = self._running.as_ref()?.metrics_addr()?;
        Some(format!("http://{addr}/metrics"))
    }

    /// The AMQP URL with guest credentials and the default vhost.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The `host:port` to open raw sockets to (parsed from the URL for external brokers).
    pub fn addr(&self) -> SocketAddr {
        if let Some(addr) = self.addr {
            return addr;
        }
        let rest = self.url.split('@').nth(1).unwrap_or(&self.url);
        let hostport = rest.split('/').next().unwrap_or(rest);
        use std::net::ToSocketAddrs;
        hostport
            .to_socket_addrs()
            .expect("resolve HARE_TEST_URL")
            .next()
            .expect("address")
    }

    /// True when the tests run against Hare itself (not `HARE_TEST_URL`).
    pub fn is_hare(&self) -> bool {
        self._running.is_some()
    }

    /// The in-process Hare broker (`None` for `HARE_TEST_URL`), for tests that
    /// change its settings at run time, such as the alarm thresholds.
    pub fn hare(&self) -> Option<&RunningBroker> {
        self._running.as_ref()
    }

    /// Opens a lapin connection to this broker.
    pub async fn connect(&self) -> lapin::Connection {
        lapin::Connection::connect(self.url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect")
    }
}

/// A broker running as a separate `hare` process, for what an in-process broker
/// cannot show: `kill -9`, restarts on the same data dir, SIGTERM.
///
/// Tests pass `env!("CARGO_BIN_EXE_hare")` as the binary.
pub struct BrokerProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl BrokerProcess {
    /// Starts `hare` on a free loopback port with `data_dir`, waiting (up to
    /// 30 s) until it accepts connections or exits. Extra flags go after ours;
    /// metrics go to an ephemeral port unless `extra` has `--metrics-listen`
    /// or `--no-metrics`.
    pub fn start(
        binary: &str,
        data_dir: &std::path::Path,
        extra: &[&str],
    ) -> std::io::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Self::start_on(binary, data_dir, ([127, 0, 0, 1], port).into(), extra)
    }

    /// Like [`BrokerProcess::start`] on a given address, e.g. the one a
    /// killed broker listened on, for clients that reconnect to it.
    pub fn start_on(
        binary: &str,
        data_dir: &std::path::Path,
        addr: SocketAddr,
        extra: &[&str],
    ) -> std::io::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))?;
        let metrics_chosen = extra
            .iter()
            .any(|flag| flag.starts_with("--metrics-listen") || *flag == "--no-metrics");
        // Tests run many brokers at once: no fixed metrics port.
        let default_metrics: &[&str] = if metrics_chosen {
            &[]
        } else {
            &["--metrics-listen", "127.0.0.1:0"]
        };
        let mut child = std::process::Command::new(binary)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .args(default_metrics)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(BrokerProcess { child, addr });
            }
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "hare exited early: {status}"
                )));
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                return Err(std::io::Error::other(
                    "hare did not start listening within 30 s",
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    /// Waits for the process to exit by itself (e.g. refused to start).
    pub fn wait(mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
