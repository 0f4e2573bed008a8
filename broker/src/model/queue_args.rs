//! Validation of the optional arguments clients pass to queue.declare,
//! exchange.declare and basic.consume, and of a message's `expiration`.
//!
//! Clients learn about a typo in an argument only from the channel.close it
//! earns, so every check reproduces RabbitMQ 3.10's reply: 406 with its text,
//! which embeds the reason as an Erlang term (`{value_negative,-1}`,
//! `"expected integer, got longstr"`). Checks run in RabbitMQ's order, so a
//! declare with several bad arguments names the same one. Only validation
//! lives here; the features (TTL, dead-lettering...) use the parsed values.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable};

use super::args;
use crate::error::{AmqpError, AmqpResult};

/// RabbitMQ's ceiling for TTLs and expiries: ten years in milliseconds.
const MAX_EXPIRY_MS: u64 = 315_360_000_000;

/// What a full queue does with one more message (`x-overflow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// The queue type a declare names with `x-queue-type` (absent means classic).
///
/// Hare has one queue implementation; a quorum queue is an ordinary durable
/// queue on this one node, with no replication. The type only decides what
/// RabbitMQ 3.10 would decide for it: which arguments a declare may carry,
/// that the queue must be durable, and the quorum delivery features
/// (`x-delivery-count`, `x-delivery-limit`) clients written for clusters use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

impl QueueType {
    /// The type an argument table names. Only valid names get stored, so
    /// anything but `quorum` is classic.
    pub fn of(arguments: &FieldTable) -> QueueType {
        match arguments.inner().get("x-queue-type").and_then(args::text) {
            Some(t) if t == "quorum" => QueueType::Quorum,
            _ => QueueType::Classic,
        }
    }

    /// RabbitMQ's module for the type, as its error texts name it.
    fn module(self) -> &'static str {
        match self {
            QueueType::Classic => "rabbit_classic_queue",
            QueueType::Quorum => "rabbit_quorum_queue",
        }
    }

    /// Arguments RabbitMQ 3.10 refuses for this type whatever their value
    /// (they belong to another type). Streams' own are refused by both.
    fn refused_args(self) -> &'static [&'static str] {
        match self {
            QueueType::Classic => &[
                "x-delivery-limit",
                "x-dead-letter-strategy",
                "x-max-in-memory-length",
                "x-max-in-memory-bytes",
                "x-quorum-initial-group-size",
                "x-queue-leader-locator",
                "x-max-age",
                "x-stream-max-segment-size-bytes",
                "x-initial-cluster-size",
            ],
            QueueType::Quorum => &[
                "x-max-priority",
                "x-queue-mode",
                "x-queue-master-locator",
                "x-max-age",
                "x-stream-max-segment-size-bytes",
                "x-initial-cluster-size",
            ],
        }
    }

    fn refuses(self, arg: &str) -> bool {
        self.refused_args().contains(&arg)
    }
}

/// The queue arguments Hare understands, parsed and checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueArgs {
    pub queue_type: QueueType,
    /// `x-message-ttl`, ms (0 is allowed: expire unless delivered at once).
    pub message_ttl: Option<u64>,
    /// `x-expires`, ms; never 0 (RabbitMQ refuses it).
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<String>,
    /// Only present together with `dead_letter_exchange`.
    pub dead_letter_routing_key: Option<String>,
    /// 1..=255; RabbitMQ accepts 0, which behaves as no priorities (`None`).
    pub max_priority: Option<u8>,
    pub single_active_consumer: bool,
    /// `x-consumer-timeout`, ms. RabbitMQ 3.10 ignores it; Hare honours it.
    pub consumer_timeout: Option<u64>,
    /// Quorum queues' `x-delivery-limit`: a message returned to the queue
    /// more often than this is dead-lettered (reason `delivery_limit`).
    /// RabbitMQ 3.10 takes any value: a negative one acts as 0, a
    /// non-integer as no limit.
    pub delivery_limit: Option<u64>,
}

