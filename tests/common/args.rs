//! Builders for AMQP argument tables (queue, exchange, consume and binding
//! arguments, message headers), so the tests spell tables the same way.

use lapin::types::{AMQPValue, FieldTable};

/// A 64-bit signed integer (`l`), the width most clients send for numeric
/// arguments such as `x-max-length` or `x-max-priority`.
pub fn int(v: i64) -> AMQPValue {
    AMQPValue::LongLongInt(v)
}

/// A long string (`S`), the type RabbitMQ uses for every text argument and
/// for the texts in `x-death`.
pub fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

/// A field table holding `pairs`, in order.
pub fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}
