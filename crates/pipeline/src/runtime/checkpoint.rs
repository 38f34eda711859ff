//! Checkpoints: a task's operator state and the input offsets it reflects, written
//! together to the pipeline's state topic (partition N holds task N's checkpoints),
//! so that whichever instance runs the task next resumes exactly where the last
//! checkpoint left off.
//!
//! A checkpoint is one blob ([`Checkpoint::encode`]) cut into chunk records of at
//! most [`CHUNK_BYTES`] (key `chunk`), followed by a commit record (key `commit`)
//! whose value names the first chunk's offset, the chunk count, the blob's length and
//! its CRC-32C. Each record is written with acks=all by an idempotent producer, one
//! after the other; a checkpoint exists only once its commit record is acknowledged,
//! so a crash halfway leaves chunks that no commit names, and the previous
//! checkpoint stands. After a commit, the records before its first chunk are deleted
//! (DeleteRecords): the topic holds about one checkpoint.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::Error;
use crate::ops::encode::Reader;

/// The largest chunk record (below the default 1 MiB record limit of Kafka).
pub const CHUNK_BYTES: usize = 900 * 1024;

const MAGIC: &[u8; 4] = b"FPC2";

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Checkpoint {
    /// The plan the state belongs to ([`super::plan_hash`]); a checkpoint of another
    /// plan is not restored.
    pub plan_hash: u64,
    /// Per input partition, the next offset to read.
    pub offsets: Vec<(String, i32, i64)>,
    /// Opaque blobs, in an order the task defines (its operators' snapshots, then
    /// what it needs to drop duplicates).
    pub operators: Vec<Vec<u8>>,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(64 + self.operators.iter().map(|o| o.len() + 4).sum::<usize>());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.plan_hash.to_be_bytes());
        out.extend_from_slice(&(self.offsets.len() as u32).to_be_bytes());
        for (topic, partition, offset) in &self.offsets {
            out.extend_from_slice(&(topic.len() as u32).to_be_bytes());
            out.extend_from_slice(topic.as_bytes());
            out.extend_from_slice(&partition.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
        }
        out.extend_from_slice(&(self.operators.len() as u32).to_be_bytes());
        for op in &self.operators {
            out.extend_from_slice(&(op.len() as u32).to_be_bytes());
            out.extend_from_slice(op);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
        let mut r = Reader::new(bytes);
        if r.take(4)? != MAGIC {
            return Err("not a pipeline checkpoint (bad magic)".into());
        }
        let plan_hash = r.i64()? as u64;
        let n = r.u32()? as usize;
        let mut offsets = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let len = r.u32()? as usize;
            let topic = std::str::from_utf8(r.take(len)?)
                .map_err(|_| "checkpoint: topic name is not UTF-8")?
                .to_string();
            let partition = r.u32()? as i32;
            let offset = r.i64()?;
            offsets.push((topic, partition, offset));
        }
        let n = r.u32()? as usize;
        let mut operators = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            let len = r.u32()? as usize;
            operators.push(r.take(len)?.to_vec());
        }
        if !r.done() {
            return Err("checkpoint: trailing bytes".into());
        }
        Ok(Checkpoint {
            plan_hash,
            offsets,
            operators,
        })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Commit {
    first: i64,
    chunks: i64,
    bytes: usize,
    crc: u32,
}

/// A record's key and value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// The state topic of one pipeline.
pub struct StateTopic {
    pub name: String,
    producer: FutureProducer,
    consumer: BaseConsumer,
    admin: AdminClient<DefaultClientContext>,
    timeout: Duration,
}

impl StateTopic {
    pub fn open(client: &ClientConfig, name: &str, timeout: Duration) -> Result<Self, String> {
        let producer: FutureProducer = client
            .clone()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.max.bytes", "1048576")
            .set("linger.ms", "0")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create()
            .map_err(|e| e.to_string())?;
        let consumer: BaseConsumer = client
            .clone()
            .set("group.id", "freshet-pipeline-state")
            .set("enable.auto.commit", "false")
            .set("fetch.max.bytes", "8388608")
            .set("max.partition.fetch.bytes", "2097152")
            .create()
            .map_err(|e| e.to_string())?;
        let admin = client.create().map_err(|e| e.to_string())?;
        Ok(StateTopic {
            name: name.to_string(),
            producer,
            consumer,
            admin,
            timeout,
        })
    }

    /// Writes `checkpoint` to `partition` and returns once its commit record is
    /// acknowledged.
    pub fn write(
        &self,
        rt: &tokio::runtime::Runtime,
        partition: i32,
        checkpoint: &Checkpoint,
    ) -> Result<(), String> {
        let blob = checkpoint.encode();
        // Every chunk in flight at once (the idempotent producer keeps their order),
        // then each acknowledgement.
        let mut pending = Vec::new();
        for chunk in blob.chunks(CHUNK_BYTES) {
            pending.push(self.queue(partition, "chunk", chunk)?);
        }
        let mut offsets = Vec::with_capacity(pending.len());
        for delivery in pending {
            offsets.push(Self::delivered(rt, delivery)?);
        }
        let chunks = offsets.len() as i64;
        let first = offsets.first().copied();
        if first.is_some_and(|f| offsets.last() != Some(&(f + chunks - 1))) {
            return Err(format!(
                "cannot write a checkpoint: another writer is on partition {partition} of '{}'",
                self.name
            ));
        }
        let commit = Commit {
            first: first.unwrap_or(-1),
            chunks,
            bytes: blob.len(),
            crc: crc32c::crc32c(&blob),
        };
        let value = serde_json::to_vec(&commit).map_err(|e| e.to_string())?;
        self.send(rt, partition, "commit", &value)?;
        if commit.first > 0 {
            // What came before this checkpoint is never read again.
            self.trim(rt, &self.name, &[(partition, commit.first)]);
        }
        Ok(())
    }