/// Why a value is refused, printed as RabbitMQ prints the Erlang term.
enum Reason {
    /// `"expected integer, got <type>"` (an Erlang string, quotes included).
    NotInteger(&'static str),
    UnacceptableType(&'static str),
    Negative(i128),
    Zero,
    TooLarge(i128),
    MaxExceeded(i128),
    /// A bare atom such as `invalid_overflow`.
    Atom(&'static str),
    /// An Erlang string such as `"unsupported queue mode 'x'"`.
    Text(String),
}

impl Reason {
    fn term(&self) -> String {
        match self {
            Reason::NotInteger(t) => format!("\"expected integer, got {t}\""),
            Reason::UnacceptableType(t) => format!("{{unacceptable_type,{t}}}"),
            Reason::Negative(n) => format!("{{value_negative,{n}}}"),
            Reason::Zero => "{value_zero,0}".to_owned(),
            Reason::TooLarge(n) => format!("{{value_too_large,{n}}}"),
            Reason::MaxExceeded(n) => format!("{{max_value_exceeded,{n}}}"),
            Reason::Atom(a) => (*a).to_owned(),
            Reason::Text(s) => erlang_string(s.as_bytes()),
        }
    }
}

/// The queue-side context of an error text: `for queue 'q' in vhost '/'`.
struct Target<'a> {
    queue: &'a str,
    vhost: &'a str,
}

impl Target<'_> {
    fn invalid(&self, arg: &str, reason: Reason) -> AmqpError {
        AmqpError::precondition(format!(
            "invalid arg '{arg}' for queue '{}' in vhost '{}': {}",
            self.queue,
            self.vhost,
            reason.term()
        ))
    }
}

/// An integer of any AMQP width; RabbitMQ refuses floats, decimals, timestamps.
fn integer(value: &AMQPValue) -> Result<i128, Reason> {
    args::integer(value).ok_or_else(|| Reason::NotInteger(args::type_name(value)))
}

fn non_negative(value: &AMQPValue) -> Result<u64, Reason> {
    let n = integer(value)?;
    if n < 0 {
        return Err(Reason::Negative(n));
    }
    Ok(n as u64)
}

/// TTLs and expiries: non-negative and at most ten years.
fn expiry(value: &AMQPValue) -> Result<u64, Reason> {
    let n = non_negative(value)?;
    if n > MAX_EXPIRY_MS {
        return Err(Reason::TooLarge(n.into()));
    }
    Ok(n)
}

fn long_string(value: &AMQPValue) -> Result<String, Reason> {
    match value {
        AMQPValue::LongString(_) => Ok(args::text(value).unwrap_or_default()),
        other => Err(Reason::UnacceptableType(args::type_name(other))),
    }
}

impl QueueArgs {
    /// Checks the arguments of a queue.declare that creates `queue` (RabbitMQ
    /// checks neither a redeclare, which only compares, nor a passive declare).
    /// Errors carry RabbitMQ's code and text for the named queue.
    pub fn parse(arguments: &FieldTable, queue: &str, vhost: &str) -> AmqpResult<QueueArgs> {
        let target = Target { queue, vhost };
        let table = arguments.inner();
        let get = |name: &str| table.get(name);
        let mut parsed = QueueArgs::default();

        // The channel checks the DLX's type before the queue's validators run,
        // with a text of its own.
        if let Some(v) = get("x-dead-letter-exchange") {
            match long_string(v) {
                Ok(name) => parsed.dead_letter_exchange = Some(name),
                Err(_) => {
                    return Err(AmqpError::precondition(format!(
                        "invalid type '{}' for arg 'x-dead-letter-exchange' in queue '{queue}' in vhost '{vhost}'",
                        args::type_name(v)
                    )))
                }
            }
        }
        // Then RabbitMQ's validators, in its order.
        let check = |arg: &str, f: &dyn Fn(&AMQPValue) -> Result<(), Reason>| match get(arg) {
            Some(v) => f(v).map_err(|r| target.invalid(arg, r)),
            None => Ok(()),
        };
        check("x-queue-type", &|v| match long_string(v)?.as_str() {
            // Quorum queues are accepted (see `QueueType`); streams are a
            // different kind of log that Hare does not have, so a stream
            // is refused as RabbitMQ refuses a type it does not know.
            "classic" | "quorum" => Ok(()),
            other => Err(Reason::Text(format!("unsupported queue type '{other}'"))),
        })?;
        let kind = QueueType::of(arguments);
        parsed.queue_type = kind;
        // An argument the type refuses is not validated first: its value is moot.
        let check = |arg: &str, f: &dyn Fn(&AMQPValue) -> Result<(), Reason>| {
            if kind.refuses(arg) {
                return Ok(());
            }
            check(arg, f)
        };
        if let Some(v) = get("x-expires") {
            parsed.expires = Some(
                expiry(v)
                    .and_then(|n| if n == 0 { Err(Reason::Zero) } else { Ok(n) })
                    .map_err(|r| target.invalid("x-expires", r))?,
            );
        }
        if let Some(v) = get("x-message-ttl") {
            parsed.message_ttl = Some(expiry(v).map_err(|r| target.invalid("x-message-ttl", r))?);
        }
        if let Some(v) = get("x-dead-letter-routing-key") {
            let key = long_string(v).map_err(|r| target.invalid("x-dead-letter-routing-key", r))?;
            if parsed.dead_letter_exchange.is_none() {
                return Err(target.invalid(
                    "x-dead-letter-routing-key",
                    Reason::Atom("routing_key_but_no_dlx_defined"),
                ));
            }
            parsed.dead_letter_routing_key = Some(key);
        }
        if let Some(v) = get("x-max-length") {
            parsed.max_length =
                Some(non_negative(v).map_err(|r| target.invalid("x-max-length", r))?);
        }
        if let Some(v) = get("x-max-length-bytes") {
            parsed.max_length_bytes =
                Some(non_negative(v).map_err(|r| target.invalid("x-max-length-bytes", r))?);
        }
        for arg in ["x-max-in-memory-length", "x-max-in-memory-bytes"] {
            // Quorum queues' memory caps; Hare's store pages out by itself.
            check(arg, &|v| non_negative(v).map(drop))?;
        }
        if let Some(v) = get("x-max-priority").filter(|_| !kind.refuses("x-max-priority")) {
            let n = non_negative(v)
                .and_then(|n| u8::try_from(n).map_err(|_| Reason::MaxExceeded(n.into())))
                .map_err(|r| target.invalid("x-max-priority", r))?;
            parsed.max_priority = (n > 0).then_some(n);
        }
        if let Some(v) = get("x-overflow") {
            parsed.overflow = match long_string(v)
                .map_err(|r| target.invalid("x-overflow", r))?
                .as_str()
            {
                "drop-head" => Overflow::DropHead,
                "reject-publish" => Overflow::RejectPublish,
                // RabbitMQ 3.10's quorum queues accept it but drop from the
                // head (dead-lettering) as with drop-head.
                "reject-publish-dlx" if kind == QueueType::Quorum => Overflow::DropHead,
                "reject-publish-dlx" => Overflow::RejectPublishDlx,
                _ => return Err(target.invalid("x-overflow", Reason::Atom("invalid_overflow"))),
            };
        }
        check("x-queue-mode", &|v| match long_string(v)?.as_str() {
            // Lazy is a storage hint; Hare's store pages out by itself.
            "default" | "lazy" => Ok(()),
            other => Err(Reason::Text(format!("unsupported queue mode '{other}'"))),
        })?;
        if let Some(v) = get("x-single-active-consumer") {
            parsed.single_active_consumer = match v {
                AMQPValue::Boolean(b) => *b,
                other => {
                    return Err(target.invalid(
                        "x-single-active-consumer",
                        Reason::UnacceptableType(args::type_name(other)),
                    ))
                }
            };
        }
        check("x-quorum-initial-group-size", &|v| match non_negative(v)? {
            // One node whatever the size asked for: there is nothing to replicate to.
            0 => Err(Reason::Zero),
            _ => Ok(()),
        })?;
        check(
            "x-dead-letter-strategy",
            &|v| match long_string(v)?.as_str() {
                // Hare's dead-lettering never loses a message in between, so
                // both strategies behave as at-least-once.
                "at-most-once" | "at-least-once" => Ok(()),
                _ => Err(Reason::Atom("invalid_dlx_strategy")),
            },
        )?;
        check(
            "x-queue-leader-locator",
            &|v| match long_string(v)?.as_str() {
                // Where a leader goes matters only in a cluster.
                "client-local" | "random" | "least-leaders" | "balanced" => Ok(()),
                _ => Err(Reason::Atom("invalid_queue_locator_arg")),
            },
        )?;
        if kind == QueueType::Quorum {
            parsed.delivery_limit = get("x-delivery-limit")
                .and_then(args::integer)
                .map(|n| n.clamp(0, u64::MAX.into()) as u64);
        }
        // Arguments of another queue type, in the table's (sorted) order;
        // RabbitMQ names the first in the order the client sent them.
        if let Some(arg) = table.keys().find(|k| kind.refuses(k.as_str())) {
            return Err(AmqpError::precondition(format!(
                "invalid arg '{arg}' for queue '{queue}' in vhost '{vhost}' of queue type {}",
                kind.module()
            )));
        }
        // Hare's own: RabbitMQ 3.10 ignores it; refused like the other integers.
        if let Some(v) = get("x-consumer-timeout") {
            parsed.consumer_timeout =
                Some(non_negative(v).map_err(|r| target.invalid("x-consumer-timeout", r))?);
        }
        Ok(parsed)
    }
}

/// The declare's properties a queue type refuses, checked after its
/// arguments. A quorum queue must be durable and outlive its declarer's
/// connection and consumers, as RabbitMQ 3.10 requires (Hare could do
/// otherwise, but clients must not come to depend on it).
pub fn check_properties(
    kind: QueueType,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    queue: &str,
    vhost: &str,
) -> AmqpResult<()> {
    if kind != QueueType::Quorum {
        return Ok(());
    }
    let refused = if auto_delete {
        "auto-delete"
    } else if exclusive {
        "exclusive-owner"
    } else if !durable {
        "non-durable"
    } else {
        return Ok(());
    };
    Err(AmqpError::precondition(format!(
        "invalid property '{refused}' for queue '{queue}' in vhost '{vhost}'"
    )))
}

/// basic.consume's `x-priority` (default 0). RabbitMQ takes any integer,
/// however large, and refuses every other type.
pub fn consumer_priority(arguments: &FieldTable, queue: &str, vhost: &str) -> AmqpResult<i64> {
    match arguments.inner().get("x-priority") {
        None => Ok(0),
        Some(v) => integer(v)
            // Every AMQP integer width fits: the widest, `long`, is an i64.
            .map(|n| n as i64)
            .map_err(|r| Target { queue, vhost }.invalid("x-priority", r)),
    }
}

/// The `expiration` property in ms; `Ok(None)` when absent.
///
/// RabbitMQ reads it like Erlang's `string:to_integer`: an optional sign and
/// digits (leading zeros are fine), nothing after them, not negative, at most
/// ten years. The error is raised when the content is complete, so the
/// channel adds basic.publish as the failing method.
pub fn message_expiration(properties: &BasicProperties) -> AmqpResult<Option<u64>> {
    let Some(raw) = properties.expiration() else {
        return Ok(None);
    };
    let raw = raw.as_str();
    let bytes = raw.as_bytes();
    let sign_len = usize::from(matches!(bytes.first(), Some(b'+' | b'-')));
    let digits_len = bytes[sign_len..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let fail = |reason: (&str, String)| {
        let prefix = format!("invalid expiration '{raw}': ");
        let term = erlang_tuple(prefix.len(), reason.0, &reason.1);
        Err(AmqpError::precondition(format!("{prefix}{term}")))
    };
    if digits_len == 0 {
        return Err(AmqpError::precondition(format!(
            "invalid expiration '{raw}': no_integer"
        )));
    }
    let rest = &bytes[sign_len + digits_len..];
    if !rest.is_empty() {
        return fail(("leftover_string", erlang_string(rest)));
    }
    // Arbitrarily long digit strings: compare as text, print without zeros.
    let digits = raw[sign_len..].trim_start_matches('0');
    let digits = if digits.is_empty() { "0" } else { digits };
    if bytes[0] == b'-' && digits != "0" {
        return fail(("value_negative", format!("-{digits}")));
    }
    match digits.parse::<u64>() {
        Ok(ms) if ms <= MAX_EXPIRY_MS => Ok(Some(ms)),
        _ => fail(("value_too_large", digits.to_owned())),
    }
}

/// Exchange arguments: `alternate-exchange` must be a string, and type
/// `x-delayed-message` (the delayed-message plugin's) needs `x-delayed-type`
/// naming a built-in type. Checked only when the exchange is created.
pub fn check_exchange_args(
    kind: &str,
    arguments: &FieldTable,
    exchange: &str,
    vhost: &str,
) -> AmqpResult<()> {
    let table = arguments.inner();
    if let Some(v) = table.get("alternate-exchange") {
        if !matches!(v, AMQPValue::LongString(_)) {
            return Err(AmqpError::precondition(format!(
                "invalid type '{}' for arg 'alternate-exchange' in exchange '{exchange}' in vhost '{vhost}'",
                args::type_name(v)
            )));
        }
    }
    if kind == "x-delayed-message" {
        let delayed = match table.get("x-delayed-type") {
            Some(v @ AMQPValue::LongString(_)) => args::text(v),
            _ => None,
        };
        if !matches!(
            delayed.as_deref(),
            Some("direct" | "fanout" | "topic" | "headers")
        ) {
            // The plugin's own text (rabbitmq-delayed-message-exchange).
            return Err(AmqpError::precondition(
                "Invalid argument, 'x-delayed-type' must be an existing exchange type",
            ));
        }
    }
    Ok(())
}

/// `{tag,value}` as Erlang's `~p` lays it out after `column` characters of
/// text: when it would pass column 78, the value moves to its own line,
/// aligned after the brace.
fn erlang_tuple(column: usize, tag: &str, value: &str) -> String {
    let one_line = format!("{{{tag},{value}}}");
    if column + one_line.len() <= 78 {
        one_line
    } else {
        format!("{{{tag},\n{}{value}}}", " ".repeat(column + 1))
    }
}

/// A byte string as Erlang's `~p` prints a list: quoted with escapes when
/// every byte is printable Latin-1, else as a list of integers.
fn erlang_string(bytes: &[u8]) -> String {
    let escape = |b: u8| -> Option<&'static [u8]> {
        Some(match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x0b => b"\\v",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x1b => b"\\e",
            _ => return None,
        })
    };
    let printable = |b: u8| matches!(b, 32..=126 | 160..=255) || escape(b).is_some();
    if !bytes.iter().all(|&b| printable(b)) {
        let items: Vec<String> = bytes.iter().map(u8::to_string).collect();
        return format!("[{}]", items.join(","));
    }
    let mut out = vec![b'"'];
    for &b in bytes {
        match escape(b) {
            Some(e) => out.extend_from_slice(e),
            None => out.push(b),
        }
    }
    out.push(b'"');
    // The bytes came from a UTF-8 string and escapes are ASCII.
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(kv: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in kv {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn text(kv: &[(&str, AMQPValue)]) -> String {
        QueueArgs::parse(&table(kv), "q", "/").unwrap_err().text
    }

    #[test]
    fn parses_valid_arguments() {
        let a = QueueArgs::parse(
            &table(&[
                ("x-message-ttl", AMQPValue::ShortShortUInt(5)),
                ("x-expires", AMQPValue::LongLongInt(1000)),
                ("x-max-priority", AMQPValue::LongInt(0)),
                ("x-overflow", AMQPValue::LongString("reject-publish".into())),
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString("dlx".into()),
                ),
                (
                    "x-dead-letter-routing-key",
                    AMQPValue::LongString("k".into()),
                ),
            ]),
            "q",
            "/",
        )
        .unwrap();
        assert_eq!(a.message_ttl, Some(5));
        assert_eq!(a.expires, Some(1000));
        assert_eq!(a.max_priority, None);
        assert_eq!(a.overflow, Overflow::RejectPublish);
        assert_eq!(a.dead_letter_routing_key.as_deref(), Some("k"));
    }

    #[test]
    fn reports_rabbitmq_terms() {
        let t = text(&[("x-expires", AMQPValue::LongInt(0))]);
        assert!(
            t.ends_with("'x-expires' for queue 'q' in vhost '/': {value_zero,0}"),
            "{t}"
        );
        let t = text(&[("x-max-priority", AMQPValue::LongInt(256))]);
        assert!(t.ends_with("{max_value_exceeded,256}"), "{t}");
        let t = text(&[("x-queue-mode", AMQPValue::LongString("a\"b".into()))]);
        assert!(t.ends_with(r#""unsupported queue mode 'a\"b'""#), "{t}");
    }

    #[test]
    fn quorum_arguments_follow_the_type() {
        let quorum = |kv: &[(&str, AMQPValue)]| {
            let mut t = table(kv);
            t.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
            QueueArgs::parse(&t, "q", "/")
        };
        let a = quorum(&[
            ("x-delivery-limit", AMQPValue::LongInt(-1)),
            (
                "x-overflow",
                AMQPValue::LongString("reject-publish-dlx".into()),
            ),
        ])
        .unwrap();
        assert_eq!(a.queue_type, QueueType::Quorum);
        assert_eq!(a.delivery_limit, Some(0));
        assert_eq!(a.overflow, Overflow::DropHead);
        let a = quorum(&[("x-delivery-limit", AMQPValue::LongString("a".into()))]).unwrap();
        assert_eq!(a.delivery_limit, None);
        // Refused by type before its value is looked at.
        let t = quorum(&[("x-max-priority", AMQPValue::LongString("a".into()))])
            .unwrap_err()
            .text;
        assert!(t.ends_with("of queue type rabbit_quorum_queue"), "{t}");
        let t = text(&[("x-delivery-limit", AMQPValue::LongInt(1))]);
        assert!(t.ends_with("of queue type rabbit_classic_queue"), "{t}");
        assert!(check_properties(QueueType::Quorum, true, false, false, "q", "/").is_ok());
        let t = check_properties(QueueType::Quorum, false, true, true, "q", "/")
            .unwrap_err()
            .text;
        assert!(
            t.ends_with("invalid property 'auto-delete' for queue 'q' in vhost '/'"),
            "{t}"
        );
    }

    #[test]
    fn expiration_like_string_to_integer() {
        let exp =
            |s: &str| message_expiration(&BasicProperties::default().with_expiration(s.into()));
        assert_eq!(exp("+007").unwrap(), Some(7));
        assert_eq!(exp("-0").unwrap(), Some(0));
        assert!(exp("1\u{1}")
            .unwrap_err()
            .text
            .ends_with("{leftover_string,[1]}"));
        let long = exp("-99999999999999999999").unwrap_err().text;
        assert!(
            long.ends_with(&format!(
                "{{value_negative,\n{}-99999999999999999999}}",
                " ".repeat(45)
            )),
            "{long:?}"
        );
    }
}
