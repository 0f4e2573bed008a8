//! Which broker to talk to: one URL, or a comma-separated list of the nodes
//! of a cluster, tried in turn, so that losing a node means reconnecting to
//! the next one rather than an outage.

use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::{Connection, ConnectionProperties};

/// The broker's node URLs and the one to try first next time.
#[derive(Debug)]
pub(crate) struct Nodes {
    urls: Vec<String>,
    next: AtomicUsize,
}

impl Nodes {
    /// `amqp://a:5672/%2f` or `amqp://a:5672/%2f,amqp://b:5672/%2f`.
    pub fn parse(spec: &str) -> Nodes {
        let urls: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        Nodes {
            urls,
            next: AtomicUsize::new(0),
        }
    }

    /// Connects to the first node that answers, starting after the last one
    /// that worked (a node that just failed is tried last). Returns the URL
    /// it connected to.
    pub async fn connect(&self) -> lapin::Result<(Connection, String)> {
        let count = self.urls.len().max(1);
        let start = self.next.load(Ordering::Relaxed);
        let mut last_err = None;
        for i in 0..count {
            let index = (start + i) % count;
            let Some(url) = self.urls.get(index) else {
                break;
            };
            match Connection::connect(url, ConnectionProperties::default()).await {
                Ok(conn) => {
                    // Next time, begin with the node after this one: when a
                    // connection drops, its node is the likely culprit.
                    self.next.store((index + 1) % count, Ordering::Relaxed);
                    return Ok((conn, url.clone()));
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                lapin::ConnectionState::Closed,
            ))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_on_commas() {
        let nodes = Nodes::parse("amqp://a/%2f, amqp://b/%2f,");
        assert_eq!(nodes.urls, vec!["amqp://a/%2f", "amqp://b/%2f"]);
    }
}
