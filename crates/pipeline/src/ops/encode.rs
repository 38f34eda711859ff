//! The canonical byte form of values (group keys, distinct sets, snapshots), the
//! stable hash over it, and the reader that decodes snapshots without panicking.

use sql::Value;

const NULL: u8 = 0;
const BOOL: u8 = 1;
const INT: u8 = 2;
const FLOAT: u8 = 3;
const STR: u8 = 4;
const TIMESTAMP: u8 = 5;
const JSON: u8 = 6;

/// Appends the canonical form of `v`: type-tagged, except that a float with an
/// integral value in the i64 range is the integer (so `1` and `1.0` group together).
pub fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(NULL),
        Value::Bool(b) => out.extend_from_slice(&[BOOL, *b as u8]),
        Value::Int(i) => {
            out.push(INT);
            out.extend_from_slice(&i.to_be_bytes());
        }
        Value::Float(f) => {
            if f.fract() == 0.0 && *f >= i64::MIN as f64 && *f < i64::MAX as f64 {
                out.push(INT);
                out.extend_from_slice(&(*f as i64).to_be_bytes());
            } else {
                out.push(FLOAT);
                out.extend_from_slice(&f.to_bits().to_be_bytes());
            }
        }
        Value::Str(s) => bytes_tagged(out, STR, s.as_bytes()),
        Value::Timestamp(t) => {
            out.push(TIMESTAMP);
            out.extend_from_slice(&t.to_be_bytes());
        }
        Value::Json(j) => bytes_tagged(out, JSON, j.to_string().as_bytes()),
    }
}

/// What [`value`] writes for `Value::from_json(v)` (`None`: NULL), without building
/// the value: a group key read straight from the record costs no allocation.
pub fn json(out: &mut Vec<u8>, v: Option<&serde_json::Value>) {
    use serde_json::Value as J;
    match v {
        None | Some(J::Null) => out.push(NULL),
        Some(J::Bool(b)) => out.extend_from_slice(&[BOOL, *b as u8]),
        Some(J::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => value(out, &Value::Int(i)),
            (None, Some(f)) => value(out, &Value::Float(f)),
            (None, None) => out.push(NULL),
        },
        Some(J::String(s)) => bytes_tagged(out, STR, s.as_bytes()),
        Some(other) => bytes_tagged(out, JSON, other.to_string().as_bytes()),
    }
}

fn bytes_tagged(out: &mut Vec<u8>, tag: u8, b: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

pub fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

pub fn i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn opt_i64(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            i64(out, v);
        }
    }
}

/// FNV-1a 64 finished with murmur3's fmix64: the same in every process and build,
/// since HyperLogLog registers built from it are checkpointed.
pub fn hash(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Reads what the functions above wrote; every read checks its bounds.
pub struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

pub type Result<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, at: 0 }
    }

    pub fn done(&self) -> bool {
        self.at == self.data.len()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("snapshot truncated")?;
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn i64(&mut self) -> Result<i64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    pub fn opt_i64(&mut self) -> Result<Option<i64>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.i64()?)),
            t => Err(format!("snapshot: bad option tag {t}")),
        }
    }

    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// A count of items that each take at least one byte: bounded by what is left.
    pub fn count(&mut self) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > self.data.len() - self.at {
            return Err("snapshot: count larger than the data".into());
        }
        Ok(n)
    }

    pub fn value(&mut self) -> Result<Value> {
        Ok(match self.u8()? {
            NULL => Value::Null,
            BOOL => Value::Bool(self.u8()? != 0),
            INT => Value::Int(self.i64()?),
            FLOAT => Value::Float(f64::from_bits(self.i64()? as u64)),
            STR => Value::Str(
                std::str::from_utf8(self.bytes()?)
                    .map_err(|_| "snapshot: string not UTF-8")?
                    .to_string(),
            ),
            TIMESTAMP => Value::Timestamp(self.i64()?),
            JSON => Value::Json(
                serde_json::from_slice(self.bytes()?).map_err(|e| format!("snapshot: {e}"))?,
            ),
            t => return Err(format!("snapshot: bad value tag {t}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            (-1e6f64..1e6).prop_map(|f| serde_json::Value::from(f.trunc())),
            ".{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// A key read straight from the record has the bytes of the value built from it.
        #[test]
        fn json_writes_what_value_writes(v in json_value()) {
            let (mut direct, mut built) = (Vec::new(), Vec::new());
            json(&mut direct, Some(&v));
            value(&mut built, &Value::from_json(&v));
            prop_assert_eq!(direct, built);
        }
    }

    #[test]
    fn an_absent_field_writes_null() {
        let (mut direct, mut built) = (Vec::new(), Vec::new());
        json(&mut direct, None);
        value(&mut built, &Value::Null);
        assert_eq!(direct, built);
    }
}
