//! Validation of queue, exchange and consumer arguments and of the
//! `expiration` property, pinned to RabbitMQ 3.10's exact replies.
//!
//! A wrong argument type or value closes the channel with 406 and a text
//! that embeds RabbitMQ's Erlang reason (`{value_negative,-1}`,
//! `"expected integer, got longstr"`); these tests assert code, text, and
//! the failing method. The facts they pin down, all observed on RabbitMQ
//! 3.10.8 (run with `HARE_TEST_URL=amqp://guest:guest@127.0.0.1:5680/%2f`):
//! only a declare that creates a queue or exchange validates; a redeclare
//! only compares (so a bad value there is an `inequivalent arg`), a passive
//! declare checks nothing; several bad arguments are reported in a fixed
//! order; integers of every AMQP width are accepted, floats never.
//!
//! The tests use a raw socket: the field types must be exactly the ones
//! sent, and the failing method's ids are part of the reply.

mod common;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::BasicProperties;
use amq_protocol::protocol::{basic, channel, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray, FieldTable};
use common::args::{table, text as s};
use common::raw::{assert_text, body, method, Raw};
use common::unique;
use hare_suite::TestBroker;

/// How a method was answered: its `-ok` (carrying the queue name for
/// queue.declare), or a close.
#[derive(Debug, PartialEq)]
enum Reply {
    Ok(String),
    ChannelClose(u16, String, u16, u16),
    ConnectionClose(u16, String, u16, u16),
}

/// One raw connection; every call runs on a fresh channel, since most close it.
struct Client {
    raw: Raw,
    last_channel: u16,
}

impl Client {
    async fn open(broker: &TestBroker) -> Client {
        Client {
            raw: Raw::open(broker.addr()).await,
            last_channel: 0,
        }
    }

    async fn channel(&mut self) -> u16 {
        self.last_channel += 1;
        self.raw.open_channel(self.last_channel).await;
        self.last_channel
    }

    async fn reply(&mut self) -> Reply {
        match self.raw.next().await {
            Some(AMQPFrame::Method(ch, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) => {
                self.raw
                    .send(&method(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    ))
                    .await;
                Reply::ChannelClose(
                    c.reply_code,
                    c.reply_text.to_string(),
                    c.class_id,
                    c.method_id,
                )
            }
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                Reply::ConnectionClose(
                    c.reply_code,
                    c.reply_text.to_string(),
                    c.class_id,
                    c.method_id,
                )
            }
            Some(AMQPFrame::Method(_, AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)))) => {
                Reply::Ok(ok.queue.to_string())
            }
            Some(AMQPFrame::Method(_, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)))) => {
                Reply::Ok(String::new())
            }
            Some(AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)))) => {
                Reply::Ok(ok.consumer_tag.to_string())
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }

    async fn call(&mut self, class: AMQPClass) -> Reply {
        let ch = self.channel().await;
        self.raw.send(&method(ch, class)).await;
        self.reply().await
    }

    async fn declare(&mut self, name: &str, args: FieldTable, flags: Flags) -> Reply {
        self.call(AMQPClass::Queue(queue::AMQPMethod::Declare(
            queue::Declare {
                queue: name.into(),
                passive: flags.passive,
                durable: flags.durable,
                exclusive: flags.exclusive,
                auto_delete: false,
                nowait: false,
                arguments: args,
            },
        )))
        .await
    }

    async fn declare_exchange(&mut self, name: &str, kind: &str, args: FieldTable) -> Reply {
        self.call(AMQPClass::Exchange(exchange::AMQPMethod::Declare(
            exchange::Declare {
                exchange: name.into(),
                kind: kind.into(),
                passive: false,
                durable: false,
                auto_delete: false,
                internal: false,
                nowait: false,
                arguments: args,
            },
        )))
        .await
    }

    async fn delete_exchange(&mut self, name: &str) {
        let ch = self.channel().await;
        let delete = exchange::Delete {
            exchange: name.into(),
            if_unused: false,
            nowait: false,
        };
        self.raw
            .send(&method(
                ch,
                AMQPClass::Exchange(exchange::AMQPMethod::Delete(delete)),
            ))
            .await;
        match self.raw.next().await {
            Some(AMQPFrame::Method(_, AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(_)))) => {}
            other => panic!("expected exchange.delete-ok, got {other:?}"),
        }
    }

    async fn consume(&mut self, queue: &str, args: FieldTable) -> Reply {
        self.call(AMQPClass::Basic(basic::AMQPMethod::Consume(
            basic::Consume {
                queue: queue.into(),
                consumer_tag: "".into(),
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
                arguments: args,
            },
        )))
        .await
    }

    /// Publishes one message with `expiration`, then a passive declare of
    /// amq.direct: its declare-ok proves the publish was accepted.
    async fn publish_expiring(&mut self, exchange: &str, key: &str, expiration: &str) -> Reply {
        let ch = self.channel().await;
        let publish = basic::Publish {
            exchange: exchange.into(),
            routing_key: key.into(),
            mandatory: false,
            immediate: false,
        };
        self.raw
            .send(&method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Publish(publish)),
            ))
            .await;
        let properties = BasicProperties::default().with_expiration(expiration.into());
        self.raw
            .send(&AMQPFrame::Header(
                ch,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: 1,
                    properties,
                },
            ))
            .await;
        self.raw.send(&body(ch, b"x")).await;
        let probe = exchange::Declare {
            exchange: "amq.direct".into(),
            kind: "direct".into(),
            passive: true,
            ..Default::default()
        };
        self.raw
            .send(&method(
                ch,
                AMQPClass::Exchange(exchange::AMQPMethod::Declare(probe)),
            ))
            .await;
        self.reply().await
    }
}

