//! The private RabbitMQ nodes of `common::rabbitmq`: they serve AMQP, and they
//! go away with the process that started them, so `cargo test` leaves no node
//! behind.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::rabbitmq::{self, answers_amqp, RabbitNode};
use common::{connect_url, declare_queue, drain, send, within};

/// Polls `gone` for up to 20 s.
fn gone_within_20s(what: &str, gone: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gone() {
        assert!(Instant::now() < deadline, "{what} still there after 20 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn the_shared_node_round_trips_a_message() {
    let node = rabbitmq::shared();
    let conn = connect_url(node.url())
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", node.url()));
    let ch = within(conn.create_channel()).await.expect("channel");
    let q = declare_queue(&ch, "rabbitmq-node").await;
    send(&ch, &q, b"hello rabbit").await;
    assert_eq!(drain(&ch, &q).await, ["hello rabbit"]);
}

#[test]
fn the_watchdog_stops_the_node_when_the_watched_process_dies() {
    // Stands in for a test binary that dies without running destructors.
    let mut parent = Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("spawn sleep");
    let node = RabbitNode::start_watched("watchdog", parent.id());
    assert!(answers_amqp(node.port()));

    parent.kill().expect("kill sleep");
    parent.wait().expect("reap sleep");
    gone_within_20s("the node's AMQP listener", || !answers_amqp(node.port()));
    gone_within_20s("the node's VM", || !process_exists(node.pid()));
    gone_within_20s("the node's dir", || !node.dir().exists());
}

#[test]
fn dropping_a_node_stops_it_and_removes_its_dir() {
    let node = RabbitNode::start("drop");
    let (port, pid, dir) = (node.port(), node.pid(), node.dir().to_owned());
    assert!(answers_amqp(port));
    drop(node);
    assert!(!answers_amqp(port), "port {port} still answers after drop");
    assert!(!process_exists(pid), "beam {pid} still runs after drop");
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
}
