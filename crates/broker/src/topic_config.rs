//! Topic configs: the keys Freshet honours, how each is validated (as Kafka does)
//! and how a topic's explicit values combine with broker defaults.

use std::collections::BTreeMap;

use crate::config::BrokerConfig;

/// Kafka's `ConfigType` codes (DescribeConfigs v3+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigType {
    Boolean = 1,
    String = 2,
    Int = 3,
    Long = 5,
    List = 7,
}

/// Kafka's `ConfigSource` codes.
pub const SOURCE_DYNAMIC_TOPIC: i8 = 1;
pub const SOURCE_DEFAULT: i8 = 5;

pub struct ConfigDef {
    pub name: &'static str,
    pub kind: ConfigType,
    pub doc: &'static str,
    /// Inclusive lower bound for numeric configs.
    min: i64,
    /// Allowed values for string and list configs (empty = any).
    allowed: &'static [&'static str],
    default: fn(&BrokerConfig) -> String,
}

pub const DEFS: &[ConfigDef] = &[
    ConfigDef {
        name: "cleanup.policy",
        kind: ConfigType::List,
        doc: "Only \"delete\" (retention by time and size): Freshet does not compact logs.",
        min: 0,
        allowed: &["delete"],
        default: |_| "delete".into(),
    },
    ConfigDef {
        name: "compression.type",
        kind: ConfigType::String,
        doc: "Only \"producer\": batches are stored exactly as the producer compressed them.",
        min: 0,
        allowed: &["producer"],
        default: |_| "producer".into(),
    },
    ConfigDef {
        name: "max.message.bytes",
        kind: ConfigType::Int,
        doc: "Largest record batch accepted, in bytes.",
        min: 0,
        allowed: &[],
        default: |c| c.max_message_bytes.to_string(),
    },
    ConfigDef {
        name: "message.timestamp.type",
        kind: ConfigType::String,
        doc: "Only \"CreateTime\": timestamps are the producer's.",
        min: 0,
        allowed: &["CreateTime"],
        default: |_| "CreateTime".into(),
    },
    ConfigDef {
        name: "min.insync.replicas",
        kind: ConfigType::Int,
        doc: "Accepted for compatibility; a single node always has one in-sync replica.",
        min: 1,
        allowed: &[],
        default: |_| "1".into(),
    },
    ConfigDef {
        name: "retention.bytes",
        kind: ConfigType::Long,
        doc: "Delete old segments while a partition is larger than this; -1 = no limit.",
        min: -1,
        allowed: &[],
        default: |c| c.retention_bytes.to_string(),
    },
    ConfigDef {
        name: "retention.ms",
        kind: ConfigType::Long,
        doc: "Delete segments whose newest record is older than this; -1 = keep forever.",
        min: -1,
        allowed: &[],
        default: |c| c.retention_ms.to_string(),
    },
    ConfigDef {
        name: "segment.bytes",
        kind: ConfigType::Int,
        doc: "Roll to a new segment file at this size.",
        min: 14,
        allowed: &[],
        default: |c| c.segment_bytes.to_string(),
    },
    ConfigDef {
        name: "segment.ms",
        kind: ConfigType::Long,
        doc: "Roll to a new segment file after this long.",
        min: 1,
        allowed: &[],
        default: |c| c.segment_ms.to_string(),
    },
];

pub fn def(name: &str) -> Option<&'static ConfigDef> {
    DEFS.iter().find(|d| d.name == name)
}

