//! Exchange routing semantics: direct, fanout, topic, headers, default exchange,
//! mandatory returns.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::args::{table, text as s};
use common::*;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};

const MARKER: &str = "--marker--";

/// Gets messages from `queue` until the marker (sent last, on the same channel as
/// everything else) shows up; returns the bodies before it.
async fn bodies_until_marker(ch: &Channel, queue: &str) -> Vec<String> {
    send(ch, queue, MARKER.as_bytes()).await;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let msg = within(ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }))
            .await
            .expect("basic.get");
        match msg {
            Some(m) => {
                let body = String::from_utf8_lossy(&m.delivery.data).into_owned();
                if body == MARKER {
                    return out;
                }
                out.push(body);
            }
            None => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "marker never reached {queue}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::test]
async fn direct_exchange_routes_on_exact_key() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "r-direct", ExchangeKind::Direct).await;
    let qa = declare_queue(&ctx.ch, "r-direct-a").await;
    let qb = declare_queue(&ctx.ch, "r-direct-b").await;
    bind(&ctx.ch, &qa, &x, "a", FieldTable::default()).await;
    bind(&ctx.ch, &qb, &x, "b", FieldTable::default()).await;
    bind(&ctx.ch, &qb, &x, "", FieldTable::default()).await;
    for key in ["a", "b", "A", "a.b", "", "a ", "c"] {
        publish(&ctx.ch, &x, key, format!("k={key}").as_bytes()).await;
    }
    assert_eq!(bodies_until_marker(&ctx.ch, &qa).await, vec!["k=a"]);
    assert_eq!(bodies_until_marker(&ctx.ch, &qb).await, vec!["k=b", "k="]);
    delete_queue(&ctx.ch, &qa).await;
    delete_queue(&ctx.ch, &qb).await;
    delete_exchange(&ctx.ch, &x).await;
}

#[tokio::test]
async fn delivery_carries_exchange_and_routing_key() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "r-fields", ExchangeKind::Direct).await;
    let q = declare_queue(&ctx.ch, "r-fields-q").await;
    bind(&ctx.ch, &q, &x, "rk", FieldTable::default()).await;
    publish(&ctx.ch, &x, "rk", b"x").await;
    let mut c = consume(&ctx.ch, &q, true).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(d.exchange.as_str(), x);
    assert_eq!(d.routing_key.as_str(), "rk");
    assert!(!d.redelivered);
    drop(c);
    delete_queue(&ctx.ch, &q).await;
    delete_exchange(&ctx.ch, &x).await;
}

#[tokio::test]
async fn fanout_routes_to_all_bound_queues_ignoring_key() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "r-fanout", ExchangeKind::Fanout).await;
    let mut queues = Vec::new();
    for i in 0..3 {
        let q = declare_queue(&ctx.ch, &format!("r-fanout-{i}")).await;
        bind(
            &ctx.ch,
            &q,
            &x,
            &format!("ignored-{i}"),
            FieldTable::default(),
        )
        .await;
        queues.push(q);
    }
    publish(&ctx.ch, &x, "whatever", b"m1").await;
    publish(&ctx.ch, &x, "", b"m2").await;
    for q in &queues {
        assert_eq!(bodies_until_marker(&ctx.ch, q).await, vec!["m1", "m2"]);
        delete_queue(&ctx.ch, q).await;
    }
    delete_exchange(&ctx.ch, &x).await;
}

