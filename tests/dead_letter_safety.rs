//! Dead-lettering under stress: a crash in the middle of dead-lettering, a
//! restart with messages that expired while the broker was down, and a long
//! chain of dead-lettering queues. Hare-only: they restart the `hare` process.

mod common;

use std::time::Duration;

use common::args::text as ls;
use common::process::start_process;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

async fn count(ch: &lapin::Channel, q: &str) -> u32 {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive")
    .message_count()
}

/// Messages whose TTL ran out while the broker was down are dead-lettered
/// once it is back, through an exchange binding that is restored after them
/// (a large topology makes restoring take a while: timers wait for it).
#[tokio::test]
async fn expired_while_down_reach_a_dlq_bound_through_an_exchange() {
    let dir = hare_suite::temp_data_dir("review-dlx-restart");
    let data = dir.join("data");
    let broker = start_process(&data).await;
    let conn = Connection::connect(&broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "dlx".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(200));
    args.insert("x-dead-letter-exchange".into(), ls("dlx"));
    args.insert("x-dead-letter-routing-key".into(), ls("k"));
    ch.queue_declare("a-src".into(), durable(), args)
        .await
        .unwrap();
    ch.queue_declare("z-dst".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        "z-dst".into(),
        "dlx".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Some ordinary durable topology, as any real broker has.
    for i in 0..3000 {
        let q = format!("m-fill-{i:04}");
        ch.queue_declare(q.as_str().into(), durable(), FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind(
            q.as_str().into(),
            "amq.direct".into(),
            q.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..20 {
        let confirm = ch
            .basic_publish(
                "".into(),
                "a-src".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    drop(conn);
    // Down while the TTL passes (SIGTERM: a clean stop).
    let status = tokio::task::spawn_blocking(move || broker.terminate(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(status.is_some());
    tokio::time::sleep(Duration::from_millis(400)).await;

    let broker = start_process(&data).await;
    let conn = Connection::connect(&broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let (src, dst) = (count(&ch, "a-src").await, count(&ch, "z-dst").await);
        if dst == 20 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("after restart: a-src holds {src}, z-dst holds {dst} of the 20 dead letters");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(conn);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// kill -9 in the middle of dead-lettering 20,000 confirmed persistent
/// messages (while another publisher forces flushes) loses none of them: each
/// is in the source queue, the dead-letter queue, or both.
#[tokio::test]
async fn dead_lettering_then_kill9_loses_nothing() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
    const N: usize = 20_000;
    let dir = hare_suite::temp_data_dir("review-dlx-kill9");
    let data = dir.join("data");
    let broker = start_process(&data).await;
    let conn = Connection::connect(&broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), ls(""));
    args.insert("x-dead-letter-routing-key".into(), ls("dst"));
    ch.queue_declare("src".into(), durable(), args)
        .await
        .unwrap();
    ch.queue_declare("dst".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch.queue_declare("noise".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for i in 0..N {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "src".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    // Take everything unacked.
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(0, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "src".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut last = 0;
    for _ in 0..N {
        let d = consumer.next().await.unwrap().unwrap();
        last = d.delivery_tag;
    }
    // Another publisher keeps the flusher busy.
    let noise_conn = Connection::connect(&broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let noise = noise_conn.create_channel().await.unwrap();
    noise
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let noise_task = tokio::spawn(async move {
        loop {
            let c = noise
                .basic_publish(
                    "".into(),
                    "noise".into(),
                    BasicPublishOptions::default(),
                    b"n",
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await;
            match c {
                Ok(c) => {
                    if c.await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let watch_conn = Connection::connect(&broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let watch = watch_conn.create_channel().await.unwrap();
    cch.basic_nack(
        last,
        BasicNackOptions {
            multiple: true,
            requeue: false,
        },
    )
    .await
    .unwrap();
    // Kill as soon as the dead letters start arriving.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let n = count(&watch, "dst").await;
        if n > 0 {
            break n;
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letters");
    };
    tokio::task::spawn_blocking(move || broker.kill9())
        .await
        .unwrap();
    noise_task.abort();
    drop((conn, noise_conn, watch_conn));

    let broker = start_process(&data).await;
    let conn = Connection::connect(&broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let (src, dst) = (count(&ch, "src").await, count(&ch, "dst").await);
    eprintln!("dst had {seen} when killed; after restart src={src} dst={dst}");
    // A message caught between its two writes may be in both (at least
    // once), but never in neither.
    assert!(
        src as usize + dst as usize >= N,
        "confirmed persistent messages lost: src {src} + dst {dst} < {N}"
    );
    drop(conn);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}

/// A message dead-lettered along a chain of 1,500 queues (each with
/// x-max-length 0) arrives at the end; the broker does not recurse per hop.
#[tokio::test]
async fn long_dead_letter_chain_does_not_crash_the_broker() {
    const N: usize = 1500;
    let dir = hare_suite::temp_data_dir("review-dlx-chain");
    let data = dir.join("data");
    let broker = start_process(&data).await;
    let conn = Connection::connect(&broker.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for i in 0..N {
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(0));
        args.insert("x-dead-letter-exchange".into(), ls(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            ls(&format!("chain-{}", i + 1)),
        );
        ch.queue_declare(
            format!("chain-{i}").as_str().into(),
            QueueDeclareOptions::default(),
            args,
        )
        .await
        .unwrap();
    }
    ch.queue_declare(
        format!("chain-{N}").as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "chain-0".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ch
            .queue_declare(
                format!("chain-{N}").as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(q) if q.message_count() == 1 => break,
            Ok(_) => {}
            Err(e) => panic!("broker gone: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "message never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(conn);
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