/// Checks one value; the error is the message Kafka clients show the user.
pub fn validate(name: &str, value: Option<&str>) -> Result<String, String> {
    let def = def(name).ok_or_else(|| format!("Unknown topic config name: {name}"))?;
    let value = value
        .ok_or_else(|| format!("Null value not supported for topic config '{name}'"))?
        .trim();
    match def.kind {
        ConfigType::Int | ConfigType::Long => {
            let n: i64 = value.parse().map_err(|_| {
                format!("Invalid value {value} for configuration {name}: Not a number")
            })?;
            if def.kind == ConfigType::Int && i32::try_from(n).is_err() {
                return Err(format!(
                    "Invalid value {value} for configuration {name}: Not a 32-bit integer"
                ));
            }
            if n < def.min {
                return Err(format!(
                    "Invalid value {value} for configuration {name}: Value must be at least {}",
                    def.min
                ));
            }
            Ok(n.to_string())
        }
        ConfigType::String | ConfigType::List | ConfigType::Boolean => {
            let items: Vec<&str> = if def.kind == ConfigType::List {
                value.split(',').map(str::trim).collect()
            } else {
                vec![value]
            };
            for item in &items {
                if !def.allowed.is_empty() && !def.allowed.contains(item) {
                    return Err(format!(
                        "Invalid value {value} for configuration {name}: Freshet supports only {}",
                        def.allowed.join(", ")
                    ));
                }
            }
            Ok(items.join(","))
        }
    }
}

/// The configs a topic sets explicitly; everything else is the broker default.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicConfig {
    pub overrides: BTreeMap<String, String>,
}

impl TopicConfig {
    /// Builds from (name, value) pairs, validating each.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<Self, String> {
        let mut overrides = BTreeMap::new();
        for (name, value) in pairs {
            let value = validate(name, value)?;
            if overrides.insert(name.to_string(), value).is_some() {
                return Err(format!("Duplicate config name {name}"));
            }
        }
        Ok(TopicConfig { overrides })
    }

    /// The effective value and whether the topic set it.
    pub fn value(&self, def: &ConfigDef, broker: &BrokerConfig) -> (String, bool) {
        match self.overrides.get(def.name) {
            Some(v) => (v.clone(), true),
            None => ((def.default)(broker), false),
        }
    }

    fn number(&self, name: &str, broker: &BrokerConfig) -> i64 {
        let def = def(name).expect("config defined");
        let (value, _) = self.value(def, broker);
        value.parse().expect("validated numeric config")
    }

    pub fn max_message_bytes(&self, broker: &BrokerConfig) -> usize {
        self.number("max.message.bytes", broker) as usize
    }

    pub fn log_config(&self, broker: &BrokerConfig) -> storage::LogConfig {
        storage::LogConfig {
            segment_bytes: self.number("segment.bytes", broker) as u64,
            segment_ms: self.number("segment.ms", broker),
            retention_ms: self.number("retention.ms", broker),
            retention_bytes: self.number("retention.bytes", broker),
            index_interval_bytes: storage::LogConfig::default().index_interval_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_like_kafka() {
        assert_eq!(validate("retention.ms", Some("1000")), Ok("1000".into()));
        assert!(validate("retention.ms", Some("-2"))
            .unwrap_err()
            .contains("at least -1"));
        assert!(validate("segment.bytes", Some("abc"))
            .unwrap_err()
            .contains("Not a number"));
        assert!(validate("segment.bytes", Some("9999999999"))
            .unwrap_err()
            .contains("32-bit"));
        assert!(validate("no.such", Some("1"))
            .unwrap_err()
            .contains("Unknown topic config"));
        assert!(validate("cleanup.policy", Some("compact")).is_err());
        assert_eq!(
            validate("cleanup.policy", Some("delete")),
            Ok("delete".into())
        );
    }

    #[test]
    fn effective_values_fall_back_to_broker_defaults() {
        let broker = BrokerConfig {
            retention_ms: 42,
            ..BrokerConfig::default()
        };
        let topic = TopicConfig::from_pairs([("segment.bytes", Some("1024"))]).unwrap();
        let log = topic.log_config(&broker);
        assert_eq!((log.segment_bytes, log.retention_ms), (1024, 42));
        assert!(TopicConfig::from_pairs([
            ("segment.bytes", Some("1024")),
            ("segment.bytes", Some("2048"))
        ])
        .is_err());
    }
}
