//! Per-topic JSON Schemas: a record for a topic with a schema must validate before
//! anything is written; a failure lists every violation by JSON pointer.
//!
//! Where schemas come from, later overriding earlier: the `[http.schemas]` table of
//! the configuration (topic = file), then schemas set with
//! `PUT /topics/{topic}/schema`. Those are kept in the cluster, in `schema_topic`
//! (key: topic name, value: the schema, a null value deletes), so every gateway in
//! front of the cluster applies the same schemas; each gateway reads that topic from
//! the beginning and follows it. A copy of the last state read is kept in
//! `<spool_dir>/schemas.json`, so a gateway that starts while the cluster is away
//! still validates.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use serde_json::Value;

use crate::config::GatewayConfig;
use crate::shared::{Event, SharedTopic, Start};

/// One failed check, located by JSON pointer into the record (`""` is the root).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    pub pointer: String,
    pub message: String,
}

/// A compiled schema with the document it came from.
pub struct TopicSchema {
    pub document: Value,
    validator: jsonschema::Validator,
}

impl TopicSchema {
    /// Compiles `document`; the error says why it is not a usable schema.
    pub fn compile(document: Value) -> Result<TopicSchema, String> {
        if !document.is_object() && !document.is_boolean() {
            return Err("a JSON Schema is an object or a boolean".into());
        }
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&document)
            .map_err(|e| format!("invalid JSON Schema: {e}"))?;
        Ok(TopicSchema {
            document,
            validator,
        })
    }

    pub fn violations(&self, value: &Value) -> Vec<Violation> {
        self.validator
            .iter_errors(value)
            .map(|e| Violation {
                pointer: e.instance_path().to_string(),
                message: e.to_string(),
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("{0}")]
    Invalid(String),
    #[error("the cluster did not take the schema: {0}")]
    Unavailable(String),
}

/// The schemas of all topics that have one.
pub struct Schemas {
    from_config: HashMap<String, Arc<TopicSchema>>,
    from_topic: Arc<FromTopic>,
    topic: Arc<SharedTopic>,
    producer: FutureProducer,
}

/// Schemas set over HTTP (from the schema topic), with their cached copy.
struct FromTopic {
    schemas: RwLock<HashMap<String, Arc<TopicSchema>>>,
    cache_path: PathBuf,
}

impl Schemas {
    /// Loads the configured schema files and the cached copy of the schema topic, then
    /// follows the schema topic in a background thread. Waits (up to a few seconds)
    /// until what the topic held at start has been read.
    pub fn open(config: &GatewayConfig, client: &ClientConfig) -> anyhow::Result<Arc<Schemas>> {
        let mut from_config = HashMap::new();
        for (topic, path) in &config.schemas {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the schema of topic '{topic}' ({}): {e}",
                    path.display()
                )
            })?;
            let document: Value = serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "the schema of topic '{topic}' ({}) is not JSON: {e}",
                    path.display()
                )
            })?;
            let schema = TopicSchema::compile(document).map_err(|e| {
                anyhow::anyhow!("the schema of topic '{topic}' ({}): {e}", path.display())
            })?;
            from_config.insert(topic.clone(), Arc::new(schema));
        }
        std::fs::create_dir_all(&config.spool_dir)?;
        let from_topic = Arc::new(FromTopic {
            schemas: RwLock::new(HashMap::new()),
            cache_path: config.spool_dir.join("schemas.json"),
        });
        from_topic.load_cache();
        let producer: FutureProducer = client
            .clone()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000")
            .create()?;
        let (caught_up_tx, caught_up_rx) = std::sync::mpsc::channel();
        let follower = from_topic.clone();
        // While replaying the topic's history, collect; apply once at the end.
        let mut replay: Option<HashMap<String, Option<Arc<TopicSchema>>>> = Some(HashMap::new());
        let topic = SharedTopic::follow(
            client,
            &config.schema_topic,
            -1,
            Start::Beginning,
            "gateway-schemas",
            move |event| match event {
                Event::Record { key, value } => {
                    let Ok(topic) = std::str::from_utf8(key) else {
                        return;
                    };
                    let schema = match value {
                        None => None,
                        Some(bytes) => match serde_json::from_slice(bytes)
                            .map_err(|e| e.to_string())
                            .and_then(TopicSchema::compile)
                        {
                            Ok(schema) => Some(Arc::new(schema)),
                            Err(err) => {
                                tracing::warn!(topic, error = %err, "schemas: ignoring an invalid schema in the schema topic");
                                return;
                            }
                        },
                    };
                    match &mut replay {
                        Some(seen) => {
                            seen.insert(topic.to_string(), schema);
                        }
                        None => follower.apply(topic, schema),
                    }
                }
                Event::CaughtUp => {
                    if let Some(seen) = replay.take() {
                        follower.replace_all(seen);
                        let _ = caught_up_tx.send(());
                    }
                }
            },
        )?;
        if caught_up_rx.recv_timeout(Duration::from_secs(3)).is_err() {
            tracing::warn!(
                topic = %config.schema_topic,
                "schemas: the schema topic could not be read yet; validating with the cached copy"
            );
        }
        Ok(Arc::new(Schemas {
            from_config,
            from_topic,
            topic,
            producer,
        }))
    }

    /// Every violation of `topic`'s schema by `value`; empty when valid or when the
    /// topic has no schema.
    pub fn validate(&self, topic: &str, value: &Value) -> Vec<Violation> {
        match self.get(topic) {
            Some(schema) => schema.violations(value),
            None => Vec::new(),
        }
    }

    pub fn get(&self, topic: &str) -> Option<Arc<TopicSchema>> {
        let from_topic = self
            .from_topic
            .schemas
            .read()
            .unwrap_or_else(|e| e.into_inner());
        from_topic
            .get(topic)
            .or_else(|| self.from_config.get(topic))
            .cloned()
    }

    pub fn has_any(&self, topic: &str) -> bool {
        self.get(topic).is_some()
    }

    /// Sets (`Some`) or deletes (`None`) the schema of `topic` for every gateway:
    /// written to the schema topic with acks=all, then applied here at once.
    pub async fn put(&self, topic: &str, document: Option<Value>) -> Result<(), SchemaError> {
        let schema = match document {
            Some(document) => Some(Arc::new(
                TopicSchema::compile(document).map_err(SchemaError::Invalid)?,
            )),
            None => None,
        };
        let payload = schema.as_ref().map(|s| s.document.to_string());
        self.topic
            .ensure()
            .await
            .map_err(SchemaError::Unavailable)?;
        // Partition 0 always: the topic is created with one, and a cluster that
        // auto-created it with more must still keep every schema where it is read.
        let mut record = FutureRecord::<str, str>::to(&self.topic.name)
            .key(topic)
            .partition(0);
        if let Some(payload) = &payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(err, _)| SchemaError::Unavailable(err.to_string()))?;
        self.from_topic.apply(topic, schema);
        Ok(())
    }

    pub fn stop(&self) {
        self.topic.stop();
    }
}