/// RabbitMQ's topic matching: split both keys on '.', an empty key has zero words,
/// `*` matches exactly one (possibly empty) word, `#` zero or more words.
#[tokio::test]
async fn topic_matching_semantics() {
    let patterns: &[&str] = &[
        "a.b", "a.*", "*.b", "*", "#", "#.#", "a.#", "#.b", "a.#.b", "a.*.b", "*.*", "", "a..b",
        "#.a.#", "*.#", "#.*", ".", "a.*.#",
    ];
    let keys: &[&str] = &[
        "a.b", "a", "b", "a.b.c", "a.x.b", "a.x.y.b", "a..b", "", ".", "a.", ".b", "x.a.y", "ab",
        "a.b.b", "A.B",
    ];
    // Expected matches per pattern, following RabbitMQ 3.x.
    let expected: &[(&str, &[&str])] = &[
        ("a.b", &["a.b"]),
        ("a.*", &["a.b", "a."]),
        ("*.b", &["a.b", ".b"]),
        ("*", &["a", "b", "ab"]),
        (
            "#",
            &[
                "a.b", "a", "b", "a.b.c", "a.x.b", "a.x.y.b", "a..b", "", ".", "a.", ".b", "x.a.y",
                "ab", "a.b.b", "A.B",
            ],
        ),
        (
            "#.#",
            &[
                "a.b", "a", "b", "a.b.c", "a.x.b", "a.x.y.b", "a..b", "", ".", "a.", ".b", "x.a.y",
                "ab", "a.b.b", "A.B",
            ],
        ),
        (
            "a.#",
            &[
                "a.b", "a", "a.b.c", "a.x.b", "a.x.y.b", "a..b", "a.", "a.b.b",
            ],
        ),
        (
            "#.b",
            &["a.b", "b", "a.x.b", "a.x.y.b", "a..b", ".b", "a.b.b"],
        ),
        ("a.#.b", &["a.b", "a.x.b", "a.x.y.b", "a..b", "a.b.b"]),
        ("a.*.b", &["a.x.b", "a..b", "a.b.b"]),
        ("*.*", &["a.b", ".", "a.", ".b", "A.B"]),
        ("", &[""]),
        ("a..b", &["a..b"]),
        (
            "#.a.#",
            &[
                "a.b", "a", "a.b.c", "a.x.b", "a.x.y.b", "a..b", "a.", "x.a.y", "a.b.b",
            ],
        ),
        (
            "*.#",
            &[
                "a.b", "a", "b", "a.b.c", "a.x.b", "a.x.y.b", "a..b", ".", "a.", ".b", "x.a.y",
                "ab", "a.b.b", "A.B",
            ],
        ),
        (
            "#.*",
            &[
                "a.b", "a", "b", "a.b.c", "a.x.b", "a.x.y.b", "a..b", ".", "a.", ".b", "x.a.y",
                "ab", "a.b.b", "A.B",
            ],
        ),
        (".", &["."]),
        (
            "a.*.#",
            &["a.b", "a.b.c", "a.x.b", "a.x.y.b", "a..b", "a.", "a.b.b"],
        ),
    ];
    assert_eq!(patterns.len(), expected.len());

    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "r-topic", ExchangeKind::Topic).await;
    let mut queues = Vec::new();
    for p in patterns {
        let q = declare_queue(&ctx.ch, "r-topic-q").await;
        bind(&ctx.ch, &q, &x, p, FieldTable::default()).await;
        queues.push(q);
    }
    for k in keys {
        publish(&ctx.ch, &x, k, format!("[{k}]").as_bytes()).await;
    }
    let mut failures = Vec::new();
    for ((p, q), (ep, want)) in patterns.iter().zip(&queues).zip(expected) {
        assert_eq!(p, ep);
        let got: Vec<String> = bodies_until_marker(&ctx.ch, q).await;
        let want: Vec<String> = want.iter().map(|k| format!("[{k}]")).collect();
        // Order follows publish order; compare as sets after checking no duplicates.
        let got_set: BTreeSet<&String> = got.iter().collect();
        assert_eq!(
            got_set.len(),
            got.len(),
            "pattern {p:?}: duplicates in {got:?}"
        );
        let want_set: BTreeSet<&String> = want.iter().collect();
        if got_set != want_set {
            failures.push(format!("pattern {p:?}: got {got:?}, want {want:?}"));
        }
        delete_queue(&ctx.ch, q).await;
    }
    delete_exchange(&ctx.ch, &x).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Binds one queue per binding-argument set to a headers exchange, publishes one