#[derive(Clone, Copy, Default)]
struct Flags {
    passive: bool,
    durable: bool,
    exclusive: bool,
}

/// Queues that succeed are exclusive, so they vanish with the connection
/// (RabbitMQ is shared and long-lived).
const EXCLUSIVE: Flags = Flags {
    passive: false,
    durable: false,
    exclusive: true,
};

/// Arguments as (name, value) pairs.
type Args = Vec<(&'static str, AMQPValue)>;

fn int(n: i32) -> AMQPValue {
    AMQPValue::LongInt(n)
}

/// RabbitMQ's text for a refused queue (or consumer) argument.
fn invalid(arg: &str, queue: &str, reason: &str) -> String {
    format!("PRECONDITION_FAILED - invalid arg '{arg}' for queue '{queue}' in vhost '/': {reason}")
}

fn precondition(text: String) -> Reply {
    Reply::ChannelClose(406, text, 50, 10)
}

/// Values that are not integers, with RabbitMQ's type names.
fn non_integers() -> Vec<(&'static str, AMQPValue)> {
    vec![
        ("longstr", s("10")),
        ("float", AMQPValue::Float(1.5)),
        ("double", AMQPValue::Double(2.0)),
        ("bool", AMQPValue::Boolean(true)),
        ("timestamp", AMQPValue::Timestamp(5)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 1,
                value: 15,
            }),
        ),
        ("void", AMQPValue::Void),
        ("table", AMQPValue::FieldTable(FieldTable::default())),
        ("array", AMQPValue::FieldArray(FieldArray::default())),
        ("binary", AMQPValue::ByteArray(vec![1u8].into())),
    ]
}

/// 5 in every integer width RabbitMQ reads.
fn integer_widths() -> Vec<(&'static str, AMQPValue)> {
    vec![
        ("byte", AMQPValue::ShortShortInt(5)),
        ("unsignedbyte", AMQPValue::ShortShortUInt(5)),
        ("short", AMQPValue::ShortInt(5)),
        ("unsignedshort", AMQPValue::ShortUInt(5)),
        ("signedint", AMQPValue::LongInt(5)),
        ("unsignedint", AMQPValue::LongUInt(5)),
        ("long", AMQPValue::LongLongInt(5)),
    ]
}

const INTEGER_ARGS: &[&str] = &[
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
];

/// Ten years in ms: RabbitMQ's ceiling for TTLs, expiries and `expiration`.
const MAX_EXPIRY: i64 = 315_360_000_000;

async fn expect_refused(
    c: &mut Client,
    case: &str,
    args: FieldTable,
    reason_for: impl Fn(&str) -> String,
) {
    let q = unique("args");
    let got = c.declare(&q, args, EXCLUSIVE).await;
    assert_eq!(got, precondition(reason_for(&q)), "case: {case}");
}

