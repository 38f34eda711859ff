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

use crate::plan::ColumnType;
use crate::value::Value;

/// A source record's value as JSON, as expressions read it: field by field.
#[derive(Debug, Clone, Copy)]
pub enum Json<'a> {
    /// A whole parsed value (`Null` when the source is not read as JSON).
    Value(&'a serde_json::Value),
    /// Only the top-level fields the queries read, as the runtime parses them: the
    /// value of `names[i]` is `values[i]` (`Null` when the record has no such field,
    /// or is not an object). No map is built per record.
    Fields {
        names: &'a [String],
        values: &'a [serde_json::Value],
    },
}

impl<'a> Json<'a> {
    /// No JSON: every field is NULL.
    pub const NULL: Json<'static> = Json::Value(&serde_json::Value::Null);

    /// A top-level field (`None`: absent, which reads as NULL).
    pub fn field(&self, name: &str) -> Option<&'a serde_json::Value> {
        match *self {
            Json::Value(v) => v.get(name),
            Json::Fields { names, values } => names
                .iter()
                .position(|n| n.len() == name.len() && n == name)
                .and_then(|i| values.get(i)),
        }
    }
}

/// One source record, as expressions in input context see it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The value read as JSON.
    pub json: Json<'a>,
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

impl<'a> Input<'a> {
    /// The JSON value at `path` (`user.id` is `["user", "id"]`), borrowed from the
    /// record; `None` when absent (which reads as NULL).
    pub fn field(&self, path: &[String]) -> Option<&'a serde_json::Value> {
        let mut at = self.json.field(path.first()?)?;
        for part in &path[1..] {
            at = at.get(part)?;
        }
        Some(at)
    }
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
    /// `header('name')`: the first header of that name, as a string.
    Header(String),
    /// `x -> 'k'` (JSON) or `x ->> 'k'` (text); an integer key indexes an array.
    JsonGet {
        base: Box<Expr>,
        key: Box<Expr>,
        text: bool,
    },
    Binary(Box<Expr>, BinOp, Box<Expr>),
    Not(Box<Expr>),
    Neg(Box<Expr>),
    IsNull {
        expr: Box<Expr>,
        negated: bool,
    },
    /// `LIKE` / `ILIKE` with `%` and `_`.
    Like {
        expr: Box<Expr>,
        pattern: Box<Expr>,
        negated: bool,
        case_insensitive: bool,
    },
    /// `x ~ 'pattern'`, `regexp_like(x, 'pattern')`: whether the pattern matches
    /// somewhere in the text.
    Regex {
        expr: Box<Expr>,
        pattern: Pattern,
        negated: bool,
    },
    InList {
        expr: Box<Expr>,
        list: Vec<Expr>,
        negated: bool,
    },
    Between {
        expr: Box<Expr>,
        low: Box<Expr>,
        high: Box<Expr>,
        negated: bool,
    },
    Case {
        operand: Option<Box<Expr>>,
        whens: Vec<(Expr, Expr)>,
        otherwise: Option<Box<Expr>>,
    },
    Cast(Box<Expr>, CastType),
    Call(Func, Vec<Expr>),
}

