//! The Prometheus endpoint under real traffic: counters move by exactly what
//! clients did, gauges show the state of the moment, and the text follows
//! Prometheus conventions. Hare-only (RabbitMQ's metric names differ).

mod common;

use common::*;
use lapin::options::{
    BasicAckOptions, BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;

/// GET `url`: (status, body).
fn http_get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(5)))
        .build()
        .into();
    let mut response = agent.get(url).call().expect("GET the metrics endpoint");
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .expect("read the response");
    (status, body)
}

/// One scrape, parsed into (series, value) pairs.
struct Scrape(Vec<(String, f64)>);

impl Scrape {
    async fn take(url: &str) -> Scrape {
        let url = url.to_owned();
        let (status, text) = tokio::task::spawn_blocking(move || http_get(&url))
            .await
            .expect("scrape");
        assert_eq!(status, 200, "GET /metrics");
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect();
        Scrape(series)
    }

    /// The value of `name` whose labels include every pair in `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let found: Vec<f64> = self
            .0
            .iter()
            .filter(|(series, _)| {
                let (n, rest) = series.split_once('{').unwrap_or((series, ""));
                n == name && wanted.iter().all(|w| rest.contains(w.as_str()))
            })
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one series {name} with {labels:?}, found {found:?}"
        );
        found[0]
    }

    fn has(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|(s, _)| s.split('{').next() == Some(name))
    }
}

fn queue_labels(queue: &str) -> [(&str, &str); 2] {
    [("vhost", "/"), ("queue", queue)]
}

#[tokio::test]
async fn counters_move_by_exactly_what_clients_did() {
    let cx = setup().await;
    let Some(url) = cx.broker.metrics_url() else {
        return; // Hare-only: another broker's metrics are not ours to check.
    };
    let ch = &cx.ch;
    within(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let dlx = declare_exchange(ch, "metrics-dlx", ExchangeKind::Fanout).await;
    let dlq = declare_queue(ch, "metrics-dlq").await;
    bind(ch, &dlq, &dlx, "", FieldTable::default()).await;
    let queue = unique("metrics-q");
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dlx.as_str().into()),
    );
    within(ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), args))
        .await
        .unwrap();
    let lonely = declare_exchange(ch, "metrics-nowhere", ExchangeKind::Direct).await;

    let before = Scrape::take(&url).await;
    assert_eq!(
        before.value("hare_queue_messages_published_total", &queue_labels(&queue)),
        0.0
    );

    for i in 0..25 {
        send(ch, &queue, format!("m{i}").as_bytes()).await;
    }
    for _ in 0..3 {
        publish(ch, &lonely, "no-binding", b"lost").await;
    }
    let after_publish = Scrape::take(&url).await;
    let q = queue_labels(&queue);
    assert_eq!(
        after_publish.value("hare_queue_messages_published_total", &q),
        25.0
    );
    assert_eq!(after_publish.value("hare_queue_messages_ready", &q), 25.0);
    assert_eq!(
        after_publish.value("hare_queue_messages_ready_bytes", &q),
        // "m0".."m9" are 2 bytes, "m10".."m24" are 3.
        (10 * 2 + 15 * 3) as f64
    );
    let ex = [("vhost", "/"), ("exchange", lonely.as_str())];
    assert_eq!(
        after_publish.value("hare_exchange_messages_published_in_total", &ex),
        3.0
    );
    assert_eq!(
        after_publish.value("hare_exchange_messages_unroutable_total", &ex),
        3.0
    );
    assert_eq!(
        after_publish.value("hare_exchange_messages_published_out_total", &ex),
        0.0
    );

    // Consume everything: ack 20, reject 5 without requeue (dead-lettered).
    let mut consumer = consume(ch, &queue, false).await;
    let mut deliveries = Vec::new();
    for _ in 0..25 {
        deliveries.push(next_delivery(&mut consumer).await);
    }
    let during = Scrape::take(&url).await;
    assert_eq!(during.value("hare_queue_messages_unacked", &q), 25.0);
    assert_eq!(during.value("hare_queue_messages_ready", &q), 0.0);
    assert_eq!(during.value("hare_queue_consumers", &q), 1.0);
    assert!(during.value("hare_consumers", &[]) >= 1.0);
    for (i, d) in deliveries.into_iter().enumerate() {
        if i < 20 {
            within(d.ack(BasicAckOptions::default())).await.unwrap();
        } else {
            within(d.reject(BasicRejectOptions { requeue: false }))
                .await
                .unwrap();
        }
    }
    wait_message_count(ch, &dlq, 5).await;

    let end = Scrape::take(&url).await;
    assert_eq!(end.value("hare_queue_messages_delivered_total", &q), 25.0);
    assert_eq!(end.value("hare_queue_messages_redelivered_total", &q), 0.0);
    assert_eq!(end.value("hare_queue_messages_acked_total", &q), 20.0);
    assert_eq!(end.value("hare_queue_messages_unacked", &q), 0.0);
    let rejected = [
        ("vhost", "/"),
        ("queue", queue.as_str()),
        ("reason", "rejected"),
    ];
    assert_eq!(
        end.value("hare_queue_messages_dead_lettered_total", &rejected),
        5.0
    );
    let expired = [
        ("vhost", "/"),
        ("queue", queue.as_str()),
        ("reason", "expired"),
    ];
    assert_eq!(
        end.value("hare_queue_messages_dead_lettered_total", &expired),
        0.0
    );
    assert_eq!(
        end.value("hare_queue_messages_published_total", &queue_labels(&dlq)),
        5.0
    );
    assert_eq!(
        end.value("hare_queue_messages_ready", &queue_labels(&dlq)),
        5.0
    );
    let dlx_labels = [("vhost", "/"), ("exchange", dlx.as_str())];
    // Dead letters are routed by the model, not published by a client.
    assert_eq!(
        end.value("hare_exchange_messages_published_in_total", &dlx_labels),
        0.0
    );

    // Every confirm was timed.
    assert!(end.value("hare_publisher_confirm_latency_seconds_count", &[]) >= 1.0);
}