#[tokio::test]
async fn integer_arguments_refuse_other_types() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    for arg in INTEGER_ARGS {
        for (type_name, value) in non_integers() {
            let reason = format!("\"expected integer, got {type_name}\"");
            expect_refused(
                &mut c,
                &format!("{arg} as {type_name}"),
                table(&[(arg, value)]),
                |q| invalid(arg, q, &reason),
            )
            .await;
        }
    }
}

#[tokio::test]
async fn integer_arguments_refuse_negative_values() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    for arg in INTEGER_ARGS {
        for (n, value) in [
            (-1, int(-1)),
            (-5, AMQPValue::LongLongInt(-5)),
            (-7, AMQPValue::ShortShortInt(-7)),
        ] {
            expect_refused(
                &mut c,
                &format!("{arg} = {value:?}"),
                table(&[(arg, value)]),
                |q| invalid(arg, q, &format!("{{value_negative,{n}}}")),
            )
            .await;
        }
    }
}

#[tokio::test]
async fn range_limits() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    let cases: Vec<(&str, AMQPValue, &str)> = vec![
        ("x-expires", int(0), "{value_zero,0}"),
        (
            "x-expires",
            AMQPValue::LongLongInt(MAX_EXPIRY + 1),
            "{value_too_large,315360000001}",
        ),
        (
            "x-message-ttl",
            AMQPValue::LongLongInt(MAX_EXPIRY + 1),
            "{value_too_large,315360000001}",
        ),
        (
            "x-message-ttl",
            AMQPValue::LongLongInt(i64::MAX),
            "{value_too_large,9223372036854775807}",
        ),
        ("x-max-priority", int(256), "{max_value_exceeded,256}"),
        (
            "x-max-priority",
            AMQPValue::LongLongInt(1 << 40),
            "{max_value_exceeded,1099511627776}",
        ),
    ];
    for (arg, value, reason) in cases {
        expect_refused(
            &mut c,
            &format!("{arg} = {value:?}"),
            table(&[(arg, value)]),
            |q| invalid(arg, q, reason),
        )
        .await;
    }
}

#[tokio::test]
async fn string_and_boolean_arguments() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    let dlx = ("x-dead-letter-exchange", s("dlx"));
    let cases: Vec<(&str, Args, &str, &str)> = vec![
        (
            "overflow bogus",
            vec![("x-overflow", s("bogus"))],
            "x-overflow",
            "invalid_overflow",
        ),
        (
            "overflow empty",
            vec![("x-overflow", s(""))],
            "x-overflow",
            "invalid_overflow",
        ),
        (
            "overflow int",
            vec![("x-overflow", int(1))],
            "x-overflow",
            "{unacceptable_type,signedint}",
        ),
        (
            "overflow bool",
            vec![("x-overflow", AMQPValue::Boolean(true))],
            "x-overflow",
            "{unacceptable_type,bool}",
        ),
        (
            "dlrk without dlx",
            vec![("x-dead-letter-routing-key", s("k"))],
            "x-dead-letter-routing-key",
            "routing_key_but_no_dlx_defined",
        ),
        (
            "dlrk int without dlx",
            vec![("x-dead-letter-routing-key", int(1))],
            "x-dead-letter-routing-key",
            "{unacceptable_type,signedint}",
        ),
        (
            "dlrk bool with dlx",
            vec![
                dlx.clone(),
                ("x-dead-letter-routing-key", AMQPValue::Boolean(true)),
            ],
            "x-dead-letter-routing-key",
            "{unacceptable_type,bool}",
        ),
        (
            "sac string",
            vec![("x-single-active-consumer", s("true"))],
            "x-single-active-consumer",
            "{unacceptable_type,longstr}",
        ),
        (
            "sac int",
            vec![("x-single-active-consumer", int(1))],
            "x-single-active-consumer",
            "{unacceptable_type,signedint}",
        ),
        (
            "mode bogus",
            vec![("x-queue-mode", s("bogus"))],
            "x-queue-mode",
            "\"unsupported queue mode 'bogus'\"",
        ),
        (
            "mode int",
            vec![("x-queue-mode", int(1))],
            "x-queue-mode",
            "{unacceptable_type,signedint}",
        ),
        (
            "type bogus",
            vec![("x-queue-type", s("bogus"))],
            "x-queue-type",
            "\"unsupported queue type 'bogus'\"",
        ),
        (
            "type empty",
            vec![("x-queue-type", s(""))],
            "x-queue-type",
            "\"unsupported queue type ''\"",
        ),
        (
            "type int",
            vec![("x-queue-type", int(1))],
            "x-queue-type",
            "{unacceptable_type,signedint}",
        ),
        (
            "type bool",
            vec![("x-queue-type", AMQPValue::Boolean(false))],
            "x-queue-type",
            "{unacceptable_type,bool}",
        ),
    ];
    for (case, args, arg, reason) in cases {
        expect_refused(&mut c, case, table(&args), |q| invalid(arg, q, reason)).await;
    }
}

