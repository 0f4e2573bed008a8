//! Who gets a message, and in which order, as RabbitMQ 3.10 decides it:
//!
//! * priority queues (`x-max-priority`): highest priority first, FIFO within a
//!   priority; a priority above the maximum counts as the maximum, none as 0;
//!   basic.get and requeues respect it;
//! * single active consumer (`x-single-active-consumer`): one consumer gets
//!   everything; the next in line takes over when it cancels or its channel
//!   closes, requeued messages included;
//! * consumer priorities (the `x-priority` consume argument): the highest
//!   priority consumer with prefetch credit gets the message, equal priorities
//!   share round-robin;
//! * alternate exchanges: an exchange that routes a message nowhere hands it to
//!   its `alternate-exchange`, down a chain; missing alternates are skipped and
//!   cycles end.
//!
//! The restart test (priority order after recovery) is Hare-only.

mod common;

use common::args::{int, table, text};
use common::process::{open, restart_process, start_process};
use common::*;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Consumer, ExchangeKind};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

async fn publish_priority(ch: &Channel, q: &str, body: &str, priority: Option<u8>) {
    let props = match priority {
        Some(p) => BasicProperties::default().with_priority(p),
        None => BasicProperties::default(),
    };
    publish_with(ch, "", q, body.as_bytes(), props).await;
}

fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn qos(ch: &Channel, prefetch: u16) {
    within(ch.basic_qos(prefetch, BasicQosOptions::default()))
        .await
        .expect("basic.qos");
}

/// Starts a manual-ack consumer with consume `arguments`.
async fn consume_args(ch: &Channel, q: &str, arguments: &[(&str, AMQPValue)]) -> Consumer {
    within(ch.basic_consume(
        q.into(),
        "".into(),
        BasicConsumeOptions::default(),
        table(arguments),
    ))
    .await
    .unwrap_or_else(|e| panic!("consume {q}: {e}"))
}

async fn ack(d: &Delivery) {
    within(d.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
}

async fn take(consumer: &mut Consumer, n: usize) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_delivery(consumer).await);
    }
    out
}

fn bodies(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(body).collect()
}

async fn consumer_count(ch: &Channel, q: &str) -> u32 {
    passive_declare(ch, q).await.consumer_count()
}

// ---------------------------------------------------------------------------
// Priority queues
// ---------------------------------------------------------------------------

/// (priority, body) in publish order, and the order RabbitMQ delivers them:
/// 9 counts as the maximum 5 (and stays behind earlier 5s), none counts as 0.
const MIXED: [(Option<u8>, &str); 8] = [
    (Some(1), "a"),
    (None, "b"),
    (Some(5), "c"),
    (Some(3), "d"),
    (Some(9), "e"),
    (Some(5), "f"),
    (Some(0), "g"),
    (Some(3), "h"),
];
const MIXED_ORDER: [&str; 8] = ["c", "e", "f", "d", "h", "a", "b", "g"];

