//! The accept loop: one task per connection, nothing shared between them but
//! the broker model. On shutdown it stops accepting, lets every connection
//! close itself (320 CONNECTION_FORCED) and waits for them, briefly.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::alarms::Alarms;
use crate::config::Config;
use crate::model::Broker;
use crate::protocol::connection;
use crate::telemetry::{self, ResourceReport};

/// Where the broker listens: AMQP, and Prometheus scrapes unless disabled.
pub struct Listeners {
    pub amqp: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// Accepts connections until `shutdown` turns true, then waits for them to close.
/// The resource monitor behind `alarms` and the metrics endpoint run for as long.
pub async fn serve(
    listeners: Listeners,
    broker: Arc<Broker>,
    config: Arc<Config>,
    alarms: Arc<Alarms>,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = listeners.amqp;
    let monitor = tokio::spawn(
        alarms
            .clone()
            .monitor(config.resource_check_interval, shutdown.clone()),
    );
    if let Some(metrics) = listeners.metrics {
        let resources: Arc<dyn ResourceReport> = alarms.clone();
        let endpoint =
            telemetry::http::serve(metrics, broker.clone(), Some(resources), shutdown.clone());
        tokio::spawn(endpoint);
    }
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let task = connection::serve(
                        stream,
                        peer,
                        broker.clone(),
                        config.clone(),
                        alarms.clone(),
                        shutdown.clone(),
                    );
                    connections.spawn(task);
                }
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    monitor.abort();
    let all_closed = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(config.shutdown_grace, all_closed)
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close in time");
    }
}
