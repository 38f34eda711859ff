//! The one settings loader: defaults, overlaid by a TOML table (from the config file),
//! overlaid by `PREFIX<KEY>` environment variables; command-line flags are the
//! caller's last word. Used by the broker (`FRESHET_*`, the file's top level) and the
//! gateway (`FRESHET_HTTP_*`, the file's `[http]` table).
//!
//! The keys are the settings struct's own fields, as its derived `Deserialize` names
//! them (no hand-kept list to drift), and an environment value is read as the type of
//! that field's default: `FRESHET_DATA_DIR=123` is the path `123`, not a number, and
//! `true`/`false` are booleans only where the setting is one. Tables and arrays are
//! set in the file only; a field whose default is absent (an `Option` that is `None`)
//! takes the value as a string.

use serde::de::{self, DeserializeOwned, Visitor};
use serde::Serialize;

/// Why settings could not be loaded: the message names the key or file at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError(pub String);

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SettingsError {}

/// Reads a TOML file into a table.
pub fn read_toml(path: &std::path::Path) -> Result<toml::Table, SettingsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingsError(format!("cannot read {}: {e}", path.display())))?;
    text.parse::<toml::Table>()
        .map_err(|e| SettingsError(format!("{}: {e}", path.display())))
}

/// What to do with a `{env_prefix}{KEY}` variable whose key is no field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownEnv {
    /// Leave it alone: the prefix is shared with other components or tools
    /// (`FRESHET_BROKERS` is the tools', `FRESHET_HTTP_*` the gateway's).
    Ignore,
    /// Refuse it, naming it: the prefix is this component's alone, so it is a typo.
    Refuse,
}

/// `T::default()`, overlaid by `file` (a TOML table, unknown keys refused if `T`
/// denies them), overlaid by every `{env_prefix}{KEY}` variable of `env` whose key
/// (lower-cased) is a field of `T`; the others as `unknown` says.
pub fn load<T>(
    file: toml::Table,
    env_prefix: &str,
    unknown: UnknownEnv,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, SettingsError>
where
    T: DeserializeOwned + Serialize + Default,
{
    let defaults = toml::Table::try_from(T::default())
        .map_err(|e| SettingsError(format!("defaults do not serialize: {e}")))?;
    let fields = field_names::<T>();
    let mut table = file;
    for (name, raw) in env {
        let Some(key) = name.strip_prefix(env_prefix) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if !fields.contains(&key.as_str()) {
            if unknown == UnknownEnv::Refuse {
                return Err(SettingsError(format!("{name}: no setting `{key}`")));
            }
            continue;
        }
        let value = match defaults.get(&key) {
            Some(toml::Value::Integer(_)) => raw
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| SettingsError(format!("{name}: {raw:?} is not a whole number")))?,
            Some(toml::Value::Float(_)) => raw
                .trim()
                .parse::<f64>()
                .map(toml::Value::Float)
                .map_err(|_| SettingsError(format!("{name}: {raw:?} is not a number")))?,
            Some(toml::Value::Boolean(_)) => match raw.trim() {
                "true" => toml::Value::Boolean(true),
                "false" => toml::Value::Boolean(false),
                _ => {
                    return Err(SettingsError(format!(
                        "{name}: {raw:?} is not true or false"
                    )))
                }
            },
            Some(toml::Value::Table(_)) | Some(toml::Value::Array(_)) => {
                return Err(SettingsError(format!(
                    "{name}: `{key}` is a table or list: set it in the config file"
                )))
            }
            Some(toml::Value::String(_)) | Some(toml::Value::Datetime(_)) | None => {
                toml::Value::String(raw)
            }
        };
        table.insert(key, value);
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| SettingsError(e.to_string().trim_end().to_string()))
}

/// The field names `T`'s derived `Deserialize` expects: it hands them to
/// `deserialize_struct`, which this deserializer records and then refuses.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Names(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names recorded")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> de::Deserializer<'de> for &mut Names {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut names = Names(None);
    let _ = T::deserialize(&mut names);
    names.0.unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Example {
        data_dir: PathBuf,
        port: u16,
        verbose: bool,
        advertised: Option<String>,
        extra: std::collections::BTreeMap<String, String>,
    }

    impl Default for Example {
        fn default() -> Self {
            Example {
                data_dir: "./data".into(),
                port: 80,
                verbose: false,
                advertised: None,
                extra: Default::default(),
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_values_take_the_type_of_their_field() {
        let file: toml::Table = "port = 81\nverbose = true".parse().unwrap();
        let loaded: Example = load(
            file,
            "X_",
            UnknownEnv::Ignore,
            env(&[
                ("X_DATA_DIR", "123"),
                ("X_VERBOSE", "false"),
                ("X_ADVERTISED", "h:1"),
                ("X_UNRELATED", "whatever"),
                ("OTHER_PORT", "9"),
            ]),
        )
        .unwrap();
        assert_eq!(
            loaded,
            Example {
                data_dir: "123".into(),
                port: 81,
                verbose: false,
                advertised: Some("h:1".into()),
                extra: Default::default(),
            }
        );
    }

    #[test]
    fn bad_values_and_unknown_file_keys_are_errors_that_name_them() {
        let err = load::<Example>(
            toml::Table::new(),
            "X_",
            UnknownEnv::Ignore,
            env(&[("X_PORT", "eighty")]),
        )
        .unwrap_err();
        assert!(err.0.contains("X_PORT"), "{err}");
        let err = load::<Example>(
            toml::Table::new(),
            "X_",
            UnknownEnv::Ignore,
            env(&[("X_VERBOSE", "yes")]),
        )
        .unwrap_err();
        assert!(err.0.contains("X_VERBOSE"), "{err}");
        let err = load::<Example>(
            toml::Table::new(),
            "X_",
            UnknownEnv::Ignore,
            env(&[("X_EXTRA", "a=b")]),
        )
        .unwrap_err();
        assert!(err.0.contains("config file"), "{err}");
        let err = load::<Example>(
            "colour = 1".parse().unwrap(),
            "X_",
            UnknownEnv::Ignore,
            env(&[]),
        )
        .unwrap_err();
        assert!(err.0.contains("colour"), "{err}");
        let err = load::<Example>(
            toml::Table::new(),
            "X_",
            UnknownEnv::Ignore,
            env(&[("X_PORT", "70000")]),
        )
        .unwrap_err();
        assert!(err.0.contains("70000") || err.0.contains("port"), "{err}");
        let err = load::<Example>(
            toml::Table::new(),
            "X_",
            UnknownEnv::Refuse,
            env(&[("X_PROT", "1")]),
        )
        .unwrap_err();
        assert!(err.0.contains("X_PROT"), "{err}");
    }

    #[test]
    fn the_keys_are_the_structs_fields() {
        assert_eq!(
            field_names::<Example>(),
            &["data_dir", "port", "verbose", "advertised", "extra"]
        );
    }
}
