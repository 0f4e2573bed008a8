//! Celery's positional and keyword arguments as one Rust value, the way
//! Python binds them to a function's parameters.
//!
//! The target type is asked, without any data, how it wants to be
//! deserialized (a struct names its fields), then:
//! - a struct with named fields: positional arguments fill the fields in
//!   declaration order, keyword arguments by name (`add(2, y=3)` fits
//!   `struct Add { x: i64, y: i64 }`); too many positionals, a field given
//!   twice or one missing is an error, as in Python;
//! - a map (`HashMap<String, _>`, a struct with `#[serde(flatten)]`): the
//!   keyword arguments; positionals are an error;
//! - `()`: no arguments at all;
//! - anything else (a tuple, a tuple struct, a `Vec`, `serde_json::Value`):
//!   the positional arguments as a list; keyword arguments are an error. A
//!   task of one positional argument may also name its bare type
//!   (`type Args = String`).

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::Deserializer;
use serde_json::{Map, Value};

/// How a type deserializes itself.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Struct(&'static [&'static str]),
    Map,
    Unit,
    Other,
}

/// Binds `args` and `kwargs` to `A`; the error reads like Python's TypeError.
pub fn bind<A: DeserializeOwned>(
    args: Vec<Value>,
    kwargs: Map<String, Value>,
) -> Result<A, String> {
    let from = |v: Value| A::deserialize(v).map_err(|e| e.to_string());
    match shape::<A>() {
        Shape::Struct(fields) => {
            if args.len() > fields.len() {
                return Err(format!(
                    "takes {} positional argument(s) but {} were given",
                    fields.len(),
                    args.len()
                ));
            }
            let mut named: Map<String, Value> =
                fields.iter().map(|f| (*f).to_owned()).zip(args).collect();
            for (k, v) in kwargs {
                if named.contains_key(&k) {
                    return Err(format!("got multiple values for argument '{k}'"));
                }
                named.insert(k, v);
            }
            from(Value::Object(named))
        }
        Shape::Map => {
            if !args.is_empty() {
                return Err(format!(
                    "takes keyword arguments only, but {} positional argument(s) were given",
                    args.len()
                ));
            }
            from(Value::Object(kwargs))
        }
        Shape::Unit => {
            if !args.is_empty() || !kwargs.is_empty() {
                return Err("takes no arguments".into());
            }
            from(Value::Null)
        }
        Shape::Other => {
            if !kwargs.is_empty() {
                let names: Vec<&str> = kwargs.keys().map(String::as_str).collect();
                return Err(format!(
                    "takes positional arguments only, but got keyword argument(s) {}",
                    names.join(", ")
                ));
            }
            let single = (args.len() == 1).then(|| args[0].clone());
            match (from(Value::Array(args)), single) {
                (Ok(v), _) => Ok(v),
                (Err(_), Some(one)) if from(one.clone()).is_ok() => from(one),
                (Err(e), _) => Err(e),
            }
        }
    }
}

fn shape<A: DeserializeOwned>() -> Shape {
    let seen = Cell::new(Shape::Other);
    let _ = A::deserialize(Probe(&seen));
    seen.get()
}

/// A deserializer that holds no data: it records the first request and
/// stops the type's `Deserialize` right there.
struct Probe<'a>(&'a Cell<Shape>);

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("probe")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        self.0.set(Shape::Other);
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        self.0.set(Shape::Struct(fields));
        Err(Stop)
    }

    fn deserialize_map<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        self.0.set(Shape::Map);
        Err(Stop)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        self.0.set(Shape::Unit);
        Err(Stop)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: V,
    ) -> Result<V::Value, Stop> {
        self.0.set(Shape::Unit);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option newtype_struct seq tuple tuple_struct enum
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Deserialize, Debug, PartialEq)]
    struct Add {
        x: i64,
        #[serde(rename = "y")]
        other: i64,
    }

    fn kw(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn structs_bind_like_python_parameters() {
        let want = Add { x: 2, other: 3 };
        assert_eq!(bind::<Add>(vec![json!(2), json!(3)], Map::new()), Ok(want));
        let want = Add { x: 2, other: 3 };
        assert_eq!(bind::<Add>(vec![json!(2)], kw(json!({"y": 3}))), Ok(want));
        let want = Add { x: 2, other: 3 };
        assert_eq!(bind::<Add>(vec![], kw(json!({"x": 2, "y": 3}))), Ok(want));
        let err = bind::<Add>(vec![json!(2)], kw(json!({"x": 3}))).unwrap_err();
        assert!(err.contains("multiple values for argument 'x'"), "{err}");
        let err = bind::<Add>(vec![json!(1), json!(2), json!(3)], Map::new()).unwrap_err();
        assert!(err.contains("takes 2 positional"), "{err}");
        let err = bind::<Add>(vec![json!(1)], Map::new()).unwrap_err();
        assert!(err.contains("missing field `y`"), "{err}");
    }

    #[test]
    fn tuples_take_positionals_and_maps_take_keywords() {
        assert_eq!(
            bind::<(i64, String)>(vec![json!(1), json!("a")], Map::new()),
            Ok((1, "a".to_owned()))
        );
        assert!(bind::<(i64,)>(vec![json!(1)], kw(json!({"k": 1}))).is_err());
        assert_eq!(
            bind::<String>(vec![json!("solo")], Map::new()),
            Ok("solo".into())
        );
        assert_eq!(bind::<Vec<i64>>(vec![json!(1)], Map::new()), Ok(vec![1]));
        let m = bind::<HashMap<String, i64>>(vec![], kw(json!({"a": 1}))).unwrap();
        assert_eq!(m.get("a"), Some(&1));
        assert!(bind::<HashMap<String, i64>>(vec![json!(1)], Map::new()).is_err());
        assert_eq!(bind::<()>(vec![], Map::new()), Ok(()));
        assert!(bind::<()>(vec![json!(1)], Map::new()).is_err());
    }
}