#[tokio::test]
async fn dead_letter_exchange_must_be_a_string() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    for (type_name, value) in [
        ("signedint", int(1)),
        ("bool", AMQPValue::Boolean(true)),
        ("binary", AMQPValue::ByteArray(b"dlx".to_vec().into())),
    ] {
        // The channel's own check, with a text unlike the other arguments'.
        expect_refused(&mut c, type_name, table(&[("x-dead-letter-exchange", value)]), |q| {
            format!("PRECONDITION_FAILED - invalid type '{type_name}' for arg 'x-dead-letter-exchange' in queue '{q}' in vhost '/'")
        })
        .await;
    }
}

#[tokio::test]
async fn consumer_timeout_is_validated_by_hare_only() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    for value in [
        int(0),
        AMQPValue::LongLongInt(60_000),
        AMQPValue::ShortUInt(5),
    ] {
        let got = c
            .declare(
                &unique("args"),
                table(&[("x-consumer-timeout", value.clone())]),
                EXCLUSIVE,
            )
            .await;
        assert!(
            matches!(got, Reply::Ok(_)),
            "x-consumer-timeout {value:?}: {got:?}"
        );
    }
    // RabbitMQ 3.10 ignores x-consumer-timeout entirely; Hare honours it and
    // so refuses what it cannot use, in the style of the other integers.
    if !broker.is_hare() {
        return;
    }
    let cases = [
        (s("60000"), "\"expected integer, got longstr\"".to_string()),
        (
            AMQPValue::Double(1.5),
            "\"expected integer, got double\"".to_string(),
        ),
        (int(-1), "{value_negative,-1}".to_string()),
    ];
    for (value, reason) in cases {
        expect_refused(
            &mut c,
            &format!("x-consumer-timeout {value:?}"),
            table(&[("x-consumer-timeout", value)]),
            |q| invalid("x-consumer-timeout", q, &reason),
        )
        .await;
    }
}

#[tokio::test]
async fn every_valid_form_is_accepted() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    let mut cases: Vec<(String, FieldTable)> = Vec::new();
    for arg in INTEGER_ARGS {
        for (type_name, value) in integer_widths() {
            cases.push((format!("{arg} as {type_name}"), table(&[(arg, value)])));
        }
    }
    let more: Vec<(&str, &str, AMQPValue)> = vec![
        ("ttl 0", "x-message-ttl", int(0)),
        (
            "ttl max",
            "x-message-ttl",
            AMQPValue::LongLongInt(MAX_EXPIRY),
        ),
        (
            "expires max",
            "x-expires",
            AMQPValue::LongLongInt(MAX_EXPIRY),
        ),
        ("max-length 0", "x-max-length", int(0)),
        (
            "max-length huge",
            "x-max-length",
            AMQPValue::LongLongInt(1 << 40),
        ),
        ("max-length-bytes 0", "x-max-length-bytes", int(0)),
        ("max-priority 0", "x-max-priority", int(0)),
        ("max-priority 255", "x-max-priority", int(255)),
        ("drop-head", "x-overflow", s("drop-head")),
        ("reject-publish", "x-overflow", s("reject-publish")),
        ("reject-publish-dlx", "x-overflow", s("reject-publish-dlx")),
        ("dlx", "x-dead-letter-exchange", s("dlx")),
        ("dlx empty", "x-dead-letter-exchange", s("")),
        (
            "dlx missing exchange",
            "x-dead-letter-exchange",
            s("no-such-exchange"),
        ),
        (
            "sac true",
            "x-single-active-consumer",
            AMQPValue::Boolean(true),
        ),
        (
            "sac false",
            "x-single-active-consumer",
            AMQPValue::Boolean(false),
        ),
        ("mode default", "x-queue-mode", s("default")),
        ("mode lazy", "x-queue-mode", s("lazy")),
        ("type classic", "x-queue-type", s("classic")),
        ("unknown argument", "x-no-such-argument", s("whatever")),
    ];
    for (case, arg, value) in more {
        cases.push((case.to_string(), table(&[(arg, value)])));
    }
    cases.push((
        "dlx with routing key".to_string(),
        table(&[
            ("x-dead-letter-exchange", s("dlx")),
            ("x-dead-letter-routing-key", s("k")),
        ]),
    ));
    for (case, args) in cases {
        let got = c.declare(&unique("args"), args, EXCLUSIVE).await;
        assert!(matches!(got, Reply::Ok(_)), "case {case}: {got:?}");
    }
}

