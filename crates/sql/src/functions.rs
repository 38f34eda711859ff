//! Scalar functions over evaluated arguments (NULL in, NULL out, unless noted).

use crate::expr::{text_of, type_of, EvalError, Func};
use crate::time::{civil_from_days, days_from_civil};
use crate::value::Value;

fn err<T>(msg: String) -> Result<T, EvalError> {
    Err(EvalError(msg))
}

fn int(v: &Value, what: &str) -> Result<i64, EvalError> {
    match v {
        Value::Int(i) | Value::Timestamp(i) => Ok(*i),
        Value::Float(f) if f.is_finite() => Ok(*f as i64),
        other => err(format!(
            "{what}: expected an integer, got {}",
            type_of(other)
        )),
    }
}

pub fn call(func: Func, args: Vec<Value>) -> Result<Value, EvalError> {
    use Value::*;
    match func {
        Func::Coalesce => return Ok(args.into_iter().find(|v| !v.is_null()).unwrap_or(Null)),
        Func::NullIf => {
            let (a, b) = (&args[0], &args[1]);
            if !a.is_null()
                && !b.is_null()
                && crate::expr::compare(a, b)? == std::cmp::Ordering::Equal
            {
                return Ok(Null);
            }
            return Ok(a.clone());
        }
        Func::Concat => {
            return Ok(Str(args
                .iter()
                .filter(|v| !v.is_null())
                .map(text_of)
                .collect()))
        }
        _ => {}
    }
    if args.iter().any(Value::is_null) {
        return Ok(Null);
    }
    let text = |i: usize| text_of(&args[i]);
    Ok(match func {
        Func::Lower => Str(text(0).to_lowercase()),
        Func::Upper => Str(text(0).to_uppercase()),
        Func::Length => Int(text(0).chars().count() as i64),
        Func::Trim => Str(text(0).trim().to_string()),
        Func::Replace => Str(text(0).replace(&text(1), &text(2))),
        Func::Substring => {
            // 1-based start, optional length, as PostgreSQL.
            let s: Vec<char> = text(0).chars().collect();
            let start = int(&args[1], "substring")?;
            let end = match args.get(2) {
                Some(n) => start.saturating_add(int(n, "substring")?.max(0)),
                None => i64::MAX,
            };
            let from = start.max(1) - 1;
            let to = end.saturating_sub(1).clamp(0, s.len() as i64);
            Str(s
                .get(from as usize..(to as usize).max(from as usize))
                .map_or(String::new(), |c| c.iter().collect()))
        }
        Func::Abs => match &args[0] {
            Int(i) => Int(i
                .checked_abs()
                .ok_or_else(|| EvalError("integer overflow".into()))?),
            Float(f) => Float(f.abs()),
            other => return err(format!("abs: expected a number, got {}", type_of(other))),
        },
        Func::Round | Func::Floor | Func::Ceil => match &args[0] {
            Int(i) => Int(*i),
            Float(f) => {
                let digits = args
                    .get(1)
                    .map(|d| int(d, "round"))
                    .transpose()?
                    .unwrap_or(0)
                    .clamp(-15, 15);
                let scale = 10f64.powi(digits as i32);
                let g = f * scale;
                Float(
                    match func {
                        Func::Round => g.round(),
                        Func::Floor => g.floor(),
                        _ => g.ceil(),
                    } / scale,
                )
            }
            other => {
                return err(format!(
                    "{func:?}: expected a number, got {}",
                    type_of(other)
                ))
            }
        },
        Func::ToTimestamp => {
            match &args[0] {
                Str(s) => Timestamp(crate::time::parse_iso8601(s).ok_or_else(|| {
                    EvalError(format!("to_timestamp: not an ISO-8601 time: {s:?}"))
                })?),
                other => Timestamp(int(other, "to_timestamp")?),
            }
        }
        Func::EpochMs => Int(int(&args[0], "epoch_ms")?),
        Func::DateTrunc => {
            let ms = int(&args[1], "date_trunc")?;
            let unit = match text(0).to_ascii_lowercase().as_str() {
                "second" => 1_000,
                "minute" => 60_000,
                "hour" => 3_600_000,
                "day" => 86_400_000,
                other => {
                    return err(format!(
                        "date_trunc: unknown unit '{other}' (second, minute, hour, day)"
                    ))
                }
            };
            Timestamp(ms - ms.rem_euclid(unit))
        }
        Func::Extract => {
            let ms = int(&args[1], "extract")?;
            let (y, m, d) = civil_from_days(ms.div_euclid(86_400_000));
            let day_ms = ms.rem_euclid(86_400_000);
            let _ = days_from_civil;
            Int(match text(0).to_ascii_lowercase().as_str() {
                "year" => y,
                "month" => m,
                "day" => d,
                "hour" => day_ms / 3_600_000,
                "minute" => day_ms / 60_000 % 60,
                "second" => day_ms / 1000 % 60,
                other => return err(format!("extract: unknown field '{other}'")),
            })
        }
        Func::Coalesce | Func::NullIf | Func::Concat => unreachable!("handled above"),
    })
}