/// message per header set, and checks which queue got which message.
async fn check_headers(
    bindings: Vec<(&str, FieldTable)>,
    messages: Vec<(&str, Option<FieldTable>)>,
    expected: &[(&str, &[&str])],
) {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "r-headers", ExchangeKind::Headers).await;
    let mut queues = BTreeMap::new();
    for (label, args) in bindings {
        let q = declare_queue(&ctx.ch, &format!("r-headers-{label}")).await;
        // The routing key is ignored by the headers exchange.
        bind(&ctx.ch, &q, &x, "ignored", args).await;
        queues.insert(label.to_string(), q);
    }
    for (id, headers) in messages {
        let mut props = BasicProperties::default();
        if let Some(h) = headers {
            props = props.with_headers(h);
        }
        publish_with(&ctx.ch, &x, "some-key", id.as_bytes(), props).await;
    }
    let mut failures = Vec::new();
    for (label, want) in expected {
        let q = &queues[*label];
        let got = bodies_until_marker(&ctx.ch, q).await;
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        if got != want {
            failures.push(format!("binding {label}: got {got:?}, want {want:?}"));
        }
    }
    for q in queues.values() {
        delete_queue(&ctx.ch, q).await;
    }
    delete_exchange(&ctx.ch, &x).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn headers_exchange_all_and_any() {
    let bindings = vec![
        (
            "all",
            table(&[
                ("x-match", s("all")),
                ("a", AMQPValue::LongInt(1)),
                ("b", s("x")),
            ]),
        ),
        (
            "any",
            table(&[
                ("x-match", s("any")),
                ("a", AMQPValue::LongInt(1)),
                ("b", s("x")),
            ]),
        ),
        // No x-match: defaults to all.
        (
            "default",
            table(&[("a", AMQPValue::LongInt(1)), ("b", s("x"))]),
        ),
        // Void value: the header only has to be present.
        (
            "present",
            table(&[("x-match", s("all")), ("c", AMQPValue::Void)]),
        ),
        // No conditions at all.
        ("empty-all", table(&[("x-match", s("all"))])),
        ("empty-any", table(&[("x-match", s("any"))])),
        ("none", FieldTable::default()),
    ];
    let messages = vec![
        (
            "both",
            Some(table(&[("a", AMQPValue::LongInt(1)), ("b", s("x"))])),
        ),
        ("only-a", Some(table(&[("a", AMQPValue::LongInt(1))]))),
        ("only-b", Some(table(&[("b", s("x"))]))),
        (
            "both-plus",
            Some(table(&[
                ("a", AMQPValue::LongInt(1)),
                ("b", s("x")),
                ("z", s("extra")),
            ])),
        ),
        (
            "wrong-b",
            Some(table(&[("a", AMQPValue::LongInt(2)), ("b", s("y"))])),
        ),
        ("c-any-value", Some(table(&[("c", s("anything"))]))),
        ("no-headers", None),
        ("empty-headers", Some(FieldTable::default())),
    ];
    let all_msgs: &[&str] = &[
        "both",
        "only-a",
        "only-b",
        "both-plus",
        "wrong-b",
        "c-any-value",
        "no-headers",
        "empty-headers",
    ];
    check_headers(
        bindings,
        messages,
        &[
            ("all", &["both", "both-plus"]),
            ("any", &["both", "only-a", "only-b", "both-plus"]),
            ("default", &["both", "both-plus"]),
            ("present", &["c-any-value"]),
            ("empty-all", all_msgs),
            ("empty-any", &[]),
            ("none", all_msgs),
        ],
    )
    .await;
}

#[tokio::test]
async fn headers_exchange_x_headers_ignored_unless_with_x() {
    let bindings = vec![
        (
            "all",
            table(&[("x-match", s("all")), ("x-tag", s("t")), ("k", s("v"))]),
        ),
        (
            "any",
            table(&[("x-match", s("any")), ("x-tag", s("t")), ("k", s("v"))]),
        ),
        (
            "all-with-x",
            table(&[
                ("x-match", s("all-with-x")),
                ("x-tag", s("t")),
                ("k", s("v")),
            ]),
        ),
        (
            "any-with-x",
            table(&[
                ("x-match", s("any-with-x")),
                ("x-tag", s("t")),
                ("k", s("v")),
            ]),
        ),
        // Only x- conditions: with all, no conditions remain, so everything matches;
        // with any, nothing can match.
        (
            "all-only-x",
            table(&[("x-match", s("all")), ("x-tag", s("t"))]),
        ),
        (
            "any-only-x",
            table(&[("x-match", s("any")), ("x-tag", s("t"))]),
        ),
    ];
    let messages = vec![
        ("k-only", Some(table(&[("k", s("v"))]))),
        ("x-only", Some(table(&[("x-tag", s("t"))]))),
        ("both", Some(table(&[("k", s("v")), ("x-tag", s("t"))]))),
        (
            "wrong-x",
            Some(table(&[("k", s("v")), ("x-tag", s("nope"))])),
        ),
        ("neither", Some(table(&[("other", s("v"))]))),
    ];
    check_headers(
        bindings,
        messages,
        &[
            ("all", &["k-only", "both", "wrong-x"]),
            ("any", &["k-only", "both", "wrong-x"]),
            ("all-with-x", &["both"]),
            ("any-with-x", &["k-only", "x-only", "both", "wrong-x"]),
            (
                "all-only-x",
                &["k-only", "x-only", "both", "wrong-x", "neither"],
            ),
            ("any-only-x", &[]),
        ],
    )
    .await;
}

