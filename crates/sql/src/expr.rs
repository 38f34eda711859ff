//! Expressions and their evaluation. An expression is evaluated in one of two
//! contexts: *input* (one source record: its JSON fields and metadata columns) or
//! *row* (one aggregated row: slots, see [`crate::plan::Aggregate`]). The planner
//! only builds expressions that are valid in the context they are used in.
//!
//! NULL semantics are SQL's: most operators and functions return NULL when an
//! operand is NULL; `AND`/`OR` are three-valued; `IS [NOT] NULL` and `COALESCE`
//! look at NULLs. A missing JSON field is NULL. A value of the wrong type (`'a' + 1`,
//! a failed `CAST`) is an [`EvalError`]: the runtime sends that record to the
//! dead-letter topic with the message.

use serde::{Deserialize, Serialize};

use crate::value::Value;

/// One source record, as expressions in input context see it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The value parsed as JSON (`Null` when the source is not read as JSON).
    pub json: &'a serde_json::Value,
    /// The value's bytes (`_value`, as a string).
    pub raw: &'a [u8],
    /// `_key`.
    pub key: Option<&'a [u8]>,
    /// `_timestamp`: the record's timestamp, epoch ms.
    pub timestamp: i64,
    /// `_partition`.
    pub partition: i32,
    /// `_offset`.
    pub offset: i64,
    /// `_headers`: name and value of each header, in order.
    pub headers: &'a [(String, Option<Vec<u8>>)],
}

/// Where an expression is evaluated.
#[derive(Debug, Clone, Copy)]
pub enum Context<'a> {
    Input(&'a Input<'a>),
    Row(&'a [Value]),
}

/// A record's metadata column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Meta {
    Key,
    Value,
    Timestamp,
    Partition,
    Offset,
}

/// Why an expression could not be evaluated for one record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);

/// A planned expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Expr {
    Literal(Value),
    /// A JSON field of the input value, by path (`user.id` is `["user", "id"]`).
    Field(Vec<String>),
    Meta(Meta),
    /// A slot of the aggregated row.
    Slot(usize),
}

impl Expr {
    pub fn eval(&self, ctx: &Context<'_>) -> Result<Value, EvalError> {
        match (self, ctx) {
            (Expr::Literal(v), _) => Ok(v.clone()),
            (Expr::Slot(i), Context::Row(row)) => Ok(row.get(*i).cloned().unwrap_or(Value::Null)),
            (Expr::Field(path), Context::Input(input)) => {
                let mut at = input.json;
                for part in path {
                    match at.get(part) {
                        Some(next) => at = next,
                        None => return Ok(Value::Null),
                    }
                }
                Ok(Value::from_json(at))
            }
            (Expr::Meta(meta), Context::Input(input)) => Ok(match meta {
                Meta::Key => input.key.map_or(Value::Null, |k| {
                    Value::Str(String::from_utf8_lossy(k).into_owned())
                }),
                Meta::Value => Value::Str(String::from_utf8_lossy(input.raw).into_owned()),
                Meta::Timestamp => Value::Timestamp(input.timestamp),
                Meta::Partition => Value::Int(input.partition as i64),
                Meta::Offset => Value::Int(input.offset),
            }),
            (expr, _) => Err(EvalError(format!(
                "{expr:?} evaluated in the wrong context"
            ))),
        }
    }
}