/// With several bad arguments RabbitMQ names them in a fixed order.
#[tokio::test]
async fn bad_arguments_are_reported_in_rabbitmq_order() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    let mut bad: Vec<(&str, AMQPValue)> = vec![
        ("x-single-active-consumer", s("a")),
        ("x-queue-mode", s("bogus")),
        ("x-overflow", s("bogus")),
        ("x-max-priority", s("a")),
        ("x-max-length-bytes", s("a")),
        ("x-max-length", s("a")),
        ("x-dead-letter-routing-key", int(1)),
        ("x-message-ttl", s("a")),
        ("x-expires", s("a")),
        ("x-queue-type", s("bogus")),
        ("x-dead-letter-exchange", int(1)),
    ];
    while let Some((first, _)) = bad.last().cloned() {
        let q = unique("args");
        let got = c.declare(&q, table(&bad), EXCLUSIVE).await;
        match got {
            Reply::ChannelClose(406, text, 50, 10) => assert!(
                text.contains(&format!("arg '{first}' ")),
                "with {} bad arguments, expected {first} first: {text}",
                bad.len()
            ),
            other => panic!("expected 406 naming {first}, got {other:?}"),
        }
        bad.pop();
    }
}

#[tokio::test]
async fn redeclare_compares_instead_of_validating() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    let q = unique("args");
    let ttl = |v: AMQPValue| table(&[("x-message-ttl", v)]);
    assert!(matches!(
        c.declare(&q, ttl(int(1000)), EXCLUSIVE).await,
        Reply::Ok(_)
    ));
    let inequivalent = |arg: &str, detail: &str| {
        precondition(format!(
            "PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{q}' in vhost '/': {detail}"
        ))
    };
    let cases: Vec<(&str, FieldTable, Reply)> = vec![
        (
            "same value, other width",
            ttl(AMQPValue::LongLongInt(1000)),
            Reply::Ok(q.clone()),
        ),
        (
            "other value",
            ttl(int(2000)),
            inequivalent("x-message-ttl", "received '2000' but current is '1000'"),
        ),
        (
            "invalid value",
            ttl(int(-1)),
            inequivalent("x-message-ttl", "received '-1' but current is '1000'"),
        ),
        (
            "invalid type",
            ttl(s("abc")),
            inequivalent("x-message-ttl", "received 'abc' but current is '1000'"),
        ),
        (
            "invalid new argument",
            table(&[("x-message-ttl", int(1000)), ("x-expires", int(0))]),
            inequivalent(
                "x-expires",
                "received the value '0' of type 'signedint' but current is none",
            ),
        ),
        (
            "dlx of a wrong type",
            table(&[
                ("x-message-ttl", int(1000)),
                ("x-dead-letter-exchange", int(1)),
            ]),
            inequivalent(
                "x-dead-letter-exchange",
                "received the value '1' of type 'signedint' but current is none",
            ),
        ),
        (
            "missing argument",
            table(&[]),
            inequivalent(
                "x-message-ttl",
                "received none but current is the value '1000' of type 'signedint'",
            ),
        ),
    ];
    for (case, args, expected) in cases {
        assert_eq!(
            c.declare(&q, args, EXCLUSIVE).await,
            expected,
            "case: {case}"
        );
    }
    // A passive declare checks neither validity nor equivalence.
    let passive = Flags {
        passive: true,
        ..EXCLUSIVE
    };
    for (case, args) in [
        ("bad ttl", ttl(int(-1))),
        ("bad type", table(&[("x-queue-type", s("bogus"))])),
    ] {
        assert_eq!(
            c.declare(&q, args, passive).await,
            Reply::Ok(q.clone()),
            "passive, {case}"
        );
    }
    let missing = unique("args");
    assert_eq!(
        c.declare(&missing, ttl(int(-1)), passive).await,
        Reply::ChannelClose(
            404,
            format!("NOT_FOUND - no queue '{missing}' in vhost '/'"),
            50,
            10
        ),
        "passive declare of a missing queue"
    );
}