impl FromTopic {
    fn apply(&self, topic: &str, schema: Option<Arc<TopicSchema>>) {
        {
            let mut schemas = self.schemas.write().unwrap_or_else(|e| e.into_inner());
            match schema {
                Some(schema) => schemas.insert(topic.to_string(), schema),
                None => schemas.remove(topic),
            };
        }
        self.write_cache();
    }

    /// The state read from the whole topic replaces the cached copy.
    fn replace_all(&self, seen: HashMap<String, Option<Arc<TopicSchema>>>) {
        {
            let mut schemas = self.schemas.write().unwrap_or_else(|e| e.into_inner());
            schemas.clear();
            schemas.extend(seen.into_iter().filter_map(|(t, s)| s.map(|s| (t, s))));
        }
        self.write_cache();
    }

    fn load_cache(&self) {
        let Ok(text) = std::fs::read_to_string(&self.cache_path) else {
            return;
        };
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&text) else {
            tracing::warn!(path = %self.cache_path.display(), "schemas: ignoring an unreadable cached copy");
            return;
        };
        let mut schemas = self.schemas.write().unwrap_or_else(|e| e.into_inner());
        for (topic, document) in map {
            if let Ok(schema) = TopicSchema::compile(document) {
                schemas.insert(topic, Arc::new(schema));
            }
        }
    }

    fn write_cache(&self) {
        let snapshot: BTreeMap<String, Value> = self
            .schemas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(t, s)| (t.clone(), s.document.clone()))
            .collect();
        if let Err(err) = write_cache(&self.cache_path, &snapshot) {
            tracing::warn!(error = %err, path = %self.cache_path.display(), "schemas: cannot write the cached copy");
        }
    }
}

/// Through the one durable write, so a crash leaves the old copy or the new one.
fn write_cache(path: &Path, snapshot: &BTreeMap<String, Value>) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
    common::write_file_atomically(path, &json, common::Durability::Durable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_violation_is_listed_by_pointer() {
        let schema = TopicSchema::compile(json!({
            "type": "object",
            "required": ["poll", "choice"],
            "properties": {
                "poll": {"type": "string", "minLength": 1},
                "choice": {"enum": ["a", "b", "c"]},
                "voters": {"type": "array", "items": {"type": "integer"}}
            },
            "additionalProperties": false
        }))
        .unwrap();
        assert!(schema
            .violations(&json!({"poll": "p1", "choice": "a"}))
            .is_empty());
        let found =
            schema.violations(&json!({"poll": "", "choice": "z", "voters": [1, "x"], "extra": 1}));
        let mut pointers: Vec<&str> = found.iter().map(|v| v.pointer.as_str()).collect();
        pointers.sort();
        assert_eq!(
            pointers,
            vec!["", "/choice", "/poll", "/voters/1"],
            "{found:?}"
        );
        let missing = schema.violations(&json!({}));
        assert_eq!(missing.len(), 2, "{missing:?}");
    }

    #[test]
    fn a_bad_schema_is_refused_with_a_reason() {
        assert!(TopicSchema::compile(json!({"type": "no-such-type"})).is_err());
        assert!(TopicSchema::compile(json!([1])).is_err());
        assert!(TopicSchema::compile(json!({"minLength": "x"})).is_err());
    }
}
