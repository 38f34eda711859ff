//! The values expressions compute and aggregates fold.

use serde::{Deserialize, Serialize};

/// One SQL value. JSON numbers become `Int` when they are integers that fit an i64,
/// `Float` otherwise; JSON objects and arrays stay `Json` (reachable with `->`, `->>`
/// and dotted paths). `Timestamp` is epoch milliseconds (UTC) and is written to
/// output records as that number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Timestamp(i64),
    Json(serde_json::Value),
}

impl Value {
    /// What `WHERE`, `FILTER (WHERE ...)` and `HAVING` keep: only `TRUE` (NULL and
    /// FALSE do not pass).
    pub fn is_true(&self) -> bool {
        matches!(self, Value::Bool(true))
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// A JSON value as a SQL value (see [`Value`] for numbers).
    pub fn from_json(json: &serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => n.as_f64().map_or(Value::Null, Value::Float),
            },
            serde_json::Value::String(s) => Value::Str(s.clone()),
            other => Value::Json(other.clone()),
        }
    }

    /// How the value is written in an output record: timestamps as epoch
    /// milliseconds, non-finite floats as NULL (JSON has no NaN).
    pub fn to_json(&self) -> serde_json::Value {
        self.clone().into_json()
    }

    /// [`Value::to_json`], moving strings and documents instead of copying them.
    pub fn into_json(self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(b),
            Value::Int(i) | Value::Timestamp(i) => serde_json::Value::from(i),
            Value::Float(f) => serde_json::Number::from_f64(f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Value::Str(s) => serde_json::Value::String(s),
            Value::Json(j) => j,
        }
    }
}
