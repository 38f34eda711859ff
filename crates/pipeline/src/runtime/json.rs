//! Reading a source value as JSON, keeping only the top-level fields the queries
//! read ([`sql::plan::Query::json_fields`]), each in its place in a list
//! ([`sql::expr::Json::Fields`]), with no map and no key allocated: the other fields
//! are checked for syntax and skipped, never allocated (their strings, and the keys,
//! are not checked for valid UTF-8). A value that is not an object has every field NULL, as a
//! missing field.

use std::borrow::Cow;
use std::fmt;

use serde::de::{
    Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::Value;

/// The top-level fields to keep. Every key of every record is looked up here, so it
/// is a list compared by length first: queries read a handful of fields, and a
/// sorted set's string compares cost 2% of a grouped query's time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wanted(Vec<String>);

impl Wanted {
    fn position(&self, key: &[u8]) -> Option<usize> {
        self.0
            .iter()
            .position(|f| f.len() == key.len() && f.as_bytes() == key)
    }

    /// The record `values` (as [`parse`] returned them) as expressions read it.
    pub fn json<'a>(&'a self, values: &'a [Value]) -> sql::expr::Json<'a> {
        sql::expr::Json::Fields {
            names: &self.0,
            values,
        }
    }
}

impl FromIterator<String> for Wanted {
    fn from_iter<I: IntoIterator<Item = String>>(fields: I) -> Wanted {
        let mut fields: Vec<String> = fields.into_iter().collect();
        fields.sort();
        fields.dedup();
        Wanted(fields)
    }
}

/// Parses `bytes` (one JSON value, nothing after it but whitespace) into `values`:
/// the value of each of `fields`, in its order (`Null` when absent; the last of a
/// repeated key). `values` is a buffer reused from record to record: a string field
/// is written into the string the record before left in its place, so a field every
/// record has costs no allocation once its longest value has been seen.
pub fn parse(
    bytes: &[u8],
    fields: &Wanted,
    values: &mut Vec<Value>,
) -> Result<(), serde_json::Error> {
    values.resize(fields.0.len(), Value::Null);
    // Which fields this record has; the fields past the 64th are not followed, and
    // start from `Null`.
    for v in values.iter_mut().skip(64) {
        *v = Value::Null;
    }
    let mut seen = 0u64;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Fields(fields, values, &mut seen)
        .deserialize(&mut de)
        .and_then(|()| de.end());
    for (i, v) in values.iter_mut().enumerate() {
        if parsed.is_err() || (i < 64 && seen & (1 << i) == 0) {
            *v = Value::Null;
        }
    }
    parsed
}

struct Fields<'a>(&'a Wanted, &'a mut [Value], &'a mut u64);

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(Key)? {
            match self.0.position(key.as_ref()) {
                Some(i) => {
                    map.next_value_seed(Place(&mut self.1[i]))?;
                    if i < 64 {
                        *self.2 |= 1 << i;
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// A field's value, written over the value in its place: into its string when both
/// are strings (no allocation while the new one fits), else replacing it; as
/// `Value`'s own `Deserialize` would read it.
struct Place<'a>(&'a mut Value);

impl<'de> DeserializeSeed<'de> for Place<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Place<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        match self.0 {
            Value::String(s) => {
                s.clear();
                s.push_str(v);
            }
            other => *other = Value::String(v.to_owned()),
        }
        Ok(())
    }

    fn visit_string<E>(self, v: String) -> Result<(), E> {
        *self.0 = Value::String(v);
        Ok(())
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        *self.0 = Value::Bool(v);
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        *self.0 = Value::from(v);
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        *self.0 = Value::from(v);
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        *self.0 = serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        *self.0 = Value::Null;
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        *self.0 = Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        *self.0 = Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        Ok(())
    }
}

/// An object key's bytes (escapes resolved), borrowed from the input when it has
/// none. Not checked for UTF-8 (it is compared with the wanted names' bytes).
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, [u8]>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, [u8]>, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, [u8]>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Cow<'de, [u8]>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Cow<'de, [u8]>, E> {
        Ok(Cow::Owned(v.to_vec()))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, [u8]>, E> {
        Ok(Cow::Borrowed(v.as_bytes()))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, [u8]>, E> {
        Ok(Cow::Owned(v.as_bytes().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z\"\\\\é ]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-c\"]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Each field asked for reads as in a full parse (absent: `None`), and only
        /// those are kept.
        #[test]
        fn keeps_exactly_the_fields_asked_for(value in json(), fields in proptest::collection::btree_set("[a-c\"]{1,2}", 0..4), other in "[a-c\"]{1,2}") {
            let text = serde_json::to_vec(&value).unwrap();
            let wanted: Wanted = fields.iter().cloned().collect();
            let mut values = Vec::new();
            parse(&text, &wanted, &mut values).unwrap();
            let got = wanted.json(&values);
            for f in &fields {
                let want = value.get(f).filter(|v| !v.is_null());
                prop_assert_eq!(got.field(f).filter(|v| !v.is_null()), want, "field {}", f);
            }
            if !fields.contains(&other) {
                prop_assert_eq!(got.field(&other), None);
            }
        }

        /// A record parsed into the buffer the record before left reads as one
        /// parsed into an empty buffer (strings written over strings, fields the
        /// record lacks back to `Null`).
        #[test]
        fn a_reused_buffer_reads_as_a_fresh_one(before in json(), value in json(), fields in proptest::collection::btree_set("[a-c\"]{1,2}", 0..4)) {
            let wanted: Wanted = fields.iter().cloned().collect();
            let mut reused = Vec::new();
            let _ = parse(&serde_json::to_vec(&before).unwrap(), &wanted, &mut reused);
            let text = serde_json::to_vec(&value).unwrap();
            parse(&text, &wanted, &mut reused).unwrap();
            let mut fresh = Vec::new();
            parse(&text, &wanted, &mut fresh).unwrap();
            prop_assert_eq!(reused, fresh);
        }

        /// What a full parse refuses for its syntax is refused too.
        #[test]
        fn refuses_what_is_not_json(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let full = serde_json::from_slice::<Value>(&bytes).is_ok();
            let fields: Wanted = ["a".to_string()].into_iter().collect();
            prop_assert_eq!(parse(&bytes, &fields, &mut Vec::new()).is_ok(), full);
        }
    }

    /// Past the 64 fields whose presence is followed, a field a record lacks is
    /// `Null` too, not the value the record before left.
    #[test]
    fn many_fields_absent_read_as_null() {
        let names: Vec<String> = (0..70).map(|i| format!("f{i:02}")).collect();
        let wanted: Wanted = names.iter().cloned().collect();
        let all: serde_json::Map<String, Value> = names
            .iter()
            .map(|n| (n.clone(), Value::from(n.as_str())))
            .collect();
        let mut values = Vec::new();
        parse(&serde_json::to_vec(&all).unwrap(), &wanted, &mut values).unwrap();
        assert!(values.iter().all(Value::is_string));
        parse(b"{\"f69\": 1}", &wanted, &mut values).unwrap();
        assert_eq!(values[69], Value::from(1));
        assert!(values[..69].iter().all(Value::is_null), "{values:?}");
    }

    #[test]
    fn broken_and_trailing_input_is_refused() {
        let fields: Wanted = ["a".to_string()].into_iter().collect();
        for bad in [
            &b"{\"a\": 1"[..],
            b"{\"a\": 1} x",
            b"{\"b\": [1,}",
            b"not json",
            b"",
        ] {
            assert!(
                parse(bad, &fields, &mut Vec::new()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut values = vec![serde_json::json!("left from the record before")];
        parse(
            b" {\"b\": {\"c\": [1, 2]}, \"a\": 1} ",
            &fields,
            &mut values,
        )
        .unwrap();
        assert_eq!(values, vec![serde_json::json!(1)]);
        parse(b"{\"b\": 2}", &fields, &mut values).unwrap();
        assert_eq!(values, vec![Value::Null]);
    }
}
