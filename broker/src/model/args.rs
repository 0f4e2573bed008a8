//! Field-table values as RabbitMQ names and prints them in error texts, and
//! its rule for comparing them (integers compare by value across widths).

use amq_protocol::types::AMQPValue;

/// RabbitMQ's name for a field's wire type (`signedint`, `longstr`, ...).
pub fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

pub fn integer(value: &AMQPValue) -> Option<i128> {
    Some(match *value {
        AMQPValue::ShortShortInt(v) => v.into(),
        AMQPValue::ShortShortUInt(v) => v.into(),
        AMQPValue::ShortInt(v) => v.into(),
        AMQPValue::ShortUInt(v) => v.into(),
        AMQPValue::LongInt(v) => v.into(),
        AMQPValue::LongUInt(v) => v.into(),
        AMQPValue::LongLongInt(v) => v.into(),
        _ => return None,
    })
}

pub fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The value as RabbitMQ prints it inside quotes: `10`, `dlx`, `true`.
pub fn display(value: &AMQPValue) -> String {
    if let Some(i) = integer(value) {
        return i.to_string();
    }
    if let Some(s) = text(value) {
        return s;
    }
    match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(d) => d.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        other => format!("{other:?}"),
    }
}

/// The value as Erlang prints a term: strings as binaries (`<<"some">>`).
pub fn erlang_term(value: &AMQPValue) -> String {
    match text(value) {
        Some(s) => format!("<<\"{s}\">>"),
        None => display(value),
    }
}

/// Whether two argument values are the same to RabbitMQ.
pub fn same(a: Option<&AMQPValue>, b: Option<&AMQPValue>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => match (integer(x), integer(y)) {
            (Some(i), Some(j)) => i == j,
            _ => match (text(x), text(y)) {
                (Some(s), Some(t)) => s == t,
                _ => x == y,
            },
        },
        _ => false,
    }
}

/// `received ... but current is ...` in RabbitMQ's two styles: bare values when
/// both sides have one, typed values when one side is missing.
pub fn describe_mismatch(received: Option<&AMQPValue>, current: Option<&AMQPValue>) -> String {
    let side = |v: Option<&AMQPValue>, both: bool| match v {
        None => "none".to_string(),
        Some(v) if both => format!("'{}'", display(v)),
        Some(v) => format!("the value '{}' of type '{}'", display(v), type_name(v)),
    };
    let both = received.is_some() && current.is_some();
    format!(
        "received {} but current is {}",
        side(received, both),
        side(current, both)
    )
}