#[tokio::test]
async fn every_kind_of_new_queue_is_validated() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    let bad = || table(&[("x-message-ttl", int(-1))]);
    for (case, flags) in [
        ("exclusive", EXCLUSIVE),
        ("transient", Flags::default()),
        (
            "durable",
            Flags {
                durable: true,
                ..Flags::default()
            },
        ),
    ] {
        let q = unique("args");
        assert_eq!(
            c.declare(&q, bad(), flags).await,
            precondition(invalid("x-message-ttl", &q, "{value_negative,-1}")),
            "case: {case}"
        );
    }
    match c.declare("", bad(), EXCLUSIVE).await {
        Reply::ChannelClose(406, text, 50, 10) => assert_text(
            &text,
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'amq.gen-*' in vhost '/': {value_negative,-1}",
        ),
        other => panic!("server-named queue: {other:?}"),
    }
    // The reserved-name check comes first.
    assert_eq!(
        c.declare("amq.args-test", bad(), EXCLUSIVE).await,
        Reply::ChannelClose(
            403,
            "ACCESS_REFUSED - queue name 'amq.args-test' contains reserved prefix 'amq.*'".into(),
            50,
            10
        )
    );
}

#[tokio::test]
async fn alternate_exchange_must_be_a_string() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    for (type_name, value) in [
        ("signedint", int(1)),
        ("bool", AMQPValue::Boolean(true)),
        ("binary", AMQPValue::ByteArray(b"ae".to_vec().into())),
    ] {
        let e = unique("args-ex");
        assert_eq!(
            c.declare_exchange(&e, "direct", table(&[("alternate-exchange", value)])).await,
            Reply::ChannelClose(
                406,
                format!("PRECONDITION_FAILED - invalid type '{type_name}' for arg 'alternate-exchange' in exchange '{e}' in vhost '/'"),
                40,
                10
            ),
            "alternate-exchange as {type_name}"
        );
    }
    // Valid, even naming no exchange; a redeclare compares instead of validating.
    for (case, ae) in [("empty", ""), ("missing exchange", "no-such-exchange")] {
        let e = unique("args-ex");
        let got = c
            .declare_exchange(&e, "direct", table(&[("alternate-exchange", s(ae))]))
            .await;
        assert_eq!(got, Reply::Ok(String::new()), "alternate-exchange {case}");
        let got = c
            .declare_exchange(&e, "direct", table(&[("alternate-exchange", int(1))]))
            .await;
        assert_eq!(
            got,
            Reply::ChannelClose(
                406,
                format!("PRECONDITION_FAILED - inequivalent arg 'alternate-exchange' for exchange '{e}' in vhost '/': received '1' but current is '{ae}'"),
                40,
                10
            ),
            "redeclare, alternate-exchange {case}"
        );
        c.delete_exchange(&e).await;
    }
}

#[tokio::test]
async fn delayed_message_exchange_needs_a_delayed_type() {
    // Hare only: the RabbitMQ reference has no delayed-message plugin (it
    // answers 503 "unknown exchange type"). The text is the plugin's.
    let broker = TestBroker::start();
    if !broker.is_hare() {
        return;
    }
    let mut c = Client::open(&broker).await;
    let text = "PRECONDITION_FAILED - Invalid argument, 'x-delayed-type' must be an existing exchange type";
    for (case, args) in [
        ("missing", table(&[])),
        ("unknown type", table(&[("x-delayed-type", s("bogus"))])),
        (
            "itself",
            table(&[("x-delayed-type", s("x-delayed-message"))]),
        ),
        ("not a string", table(&[("x-delayed-type", int(1))])),
    ] {
        assert_eq!(
            c.declare_exchange(&unique("args-ex"), "x-delayed-message", args)
                .await,
            Reply::ChannelClose(406, text.into(), 40, 10),
            "x-delayed-type {case}"
        );
    }
}

