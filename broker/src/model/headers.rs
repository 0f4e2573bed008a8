//! Headers-exchange bindings: the binding's arguments are parsed once at bind
//! time into the rule that each publish is checked against.

use amq_protocol::types::{AMQPValue, FieldTable};

use super::args;
use crate::error::{AmqpError, AmqpResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    All,
    Any,
}

#[derive(Clone, Debug)]
pub struct HeadersRule {
    mode: Mode,
    /// (header name, required value; `None` means presence is enough).
    required: Vec<(String, Option<AMQPValue>)>,
}

impl HeadersRule {
    /// `x-match` is `all` (default), `any`, `all-with-x` or `any-with-x`; the
    /// plain forms ignore `x-` arguments, the `-with-x` forms match them too.
    pub fn compile(args: &FieldTable) -> AmqpResult<Self> {
        let (mode, with_x) = match args.inner().get("x-match") {
            None => (Mode::All, false),
            Some(value) => match args::text(value).as_deref() {
                Some("all") => (Mode::All, false),
                Some("any") => (Mode::Any, false),
                Some("all-with-x") => (Mode::All, true),
                Some("any-with-x") => (Mode::Any, true),
                _ => {
                    return Err(AmqpError::precondition(format!(
                    "Invalid x-match field value {}; expected all, any, all-with-x, or any-with-x",
                    args::erlang_term(value)
                )))
                }
            },
        };
        let required = args
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.as_str().starts_with("x-")))
            .map(|(k, v)| {
                let v = if matches!(v, AMQPValue::Void) {
                    None
                } else {
                    Some(v.clone())
                };
                (k.as_str().to_owned(), v)
            })
            .collect();
        Ok(HeadersRule { mode, required })
    }

    pub fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let empty = FieldTable::default();
        let headers = headers.unwrap_or(&empty).inner();
        let hit = |(name, want): &(String, Option<AMQPValue>)| match headers.get(name.as_str()) {
            None => false,
            Some(have) => want
                .as_ref()
                .is_none_or(|want| args::same(Some(want), Some(have))),
        };
        match self.mode {
            Mode::All => self.required.iter().all(hit),
            Mode::Any => self.required.iter().any(hit),
        }
    }
}