#[tokio::test]
async fn headers_exchange_compares_values_not_types() {
    // RabbitMQ compares decoded values: an integer matches the same integer sent
    // with another integer width, but never a string.
    let bindings = vec![
        (
            "int",
            table(&[("x-match", s("all")), ("n", AMQPValue::LongInt(5))]),
        ),
        ("str", table(&[("x-match", s("all")), ("n", s("5"))])),
        (
            "bool",
            table(&[("x-match", s("all")), ("f", AMQPValue::Boolean(true))]),
        ),
    ];
    let messages = vec![
        ("i32", Some(table(&[("n", AMQPValue::LongInt(5))]))),
        ("i64", Some(table(&[("n", AMQPValue::LongLongInt(5))]))),
        ("u8", Some(table(&[("n", AMQPValue::ShortShortUInt(5))]))),
        ("string", Some(table(&[("n", s("5"))]))),
        ("other-int", Some(table(&[("n", AMQPValue::LongInt(6))]))),
        ("true", Some(table(&[("f", AMQPValue::Boolean(true))]))),
        ("false", Some(table(&[("f", AMQPValue::Boolean(false))]))),
    ];
    check_headers(
        bindings,
        messages,
        &[
            ("int", &["i32", "i64", "u8"]),
            ("str", &["string"]),
            ("bool", &["true"]),
        ],
    )
    .await;
}

#[tokio::test]
async fn headers_binding_with_invalid_x_match_is_406() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "r-headers-bad", ExchangeKind::Headers).await;
    let q = declare_queue(&ctx.ch, "r-headers-bad-q").await;
    let res = within(ctx.ch.queue_bind(
        q.as_str().into(),
        x.as_str().into(),
        "".into(),
        Default::default(),
        table(&[("x-match", s("some")), ("a", s("b"))]),
    ))
    .await;
    let text = expect_channel_error(res, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - Invalid x-match field value <<\"some\">>; \
         expected all, any, all-with-x, or any-with-x"
    );
    let ch = ctx.channel().await;
    delete_queue(&ch, &q).await;
    delete_exchange(&ch, &x).await;
}

#[tokio::test]
async fn message_reaches_each_queue_once_despite_several_bindings() {
    let ctx = setup().await;
    let topic = declare_exchange(&ctx.ch, "r-multi-topic", ExchangeKind::Topic).await;
    let fan = declare_exchange(&ctx.ch, "r-multi-fan", ExchangeKind::Fanout).await;
    let q1 = declare_queue(&ctx.ch, "r-multi-1").await;
    let q2 = declare_queue(&ctx.ch, "r-multi-2").await;
    // q1: three matching topic bindings.
    for key in ["a.b", "a.*", "#"] {
        bind(&ctx.ch, &q1, &topic, key, FieldTable::default()).await;
    }
    // q2: a direct topic binding plus a path through an exchange-to-exchange binding.
    bind(&ctx.ch, &q2, &topic, "*.b", FieldTable::default()).await;
    within(ctx.ch.exchange_bind(
        fan.as_str().into(),
        topic.as_str().into(),
        "#".into(),
        Default::default(),
        FieldTable::default(),
    ))
    .await
    .expect("e2e bind");
    bind(&ctx.ch, &q2, &fan, "", FieldTable::default()).await;
    bind(&ctx.ch, &q1, &fan, "", FieldTable::default()).await;

    publish(&ctx.ch, &topic, "a.b", b"once").await;
    assert_eq!(bodies_until_marker(&ctx.ch, &q1).await, vec!["once"]);
    assert_eq!(bodies_until_marker(&ctx.ch, &q2).await, vec!["once"]);
    delete_queue(&ctx.ch, &q1).await;
    delete_queue(&ctx.ch, &q2).await;
    delete_exchange(&ctx.ch, &topic).await;
    delete_exchange(&ctx.ch, &fan).await;
}