#[tokio::test]
async fn consumer_priority_must_be_an_integer() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    let q = unique("args");
    assert!(matches!(
        c.declare(&q, table(&[]), EXCLUSIVE).await,
        Reply::Ok(_)
    ));
    for (type_name, value) in non_integers() {
        assert_eq!(
            c.consume(&q, table(&[("x-priority", value)])).await,
            Reply::ChannelClose(
                406,
                invalid(
                    "x-priority",
                    &q,
                    &format!("\"expected integer, got {type_name}\"")
                ),
                60,
                20
            ),
            "x-priority as {type_name}"
        );
    }
    // Any integer, of any width and size, is a priority.
    let mut valid = integer_widths();
    valid.extend([
        ("negative", int(-1)),
        ("huge", AMQPValue::LongLongInt(1 << 40)),
        ("very negative", AMQPValue::LongLongInt(i64::MIN)),
    ]);
    for (case, value) in valid {
        let got = c.consume(&q, table(&[("x-priority", value)])).await;
        assert!(matches!(got, Reply::Ok(_)), "x-priority {case}: {got:?}");
    }
    // The queue is looked up first.
    let missing = unique("args");
    assert_eq!(
        c.consume(&missing, table(&[("x-priority", s("a"))])).await,
        Reply::ChannelClose(
            404,
            format!("NOT_FOUND - no queue '{missing}' in vhost '/'"),
            60,
            20
        )
    );
}

#[tokio::test]
async fn expiration_must_be_a_non_negative_integer() {
    let broker = TestBroker::start();
    let mut c = Client::open(&broker).await;
    let q = unique("args");
    assert!(matches!(
        c.declare(&q, table(&[]), EXCLUSIVE).await,
        Reply::Ok(_)
    ));
    let pad = |n: usize| " ".repeat(n);
    let cases: Vec<(&str, String)> = vec![
        ("abc", "no_integer".into()),
        ("", "no_integer".into()),
        (" 10", "no_integer".into()),
        ("-", "no_integer".into()),
        ("-1", "{value_negative,-1}".into()),
        ("-0007", "{value_negative,-7}".into()),
        ("1.5", "{leftover_string,\".5\"}".into()),
        ("-1.5", "{leftover_string,\".5\"}".into()),
        ("10 ", "{leftover_string,\" \"}".into()),
        ("1e3", "{leftover_string,\"e3\"}".into()),
        ("1\"x", "{leftover_string,\"\\\"x\"}".into()),
        ("1\n", "{leftover_string,\"\\n\"}".into()),
        ("1\u{1}", "{leftover_string,[1]}".into()),
        ("315360000001", "{value_too_large,315360000001}".into()),
        // Erlang's ~p wraps a term that would pass column 78.
        (
            "99999999999999999999",
            format!("{{value_too_large,\n{}99999999999999999999}}", pad(44)),
        ),
        (
            "-99999999999999999999",
            format!("{{value_negative,\n{}-99999999999999999999}}", pad(45)),
        ),
    ];
    for (expiration, reason) in cases {
        assert_eq!(
            c.publish_expiring("", &q, expiration).await,
            Reply::ChannelClose(
                406,
                format!("PRECONDITION_FAILED - invalid expiration '{expiration}': {reason}"),
                60,
                40
            ),
            "expiration {expiration:?}"
        );
    }
    // Texts over 255 bytes are cut to 252 and `...`.
    let long = format!("1{}", "x".repeat(101));
    let full = format!(
        "PRECONDITION_FAILED - invalid expiration '{long}': {{leftover_string,\n{}\"{}\"}}",
        pad(20 + long.len() + 3 + 1),
        &long[1..]
    );
    assert_eq!(
        c.publish_expiring("", &q, &long).await,
        Reply::ChannelClose(406, format!("{}...", &full[..252]), 60, 40),
        "long expiration"
    );
    for expiration in ["0", "60000", "+5", "007", "-0", "315360000000"] {
        assert_eq!(
            c.publish_expiring("", &q, expiration).await,
            Reply::Ok(String::new()),
            "expiration {expiration:?}"
        );
    }
    // The exchange is looked up first.
    let missing = unique("args-ex");
    assert_eq!(
        c.publish_expiring(&missing, "k", "abc").await,
        Reply::ChannelClose(
            404,
            format!("NOT_FOUND - no exchange '{missing}' in vhost '/'"),
            60,
            40
        )
    );
}
