//! What the planner may know of the cluster: which topics exist and, for a topic
//! that holds records, the top-level fields of its JSON values, read from a sample of
//! its latest records (up to [`SAMPLE_PER_PARTITION`] per partition).

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use sql::{Catalog, TopicInfo};

/// How many of each partition's latest records the column check reads.
pub const SAMPLE_PER_PARTITION: i64 = 100;

/// The cluster's topics (name and partition count) when the catalog was made.
pub struct ClusterCatalog {
    consumer: BaseConsumer,
    pub partitions: HashMap<String, i32>,
    sampled: RefCell<HashMap<String, Option<Vec<String>>>>,
    timeout: Duration,
}

impl ClusterCatalog {
    pub fn load(client: &ClientConfig, timeout: Duration) -> Result<ClusterCatalog, String> {
        let consumer: BaseConsumer = client
            .clone()
            .set("group.id", "freshet-pipeline-catalog")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .create()
            .map_err(|e| format!("cannot create a Kafka client: {e}"))?;
        let metadata = consumer
            .fetch_metadata(None, timeout)
            .map_err(|e| format!("cannot read the cluster's topics: {e}"))?;
        let partitions = metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| (t.name().to_string(), t.partitions().len() as i32))
            .collect();
        Ok(ClusterCatalog {
            consumer,
            partitions,
            sampled: RefCell::new(HashMap::new()),
            timeout,
        })
    }

    /// The union of the top-level fields of the JSON objects among the latest
    /// records of `topic`; `None` if it holds no JSON object.
    fn sample(&self, topic: &str, partitions: i32) -> Option<Vec<String>> {
        let mut assignment = TopicPartitionList::new();
        let mut remaining = 0i64;
        for p in 0..partitions {
            let Ok((low, high)) = self.consumer.fetch_watermarks(topic, p, self.timeout) else {
                continue;
            };
            if high > low {
                let from = (high - SAMPLE_PER_PARTITION).max(low);
                remaining += high - from;
                let _ = assignment.add_partition_offset(topic, p, Offset::Offset(from));
            }
        }
        if remaining == 0 || self.consumer.assign(&assignment).is_err() {
            return None;
        }
        let mut fields = BTreeSet::new();
        let mut objects = 0;
        let mut at_end = 0;
        let deadline = Instant::now() + self.timeout;
        while remaining > 0 && at_end < assignment.count() && Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    remaining -= 1;
                    if let Some(serde_json::Value::Object(map)) = message
                        .payload()
                        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                    {
                        objects += 1;
                        fields.extend(map.keys().cloned());
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => at_end += 1,
                Some(Err(_)) | None => {}
            }
        }
        let _ = self.consumer.unassign();
        (objects > 0).then(|| fields.into_iter().collect())
    }
}

impl Catalog for ClusterCatalog {
    fn topic(&self, name: &str) -> Option<TopicInfo> {
        let partitions = *self.partitions.get(name)?;
        if let Some(columns) = self.sampled.borrow().get(name) {
            return Some(TopicInfo {
                columns: columns.clone(),
            });
        }
        let columns = self.sample(name, partitions);
        self.sampled
            .borrow_mut()
            .insert(name.to_string(), columns.clone());
        Some(TopicInfo { columns })
    }
}