#[tokio::test]
async fn exchange_binding_cycles_deliver_once() {
    let ctx = setup().await;
    let x1 = declare_exchange(&ctx.ch, "r-cycle-1", ExchangeKind::Fanout).await;
    let x2 = declare_exchange(&ctx.ch, "r-cycle-2", ExchangeKind::Fanout).await;
    for (dst, src) in [(&x2, &x1), (&x1, &x2)] {
        within(ctx.ch.exchange_bind(
            dst.as_str().into(),
            src.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ))
        .await
        .expect("e2e bind");
    }
    let q = declare_queue(&ctx.ch, "r-cycle-q").await;
    bind(&ctx.ch, &q, &x1, "", FieldTable::default()).await;
    bind(&ctx.ch, &q, &x2, "", FieldTable::default()).await;
    publish(&ctx.ch, &x1, "", b"loop").await;
    assert_eq!(bodies_until_marker(&ctx.ch, &q).await, vec!["loop"]);
    delete_queue(&ctx.ch, &q).await;
    delete_exchange(&ctx.ch, &x1).await;
    delete_exchange(&ctx.ch, &x2).await;
}

#[tokio::test]
async fn default_exchange_routes_by_queue_name() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "r-default").await;
    publish(&ctx.ch, "", &q, b"direct-to-queue").await;
    // Unknown queue name: silently dropped.
    publish(&ctx.ch, "", &unique("r-nobody"), b"dropped").await;
    // The default exchange can be addressed by its name only as "".
    let mut c = consume(&ctx.ch, &q, true).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(d.data, b"direct-to-queue");
    assert_eq!(d.exchange.as_str(), "");
    assert_eq!(d.routing_key.as_str(), q);
    drop(c);
    sync_probe(&ctx.ch).await.expect("channel still open");
    delete_queue(&ctx.ch, &q).await;
}

#[tokio::test]
async fn publish_to_missing_exchange_is_404() {
    let ctx = setup().await;
    let x = unique("r-nox");
    within(ctx.ch.basic_publish(
        x.as_str().into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    ))
    .await
    .expect("publish sent");
    let text = ctx.channel_closed(404).await;
    assert_eq!(text, format!("NOT_FOUND - no exchange '{x}' in vhost '/'"));
}

