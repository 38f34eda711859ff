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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;

use crate::config::GatewayConfig;

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
    /// Set over HTTP (from `schema_topic`): `None` is a deletion, which lets the
    /// configured schema (if any) apply again.
    from_topic: RwLock<HashMap<String, Arc<TopicSchema>>>,
    cache_path: PathBuf,
    schema_topic: String,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    stop: Arc<AtomicBool>,
    /// The schema topic is known to exist.
    topic_ready: AtomicBool,
}

impl Schemas {
    /// Loads the configured schema files and the cached copy of the schema topic, then
    /// follows the schema topic in a background thread. Waits (up to a few seconds)
    /// until what the topic held at start has been read.
    pub fn open(config: &GatewayConfig) -> anyhow::Result<Arc<Schemas>> {
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
        let cache_path = config.spool_dir.join("schemas.json");
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &config.brokers);
        for (key, value) in &config.kafka {
            client.set(key, value);
        }
        let producer: FutureProducer = client
            .clone()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000")
            .create()?;
        let admin: AdminClient<DefaultClientContext> = client.create()?;
        let schemas = Arc::new(Schemas {
            from_config,
            from_topic: RwLock::new(HashMap::new()),
            cache_path,
            schema_topic: config.schema_topic.clone(),
            producer,
            admin,
            stop: Arc::new(AtomicBool::new(false)),
            topic_ready: AtomicBool::new(false),
        });
        schemas.load_cache();
        let consumer: BaseConsumer = client
            .clone()
            // librdkafka needs a group id to assign partitions; nothing is committed.
            .set("group.id", "freshet-gateway-schemas")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "100")
            // Notice soon when another gateway creates the topic.
            .set("topic.metadata.refresh.interval.ms", "5000")
            .create()?;
        let (caught_up_tx, caught_up_rx) = std::sync::mpsc::channel();
        let follower = schemas.clone();
        std::thread::Builder::new()
            .name("gateway-schemas".into())
            .spawn(move || follower.follow(consumer, caught_up_tx))?;
        if caught_up_rx.recv_timeout(Duration::from_secs(3)).is_err() {
            tracing::warn!(
                topic = %config.schema_topic,
                "schemas: the schema topic could not be read yet; validating with the cached copy"
            );
        }
        Ok(schemas)
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
        let from_topic = self.from_topic.read().unwrap_or_else(|e| e.into_inner());
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
        if !self.topic_ready.load(Ordering::Relaxed) {
            self.create_topic().await?;
            self.topic_ready.store(true, Ordering::Relaxed);
        }
        // Partition 0 always: the topic is created with one, and a cluster that
        // auto-created it with more must still keep every schema where it is read.
        let mut record = FutureRecord::<str, str>::to(&self.schema_topic)
            .key(topic)
            .partition(0);
        if let Some(payload) = &payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(err, _)| SchemaError::Unavailable(err.to_string()))?;
        self.apply(topic, schema);
        Ok(())
    }

    /// Creates the schema topic (one partition, kept forever) unless it exists.
    async fn create_topic(&self) -> Result<(), SchemaError> {
        let topic = NewTopic::new(&self.schema_topic, 1, TopicReplication::Fixed(-1))
            .set("retention.ms", "-1");
        let results = self
            .admin
            .create_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(|e| SchemaError::Unavailable(e.to_string()))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(SchemaError::Unavailable(format!(
                        "cannot create the schema topic: {code}"
                    )))
                }
            }
        }
        Ok(())
    }

    fn apply(&self, topic: &str, schema: Option<Arc<TopicSchema>>) {
        let snapshot = {
            let mut from_topic = self.from_topic.write().unwrap_or_else(|e| e.into_inner());
            match schema {
                Some(schema) => from_topic.insert(topic.to_string(), schema),
                None => from_topic.remove(topic),
            };
            from_topic
                .iter()
                .map(|(t, s)| (t.clone(), s.document.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        if let Err(err) = write_cache(&self.cache_path, &snapshot) {
            tracing::warn!(error = %err, path = %self.cache_path.display(), "schemas: cannot write the cached copy");
        }
    }

    fn load_cache(&self) {
        let Ok(text) = std::fs::read_to_string(&self.cache_path) else {
            return;
        };
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&text) else {
            tracing::warn!(path = %self.cache_path.display(), "schemas: ignoring an unreadable cached copy");
            return;
        };
        let mut from_topic = self.from_topic.write().unwrap_or_else(|e| e.into_inner());
        for (topic, document) in map {
            if let Ok(schema) = TopicSchema::compile(document) {
                from_topic.insert(topic, Arc::new(schema));
            }
        }
    }

    /// Reads the schema topic for as long as the gateway runs. Until the topic
    /// exists (no schema was ever set over HTTP) it looks for it every few seconds.
    fn follow(&self, consumer: BaseConsumer, caught_up: std::sync::mpsc::Sender<()>) {
        let mut caught_up = Some(caught_up);
        let mut seen: HashMap<String, Option<Arc<TopicSchema>>> = HashMap::new();
        let mut assigned = false;
        while !self.stop.load(Ordering::Relaxed) {
            if !assigned {
                // All topics, not the one: a request naming it could create it.
                match consumer.fetch_metadata(None, Duration::from_secs(2)) {
                    Ok(metadata)
                        if metadata
                            .topics()
                            .iter()
                            .any(|t| t.name() == self.schema_topic) =>
                    {
                        let mut assignment = TopicPartitionList::new();
                        let assign = assignment
                            .add_partition_offset(&self.schema_topic, 0, Offset::Beginning)
                            .and_then(|()| consumer.assign(&assignment));
                        match assign {
                            Ok(()) => assigned = true,
                            Err(err) => {
                                tracing::warn!(error = %err, "schemas: cannot read the schema topic")
                            }
                        }
                        continue;
                    }
                    Ok(_) => {
                        // No schema topic: nothing was ever set over HTTP.
                        if let Some(tx) = caught_up.take() {
                            self.replace_all(HashMap::new());
                            let _ = tx.send(());
                        }
                    }
                    Err(err) => tracing::debug!(error = %err, "schemas: cluster metadata"),
                }
                std::thread::sleep(Duration::from_secs(3));
                continue;
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Ok(message)) => {
                    let Some(Ok(topic)) = message.key().map(std::str::from_utf8) else {
                        continue;
                    };
                    let schema = match message.payload() {
                        None => None,
                        Some(bytes) => match serde_json::from_slice(bytes)
                            .map_err(|e| e.to_string())
                            .and_then(TopicSchema::compile)
                        {
                            Ok(schema) => Some(Arc::new(schema)),
                            Err(err) => {
                                tracing::warn!(topic, error = %err, "schemas: ignoring an invalid schema in the schema topic");
                                continue;
                            }
                        },
                    };
                    if caught_up.is_some() {
                        // Replaying history: apply once at the end.
                        seen.insert(topic.to_string(), schema);
                    } else {
                        self.apply(topic, schema);
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                    if let Some(tx) = caught_up.take() {
                        self.replace_all(std::mem::take(&mut seen));
                        let _ = tx.send(());
                    }
                }
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "schemas: reading the schema topic");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// The state read from the whole topic replaces the cached copy.
    fn replace_all(&self, seen: HashMap<String, Option<Arc<TopicSchema>>>) {
        {
            let mut from_topic = self.from_topic.write().unwrap_or_else(|e| e.into_inner());
            from_topic.clear();
            for (topic, schema) in seen {
                if let Some(schema) = schema {
                    from_topic.insert(topic, schema);
                }
            }
        }
        // Rewrite the cache through `apply`'s path with a no-op change.
        let snapshot: BTreeMap<_, _> = self
            .from_topic
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(t, s)| (t.clone(), s.document.clone()))
            .collect();
        if let Err(err) = write_cache(&self.cache_path, &snapshot) {
            tracing::warn!(error = %err, "schemas: cannot write the cached copy");
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Write-then-rename, so a crash leaves the old copy or the new one.
fn write_cache(path: &Path, snapshot: &BTreeMap<String, Value>) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
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
