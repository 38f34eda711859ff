//! Reading a source value as JSON, keeping only the top-level fields the queries
//! read ([`sql::plan::Query::json_fields`]): the others are checked for syntax and
//! skipped, never allocated (their strings are not checked for valid UTF-8). A value
//! that is not an object reads as `Null` (every field of it is NULL, as with the
//! whole value).

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The top-level fields to keep. Every key of every record is looked up here, so it
/// is a list compared by length first: queries read a handful of fields, and a
/// sorted set's string compares cost 2% of a grouped query's time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wanted(Vec<String>);

impl Wanted {
    fn contains(&self, key: &str) -> bool {
        self.0.iter().any(|f| f.len() == key.len() && f == key)
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

/// Parses `bytes` (one JSON value, nothing after it but whitespace).
pub fn parse(bytes: &[u8], fields: &Wanted) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Fields(fields).deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

struct Fields<'a>(&'a Wanted);

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key_seed(Key)? {
            if self.0.contains(key.as_ref()) {
                let value: Value = map.next_value()?;
                out.insert(key.into_owned(), value);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_str<E>(self, _: &str) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// An object key, borrowed from the input when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_string()))
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
        /// The fields kept are those of a full parse; the others are absent.
        #[test]
        fn keeps_exactly_the_fields_asked_for(value in json(), fields in proptest::collection::btree_set("[a-c\"]{1,2}", 0..4)) {
            let text = serde_json::to_vec(&value).unwrap();
            let got = parse(&text, &fields.iter().cloned().collect()).unwrap();
            match &value {
                Value::Object(all) => {
                    let want: serde_json::Map<String, Value> = all.iter()
                        .filter(|(k, _)| fields.contains(*k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    prop_assert_eq!(got, Value::Object(want));
                }
                _ => prop_assert_eq!(got, Value::Null),
            }
        }

        /// What a full parse refuses for its syntax is refused too.
        #[test]
        fn refuses_what_is_not_json(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let full = serde_json::from_slice::<Value>(&bytes).is_ok();
            let fields: Wanted = ["a".to_string()].into_iter().collect();
            prop_assert_eq!(parse(&bytes, &fields).is_ok(), full);
        }
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
                parse(bad, &fields).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse(b" {\"b\": {\"c\": [1, 2]}, \"a\": 1} ", &fields).unwrap(),
            serde_json::json!({"a": 1})
        );
    }
}