    /// Deletes the records of `topic` before each (partition, offset): they are never
    /// read again. A failure costs only space.
    pub fn trim(&self, rt: &tokio::runtime::Runtime, topic: &str, before: &[(i32, i64)]) {
        let mut list = TopicPartitionList::new();
        for &(partition, offset) in before {
            if list
                .add_partition_offset(topic, partition, Offset::Offset(offset))
                .is_err()
            {
                return;
            }
        }
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout));
        if let Err(err) = rt.block_on(self.admin.delete_records(&list, &opts)) {
            tracing::debug!(topic, error = %err, "pipeline: trimming a topic");
        }
    }

    fn send(
        &self,
        rt: &tokio::runtime::Runtime,
        partition: i32,
        key: &str,
        value: &[u8],
    ) -> Result<i64, String> {
        let delivery = self.queue(partition, key, value)?;
        Self::delivered(rt, delivery)
    }

    fn queue(&self, partition: i32, key: &str, value: &[u8]) -> Result<DeliveryFuture, String> {
        let record = FutureRecord::<str, [u8]>::to(&self.name)
            .key(key)
            .payload(value)
            .partition(partition);
        self.producer
            .send_result(record)
            .map_err(|(err, _)| format!("cannot write a checkpoint: {err}"))
    }

    fn delivered(rt: &tokio::runtime::Runtime, delivery: DeliveryFuture) -> Result<i64, String> {
        match rt.block_on(delivery) {
            Ok(Ok(delivered)) => Ok(delivered.offset),
            Ok(Err((err, _))) => Err(format!("cannot write a checkpoint: {err}")),
            Err(_) => Err("cannot write a checkpoint: the producer went away".into()),
        }
    }

    /// The last committed checkpoint of `partition`, if any. A cluster that does not
    /// answer is `Error::Cluster` (worth a retry); a checkpoint that does not read
    /// back is `Error::Corrupt`.
    pub fn read_last(&self, partition: i32) -> Result<Option<Checkpoint>, Error> {
        let corrupt = |what: String| {
            Error::Corrupt(format!(
                "state topic '{}' partition {partition}: {what}; delete the pipeline and its state topic to start afresh",
                self.name
            ))
        };
        let (low, high) = match self
            .consumer
            .fetch_watermarks(&self.name, partition, self.timeout)
        {
            Ok(w) => w,
            Err(err) => {
                return Err(Error::Cluster(format!(
                    "cannot read the state topic '{}': {err}",
                    self.name
                )))
            }
        };
        // Look for the last commit, from the end backwards in pages.
        const PAGE: i64 = 64;
        let mut end = high;
        while end > low {
            let start = (end - PAGE).max(low);
            let page = self
                .read_range(partition, start, end)
                .map_err(Error::Cluster)?;
            if let Some((_, value)) = page.iter().rev().find(|(key, _)| key == b"commit") {
                let commit: Commit = serde_json::from_slice(value)
                    .map_err(|e| corrupt(format!("bad commit record: {e}")))?;
                let chunks = self
                    .read_range(partition, commit.first, commit.first + commit.chunks)
                    .map_err(Error::Cluster)?;
                let blob: Vec<u8> = chunks.into_iter().flat_map(|(_, v)| v).collect();
                if blob.len() != commit.bytes || crc32c::crc32c(&blob) != commit.crc {
                    return Err(corrupt(
                        "the last checkpoint does not match its commit record".into(),
                    ));
                }
                return Checkpoint::decode(&blob).map(Some).map_err(corrupt);
            }
            end = start;
        }
        Ok(None)
    }

    /// Keys and values of the records of `partition` at offsets `[from, to)`.
    fn read_range(&self, partition: i32, from: i64, to: i64) -> Result<Vec<KeyValue>, String> {
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.name, partition, Offset::Offset(from))
            .map_err(|e| e.to_string())?;
        self.consumer
            .assign(&assignment)
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + self.timeout;
        let mut next = from;
        while next < to {
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "cannot read the state topic '{}' (offsets {from}..{to}): timed out",
                    self.name
                ));
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    if message.offset() < next {
                        continue;
                    }
                    next = message.offset() + 1;
                    if message.offset() < to {
                        out.push((
                            message.key().unwrap_or_default().to_vec(),
                            message.payload().unwrap_or_default().to_vec(),
                        ));
                    }
                }
                Some(Err(err)) => {
                    tracing::debug!(topic = %self.name, error = %err, "reading the state topic")
                }
                None => {}
            }
        }
        let _ = self.consumer.unassign();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode(hash: u64, offsets in proptest::collection::vec(("[a-z._-]{1,20}", 0i32..100, 0i64..i64::MAX), 0..10),
                         ops in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..5)) {
            let c = Checkpoint { plan_hash: hash, offsets, operators: ops };
            prop_assert_eq!(Checkpoint::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn garbage_is_refused_not_panicked_on(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Checkpoint::decode(&bytes);
            let mut valid = Checkpoint::default().encode();
            valid.extend_from_slice(&bytes);
            prop_assert_eq!(Checkpoint::decode(&valid).is_ok(), bytes.is_empty());
        }
    }
}