impl Expr {
    /// What is known of the type of this expression's values before any record is
    /// seen (`slots`: the types of the row context's slots); `Json` when it depends on
    /// the input.
    pub fn static_type(&self, slots: &[ColumnType]) -> ColumnType {
        use ColumnType as T;
        match self {
            Expr::Literal(v) => match v {
                Value::Bool(_) => T::Bool,
                Value::Int(_) => T::Int,
                Value::Float(_) => T::Float,
                Value::Str(_) => T::Text,
                Value::Timestamp(_) => T::Timestamp,
                Value::Null | Value::Json(_) => T::Json,
            },
            Expr::Field(_) => T::Json,
            Expr::Meta(Meta::Key | Meta::Value) => T::Text,
            Expr::Meta(Meta::Timestamp) => T::Timestamp,
            Expr::Meta(Meta::Partition | Meta::Offset) => T::Int,
            Expr::Slot(i) => slots.get(*i).copied().unwrap_or(T::Json),
            Expr::Header(_) => T::Text,
            Expr::JsonGet { text, .. } => {
                if *text {
                    T::Text
                } else {
                    T::Json
                }
            }
            Expr::Binary(a, op, b) => match op {
                BinOp::Eq
                | BinOp::Ne
                | BinOp::Lt
                | BinOp::Le
                | BinOp::Gt
                | BinOp::Ge
                | BinOp::And
                | BinOp::Or => T::Bool,
                BinOp::Concat => T::Text,
                BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Mod => {
                    match (a.static_type(slots), b.static_type(slots)) {
                        (T::Int, T::Int) => T::Int,
                        (T::Int | T::Float, T::Int | T::Float) => T::Float,
                        _ => T::Json,
                    }
                }
            },
            Expr::Not(_)
            | Expr::IsNull { .. }
            | Expr::Like { .. }
            | Expr::Regex { .. }
            | Expr::InList { .. }
            | Expr::Between { .. } => T::Bool,
            Expr::Neg(e) => e.static_type(slots),
            Expr::Case {
                whens, otherwise, ..
            } => {
                let mut types = whens
                    .iter()
                    .map(|(_, e)| e)
                    .chain(otherwise.as_deref())
                    .map(|e| e.static_type(slots));
                let first = types.next().unwrap_or(T::Json);
                if types.all(|t| t == first) {
                    first
                } else {
                    T::Json
                }
            }
            Expr::Cast(_, to) => match to {
                CastType::Int => T::Int,
                CastType::Float => T::Float,
                CastType::Text => T::Text,
                CastType::Bool => T::Bool,
                CastType::Timestamp => T::Timestamp,
            },
            Expr::Call(f, args) => match f {
                Func::Lower
                | Func::Upper
                | Func::Substring
                | Func::Concat
                | Func::Trim
                | Func::Replace => T::Text,
                Func::Length | Func::EpochMs => T::Int,
                Func::ToTimestamp | Func::DateTrunc => T::Timestamp,
                Func::Extract => T::Float,
                Func::Abs
                | Func::Round
                | Func::Floor
                | Func::Ceil
                | Func::Coalesce
                | Func::NullIf => args.first().map_or(T::Json, |e| e.static_type(slots)),
            },
        }
    }

    /// Adds the top-level JSON fields this expression reads (`user.id` reads `user`),
    /// so that the runtime can parse only those.
    pub fn top_level_fields(&self, out: &mut std::collections::BTreeSet<String>) {
        self.walk(&mut |e| {
            if let Expr::Field(path) = e {
                if let Some(first) = path.first() {
                    out.insert(first.clone());
                }
            }
        });
    }

    /// Calls `f` on this expression, then on every expression inside it.
    pub fn walk(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        let mut all = |es: &[&Expr]| es.iter().for_each(|e| e.walk(f));
        match self {
            Expr::Field(_) | Expr::Literal(_) | Expr::Meta(_) | Expr::Slot(_) | Expr::Header(_) => {
            }
            Expr::JsonGet { base, key, .. } => all(&[base, key]),
            Expr::Binary(a, _, b) => all(&[a, b]),
            Expr::Not(e) | Expr::Neg(e) | Expr::Cast(e, _) => all(&[e]),
            Expr::IsNull { expr, .. } | Expr::Regex { expr, .. } => all(&[expr]),
            Expr::Like { expr, pattern, .. } => all(&[expr, pattern]),
            Expr::InList { expr, list, .. } => {
                all(&[expr]);
                list.iter().for_each(|e| e.walk(f));
            }
            Expr::Between {
                expr, low, high, ..
            } => all(&[expr, low, high]),
            Expr::Case {
                operand,
                whens,
                otherwise,
            } => {
                operand.iter().for_each(|e| e.walk(f));
                for (w, t) in whens {
                    w.walk(f);
                    t.walk(f);
                }
                otherwise.iter().for_each(|e| e.walk(f));
            }
            Expr::Call(_, args) => args.iter().for_each(|e| e.walk(f)),
        }
    }
}

/// A regular expression compiled at planning (the `regex` crate's syntax; `(?i)`
/// for case-insensitive), kept in a plan as its text.
#[derive(Debug, Clone)]
pub struct Pattern(regex::Regex);

impl Pattern {
    /// The largest compiled pattern accepted.
    pub const SIZE_LIMIT: usize = 1 << 20;