#[tokio::test]
async fn mandatory_unroutable_is_returned_with_312() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "r-mandatory", ExchangeKind::Direct).await;
    let props = BasicProperties::default()
        .with_message_id("mid-1".into())
        .with_content_type("text/plain".into());
    let confirm = within(ctx.ch.basic_publish(
        x.as_str().into(),
        "nowhere".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"come back",
        props,
    ))
    .await
    .expect("publish");
    // Without confirms the publish resolves immediately; the return arrives later.
    assert_eq!(
        within(confirm).await.expect("confirm"),
        Confirmation::NotRequested
    );
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let returned = loop {
        let mut r = within(ctx.ch.wait_for_confirms()).await.expect("drain");
        if let Some(m) = r.pop() {
            assert!(r.is_empty(), "one return only");
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "no basic.return");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.exchange.as_str(), x);
    assert_eq!(returned.delivery.routing_key.as_str(), "nowhere");
    assert_eq!(returned.delivery.data, b"come back");
    assert_eq!(
        returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("mid-1")
    );
    assert_eq!(
        returned
            .delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("text/plain")
    );
    // A mandatory publish that does route is not returned.
    let q = declare_queue(&ctx.ch, "r-mandatory-q").await;
    bind(&ctx.ch, &q, &x, "somewhere", FieldTable::default()).await;
    within(ctx.ch.basic_publish(
        x.as_str().into(),
        "somewhere".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"stays",
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    assert_eq!(bodies_until_marker(&ctx.ch, &q).await, vec!["stays"]);
    assert!(within(ctx.ch.wait_for_confirms())
        .await
        .expect("drain")
        .is_empty());
    delete_queue(&ctx.ch, &q).await;
    delete_exchange(&ctx.ch, &x).await;
}

#[tokio::test]
async fn mandatory_return_then_ack_with_confirms() {
    let ctx = setup().await;
    within(ctx.ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let x = declare_exchange(&ctx.ch, "r-mandatory-c", ExchangeKind::Topic).await;
    let confirm = within(ctx.ch.basic_publish(
        x.as_str().into(),
        "no.route".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"returned",
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    // RabbitMQ sends basic.return first, then still basic.ack (not nack) for it.
    match within(confirm).await.expect("confirm") {
        Confirmation::Ack(Some(ret)) => {
            assert_eq!(ret.reply_code, 312);
            assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
            assert_eq!(ret.delivery.data, b"returned");
            assert_eq!(ret.delivery.routing_key.as_str(), "no.route");
        }
        other => panic!("expected Ack with a returned message, got {other:?}"),
    }
    // Unroutable but not mandatory: just acked, nothing returned.
    let confirm = within(ctx.ch.basic_publish(
        x.as_str().into(),
        "no.route".into(),
        BasicPublishOptions::default(),
        b"dropped",
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    assert_eq!(
        within(confirm).await.expect("confirm"),
        Confirmation::Ack(None)
    );
    delete_exchange(&ctx.ch, &x).await;
}

#[tokio::test]
async fn mandatory_to_default_exchange_for_missing_queue_is_returned() {
    let ctx = setup().await;
    within(ctx.ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let missing = unique("r-noq");
    let confirm = within(ctx.ch.basic_publish(
        "".into(),
        missing.as_str().into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"x",
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    match within(confirm).await.expect("confirm") {
        Confirmation::Ack(Some(ret)) => {
            assert_eq!(ret.reply_code, 312);
            assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
            assert_eq!(ret.delivery.exchange.as_str(), "");
            assert_eq!(ret.delivery.routing_key.as_str(), missing);
        }
        other => panic!("expected Ack with a returned message, got {other:?}"),
    }
}

#[tokio::test]
async fn immediate_publish_is_not_implemented_540() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "r-immediate").await;
    within(ctx.ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions {
            immediate: true,
            ..Default::default()
        },
        b"x",
        BasicProperties::default(),
    ))
    .await
    .expect("publish sent");
    let text = ctx.connection_closed(540).await;
    assert_eq!(text, "NOT_IMPLEMENTED - immediate=true");
    let conn = ctx.connect().await;
    let ch = within(conn.create_channel()).await.expect("channel");
    delete_queue(&ch, &q).await;
}

/// RabbitMQ routes through exchange-to-exchange bindings at any depth and
/// fan-out (each exchange once per message); Hare used to cut the walk after
/// 32 forwarding exchanges and drop the message.
#[tokio::test]
async fn exchange_chains_and_fan_outs_route_at_any_depth() {
    let ctx = setup().await;
    let e2e = |dst: String, src: String| {
        within(ctx.ch.exchange_bind(
            dst.as_str().into(),
            src.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ))
    };
    // A chain of 40: head -> x1 -> ... -> x39 -> queue.
    let mut chain = Vec::new();
    for _ in 0..40 {
        chain.push(declare_exchange(&ctx.ch, "r-chain", ExchangeKind::Fanout).await);
    }
    for pair in chain.windows(2) {
        e2e(pair[1].clone(), pair[0].clone())
            .await
            .expect("e2e bind");
    }
    let deep = declare_queue(&ctx.ch, "r-chain-q").await;
    bind(&ctx.ch, &deep, &chain[39], "", FieldTable::default()).await;
    // A fan-out: hub -> 40 exchanges -> one queue each.
    let hub = declare_exchange(&ctx.ch, "r-hub", ExchangeKind::Fanout).await;
    let mut leaves = Vec::new();
    for _ in 0..40 {
        let x = declare_exchange(&ctx.ch, "r-spoke", ExchangeKind::Fanout).await;
        e2e(x.clone(), hub.clone()).await.expect("e2e bind");
        let q = declare_queue(&ctx.ch, "r-spoke-q").await;
        bind(&ctx.ch, &q, &x, "", FieldTable::default()).await;
        leaves.push((x, q));
    }
    publish(&ctx.ch, &chain[0], "", b"deep").await;
    publish(&ctx.ch, &hub, "", b"wide").await;
    assert_eq!(bodies_until_marker(&ctx.ch, &deep).await, vec!["deep"]);
    for (_, q) in &leaves {
        assert_eq!(bodies_until_marker(&ctx.ch, q).await, vec!["wide"], "{q}");
    }
    delete_queue(&ctx.ch, &deep).await;
    for (x, q) in leaves {
        delete_queue(&ctx.ch, &q).await;
        delete_exchange(&ctx.ch, &x).await;
    }
    for x in chain.iter().chain([&hub]) {
        delete_exchange(&ctx.ch, x).await;
    }
}

/// Sender-selected distribution: the keys in `CC` and `BCC` route the message
/// through the same exchange too, one copy per queue however many keys reach
/// it; receivers see `CC` but never `BCC`. The default exchange takes them as
/// queue names.
#[tokio::test]
async fn cc_and_bcc_headers_route_one_copy_per_queue_and_bcc_is_hidden() {
    let ctx = setup().await;
    let x = declare_exchange(&ctx.ch, "r-cc", ExchangeKind::Direct).await;
    let mut queues = Vec::new();
    for _ in 0..4 {
        let q = declare_queue(&ctx.ch, "r-cc-q").await;
        bind(&ctx.ch, &q, &x, &q, FieldTable::default()).await;
        queues.push(q);
    }
    let keys = |names: &[&String]| {
        AMQPValue::FieldArray(names.iter().map(|n| s(n)).collect::<Vec<_>>().into())
    };
    let cc = keys(&[&queues[1], &queues[1]]);
    let headers = table(&[("CC", cc.clone()), ("BCC", keys(&[&queues[2], &queues[0]]))]);
    let props = BasicProperties::default().with_headers(headers);
    publish_with(&ctx.ch, &x, &queues[0], b"m", props.clone()).await;
    for q in &queues[..3] {
        let got = within(
            ctx.ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get")
        .unwrap_or_else(|| panic!("{q} got no copy"));
        let seen = got
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        assert_eq!(seen.inner().get("CC"), Some(&cc), "{q}");
        assert!(!seen.inner().contains_key("BCC"), "{q} sees BCC: {seen:?}");
        assert_eq!(bodies_until_marker(&ctx.ch, q).await, Vec::<String>::new());
    }
    assert_eq!(
        bodies_until_marker(&ctx.ch, &queues[3]).await,
        Vec::<String>::new()
    );
    // Through the default exchange, the keys are queue names.
    let headers = table(&[("CC", keys(&[&queues[3]]))]);
    let props = BasicProperties::default().with_headers(headers);
    publish_with(&ctx.ch, "", &queues[2], b"d", props).await;
    assert_eq!(bodies_until_marker(&ctx.ch, &queues[2]).await, vec!["d"]);
    assert_eq!(bodies_until_marker(&ctx.ch, &queues[3]).await, vec!["d"]);
    for q in &queues {
        delete_queue(&ctx.ch, q).await;
    }
    delete_exchange(&ctx.ch, &x).await;
}

/// A `CC` or `BCC` header that is not an array is refused with RabbitMQ's
/// 406 and the type it found.
#[tokio::test]
async fn cc_or_bcc_that_is_not_an_array_is_406() {
    let ctx = setup().await;
    let q = declare_queue(&ctx.ch, "r-cc-bad").await;
    for (name, value, found) in [
        ("CC", s("single"), "longstr"),
        ("BCC", AMQPValue::LongInt(5), "signedint"),
    ] {
        let ch = ctx.channel().await;
        let props = BasicProperties::default().with_headers(table(&[(name, value)]));
        within(ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"m",
            props,
        ))
        .await
        .expect("publish is written");
        let text = expect_channel_error(sync_probe(&ch).await, 406);
        assert_eq!(
            text,
            format!(
                "PRECONDITION_FAILED - invalid message: {{unacceptable_type_in_header,\"{name}\",{found}}}"
            )
        );
    }
    assert_eq!(message_count(&ctx.ch, &q).await, 0);
    delete_queue(&ctx.ch, &q).await;
}
