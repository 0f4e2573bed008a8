//! Test and example support for Hare: start a broker in-process on an ephemeral
//! port and hand out its AMQP URL, so black-box tests talk to it over real TCP.
//!
//! Set `HARE_TEST_URL` (e.g. `amqp://guest:guest@127.0.0.1:5680/%2f`) to run the
//! same tests against another broker such as RabbitMQ; that is how we check that
//! a test asserts RabbitMQ's behaviour and not just ours.

use std::net::SocketAddr;

pub use hare_broker::config::Config;
use hare_broker::RunningBroker;

/// A broker for one test: Hare on 127.0.0.1:0 unless `HARE_TEST_URL` points elsewhere.
pub struct TestBroker {
    url: String,
    addr: Option<SocketAddr>,
    _running: Option<RunningBroker>,
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
            };
        }
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("static address"),
            ..Config::default()
        };
        tweak(&mut config);
        let running = RunningBroker::start(config).expect("start broker");
        let addr = running.local_addr();
        TestBroker {
            url: format!("amqp://guest:guest@{addr}/%2f"),
            addr: Some(addr),
            _running: Some(running),
        }
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

    /// Opens a lapin connection to this broker.
    pub async fn connect(&self) -> lapin::Connection {
        lapin::Connection::connect(self.url(), lapin::ConnectionProperties::default())
            .await
            .expect("connect")
    }
}