    pub fn new(pattern: &str) -> Result<Pattern, String> {
        regex::RegexBuilder::new(pattern)
            .size_limit(Self::SIZE_LIMIT)
            .build()
            .map(Pattern)
            .map_err(|e| match e {
                regex::Error::CompiledTooBig(limit) => {
                    format!("the regular expression is too large (over {limit} bytes compiled)")
                }
                other => format!("invalid regular expression: {other}"),
            })
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn is_match(&self, text: &str) -> bool {
        self.0.is_match(text)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Pattern, D::Error> {
        let text = String::deserialize(d)?;
        Pattern::new(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    Concat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CastType {
    Int,
    Float,
    Text,
    Bool,
    Timestamp,
}

/// Scalar functions (docs/sql.md lists them with examples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Func {
    Lower,
    Upper,
    Length,
    Substring,
    Concat,
    Coalesce,
    NullIf,
    Trim,
    Replace,
    Abs,
    Round,
    Floor,
    Ceil,
    ToTimestamp,
    EpochMs,
    DateTrunc,
    Extract,
}

fn err<T>(msg: impl Into<String>) -> Result<T, EvalError> {
    Err(EvalError(msg.into()))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NULL",
        Value::Bool(_) => "boolean",
        Value::Int(_) => "integer",
        Value::Float(_) => "number",
        Value::Str(_) => "string",
        Value::Timestamp(_) => "timestamp",
        Value::Json(_) => "JSON",
    }
}

/// SQL comparison of two non-NULL values; `Err` when they cannot be compared.
pub fn compare(a: &Value, b: &Value) -> Result<std::cmp::Ordering, EvalError> {
    use Value::*;
    let o = match (a, b) {
        (Int(x), Int(y))
        | (Timestamp(x), Timestamp(y))
        | (Timestamp(x), Int(y))
        | (Int(x), Timestamp(y)) => Some(x.cmp(y)),
        (Int(x), Float(y)) => (*x as f64).partial_cmp(y),
        (Float(x), Int(y)) => x.partial_cmp(&(*y as f64)),
        (Float(x), Float(y)) => x.partial_cmp(y),
        (Str(x), Str(y)) => Some(x.cmp(y)),
        (Bool(x), Bool(y)) => Some(x.cmp(y)),
        (Json(x), Json(y)) => (x == y).then_some(std::cmp::Ordering::Equal),
        _ => None,
    };
    o.ok_or_else(|| {
        EvalError(format!(
            "cannot compare {} with {}",
            type_name(a),
            type_name(b)
        ))
    })
}

/// `%` any run, `_` one character.
pub fn like(text: &str, pattern: &str) -> bool {
    let t: Vec<char> = text.chars().collect();
    let p: Vec<char> = pattern.chars().collect();
    let (mut ti, mut pi) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || p[pi] == t[ti]) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '%' {
        pi += 1;
    }
    pi == p.len()
}

fn as_text(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        Value::Json(j) => j.to_string(),
        other => other.to_json().to_string(),
    }
}

fn arith(op: BinOp, a: Value, b: Value) -> Result<Value, EvalError> {
    use Value::*;
    let (a, b) = match (a, b) {
        (Timestamp(x), y) => (Int(x), y),
        (x, Timestamp(y)) => (x, Int(y)),
        other => other,
    };
    match (&a, &b) {
        (Int(x), Int(y)) => {
            let r = match op {
                BinOp::Add => x.checked_add(*y),
                BinOp::Sub => x.checked_sub(*y),
                BinOp::Mul => x.checked_mul(*y),
                BinOp::Div if *y == 0 => return err("division by zero"),
                BinOp::Div => x.checked_div(*y),
                BinOp::Mod if *y == 0 => return err("division by zero"),
                BinOp::Mod => x.checked_rem(*y),
                _ => None,
            };
            r.map(Int)
                .ok_or_else(|| EvalError("integer overflow".into()))
        }
        (Int(_) | Float(_), Int(_) | Float(_)) => {
            let f = |v: &Value| match v {
                Int(i) => *i as f64,
                Float(f) => *f,
                _ => 0.0,
            };
            let (x, y) = (f(&a), f(&b));
            Ok(Float(match op {
                BinOp::Add => x + y,
                BinOp::Sub => x - y,
                BinOp::Mul => x * y,
                BinOp::Div if y == 0.0 => return err("division by zero"),
                BinOp::Div => x / y,
                BinOp::Mod if y == 0.0 => return err("division by zero"),
                _ => x % y,
            }))
        }
        _ => err(format!(
            "cannot apply {op:?} to {} and {}",
            type_name(&a),
            type_name(&b)
        )),
    }
}

fn cast(v: Value, to: CastType) -> Result<Value, EvalError> {
    use Value::*;
    let fail = |v: &Value| {
        EvalError(format!(
            "cannot cast {} {} to {to:?}",
            type_name(v),
            as_text(v)
        ))
    };
    Ok(match (to, v) {
        (_, Null) => Null,
        (CastType::Int, Int(i)) | (CastType::Int, Timestamp(i)) => Int(i),
        (CastType::Int, Float(f)) if f.is_finite() && f.abs() < 9.2e18 => Int(f.trunc() as i64),
        (CastType::Int, Bool(b)) => Int(b as i64),
        (CastType::Int, Str(s)) => Int(s.trim().parse().map_err(|_| fail(&Str(s.clone())))?),
        (CastType::Float, Int(i)) | (CastType::Float, Timestamp(i)) => Float(i as f64),
        (CastType::Float, Float(f)) => Float(f),
        (CastType::Float, Str(s)) => Float(s.trim().parse().map_err(|_| fail(&Str(s.clone())))?),
        (CastType::Text, v) => Str(as_text(&v)),
        (CastType::Bool, Bool(b)) => Bool(b),
        (CastType::Bool, Int(i)) => Bool(i != 0),
        (CastType::Bool, Str(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "1" | "yes" => Bool(true),
            "false" | "f" | "0" | "no" => Bool(false),
            _ => return Err(fail(&Str(s))),
        },
        (CastType::Timestamp, Int(i)) | (CastType::Timestamp, Timestamp(i)) => Timestamp(i),
        (CastType::Timestamp, Float(f)) if f.is_finite() => Timestamp(f as i64),
        (CastType::Timestamp, Str(s)) => {
            Timestamp(crate::time::parse_iso8601(&s).ok_or_else(|| fail(&Str(s.clone())))?)
        }
        (_, v) => return Err(fail(&v)),
    })
}

impl Expr {
    pub fn eval(&self, ctx: &Context<'_>) -> Result<Value, EvalError> {
        use Value::*;
        match (self, ctx) {
            (Expr::Literal(v), _) => Ok(v.clone()),
            (Expr::Slot(i), Context::Row(row)) => Ok(row.get(*i).cloned().unwrap_or(Null)),
            (Expr::Field(path), Context::Input(input)) => {
                Ok(input.field(path).map_or(Null, Value::from_json))
            }
            (Expr::Meta(meta), Context::Input(input)) => Ok(match meta {
                Meta::Key => input
                    .key
                    .map_or(Null, |k| Str(String::from_utf8_lossy(k).into_owned())),
                Meta::Value => Str(String::from_utf8_lossy(input.raw).into_owned()),
                Meta::Timestamp => Timestamp(input.timestamp),
                Meta::Partition => Int(input.partition as i64),
                Meta::Offset => Int(input.offset),
            }),
            (Expr::Header(name), Context::Input(input)) => Ok(input
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.as_ref())
                .map_or(Null, |v| Str(String::from_utf8_lossy(v).into_owned()))),
            (Expr::JsonGet { base, key, text }, _) => {
                let base = base.eval(ctx)?;
                let key = key.eval(ctx)?;
                let json = match base {
                    Json(j) => j,
                    Str(s) => match serde_json::from_str(&s) {
                        Ok(j) => j,
                        Err(_) => return Ok(Null),
                    },
                    _ => return Ok(Null),
                };
                let got = match key {
                    Str(k) => json.get(&k).cloned(),
                    Int(i) => usize::try_from(i).ok().and_then(|i| json.get(i).cloned()),
                    _ => None,
                };
                Ok(match got {
                    None | Some(serde_json::Value::Null) => Null,
                    Some(serde_json::Value::String(s)) if *text => Str(s),
                    Some(j) if *text => Str(j.to_string()),
                    Some(j) => match Value::from_json(&j) {
                        Json(j) => Json(j),
                        Str(s) => Str(s),
                        other => other,
                    },
                })
            }
            (Expr::Binary(l, BinOp::And, r), _) => {
                let (a, b) = (truth(l.eval(ctx)?)?, truth(r.eval(ctx)?)?);
                Ok(match (a, b) {
                    (Some(false), _) | (_, Some(false)) => Bool(false),
                    (Some(true), Some(true)) => Bool(true),
                    _ => Null,
                })
            }
            (Expr::Binary(l, BinOp::Or, r), _) => {
                let (a, b) = (truth(l.eval(ctx)?)?, truth(r.eval(ctx)?)?);
                Ok(match (a, b) {
                    (Some(true), _) | (_, Some(true)) => Bool(true),
                    (Some(false), Some(false)) => Bool(false),
                    _ => Null,
                })
            }
            (Expr::Binary(l, op, r), _) => {
                let (a, b) = (l.eval(ctx)?, r.eval(ctx)?);
                if a.is_null() || b.is_null() {
                    return Ok(Null);
                }
                use std::cmp::Ordering::*;
                Ok(match op {
                    BinOp::Concat => Str(as_text(&a) + &as_text(&b)),
                    BinOp::Eq => Bool(compare(&a, &b)? == Equal),
                    BinOp::Ne => Bool(compare(&a, &b)? != Equal),
                    BinOp::Lt => Bool(compare(&a, &b)? == Less),
                    BinOp::Le => Bool(compare(&a, &b)? != Greater),
                    BinOp::Gt => Bool(compare(&a, &b)? == Greater),
                    BinOp::Ge => Bool(compare(&a, &b)? != Less),
                    _ => arith(*op, a, b)?,
                })
            }
            (Expr::Not(e), _) => Ok(match truth(e.eval(ctx)?)? {
                Some(b) => Bool(!b),
                None => Null,
            }),
            (Expr::Neg(e), _) => match e.eval(ctx)? {
                Null => Ok(Null),
                Int(i) => i
                    .checked_neg()
                    .map(Int)
                    .ok_or_else(|| EvalError("integer overflow".into())),
                Float(f) => Ok(Float(-f)),
                other => err(format!("cannot negate {}", type_name(&other))),
            },
            (Expr::IsNull { expr, negated }, _) => Ok(Bool(expr.eval(ctx)?.is_null() != *negated)),
            (
                Expr::Like {
                    expr,
                    pattern,
                    negated,
                    case_insensitive,
                },
                _,
            ) => {
                let (v, p) = (expr.eval(ctx)?, pattern.eval(ctx)?);
                if v.is_null() || p.is_null() {
                    return Ok(Null);
                }
                let (mut t, mut p) = (as_text(&v), as_text(&p));
                if *case_insensitive {
                    t = t.to_lowercase();
                    p = p.to_lowercase();
                }
                Ok(Bool(like(&t, &p) != *negated))
            }
            (
                Expr::Regex {
                    expr,
                    pattern,
                    negated,
                },
                _,
            ) => {
                let v = expr.eval(ctx)?;
                if v.is_null() {
                    return Ok(Null);
                }
                Ok(Bool(pattern.is_match(&as_text(&v)) != *negated))
            }
            (
                Expr::InList {
                    expr,
                    list,
                    negated,
                },
                _,
            ) => {
                let v = expr.eval(ctx)?;
                if v.is_null() {
                    return Ok(Null);
                }
                let mut saw_null = false;
                for item in list {
                    let i = item.eval(ctx)?;
                    if i.is_null() {
                        saw_null = true;
                    } else if compare(&v, &i)? == std::cmp::Ordering::Equal {
                        return Ok(Bool(!negated));
                    }
                }
                Ok(if saw_null { Null } else { Bool(*negated) })
            }
            (
                Expr::Between {
                    expr,
                    low,
                    high,
                    negated,
                },
                _,
            ) => {
                let (v, lo, hi) = (expr.eval(ctx)?, low.eval(ctx)?, high.eval(ctx)?);
                if v.is_null() || lo.is_null() || hi.is_null() {
                    return Ok(Null);
                }
                let inside = compare(&v, &lo)? != std::cmp::Ordering::Less
                    && compare(&v, &hi)? != std::cmp::Ordering::Greater;
                Ok(Bool(inside != *negated))
            }
            (
                Expr::Case {
                    operand,
                    whens,
                    otherwise,
                },
                _,
            ) => {
                let subject = operand.as_ref().map(|o| o.eval(ctx)).transpose()?;
                for (when, then) in whens {
                    let w = when.eval(ctx)?;
                    let hit = match &subject {
                        Some(s) => {
                            !s.is_null()
                                && !w.is_null()
                                && compare(s, &w)? == std::cmp::Ordering::Equal
                        }
                        None => w.is_true(),
                    };
                    if hit {
                        return then.eval(ctx);
                    }
                }
                otherwise.as_ref().map_or(Ok(Null), |o| o.eval(ctx))
            }
            (Expr::Cast(e, to), _) => cast(e.eval(ctx)?, *to),
            (Expr::Call(func, args), _) => {
                let vals = args
                    .iter()
                    .map(|a| a.eval(ctx))
                    .collect::<Result<Vec<_>, _>>()?;
                crate::functions::call(*func, vals)
            }
            (expr, _) => Err(EvalError(format!(
                "{expr:?} evaluated in the wrong context"
            ))),
        }
    }
}

/// A boolean operand: `Some(b)`, or `None` for NULL.
fn truth(v: Value) -> Result<Option<bool>, EvalError> {
    match v {
        Value::Bool(b) => Ok(Some(b)),
        Value::Null => Ok(None),
        other => err(format!("expected a boolean, got {}", type_name(&other))),
    }
}

pub(crate) fn type_of(v: &Value) -> &'static str {
    type_name(v)
}

pub(crate) fn text_of(v: &Value) -> String {
    as_text(v)
}
