//! Celery's message protocol 2 with the JSON serializer, as bytes and AMQP
//! properties: task messages (both directions) and the results Celery's
//! `rpc://` backend reads from a caller's reply queue.
//!
//! A task message: headers `lang`, `task`, `id`, `root_id`, `parent_id`,
//! `group`, `retries`, `eta`, `expires`, `timelimit`, `argsrepr`, …; body
//! `[args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]`;
//! `content_type: application/json`, `correlation_id` = the task id and
//! `reply_to` = the caller's result queue. A result: body
//! `{"task_id", "status", "result", "traceback", "children", "date_done"}`
//! published to `reply_to` with `correlation_id` = the task id; a failure's
//! `result` is `{"exc_type", "exc_message": [...], "exc_module"}`, which the
//! Python side turns back into an exception and raises.

use std::time::SystemTime;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::{json, Map, Value};

use crate::status::Reply;

/// The only content type accepted and sent: Celery's `json` serializer.
pub const JSON: &str = "application/json";

/// Celery's default queue (and direct exchange, and routing key).
pub const DEFAULT_QUEUE: &str = "celery";

/// A task message's headers, as JSON.
pub fn header(props: &BasicProperties, name: &str) -> Option<Value> {
    let table = props.headers().as_ref()?;
    table.inner().get(name).map(to_json)
}

/// A header that must be text (`task`, `id`, `eta`, …); `None` if absent or null.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    match header(props, name)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// An AMQP field value as JSON, whichever type the sender's client chose
/// (py-amqp sends `S`, `I`/`l`, `t`, `V`, `A` and `F`).
fn to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(d.scale as i32)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

/// JSON as an AMQP field value (`V` for null, `l` for integers, `S` for text).
fn to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => {
            AMQPValue::FieldArray(FieldArray::from(a.iter().map(to_amqp).collect::<Vec<_>>()))
        }
        Value::Object(m) => {
            let mut t = FieldTable::default();
            for (k, v) in m {
                t.insert(ShortString::from(k.as_str()), to_amqp(v));
            }
            AMQPValue::FieldTable(t)
        }
    }
}

/// A decoded task body.
#[derive(Debug, Default)]
pub struct Body {
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// `callbacks`, `errbacks`, `chain`, `chord`.
    pub embed: Map<String, Value>,
}

/// Parses `[args, kwargs, embed]` (the embed may be missing or null).
pub fn decode_body(data: &[u8]) -> Result<Body, String> {
    let parts: Vec<Value> = serde_json::from_slice(data)
        .map_err(|e| format!("the body is not a JSON array [args, kwargs, embed]: {e}"))?;
    let mut parts = parts.into_iter();
    let args = match parts.next() {
        Some(Value::Array(a)) => a,
        Some(Value::Null) | None => Vec::new(),
        Some(other) => return Err(format!("args must be a list, got {other}")),
    };
    let kwargs = match parts.next() {
        Some(Value::Object(m)) => m,
        Some(Value::Null) | None => Map::new(),
        Some(other) => return Err(format!("kwargs must be a mapping, got {other}")),
    };
    let embed = match parts.next() {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    Ok(Body {
        args,
        kwargs,
        embed,
    })
}

/// The canvas parts of an embed that are set (a non-empty `chain`,
/// `callbacks`, `errbacks` or a `chord`), by name.
pub fn canvas(embed: &Map<String, Value>) -> Vec<&'static str> {
    ["chain", "chord", "callbacks", "errbacks"]
        .into_iter()
        .filter(|k| match embed.get(*k) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(m)) => !m.is_empty(),
            Some(_) => true,
        })
        .collect()
}

/// The `(task id, reply_to)` of each task chained after this one, read from
/// the signatures' options, so that their callers hear of the failure too
/// (as Celery's own workers propagate a failure down a chain).
pub fn chained(embed: &Map<String, Value>) -> Vec<(String, String)> {
    let Some(Value::Array(chain)) = embed.get("chain") else {
        return Vec::new();
    };
    chain
        .iter()
        .filter_map(|sig| {
            let options = sig.get("options")?;
            let id = options.get("task_id")?.as_str()?;
            let to = options.get("reply_to")?.as_str()?;
            (!to.is_empty()).then(|| (id.to_owned(), to.to_owned()))
        })
        .collect()
}

