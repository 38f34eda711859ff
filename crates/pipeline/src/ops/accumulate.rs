//! Accumulators: one per aggregate call of a group, mergeable (session windows merge
//! groups), with their snapshot form and approximate size.

use std::cmp::Ordering;

use sql::plan::AggFunc;
use sql::Value;

use super::encode::{self, Reader};
use super::Set;

/// HyperLogLog precision: 2^12 registers, a standard error of about 1.6%.
const HLL_P: u32 = 12;
const HLL_M: usize = 1 << HLL_P;
/// Below this many distinct hashes the sketch keeps them exactly (cheap for small
/// groups); above, it becomes the dense registers.
const HLL_SPARSE_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub enum Acc {
    Count(i64),
    Distinct(Set<Item>),
    Hll(Hll),
    Sum {
        int: i64,
        float: f64,
        is_float: bool,
        any: bool,
    },
    Min(Option<Value>),
    Max(Option<Value>),
    Avg {
        sum: f64,
        n: i64,
    },
}

/// One value of a `COUNT(DISTINCT)` set, in its canonical byte form: inline up to
/// [`Item::INLINE`] bytes (ids, numbers and short strings cost no allocation, which
/// was a fifth of a hopping distinct count's time), on the heap beyond. Hashes and
/// compares as its bytes, so a set of them is looked up by `&[u8]`.
#[derive(Clone)]
pub enum Item {
    Inline(u8, [u8; Item::INLINE]),
    Heap(Box<[u8]>),
}

impl Item {
    pub const INLINE: usize = 30;

