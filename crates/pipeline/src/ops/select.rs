//! A query without GROUP BY: each record the filter passes becomes one row (the
//! select list as a JSON object, or `SELECT *`'s value as it was). No state.

use sql::expr::{Context, Expr, Input};
use sql::plan::Projection;
use sql::value::Value;

use super::encode::Reader;
use super::{json_object, Error, Fate, Operator, Row};

pub(super) struct Select {
    /// None for `SELECT *`.
    columns: Option<Vec<(String, Expr)>>,
}

impl Select {
    pub fn new(projection: &Projection) -> Select {
        Select {
            columns: match projection {
                Projection::Columns(columns) => Some(columns.clone()),
                _ => None,
            },
        }
    }
}

/// The select list's values on `input`, appended to `values` in its order; the
/// first that fails names its column.
pub(super) fn eval_columns(
    columns: &[(String, Expr)],
    input: &Input<'_>,
    values: &mut Vec<Value>,
) -> Result<(), Error> {
    let ctx = Context::Input(input);
    for (name, expr) in columns {
        let v = expr
            .eval(&ctx)
            .map_err(|e| Error::Rejected(format!("{name}: {e}")))?;
        values.push(v);
    }
    Ok(())
}

impl Operator for Select {
    fn process(
        &mut self,
        input: &Input<'_>,
        _time: i64,
        _watermark: Option<i64>,
        out: &mut Vec<Row>,
    ) -> Result<Fate, Error> {
        let value = match &self.columns {
            Some(columns) => {
                let mut values = Vec::with_capacity(columns.len());
                eval_columns(columns, input, &mut values)?;
                json_object(columns.iter().map(|(n, _)| n.as_str()).zip(values.iter()))
            }
            None => input.raw.to_vec(),
        };
        out.push(Row {
            key: input.key.map(<[u8]>::to_vec),
            value,
            window: None,
            is_final: false,
            error: None,
        });
        Ok(Fate::Done)
    }

    fn on_watermark(&mut self, _watermark: i64, _out: &mut Vec<Row>) {}

    fn on_tick(&mut self, _now_ms: i64, _interval_ms: i64, _out: &mut Vec<Row>) {}

    fn snapshot(&self, _out: &mut Vec<u8>) {}

    fn restore(
        &mut self,
        _r: &mut Reader<'_>,
        _version: u8,
        _wm: Option<i64>,
    ) -> Result<(), String> {
        Ok(())
    }

    fn state_bytes(&self) -> i64 {
        0
    }
}