/// A Celery timestamp (`eta`, `expires`): ISO 8601, with an offset or
/// (naive) in UTC.
pub fn parse_time(text: &str) -> Option<SystemTime> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.into());
    }
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().into())
}

/// What a new task message needs besides its name and arguments.
pub struct Outgoing<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub args: &'a [Value],
    pub kwargs: &'a Map<String, Value>,
    pub reply_to: Option<&'a str>,
}

/// A protocol 2 task message, as Celery's `send_task` would publish it.
pub fn task_message(m: &Outgoing<'_>) -> (Vec<u8>, BasicProperties) {
    let canvas = json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null});
    let body = json!([m.args, m.kwargs, canvas]);
    let origin = format!(
        "hare-worker@{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into())
    );
    let headers = json!({
        "lang": "rs",
        "task": m.name,
        "id": m.id,
        "shadow": null,
        "eta": null,
        "expires": null,
        "group": null,
        "group_index": null,
        "retries": 0,
        "timelimit": [null, null],
        "root_id": m.id,
        "parent_id": null,
        "argsrepr": Value::Array(m.args.to_vec()).to_string(),
        "kwargsrepr": Value::Object(m.kwargs.clone()).to_string(),
        "origin": origin,
        "ignore_result": false,
        "replaced_task_nesting": 0,
        "stamped_headers": null,
        "stamps": {},
    });
    let AMQPValue::FieldTable(table) = to_amqp(&headers) else {
        unreachable!("an object becomes a table")
    };
    let mut props = BasicProperties::default()
        .with_content_type(JSON.into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_correlation_id(m.id.into())
        .with_headers(table);
    if let Some(to) = m.reply_to {
        props = props.with_reply_to(to.into());
    }
    (body.to_string().into_bytes(), props)
}

/// The Python exception a failure of kind `kind` raises in the caller:
/// `(exc_module, exc_type, status)`. Builtins and Celery's own exceptions
/// only, so `except` clauses work without importing anything of ours.
fn exception_for(kind: &str) -> (&'static str, &'static str, &'static str) {
    match kind {
        "unsupported" => ("builtins", "NotImplementedError", "FAILURE"),
        "decode" => ("builtins", "TypeError", "FAILURE"),
        "no-handler" => ("celery.exceptions", "NotRegistered", "FAILURE"),
        "timeout" => ("celery.exceptions", "TimeLimitExceeded", "FAILURE"),
        "expired" => ("celery.exceptions", "TaskRevokedError", "REVOKED"),
        _ => ("builtins", "RuntimeError", "FAILURE"),
    }
}

/// A result for the `rpc://` backend: the body for a reply, or `None` for a
/// reply Celery has no state for.
pub fn result_body(task_id: &str, reply: &Reply) -> Value {
    let date_done = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    let (status, result, traceback) = match reply {
        Reply::Result { output } => ("SUCCESS", output.clone(), Value::Null),
        // Celery's idiom for progress: a custom state with a meta dict, seen
        // by `AsyncResult.get(on_message=…)` and ignored otherwise.
        Reply::Progress { percent, note } => (
            "PROGRESS",
            json!({"percent": percent, "note": note}),
            Value::Null,
        ),
        Reply::Error { kind, message } => {
            let (module, exc_type, status) = exception_for(kind);
            (
                status,
                json!({"exc_type": exc_type, "exc_message": [message], "exc_module": module}),
                Value::String(format!("hare-worker ({kind}): {message}")),
            )
        }
    };
    let date_done = if status == "PROGRESS" {
        Value::Null
    } else {
        Value::String(date_done)
    };
    json!({
        "task_id": task_id,
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": date_done,
    })
}

