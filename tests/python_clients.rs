//! Runs third-party Python client suites (tests/python/*.py) against the broker.
//!
//! Our other tests speak AMQP through lapin or raw frames; a broker that only
//! agrees with the client it was developed against is not a RabbitMQ drop-in.
//! pika has its own codec and its own expectations about replies, so running
//! a real pika program catches field-table, property-flag and error-mapping
//! differences that a Rust-only suite would share with the broker.
//!
//! The script is never skipped: if pika is missing it is installed first, so
//! a machine without it fails loudly instead of passing vacuously.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hare_suite::TestBroker;

/// Generous bound for the whole pika script (it has its own 60 s watchdog;
/// this also covers interpreter start-up on a loaded CI machine).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound for `pip install pika`, the only step that touches the network.
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

/// pika's view of the broker: properties and header types round-trip, confirms,
/// mandatory returns, ack/nack/reject with requeue, and 404 as pika's exception.
#[test]
fn pika_smoke() {
    ensure_pika();
    let broker = TestBroker::start();
    let script: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "python",
        "pika_smoke.py",
    ]
    .iter()
    .collect();
    let mut command = Command::new("python3");
    command.arg(&script).arg(broker.url());
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