    pub fn new(bytes: &[u8]) -> Item {
        if bytes.len() <= Item::INLINE {
            let mut buf = [0u8; Item::INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            Item::Inline(bytes.len() as u8, buf)
        } else {
            Item::Heap(bytes.into())
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Item::Inline(len, buf) => &buf[..*len as usize],
            Item::Heap(b) => b,
        }
    }

    /// Approximate bytes held in a set, for the state limit.
    fn size(&self) -> i64 {
        match self {
            Item::Inline(..) => std::mem::size_of::<Item>() as i64 + 8,
            Item::Heap(b) => std::mem::size_of::<Item>() as i64 + 8 + b.len() as i64,
        }
    }
}

impl std::borrow::Borrow<[u8]> for Item {
    fn borrow(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::hash::Hash for Item {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes().hash(state) // as `[u8]` hashes, which `Borrow` requires
    }
}

impl PartialEq for Item {
    fn eq(&self, other: &Item) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Item {}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.bytes())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Hll {
    Sparse(Vec<u64>),
    Dense(Box<[u8; HLL_M]>),
}

/// Whether two values can be ordered against each other (MIN/MAX).
fn class(v: &Value) -> u8 {
    match v {
        Value::Int(_) | Value::Float(_) => 1,
        Value::Str(_) => 2,
        Value::Timestamp(_) => 3,
        Value::Bool(_) => 4,
        _ => 0,
    }
}

pub fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        (Value::Int(x), Value::Float(y)) => (*x as f64).partial_cmp(y),
        (Value::Float(x), Value::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Value::Float(x), Value::Float(y)) => x.partial_cmp(y),
        (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
        (Value::Timestamp(x), Value::Timestamp(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Acc {
    pub fn new(func: AggFunc) -> Acc {
        match func {
            AggFunc::Count => Acc::Count(0),
            AggFunc::CountDistinct => Acc::Distinct(Set::default()),
            AggFunc::ApproxCountDistinct => Acc::Hll(Hll::Sparse(Vec::new())),
            AggFunc::Sum => Acc::Sum {
                int: 0,
                float: 0.0,
                is_float: false,
                any: false,
            },
            AggFunc::Min => Acc::Min(None),
            AggFunc::Max => Acc::Max(None),
            AggFunc::Avg => Acc::Avg { sum: 0.0, n: 0 },
        }
    }

    /// Checks, without changing anything, that `v` can be added (the type errors a
    /// record is rejected for).
    pub fn check(func: AggFunc, v: &Value) -> Result<(), String> {
        match func {
            AggFunc::Sum | AggFunc::Avg => match v {
                Value::Null | Value::Int(_) | Value::Float(_) => Ok(()),
                other => Err(format!(
                    "{}: expected a number, got {}",
                    name(func),
                    describe(other)
                )),
            },
            AggFunc::Min | AggFunc::Max => match v {
                Value::Null => Ok(()),
                other if class(other) == 0 => {
                    Err(format!("{}: cannot order {}", name(func), describe(other)))
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Checks that `v` is comparable with what this MIN/MAX holds.
    pub fn check_against(&self, v: &Value) -> Result<(), String> {
        if let Acc::Min(Some(cur)) | Acc::Max(Some(cur)) = self {
            if !v.is_null() && class(cur) != class(v) {
                return Err(format!(
                    "MIN/MAX: cannot compare {} with the {} values seen before",
                    describe(v),
                    describe(cur)
                ));
            }
        }
        Ok(())
    }

    /// Adds one input (`None`: COUNT(*)'s row without an argument). Returns the
    /// change in approximate bytes.
    pub fn add(&mut self, v: Option<&Value>, scratch: &mut Vec<u8>) -> i64 {
        match self {
            Acc::Count(n) => {
                if v.is_none_or(|v| !v.is_null()) {
                    *n += 1;
                }
                0
            }
            Acc::Distinct(set) => match v {
                Some(v) if !v.is_null() => {
                    scratch.clear();
                    encode::value(scratch, v);
                    if set.contains(scratch.as_slice()) {
                        0
                    } else {
                        let item = Item::new(scratch);
                        let size = item.size();
                        set.insert(item);
                        size
                    }
                }
                _ => 0,
            },
            Acc::Hll(h) => match v {
                Some(v) if !v.is_null() => {
                    scratch.clear();
                    encode::value(scratch, v);
                    h.add(encode::hash(scratch))
                }
                _ => 0,
            },
            Acc::Sum {
                int,
                float,
                is_float,
                any,
            } => {
                match v {
                    Some(Value::Int(i)) => {
                        *any = true;
                        if *is_float {
                            *float += *i as f64;
                        } else {
                            match int.checked_add(*i) {
                                Some(s) => *int = s,
                                None => {
                                    *is_float = true;
                                    *float = *int as f64 + *i as f64;
                                }
                            }
                        }
                    }
                    Some(Value::Float(f)) => {
                        *any = true;
                        if !*is_float {
                            *is_float = true;
                            *float = *int as f64;
                        }
                        *float += f;
                    }
                    _ => {}
                }
                0
            }
            Acc::Min(cur) => keep_if(cur, v, Ordering::Less),
            Acc::Max(cur) => keep_if(cur, v, Ordering::Greater),
            Acc::Avg { sum, n } => {
                match v {
                    Some(Value::Int(i)) => {
                        *sum += *i as f64;
                        *n += 1;
                    }
                    Some(Value::Float(f)) => {
                        *sum += f;
                        *n += 1;
                    }
                    _ => {}
                }
                0
            }
        }
    }

    /// Folds `other` (of the same function) into this one; returns the change in bytes.
    pub fn merge(&mut self, other: Acc) -> i64 {
        match (self, other) {
            (Acc::Count(a), Acc::Count(b)) => {
                *a += b;
                0
            }
            (Acc::Distinct(a), Acc::Distinct(b)) => {
                let mut delta = 0;
                for v in b {
                    let size = v.size();
                    if a.insert(v) {
                        delta += size;
                    }
                }
                delta
            }
            (Acc::Hll(a), Acc::Hll(b)) => match b {
                Hll::Sparse(hashes) => hashes.into_iter().map(|h| a.add(h)).sum(),
                Hll::Dense(regs) => {
                    let delta = a.densify();
                    if let Hll::Dense(mine) = a {
                        for (m, r) in mine.iter_mut().zip(regs.iter()) {
                            *m = (*m).max(*r);
                        }
                    }
                    delta
                }
            },
            (
                Acc::Sum {
                    int,
                    float,
                    is_float,
                    any,
                },
                Acc::Sum {
                    int: i2,
                    float: f2,
                    is_float: fl2,
                    any: any2,
                },
            ) => {
                *any |= any2;
                let a_float = if *is_float { *float } else { *int as f64 };
                let b_float = if fl2 { f2 } else { i2 as f64 };
                if *is_float || fl2 {
                    *is_float = true;
                    *float = a_float + b_float;
                } else {
                    match int.checked_add(i2) {
                        Some(s) => *int = s,
                        None => {
                            *is_float = true;
                            *float = a_float + b_float;
                        }
                    }
                }
                0
            }
            (me @ Acc::Min(_), Acc::Min(Some(v))) | (me @ Acc::Max(_), Acc::Max(Some(v)))
                if me.check_against(&v).is_ok() =>
            {
                me.add(Some(&v), &mut Vec::new())
            }
            (Acc::Avg { sum, n }, Acc::Avg { sum: s2, n: n2 }) => {
                *sum += s2;
                *n += n2;
                0
            }
            _ => 0,
        }
    }

    pub fn result(&self) -> Value {
        match self {
            Acc::Count(n) => Value::Int(*n),
            Acc::Distinct(set) => Value::Int(set.len() as i64),
            Acc::Hll(h) => Value::Int(h.estimate()),
            Acc::Sum { any: false, .. } => Value::Null,
            Acc::Sum {
                is_float: true,
                float,
                ..
            } => Value::Float(*float),
            Acc::Sum { int, .. } => Value::Int(*int),
            Acc::Min(v) | Acc::Max(v) => v.clone().unwrap_or(Value::Null),
            Acc::Avg { n: 0, .. } => Value::Null,
            Acc::Avg { sum, n } => Value::Float(sum / *n as f64),
        }
    }

    /// Approximate bytes held beyond the enum itself.
    pub fn size(&self) -> i64 {
        match self {
            Acc::Distinct(set) => set.iter().map(Item::size).sum(),
            Acc::Hll(Hll::Sparse(v)) => v.len() as i64 * 8,
            Acc::Hll(Hll::Dense(_)) => HLL_M as i64,
            Acc::Min(Some(v)) | Acc::Max(Some(v)) => size_of_value(v),
            _ => 0,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Acc::Count(n) => {
                out.push(0);
                encode::i64(out, *n);
            }
            Acc::Distinct(set) => {
                out.push(1);
                let mut items: Vec<&[u8]> = set.iter().map(Item::bytes).collect();
                items.sort_unstable();
                out.extend_from_slice(&(items.len() as u32).to_be_bytes());
                for v in items {
                    encode::bytes(out, v);
                }
            }
            Acc::Hll(Hll::Sparse(hashes)) => {
                // In order, as the distinct sets: the list's own order depends on how
                // merges (of session windows, of slices) came, which a replay from a
                // checkpoint need not repeat; the same hashes encode the same.
                out.push(2);
                let mut sorted = hashes.clone();
                sorted.sort_unstable();
                out.extend_from_slice(&(sorted.len() as u32).to_be_bytes());
                for h in sorted {
                    encode::i64(out, h as i64);
                }
            }
            Acc::Hll(Hll::Dense(regs)) => {
                out.push(3);
                out.extend_from_slice(&regs[..]);
            }
            Acc::Sum {
                int,
                float,
                is_float,
                any,
            } => {
                out.push(4);
                encode::i64(out, *int);
                encode::i64(out, float.to_bits() as i64);
                out.push(*is_float as u8 | (*any as u8) << 1);
            }
            Acc::Min(v) | Acc::Max(v) => {
                out.push(if matches!(self, Acc::Min(_)) { 5 } else { 6 });
                match v {
                    None => out.push(0),
                    Some(v) => {
                        out.push(1);
                        encode::value(out, v);
                    }
                }
            }
            Acc::Avg { sum, n } => {
                out.push(7);
                encode::i64(out, sum.to_bits() as i64);
                encode::i64(out, *n);
            }
        }
    }

    pub fn decode(r: &mut Reader<'_>) -> encode::Result<Acc> {
        Ok(match r.u8()? {
            0 => Acc::Count(r.i64()?),
            1 => {
                let n = r.count()?;
                let mut set = Set::with_capacity_and_hasher(n, Default::default());
                for _ in 0..n {
                    set.insert(Item::new(r.bytes()?));
                }
                Acc::Distinct(set)
            }
            2 => {
                let n = r.count()?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(r.i64()? as u64);
                }
                Acc::Hll(Hll::Sparse(v))
            }
            3 => {
                let mut regs = Box::new([0u8; HLL_M]);
                regs.copy_from_slice(r.take(HLL_M)?);
                Acc::Hll(Hll::Dense(regs))
            }
            4 => {
                let int = r.i64()?;
                let float = f64::from_bits(r.i64()? as u64);
                let flags = r.u8()?;
                Acc::Sum {
                    int,
                    float,
                    is_float: flags & 1 != 0,
                    any: flags & 2 != 0,
                }
            }
            t @ (5 | 6) => {
                let v = match r.u8()? {
                    0 => None,
                    _ => Some(r.value()?),
                };
                if t == 5 {
                    Acc::Min(v)
                } else {
                    Acc::Max(v)
                }
            }
            7 => {
                let sum = f64::from_bits(r.i64()? as u64);
                Acc::Avg { sum, n: r.i64()? }
            }
            t => return Err(format!("snapshot: bad accumulator tag {t}")),
        })
    }
}

impl Hll {
    /// Adds a hash; returns the change in bytes.
    fn add(&mut self, hash: u64) -> i64 {
        match self {
            Hll::Sparse(v) => {
                if v.contains(&hash) {
                    return 0;
                }
                v.push(hash);
                if v.len() > HLL_SPARSE_MAX {
                    return 8 + self.densify();
                }
                8
            }
            Hll::Dense(regs) => {
                let idx = (hash >> (64 - HLL_P)) as usize;
                let rest = (hash << HLL_P) | (1 << (HLL_P - 1));
                let rank = rest.leading_zeros() as u8 + 1;
                if rank > regs[idx] {
                    regs[idx] = rank;
                }
                0
            }
        }
    }

    fn densify(&mut self) -> i64 {
        if let Hll::Sparse(v) = self {
            let hashes = std::mem::take(v);
            let before = hashes.len() as i64 * 8;
            *self = Hll::Dense(Box::new([0u8; HLL_M]));
            for h in hashes {
                self.add(h);
            }
            return HLL_M as i64 - before;
        }
        0
    }

    fn estimate(&self) -> i64 {
        match self {
            Hll::Sparse(v) => v.len() as i64,
            Hll::Dense(regs) => {
                let m = HLL_M as f64;
                let alpha = 0.7213 / (1.0 + 1.079 / m);
                let mut sum = 0.0;
                let mut zeros = 0;
                for &r in regs.iter() {
                    sum += 2f64.powi(-(r as i32));
                    if r == 0 {
                        zeros += 1;
                    }
                }
                let e = alpha * m * m / sum;
                let e = if e <= 2.5 * m && zeros > 0 {
                    m * (m / zeros as f64).ln()
                } else {
                    e
                };
                e.round() as i64
            }
        }
    }
}

/// MIN/MAX: `v` replaces `cur` when it orders `want` of it.
fn keep_if(cur: &mut Option<Value>, v: Option<&Value>, want: Ordering) -> i64 {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return 0;
    };
    if cur.as_ref().is_some_and(|c| compare(v, c) != Some(want)) {
        return 0;
    }
    let before = cur.as_ref().map_or(0, size_of_value);
    *cur = Some(v.clone());
    size_of_value(v) - before
}

fn size_of_value(v: &Value) -> i64 {
    match v {
        Value::Str(s) => s.len() as i64,
        Value::Json(j) => j.to_string().len() as i64,
        _ => 0,
    }
}

fn name(func: AggFunc) -> &'static str {
    match func {
        AggFunc::Count => "COUNT",
        AggFunc::CountDistinct => "COUNT(DISTINCT)",
        AggFunc::ApproxCountDistinct => "APPROX_COUNT_DISTINCT",
        AggFunc::Sum => "SUM",
        AggFunc::Min => "MIN",
        AggFunc::Max => "MAX",
        AggFunc::Avg => "AVG",
    }
}

pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Int(i) => format!("integer {i}"),
        Value::Float(f) => format!("number {f}"),
        Value::Str(s) => format!("string {:?}", s.chars().take(40).collect::<String>()),
        Value::Timestamp(t) => format!("timestamp {t}"),
        Value::Json(j) => format!(
            "JSON {}",
            j.to_string().chars().take(40).collect::<String>()
        ),
    }
}