/// The properties of a result message: JSON (the only content Celery's
/// result consumer accepts by default), addressed by the task id.
pub fn result_properties(task_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(JSON.into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(1)
        .with_correlation_id(task_id.into())
}

/// A Celery worker's result as an SDK reply: `None` for states that are not
/// final (`STARTED`, `RETRY`, custom progress states).
pub fn reply_from_result(data: &[u8]) -> Option<Reply> {
    let meta: Value = serde_json::from_slice(data).ok()?;
    let status = meta.get("status")?.as_str()?;
    let result = meta.get("result").cloned().unwrap_or(Value::Null);
    match status {
        "SUCCESS" => Some(Reply::Result { output: result }),
        "FAILURE" | "REVOKED" => {
            let kind = result
                .get("exc_type")
                .and_then(Value::as_str)
                .unwrap_or(status)
                .to_owned();
            let message = match result.get("exc_message") {
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| {
                        p.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| p.to_string())
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => result.to_string(),
            };
            Some(Reply::Error { kind, message })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_decode_with_or_without_embed() {
        let b = decode_body(br#"[[2, 3], {"z": 1}, {"chain": null}]"#).unwrap();
        assert_eq!(b.args, vec![json!(2), json!(3)]);
        assert_eq!(b.kwargs.get("z"), Some(&json!(1)));
        assert!(canvas(&b.embed).is_empty());
        let b = decode_body(b"[[], {}]").unwrap();
        assert!(b.args.is_empty() && b.kwargs.is_empty());
        assert!(decode_body(b"{\"args\": []}").is_err());
        assert!(decode_body(b"[1, {}]").is_err());
    }

    #[test]
    fn canvas_is_any_non_empty_part() {
        let embed = json!({"callbacks": [], "errbacks": null, "chain": [{"task": "t",
            "options": {"task_id": "b", "reply_to": "q"}}], "chord": null});
        let embed = embed.as_object().unwrap();
        assert_eq!(canvas(embed), vec!["chain"]);
        assert_eq!(chained(embed), vec![("b".to_owned(), "q".to_owned())]);
    }

    #[test]
    fn times_parse_with_offset_or_naive_utc() {
        let a = parse_time("2030-01-02T03:04:05.123456+00:00").unwrap();
        let b = parse_time("2030-01-02T03:04:05.123456").unwrap();
        let c = parse_time("2030-01-02T05:04:05.123456+02:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert!(parse_time("tomorrow").is_none());
    }

    #[test]
    fn task_messages_carry_protocol_2_headers() {
        let kwargs = Map::new();
        let (body, props) = task_message(&Outgoing {
            id: "id-1",
            name: "tasks.add",
            args: &[json!(2), json!(3)],
            kwargs: &kwargs,
            reply_to: Some("q"),
        });
        assert_eq!(header_str(&props, "task").as_deref(), Some("tasks.add"));
        assert_eq!(header_str(&props, "id").as_deref(), Some("id-1"));
        assert_eq!(header(&props, "eta"), Some(Value::Null));
        assert_eq!(header(&props, "timelimit"), Some(json!([null, null])));
        assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "id-1");
        let b = decode_body(&body).unwrap();
        assert_eq!(b.args, vec![json!(2), json!(3)]);
    }

    #[test]
    fn results_round_trip_through_replies() {
        let ok = result_body("t", &Reply::Result { output: json!(5) });
        assert_eq!(ok["status"], "SUCCESS");
        let back = reply_from_result(ok.to_string().as_bytes()).unwrap();
        assert!(matches!(back, Reply::Result { output } if output == json!(5)));

        let err = result_body(
            "t",
            &Reply::Error {
                kind: "fatal".into(),
                message: "bad input".into(),
            },
        );
        assert_eq!(err["status"], "FAILURE");
        assert_eq!(err["result"]["exc_type"], "RuntimeError");
        assert_eq!(err["result"]["exc_message"], json!(["bad input"]));
        let back = reply_from_result(err.to_string().as_bytes()).unwrap();
        assert!(
            matches!(back, Reply::Error { kind, message } if kind == "RuntimeError" && message == "bad input")
        );
        let progress = result_body(
            "t",
            &Reply::Progress {
                percent: 50.0,
                note: "half".into(),
            },
        );
        assert!(reply_from_result(progress.to_string().as_bytes()).is_none());
    }
}