#[tokio::test]
async fn priority_queue_delivers_highest_first_fifo_within_a_priority() {
    let ctx = setup_confirmed().await;
    let q = declare_with(&ctx.ch, "do-prio", &[("x-max-priority", int(5))]).await;
    for (p, b) in MIXED {
        publish_priority(&ctx.ch, &q, b, p).await;
    }
    let mut consumer = consume(&ctx.ch, &q, true).await;
    assert_eq!(bodies(&take(&mut consumer, 8).await), MIXED_ORDER);
    assert_no_delivery(&mut consumer).await;
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn priority_queue_basic_get_honours_priority() {
    let ctx = setup_confirmed().await;
    let q = declare_with(&ctx.ch, "do-prio-get", &[("x-max-priority", int(5))]).await;
    for (p, b) in MIXED {
        publish_priority(&ctx.ch, &q, b, p).await;
    }
    assert_eq!(message_count(&ctx.ch, &q).await, 8);
    assert_eq!(drain(&ctx.ch, &q).await, strings(&MIXED_ORDER));
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn priority_is_ignored_without_max_priority() {
    let ctx = setup_confirmed().await;
    let q = declare_queue(&ctx.ch, "do-noprio").await;
    for (p, b) in MIXED {
        publish_priority(&ctx.ch, &q, b, p).await;
    }
    let fifo: Vec<String> = MIXED.iter().map(|(_, b)| b.to_string()).collect();
    assert_eq!(drain(&ctx.ch, &q).await, fifo);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn priority_requeue_returns_to_its_place_in_its_priority() {
    let ctx = setup_confirmed().await;
    let q = declare_with(&ctx.ch, "do-prio-requeue", &[("x-max-priority", int(5))]).await;
    publish_priority(&ctx.ch, &q, "a", Some(1)).await;
    publish_priority(&ctx.ch, &q, "b", Some(1)).await;
    publish_priority(&ctx.ch, &q, "c", Some(5)).await;
    publish_priority(&ctx.ch, &q, "d", Some(5)).await;
    let get = || {
        within(
            ctx.ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
        )
    };
    let c = get().await.expect("get").expect("c");
    let d = get().await.expect("get").expect("d");
    let a = get().await.expect("get").expect("a");
    assert_eq!(
        [&c, &d, &a].map(|m| body(&m.delivery)),
        ["c", "d", "a"].map(String::from)
    );
    publish_priority(&ctx.ch, &q, "e", Some(5)).await;
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    within(a.delivery.acker.nack(requeue))
        .await
        .expect("nack a");
    within(c.delivery.acker.nack(requeue))
        .await
        .expect("nack c");
    ack(&d.delivery).await;
    wait_message_count(&ctx.ch, &q, 4).await;
    let mut order = Vec::new();
    while let Some(m) = within(
        ctx.ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    {
        order.push((body(&m.delivery), m.delivery.redelivered));
    }
    assert_eq!(
        order,
        [("c", true), ("e", false), ("a", true), ("b", false)].map(|(b, r)| (b.to_string(), r))
    );
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn priority_with_prefetch_one_is_strict_order() {
    let ctx = setup_confirmed().await;
    let q = declare_with(&ctx.ch, "do-prio-prefetch", &[("x-max-priority", int(9))]).await;
    publish_priority(&ctx.ch, &q, "l1", Some(0)).await;
    publish_priority(&ctx.ch, &q, "l2", Some(0)).await;
    publish_priority(&ctx.ch, &q, "h1", Some(9)).await;
    qos(&ctx.ch, 1).await;
    let mut consumer = consume_args(&ctx.ch, &q, &[]).await;
    let h1 = next_delivery(&mut consumer).await;
    assert_eq!(body(&h1), "h1");
    assert_no_delivery(&mut consumer).await;
    ack(&h1).await;
    let l1 = next_delivery(&mut consumer).await;
    assert_eq!(body(&l1), "l1");
    // Published while l1 is out: overtakes l2.
    publish_priority(&ctx.ch, &q, "m1", Some(4)).await;
    publish_priority(&ctx.ch, &q, "h2", Some(9)).await;
    ack(&l1).await;
    let mut order = Vec::new();
    for _ in 0..3 {
        let d = next_delivery(&mut consumer).await;
        order.push(body(&d));
        ack(&d).await;
    }
    assert_eq!(order, ["h2", "m1", "l2"]);
    assert_no_delivery(&mut consumer).await;
    delete_queue(&ctx.ch, &q).await;
}

// ---------------------------------------------------------------------------
// Single active consumer
// ---------------------------------------------------------------------------

#[tokio::test]
async fn single_active_consumer_only_the_first_receives() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "do-sac",
        &[("x-single-active-consumer", AMQPValue::Boolean(true))],
    )
    .await;
    let ch2 = ctx.channel().await;
    let mut first = consume(&ctx.ch, &q, true).await;
    let mut second = consume(&ch2, &q, true).await;
    assert_eq!(consumer_count(&ctx.ch, &q).await, 2);
    for i in 1..=4 {
        send(&ctx.ch, &q, format!("m{i}").as_bytes()).await;
    }
    assert_eq!(bodies(&take(&mut first, 4).await), ["m1", "m2", "m3", "m4"]);
    assert_no_delivery(&mut second).await;
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn single_active_consumer_next_takes_over_on_cancel() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "do-sac-cancel",
        &[("x-single-active-consumer", AMQPValue::Boolean(true))],
    )
    .await;
    let ch1 = ctx.channel().await;
    let ch2 = ctx.channel().await;
    let ch3 = ctx.channel().await;
    qos(&ch1, 1).await;
    let mut first = consume_args(&ch1, &q, &[]).await;
    let mut second = consume(&ch2, &q, true).await;
    let mut third = consume(&ch3, &q, true).await;
    send(&ctx.ch, &q, b"m1").await;
    let m1 = next_delivery(&mut first).await;
    assert_eq!(body(&m1), "m1");
    // Cancelling does not requeue m1 (still unacked on ch1); the earliest
    // waiting consumer becomes the active one.
    //
    // The queue is empty at the cancel on purpose: RabbitMQ 3.10 does not run
    // the queue when the active consumer cancels, so messages ready at that
    // moment would wait for the next publish, ack or requeue (and a new
    // publish would overtake them). Hare hands them over at once.
    cancel(&ch1, first).await;
    send(&ctx.ch, &q, b"m2").await;
    assert_eq!(body(&next_delivery(&mut second).await), "m2");
    within(m1.acker.nack(BasicNackOptions {
        multiple: false,
        requeue: true,
    }))
    .await
    .expect("nack");
    let again = next_delivery(&mut second).await;
    assert_eq!((body(&again), again.redelivered), ("m1".to_string(), true));
    assert_no_delivery(&mut third).await;
    assert_eq!(consumer_count(&ctx.ch, &q).await, 2);
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn single_active_consumer_next_takes_over_when_channel_closes() {
    let ctx = setup_confirmed().await;
    let q = declare_with(
        &ctx.ch,
        "do-sac-close",
        &[("x-single-active-consumer", AMQPValue::Boolean(true))],
    )
    .await;
    let ch1 = ctx.channel().await;
    let ch2 = ctx.channel().await;
    qos(&ch1, 2).await;
    let mut first = consume_args(&ch1, &q, &[]).await;
    let mut second = consume_args(&ch2, &q, &[]).await;
    for i in 1..=4 {
        send(&ctx.ch, &q, format!("m{i}").as_bytes()).await;
    }
    assert_eq!(bodies(&take(&mut first, 2).await), ["m1", "m2"]);
    assert_eq!(message_count(&ctx.ch, &q).await, 2);
    within(ch1.close(200, "bye".into()))
        .await
        .expect("close ch1");
    // m1 and m2 come back ahead of m3 and m4, to the new active consumer.
    let got = take(&mut second, 4).await;
    let seen: Vec<(String, bool)> = got.iter().map(|d| (body(d), d.redelivered)).collect();
    assert_eq!(
        seen,
        [("m1", true), ("m2", true), ("m3", false), ("m4", false)].map(|(b, r)| (b.to_string(), r))
    );
    assert_eq!(consumer_count(&ctx.ch, &q).await, 1);
    delete_queue(&ctx.ch, &q).await;
}

// ---------------------------------------------------------------------------
// Consumer priorities
// ---------------------------------------------------------------------------

#[tokio::test]
async fn consumer_priority_highest_gets_everything() {
    let ctx = setup_confirmed().await;
    let q = declare_queue(&ctx.ch, "do-cprio").await;
    let ch2 = ctx.channel().await;
    let ch3 = ctx.channel().await;
    let mut low = consume_args(&ch2, &q, &[("x-priority", int(1))]).await;
    let mut high = consume_args(&ctx.ch, &q, &[("x-priority", int(10))]).await;
    let mut default = consume_args(&ch3, &q, &[]).await;
    for i in 1..=5 {
        send(&ctx.ch, &q, format!("m{i}").as_bytes()).await;
    }
    assert_eq!(
        bodies(&take(&mut high, 5).await),
        ["m1", "m2", "m3", "m4", "m5"]
    );
    assert_no_delivery(&mut low).await;
    assert_no_delivery(&mut default).await;
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn consumer_priority_lower_gets_messages_while_higher_is_full() {
    let ctx = setup_confirmed().await;
    let q = declare_queue(&ctx.ch, "do-cprio-full").await;
    let ch_low = ctx.channel().await;
    qos(&ctx.ch, 2).await;
    let mut high = consume_args(&ctx.ch, &q, &[("x-priority", int(10))]).await;
    let mut low = consume_args(&ch_low, &q, &[("x-priority", int(-5))]).await;
    for i in 1..=5 {
        send(&ctx.ch, &q, format!("m{i}").as_bytes()).await;
    }
    let held = take(&mut high, 2).await;
    assert_eq!(bodies(&held), ["m1", "m2"]);
    assert_eq!(bodies(&take(&mut low, 3).await), ["m3", "m4", "m5"]);
    // Credit back: the higher one is first in line again.
    ack(&held[0]).await;
    send(&ctx.ch, &q, b"m6").await;
    assert_eq!(body(&next_delivery(&mut high).await), "m6");
    send(&ctx.ch, &q, b"m7").await;
    assert_eq!(body(&next_delivery(&mut low).await), "m7");
    assert_no_delivery(&mut high).await;
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn consumer_priority_equal_priorities_round_robin() {
    let ctx = setup_confirmed().await;
    let q = declare_queue(&ctx.ch, "do-cprio-rr").await;
    let ch2 = ctx.channel().await;
    let ch3 = ctx.channel().await;
    let mut a = consume_args(&ctx.ch, &q, &[("x-priority", int(5))]).await;
    let mut b = consume_args(&ch2, &q, &[("x-priority", int(5))]).await;
    let mut lower = consume_args(&ch3, &q, &[]).await;
    for i in 1..=6 {
        send(&ctx.ch, &q, format!("m{i}").as_bytes()).await;
    }
    assert_eq!(bodies(&take(&mut a, 3).await), ["m1", "m3", "m5"]);
    assert_eq!(bodies(&take(&mut b, 3).await), ["m2", "m4", "m6"]);
    assert_no_delivery(&mut lower).await;
    delete_queue(&ctx.ch, &q).await;
}

// ---------------------------------------------------------------------------
// Alternate exchanges
// ---------------------------------------------------------------------------

async fn declare_exchange_with(
    ch: &Channel,
    prefix: &str,
    kind: ExchangeKind,
    alternate: Option<&str>,
) -> String {
    let name = unique(prefix);
    let arguments = match alternate {
        Some(ae) => table(&[("alternate-exchange", text(ae))]),
        None => FieldTable::default(),
    };
    within(ch.exchange_declare(
        name.as_str().into(),
        kind,
        ExchangeDeclareOptions::default(),
        arguments,
    ))
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
    name
}

/// Publishes with confirms (the channel must be in confirm mode) and returns
/// the confirm: `Ack(Some(returned))` when a mandatory message came back.
async fn publish_confirmed(
    ch: &Channel,
    x: &str,
    key: &str,
    data: &str,
    mandatory: bool,
) -> Confirmation {
    let confirm = within(ch.basic_publish(
        x.into(),
        key.into(),
        BasicPublishOptions {
            mandatory,
            ..Default::default()
        },
        data.as_bytes(),
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    within(confirm).await.expect("confirm")
}

fn returned_with_no_route(c: Confirmation) {
    match c {
        Confirmation::Ack(Some(r)) => {
            assert_eq!(r.reply_code, 312);
            assert_eq!(r.reply_text.as_str(), "NO_ROUTE");
        }
        other => panic!("expected an ack with a basic.return, got {other:?}"),
    }
}

#[tokio::test]
async fn alternate_exchange_receives_unroutable_messages() {
    let ctx = setup_confirmed().await;
    let ae = declare_exchange_with(&ctx.ch, "do-ae", ExchangeKind::Fanout, None).await;
    let x = declare_exchange_with(&ctx.ch, "do-ae-main", ExchangeKind::Direct, Some(&ae)).await;
    let routed = declare_queue(&ctx.ch, "do-ae-routed").await;
    let caught = declare_queue(&ctx.ch, "do-ae-caught").await;
    bind(&ctx.ch, &routed, &x, "k", FieldTable::default()).await;
    bind(&ctx.ch, &caught, &ae, "", FieldTable::default()).await;
    // Routed by the exchange itself: the alternate is not involved.
    assert_eq!(
        publish_confirmed(&ctx.ch, &x, "k", "direct", true).await,
        Confirmation::Ack(None)
    );
    // Unroutable, mandatory: taken by the alternate, so not returned.
    assert_eq!(
        publish_confirmed(&ctx.ch, &x, "other", "via ae", true).await,
        Confirmation::Ack(None)
    );
    assert_eq!(
        publish_confirmed(&ctx.ch, &x, "", "also via ae", false).await,
        Confirmation::Ack(None)
    );
    assert_eq!(drain(&ctx.ch, &routed).await, strings(&["direct"]));
    let m = within(
        ctx.ch
            .basic_get(caught.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("via ae");
    // The message keeps its original exchange and routing key.
    assert_eq!(body(&m.delivery), "via ae");
    assert_eq!(m.delivery.exchange.as_str(), x);
    assert_eq!(m.delivery.routing_key.as_str(), "other");
    assert_eq!(drain(&ctx.ch, &caught).await, strings(&["also via ae"]));
    for q in [&routed, &caught] {
        delete_queue(&ctx.ch, q).await;
    }
    for e in [&x, &ae] {
        delete_exchange(&ctx.ch, e).await;
    }
}

#[tokio::test]
async fn alternate_exchange_chain() {
    let ctx = setup_confirmed().await;
    let last = declare_exchange_with(&ctx.ch, "do-ae-last", ExchangeKind::Fanout, None).await;
    // The middle one routes "mid" itself, anything else goes on to `last`.
    let middle =
        declare_exchange_with(&ctx.ch, "do-ae-mid", ExchangeKind::Direct, Some(&last)).await;
    let x =
        declare_exchange_with(&ctx.ch, "do-ae-first", ExchangeKind::Direct, Some(&middle)).await;
    let q_mid = declare_queue(&ctx.ch, "do-ae-chain-mid").await;
    let q_last = declare_queue(&ctx.ch, "do-ae-chain-last").await;
    bind(&ctx.ch, &q_mid, &middle, "mid", FieldTable::default()).await;
    bind(&ctx.ch, &q_last, &last, "", FieldTable::default()).await;
    assert_eq!(
        publish_confirmed(&ctx.ch, &x, "mid", "one hop", true).await,
        Confirmation::Ack(None)
    );
    assert_eq!(
        publish_confirmed(&ctx.ch, &x, "zzz", "two hops", true).await,
        Confirmation::Ack(None)
    );
    assert_eq!(drain(&ctx.ch, &q_mid).await, strings(&["one hop"]));
    assert_eq!(drain(&ctx.ch, &q_last).await, strings(&["two hops"]));
    for q in [&q_mid, &q_last] {
        delete_queue(&ctx.ch, q).await;
    }
    for e in [&x, &middle, &last] {
        delete_exchange(&ctx.ch, e).await;
    }
}

#[tokio::test]
async fn alternate_exchange_that_does_not_exist_is_skipped() {
    let ctx = setup_confirmed().await;
    let missing = unique("do-ae-missing");
    let x = declare_exchange_with(
        &ctx.ch,
        "do-ae-dangling",
        ExchangeKind::Direct,
        Some(&missing),
    )
    .await;
    returned_with_no_route(publish_confirmed(&ctx.ch, &x, "k", "lost", true).await);
    assert_eq!(
        publish_confirmed(&ctx.ch, &x, "k", "dropped", false).await,
        Confirmation::Ack(None)
    );
    sync_probe(&ctx.ch).await.expect("channel still open");
    delete_exchange(&ctx.ch, &x).await;
}

#[tokio::test]
async fn alternate_exchange_cycle_terminates() {
    let ctx = setup_confirmed().await;
    let name_a = unique("do-ae-cycle-a");
    let name_b = unique("do-ae-cycle-b");
    for (me, other) in [(&name_a, &name_b), (&name_b, &name_a)] {
        within(ctx.ch.exchange_declare(
            me.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            table(&[("alternate-exchange", text(other))]),
        ))
        .await
        .expect("declare");
    }
    let q = declare_queue(&ctx.ch, "do-ae-cycle").await;
    bind(&ctx.ch, &q, &name_b, "b", FieldTable::default()).await;
    // a routes nothing, b (its alternate) does.
    assert_eq!(
        publish_confirmed(&ctx.ch, &name_a, "b", "through the cycle", true).await,
        Confirmation::Ack(None)
    );
    // Nobody routes it: a → b → a stops, and the message comes back.
    returned_with_no_route(publish_confirmed(&ctx.ch, &name_a, "none", "round", true).await);
    returned_with_no_route(publish_confirmed(&ctx.ch, &name_b, "none", "round", true).await);
    assert_eq!(drain(&ctx.ch, &q).await, strings(&["through the cycle"]));
    delete_queue(&ctx.ch, &q).await;
    delete_exchange(&ctx.ch, &name_a).await;
    delete_exchange(&ctx.ch, &name_b).await;
}

/// Each exchange a message passes through decides on its own alternate: an
/// exchange whose binding forwarded the message to another exchange did route
/// it, even if nothing downstream takes it; the downstream exchange's own
/// alternate then applies.
#[tokio::test]
async fn alternate_exchange_with_exchange_to_exchange_bindings() {
    let ctx = setup_confirmed().await;
    let ae_top = declare_exchange_with(&ctx.ch, "do-ae-e2e-top", ExchangeKind::Fanout, None).await;
    let ae_down =
        declare_exchange_with(&ctx.ch, "do-ae-e2e-down", ExchangeKind::Fanout, None).await;
    let top =
        declare_exchange_with(&ctx.ch, "do-ae-e2e-x", ExchangeKind::Direct, Some(&ae_top)).await;
    let down =
        declare_exchange_with(&ctx.ch, "do-ae-e2e-y", ExchangeKind::Direct, Some(&ae_down)).await;
    let bare = declare_exchange_with(&ctx.ch, "do-ae-e2e-z", ExchangeKind::Direct, None).await;
    within(ctx.ch.exchange_bind(
        down.as_str().into(),
        top.as_str().into(),
        "to-down".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("exchange.bind");
    within(ctx.ch.exchange_bind(
        bare.as_str().into(),
        top.as_str().into(),
        "to-bare".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("exchange.bind");
    let q_top = declare_queue(&ctx.ch, "do-ae-e2e-top").await;
    let q_down = declare_queue(&ctx.ch, "do-ae-e2e-down").await;
    bind(&ctx.ch, &q_top, &ae_top, "", FieldTable::default()).await;
    bind(&ctx.ch, &q_down, &ae_down, "", FieldTable::default()).await;
    // top forwards to down, which routes nowhere: down's alternate takes it.
    assert_eq!(
        publish_confirmed(&ctx.ch, &top, "to-down", "down's ae", true).await,
        Confirmation::Ack(None)
    );
    // top forwards to bare, which routes nowhere and has no alternate: top's
    // alternate does not apply (top did route), so the message is returned.
    returned_with_no_route(publish_confirmed(&ctx.ch, &top, "to-bare", "lost", true).await);
    // top routes nowhere at all: its own alternate.
    assert_eq!(
        publish_confirmed(&ctx.ch, &top, "other", "top's ae", true).await,
        Confirmation::Ack(None)
    );
    assert_eq!(drain(&ctx.ch, &q_down).await, strings(&["down's ae"]));
    assert_eq!(drain(&ctx.ch, &q_top).await, strings(&["top's ae"]));
    for q in [&q_top, &q_down] {
        delete_queue(&ctx.ch, q).await;
    }
    for e in [&top, &down, &bare, &ae_top, &ae_down] {
        delete_exchange(&ctx.ch, e).await;
    }
}

// ---------------------------------------------------------------------------
// Restart (Hare-only: RabbitMQ cannot be restarted from a test)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn durable_priority_queue_recovers_in_priority_order() {
    // Hare-only: restarts a broker process; HARE_TEST_URL cannot be restarted.
    if std::env::var("HARE_TEST_URL").is_ok() {
        return;
    }
    let dir = hare_suite::temp_data_dir("do-restart");
    let data = dir.join("data");
    let q = unique("do-restart");
    let broker = start_process(&data).await;
    {
        let (conn, ch) = open(&broker.url()).await;
        within(ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            table(&[("x-max-priority", int(5))]),
        ))
        .await
        .expect("declare");
        confirm_select(&ch).await;
        for (p, b) in MIXED {
            let mut props = BasicProperties::default().with_delivery_mode(2);
            if let Some(p) = p {
                props = props.with_priority(p);
            }
            publish_with(&ch, "", &q, b.as_bytes(), props).await;
        }
        // A transient one is not recovered.
        publish_priority(&ch, &q, "transient", Some(5)).await;
        let _ = within(conn.close(200, "bye".into())).await;
    }
    let broker = restart_process(broker, &data).await;
    let (conn, ch) = open(&broker.url()).await;
    assert_eq!(message_count(&ch, &q).await, 8);
    // Published after the restart: still behind the recovered 5s, ahead of the 3s.
    publish_with(
        &ch,
        "",
        &q,
        b"late",
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(5),
    )
    .await;
    let mut expected = strings(&MIXED_ORDER);
    expected.insert(3, "late".to_string());
    assert_eq!(drain(&ch, &q).await, expected);
    let _ = within(conn.close(200, "bye".into())).await;
    drop(broker);
    let _ = std::fs::remove_dir_all(dir);
}
