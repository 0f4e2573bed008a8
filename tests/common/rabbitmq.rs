//! A private RabbitMQ node for tests that compare Hare with RabbitMQ itself.
//!
//! Nodes are started by `tests/support/rabbitmq-node.sh`, which installs
//! Debian's rabbitmq-server when it is missing, so a test needs nothing set up
//! outside the repo.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a booted node may take to answer an AMQP protocol header (the
/// script already waited for the boot itself).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// A RabbitMQ node on loopback with all its state in a private temp dir.
///
/// Dropping it stops the node and removes the dir. If the process watching
/// it dies first (a panic that aborts, Ctrl-C, kill), the script's watchdog
/// does both.
pub struct RabbitNode {
    url: String,
    port: u16,
    pid: u32,
    dir: PathBuf,
}

impl RabbitNode {
    /// Starts a node that lives at most as long as this test process.
    /// Blocks until it accepts AMQP connections (about 5 s).
    pub fn start(label: &str) -> RabbitNode {
        Self::start_watched(label, std::process::id())
    }

    /// Starts a node that the script's watchdog stops once process `watch`
    /// exits (a zombie counts as exited).
    pub fn start_watched(label: &str, watch: u32) -> RabbitNode {
        // Node names must be unique per host (epmd), and so must dirs.
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let name = format!("hare-{label}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{name}.rabbitmq"));
        let [port, dist_port] = free_ports();

        // stderr is inherited: apt-get's progress, or why the node did not start.
        let out = Command::new(script())
            .arg("start")
            .arg(&name)
            .arg(port.to_string())
            .arg(&dir)
            .arg(watch.to_string())
            .arg(dist_port.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script().display()));
        assert!(
            out.status.success(),
            "rabbitmq node {name} did not start ({}); see stderr",
            out.status
        );
        let pid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("the script printed no pid: {e}"));
        let node = RabbitNode {
            url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            port,
            pid,
            dir,
        };
        node.wait_for_amqp();
        node
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (guest may log in over loopback only).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Erlang VM's pid (beam.smp).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The node's mnesia, logs and `out.log` (its console output).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// "Booted" per the log is not yet "serving": waits until the node answers
    /// a protocol header with a method frame (connection.start).
    fn wait_for_amqp(&self) {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            if answers_amqp(self.port) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rabbitmq on port {} does not answer AMQP; see {}",
                self.port,
                self.dir.join("out.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One node for all the tests of a test binary, started on first use. Statics
/// are never dropped, so the watchdog stops it when the binary exits.
pub fn shared() -> &'static RabbitNode {
    static NODE: OnceLock<RabbitNode> = OnceLock::new();
    NODE.get_or_init(|| RabbitNode::start("shared"))
}

/// True if something on 127.0.0.1:`port` answers the AMQP 0-9-1 header with a
/// method frame (type 1).
pub fn answers_amqp(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut frame_type = [0u8; 1];
    s.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && s.read_exact(&mut frame_type).is_ok()
        && frame_type[0] == 1
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/rabbitmq-node.sh")
}

/// Two distinct free loopback ports (AMQP and Erlang distribution). Both
/// listeners are held until both are picked, so the ports differ.
fn free_ports() -> [u16; 2] {
    let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a free port");
    [port_of(&a), port_of(&b)]
}

fn port_of(l: &TcpListener) -> u16 {
    l.local_addr().expect("local addr").port()
}