#[tokio::test]
async fn connections_and_channels_are_counted_as_they_open_and_close() {
    let cx = setup().await;
    let Some(url) = cx.broker.metrics_url() else {
        return; // Hare-only.
    };
    let start = Scrape::take(&url).await;
    assert_eq!(start.value("hare_connections", &[]), 1.0);
    assert_eq!(start.value("hare_channels", &[]), 1.0);
    let opened = start.value("hare_connections_opened_total", &[]);

    let other = cx.connect().await;
    let extra = within(other.create_channel()).await.unwrap();
    let _second = within(other.create_channel()).await.unwrap();
    let busy = Scrape::take(&url).await;
    assert_eq!(busy.value("hare_connections", &[]), 2.0);
    assert_eq!(busy.value("hare_channels", &[]), 3.0);
    assert_eq!(
        busy.value("hare_connections_opened_total", &[]),
        opened + 1.0
    );

    within(extra.close(200, "bye".into())).await.unwrap();
    within(other.close(200, "bye".into())).await.unwrap();
    // The broker counts the close once it has processed it.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let now = Scrape::take(&url).await;
        if now.value("hare_connections", &[]) == 1.0 {
            assert_eq!(now.value("hare_channels", &[]), 1.0);
            assert_eq!(now.value("hare_connections_closed_total", &[]), 1.0);
            assert_eq!(now.value("hare_channels_closed_total", &[]), 2.0);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "close never counted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_text_follows_prometheus_conventions() {
    let broker = TestBroker::start();
    let Some(url) = broker.metrics_url() else {
        return; // Hare-only.
    };
    let (status, text) = tokio::task::spawn_blocking(move || http_get(&url))
        .await
        .unwrap();
    assert_eq!(status, 200);
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(name.starts_with("hare_"), "{name} is not named hare_…");
        match kind {
            "counter" => assert!(name.ends_with("_total"), "counter {name} lacks _total"),
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name} ends in _total"),
            "histogram" => assert!(
                name.ends_with("_seconds") || name.ends_with("_size"),
                "histogram {name} lacks a unit"
            ),
            other => panic!("unexpected metric type {other} for {name}"),
        }
    }
    let scrape = Scrape(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (s, v) = l.rsplit_once(' ')?;
                Some((s.to_owned(), v.parse().ok()?))
            })
            .collect(),
    );
    for name in [
        "hare_process_resident_memory_bytes",
        "hare_process_open_fds",
        "hare_disk_space_available_bytes",
        "hare_alarms_memory_used_watermark",
        "hare_alarms_free_disk_space_watermark",
        "hare_connections",
        "hare_channels",
        "hare_consumers",
    ] {
        assert!(scrape.has(name), "{name} missing from /metrics");
    }
    assert!(scrape.value("hare_process_resident_memory_bytes", &[]) > 1e6);
    let other = broker
        .metrics_url()
        .unwrap()
        .replace("/metrics", "/elsewhere");
    let (status, _) = tokio::task::spawn_blocking(move || http_get(&other))
        .await
        .unwrap();
    assert_eq!(status, 404);
}
