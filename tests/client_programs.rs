//! Runs programs written with other languages' AMQP clients against the
//! broker: pika (`tests/python/`) and amqplib for Node.js (`tests/node/`).
//!
//! Our other tests speak AMQP through lapin or raw frames; a broker that only
//! agrees with the client it was developed against is not a RabbitMQ drop-in.
//! pika and amqplib have their own codecs and their own expectations about
//! replies and their order, so running real programs catches differences
//! that a Rust-only suite would share with the broker.
//!
//! The programs are never skipped: a missing client (or Node.js itself) is
//! installed first, so a machine without it fails loudly instead of passing
//! vacuously.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hare_suite::TestBroker;

/// Generous bound for the whole pika script (it has its own 60 s watchdog;
/// this also covers interpreter start-up on a loaded CI machine).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound for installing a client (`pip`, `npm`, `apt-get`), the only steps
/// that touch the network.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// What a finished (or killed) child process left behind.
struct Outcome {
    success: bool,
    status: String,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn transcript(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Drains a child's pipe on its own thread so a chatty child cannot block on
/// a full pipe while we wait for it.
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `command` to completion, killing it after `timeout`.
fn run(mut command: Command, timeout: Duration) -> Outcome {
    let description = format!("{command:?}");
    let mut child: Child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {description}: {e}"));
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let started = Instant::now();
    let (success, status) = loop {
        match child.try_wait().expect("wait for child") {
            Some(status) => break (status.success(), status.to_string()),
            None if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break (false, format!("killed after {timeout:?}"));
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    Outcome {
        success,
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Makes sure `import pika` works, installing pika with pip if it does not.
fn ensure_pika() {
    let mut probe = Command::new("python3");
    probe.args(["-c", "import pika"]);
    if run(probe, SCRIPT_TIMEOUT).success {
        return;
    }
    let mut install = Command::new("python3");
    install.args(["-m", "pip", "install", "--quiet", "pika"]);
    let outcome = run(install, INSTALL_TIMEOUT);
    assert!(
        outcome.success,
        "pika is missing and `python3 -m pip install pika` failed\n{}",
        outcome.transcript()
    );
    let mut probe = Command::new("python3");
    probe.args(["-c", "import pika"]);
    let outcome = run(probe, SCRIPT_TIMEOUT);
    assert!(
        outcome.success,
        "pika still not importable after installing it\n{}",
        outcome.transcript()
    );
}

/// Makes sure `node` runs and amqplib is in `tests/node/node_modules`,
/// installing Node.js (Debian's package) and amqplib (npm) when missing.
fn ensure_amqplib(dir: &Path) {
    let has_node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_node {
        let mut update = Command::new("apt-get");
        update.args(["update", "-qq"]);
        run(update, INSTALL_TIMEOUT);
        let mut install = Command::new("apt-get");
        install.args(["install", "-y", "-qq", "nodejs", "npm"]);
        let outcome = run(install, INSTALL_TIMEOUT);
        assert!(
            outcome.success,
            "node is missing and `apt-get install -y nodejs npm` failed\n{}",
            outcome.transcript()
        );
    }
    if dir.join("node_modules/amqplib/package.json").exists() {
        return;
    }
    let mut install = Command::new("npm");
    install
        .args(["install", "--no-audit", "--no-fund", "--silent"])
        .current_dir(dir);
    let outcome = run(install, INSTALL_TIMEOUT);
    assert!(
        outcome.success,
        "`npm install` of amqplib in {} failed\n{}",
        dir.display(),
        outcome.transcript()
    );
}

/// A path under the repository.
fn repo_path(parts: &[&str]) -> PathBuf {
    let mut path = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    path.extend(parts);
    path
}

/// Runs `program script url` against a fresh broker and asserts it succeeds.
fn run_against_broker(program: &str, script: &Path) {
    let broker = TestBroker::start();
    let mut command = Command::new(program);
    command.arg(script).arg(broker.url());
    let outcome = run(command, SCRIPT_TIMEOUT);
    assert!(
        outcome.success,
        "{} failed against {}\n{}",
        script.display(),
        broker.url(),
        outcome.transcript()
    );
    println!("{}", outcome.stdout);
}

/// pika's view of the broker: properties and header types round-trip, confirms,
/// mandatory returns, ack/nack/reject with requeue, and 404 as pika's exception.
#[test]
fn pika_smoke() {
    ensure_pika();
    run_against_broker("python3", &repo_path(&["tests", "python", "pika_smoke.py"]));
}

/// amqplib's view of the broker, for what amqplib's own test suite caught:
/// the close handshake with publishes still buffered, delete-ok before the
/// cancel of the deleting channel's consumer, direct reply-to, CC/BCC and a
/// quorum queue declaration.
#[test]
fn amqplib_checks() {
    let dir = repo_path(&["tests", "node"]);
    ensure_amqplib(&dir);
    run_against_broker("node", &dir.join("amqplib_checks.js"));
}
