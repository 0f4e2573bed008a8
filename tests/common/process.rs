//! Running the `hare` binary as a separate process, for the Hare-only tests
//! that stop and restart the broker on the same data dir.

use std::path::Path;
use std::time::Duration;

use hare_suite::BrokerProcess;
use lapin::{Channel, Connection};

use super::{connect_url, within};

/// Starts `hare` on `data`. Off the async runtime, since starting blocks
/// until the broker listens; bounded so a broker that never comes up fails
/// the test instead of hanging it.
pub async fn start_process(data: &Path) -> BrokerProcess {
    let dir = data.to_owned();
    let job = tokio::task::spawn_blocking(move || {
        BrokerProcess::start(env!("CARGO_BIN_EXE_hare"), &dir, &[])
    });
    match tokio::time::timeout(Duration::from_secs(40), job).await {
        Ok(Ok(Ok(broker))) => broker,
        Ok(Ok(Err(e))) => panic!("start hare on {}: {e}", data.display()),
        Ok(Err(e)) => panic!("start task failed: {e}"),
        Err(_) => panic!("starting hare took more than 40 s"),
    }
}

/// SIGTERM, then a new broker on the same data dir.
pub async fn restart_process(broker: BrokerProcess, data: &Path) -> BrokerProcess {
    let job = tokio::task::spawn_blocking(move || broker.terminate(Duration::from_secs(10)));
    let status = tokio::time::timeout(Duration::from_secs(15), job)
        .await
        .expect("terminate hung")
        .expect("terminate task");
    assert!(status.is_some(), "hare did not exit after SIGTERM");
    start_process(data).await
}

/// A connection to `url` and a channel on it (a restarted broker listens on
/// a new port, so there is no [`super::Ctx`] to reuse).
pub async fn open(url: &str) -> (Connection, Channel) {
    let conn = connect_url(url).await.expect("connect");
    let ch = within(conn.create_channel()).await.expect("channel");
    (conn, ch)
}
