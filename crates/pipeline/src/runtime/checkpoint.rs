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
//!
//! Fencing: an instance that takes a task first writes a claim record (key `claim`)
//! to its partition; the claim's offset is its owner epoch, named by each of its
//! commit records. A commit counts only when the nearest claim before it is the one
//! it names (or no claim is left before it): a stale owner that still writes after
//! a new claim writes commits nobody reads. The writer checks too: its records must
//! follow its own last one with nothing between, or it stops with
//! [`Error::Fenced`] before it commits or trims anything.

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
    /// The offset of its writer's claim record (absent in commits written before
    /// claims existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claim: Option<i64>,
}

/// The commit record of a checkpoint whose `chunks` chunk records, the pieces of
/// `blob`, start at offset `first`, written under `claim`.
pub fn commit_record(first: i64, chunks: i64, blob: &[u8], claim: &Claim) -> Vec<u8> {
    let commit = Commit {
        first,
        chunks,
        bytes: blob.len(),
        crc: crc32c::crc32c(blob),
        claim: Some(claim.epoch),
    };
    serde_json::to_vec(&commit).expect("a commit record serialises")
}

/// A record's offset, key and value.
type Record = (i64, Vec<u8>, Vec<u8>);

/// An instance's hold on one state partition: the offset of its claim record (its
/// owner epoch) and of the last record it wrote there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub epoch: i64,
    last: i64,
}

/// The state topic of one pipeline.
pub struct StateTopic {
    pub name: String,
    producer: FutureProducer,
    consumer: BaseConsumer,
    admin: AdminClient<DefaultClientContext>,
    timeout: Duration,
    /// Awaits librdkafka's deliveries and admin futures from the caller's thread.
    rt: tokio::runtime::Runtime,
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(StateTopic {
            name: name.to_string(),
            producer,
            consumer,
            admin,
            timeout,
            rt,
        })
    }

    /// Takes `partition` for this instance: writes a claim record. From its
    /// acknowledgement on, an earlier owner's commits no longer count and its writes
    /// are refused.
    pub fn claim(&self, partition: i32) -> Result<Claim, Error> {
        let epoch = self.send(partition, "claim", b"").map_err(Error::Cluster)?;
        Ok(Claim { epoch, last: epoch })
    }

    /// The first offset of `topic`'s `partition` (its low watermark), or None when
    /// the cluster does not say (the caller falls back to a logical offset).
    pub fn first_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.consumer
            .fetch_watermarks(topic, partition, self.timeout)
            .ok()
            .map(|(low, _)| low)
    }

    /// The last checkpoint of `partition` that counts before `claim`.
    pub fn last_before(&self, partition: i32, claim: &Claim) -> Result<Option<Checkpoint>, Error> {
        self.read_last(partition, claim.epoch)
    }

    /// Writes `checkpoint` to `partition` and returns once its commit record is
    /// acknowledged. Refused ([`Error::Fenced`]) when another instance claimed the
    /// partition since this one did: then the commit does not count and nothing is
    /// trimmed.
    pub fn write(
        &self,
        partition: i32,
        checkpoint: &Checkpoint,
        claim: &mut Claim,
    ) -> Result<(), Error> {
        let blob = checkpoint.encode();
        // Every chunk in flight at once (the idempotent producer keeps their order),
        // then each acknowledgement.
        let mut pending = Vec::new();
        for chunk in blob.chunks(CHUNK_BYTES) {
            pending.push(
                self.queue(partition, "chunk", chunk)
                    .map_err(Error::Cluster)?,
            );
        }
        let mut offsets = Vec::with_capacity(pending.len());
        for delivery in pending {
            offsets.push(self.delivered(delivery).map_err(Error::Cluster)?);
        }
        let chunks = offsets.len() as i64;
        let first = offsets.first().copied().unwrap_or(-1);
        if offsets.iter().zip(first..).any(|(o, want)| *o != want) {
            // Another writer's records came between the chunks: a claim among them
            // fences this instance; any other record only spoils this checkpoint.
            let after_last = offsets.last().map_or(first, |o| o + 1);
            self.fenced(partition, claim, after_last)?;
            return Err(Error::Cluster(format!(
                "cannot write a checkpoint: another writer is on partition {partition} of '{}'",
                self.name
            )));
        }
        let value = commit_record(first, chunks, &blob, claim);
        let at = self
            .send(partition, "commit", &value)
            .map_err(Error::Cluster)?;
        if first != claim.last + 1 || at != first + chunks {
            // Something else was written since this instance's last record: the
            // commit counts unless that was a claim.
            self.fenced(partition, claim, at)?;
        }
        claim.last = at;
        // What came before this checkpoint is never read again.
        self.trim(&self.name, &[(partition, first)]);
        Ok(())
    }

    /// `Err(Error::Fenced)` when a claim record lies between `claim` and `before`.
    fn fenced(&self, partition: i32, claim: &Claim, before: i64) -> Result<(), Error> {
        let (low, _) = self
            .consumer
            .fetch_watermarks(&self.name, partition, self.timeout)
            .map_err(|e| {
                Error::Cluster(format!("cannot read the state topic '{}': {e}", self.name))
            })?;
        if low > claim.last + 1 {
            // Records after this instance's last one were trimmed: a newer owner's.
            return Err(Error::Fenced(format!(
                "partition {partition} of '{}' was trimmed past this instance's records by another instance: its task moved",
                self.name
            )));
        }
        let records = self
            .read_range(partition, claim.last + 1, before)
            .map_err(Error::Cluster)?;
        match records.iter().find(|(_, key, _)| key == b"claim") {
            Some((offset, _, _)) => Err(Error::Fenced(format!(
                "partition {partition} of '{}' was claimed at offset {offset} by another instance (this one's claim is at {}): its task moved",
                self.name, claim.epoch
            ))),
            None => Ok(()),
        }
    }

    /// Deletes the records of `topic` before each (partition, offset): they are never
    /// read again. A failure costs only space.
    pub fn trim(&self, topic: &str, before: &[(i32, i64)]) {
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
        if let Err(err) = self.rt.block_on(self.admin.delete_records(&list, &opts)) {
            tracing::debug!(topic, error = %err, "pipeline: trimming a topic");
        }
    }

    fn send(&self, partition: i32, key: &str, value: &[u8]) -> Result<i64, String> {
        let delivery = self.queue(partition, key, value)?;
        self.delivered(delivery)
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

    fn delivered(&self, delivery: DeliveryFuture) -> Result<i64, String> {
        match self.rt.block_on(delivery) {
            Ok(Ok(delivered)) => Ok(delivered.offset),
            Ok(Err((err, _))) => Err(format!("cannot write a checkpoint: {err}")),
            Err(_) => Err("cannot write a checkpoint: the producer went away".into()),
        }
    }

    /// The last checkpoint of `partition` that counts, among the records before
    /// offset `before`: the last commit whose nearest claim before it is the one it
    /// names, or that has no claim left before it. A cluster that does not answer is
    /// `Error::Cluster` (worth a retry); a checkpoint that does not read back is
    /// `Error::Corrupt`.
    fn read_last(&self, partition: i32, before: i64) -> Result<Option<Checkpoint>, Error> {
        let corrupt = |what: String| {
            Error::Corrupt(format!(
                "state topic '{}' partition {partition}: {what}; delete the pipeline and its state topic to start afresh",
                self.name
            ))
        };
        let (low, _) = match self
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
        // From the end backwards in pages: the commits met since the last claim met
        // wait for the claim before them, which decides which of them count.
        const PAGE: i64 = 64;
        let mut waiting: Vec<Commit> = Vec::new();
        let mut found = None;
        let mut end = before;
        'pages: while end > low {
            let start = (end - PAGE).max(low);
            let page = self
                .read_range(partition, start, end)
                .map_err(Error::Cluster)?;
            for (offset, key, value) in page.iter().rev() {
                match key.as_slice() {
                    b"commit" => waiting.push(
                        serde_json::from_slice(value)
                            .map_err(|e| corrupt(format!("bad commit record: {e}")))?,
                    ),
                    b"claim" => {
                        // The latest of the waiting commits that this claim wrote.
                        if let Some(c) = waiting.drain(..).find(|c| c.claim == Some(*offset)) {
                            found = Some(c);
                            break 'pages;
                        }
                    }
                    _ => {}
                }
            }
            end = start;
        }
        // No claim left before the waiting commits: their writer's claim was trimmed
        // with what its first checkpoint covered, and no one claimed since.
        let Some(commit) = found.or_else(|| (!waiting.is_empty()).then(|| waiting.remove(0)))
        else {
            return Ok(None);
        };
        let chunks = self
            .read_range(partition, commit.first, commit.first + commit.chunks)
            .map_err(Error::Cluster)?;
        if chunks.len() as i64 != commit.chunks
            || chunks
                .iter()
                .zip(commit.first..)
                .any(|((o, k, _), want)| *o != want || k != b"chunk")
        {
            return Err(corrupt("the last checkpoint's chunks are missing".into()));
        }
        let blob: Vec<u8> = chunks.into_iter().flat_map(|(_, _, v)| v).collect();
        if blob.len() != commit.bytes || crc32c::crc32c(&blob) != commit.crc {
            return Err(corrupt(
                "the last checkpoint does not match its commit record".into(),
            ));
        }
        Checkpoint::decode(&blob).map(Some).map_err(corrupt)
    }

    /// The consumer's position in `partition` (-1 when it has none).
    fn position(&self, partition: i32) -> i64 {
        self.consumer
            .position()
            .ok()
            .and_then(|tpl| {
                tpl.find_partition(&self.name, partition)
                    .and_then(|e| e.offset().to_raw())
            })
            .unwrap_or(-1)
    }

    /// Offsets, keys and values of the records of `partition` at offsets `[from, to)`.
    fn read_range(&self, partition: i32, from: i64, to: i64) -> Result<Vec<Record>, String> {
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
                            message.offset(),
                            message.key().unwrap_or_default().to_vec(),
                            message.payload().unwrap_or_default().to_vec(),
                        ));
                    }
                }
                Some(Err(err)) => {
                    tracing::debug!(topic = %self.name, error = %err, "reading the state topic")
                }
                None => {
                    // Transaction markers (exactly-once checkpoints) are never
                    // delivered, but the position moves past them: a range that
                    // ends in markers ends there.
                    next = next.max(self.position(partition));
                }
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

/// Fencing against a real broker (in-process, on a free loopback port): two
/// instances that both believe they own a task.
#[cfg(test)]
mod fencing {
    use super::*;
    use crate::runtime::test_broker::Broker;

    fn take(topic: &StateTopic) -> (Claim, Option<Checkpoint>) {
        let claim = topic.claim(0).unwrap();
        let last = topic.last_before(0, &claim).unwrap();
        (claim, last)
    }

    fn checkpoint(n: u8) -> Checkpoint {
        Checkpoint {
            plan_hash: 7,
            offsets: vec![("repartition".into(), 0, n as i64)],
            // Three chunks: the checks hold for every chunk.
            operators: vec![vec![n; 2 * CHUNK_BYTES + 10]],
        }
    }

    fn low(topic: &StateTopic) -> i64 {
        topic
            .consumer
            .fetch_watermarks(&topic.name, 0, topic.timeout)
            .unwrap()
            .0
    }

    /// What a restart would restore: the last checkpoint that counts, read without
    /// claiming.
    fn current(topic: &StateTopic) -> Option<Checkpoint> {
        let (_, high) = topic
            .consumer
            .fetch_watermarks(&topic.name, 0, topic.timeout)
            .unwrap();
        topic.read_last(0, high).unwrap()
    }

    #[test]
    fn a_stale_owner_can_neither_checkpoint_nor_trim() {
        let broker = Broker::start();
        let name = "fencing.state";
        broker.create_topic(name, 1);
        let client = broker.client();
        let timeout = Duration::from_secs(10);
        let old = StateTopic::open(&client, name, timeout).unwrap();
        let new = StateTopic::open(&client, name, timeout).unwrap();

        let (mut old_claim, none) = take(&old);
        assert_eq!(none, None);
        old.write(0, &checkpoint(1), &mut old_claim).unwrap();
        old.write(0, &checkpoint(2), &mut old_claim).unwrap();

        // The task moves; the old owner does not know yet.
        let (new_claim, restored) = take(&new);
        assert_eq!(restored, Some(checkpoint(2)));
        assert!(new_claim.epoch > old_claim.epoch);
        let low_before = low(&new);

        // The old owner's next checkpoint is refused, and trims nothing: its chunks
        // were written after the new claim.
        let err = old.write(0, &checkpoint(3), &mut old_claim).unwrap_err();
        assert!(matches!(err, Error::Fenced(_)), "{err}");
        assert!(err.is_transient());
        assert_eq!(low(&new), low_before, "nothing trimmed");
        assert_eq!(current(&new), Some(checkpoint(2)));

        // A commit of the old owner that lands after the claim (its chunks went out
        // before it) does not count either.
        let small = Checkpoint {
            operators: vec![vec![4; 100]],
            ..checkpoint(4)
        };
        let blob = small.encode();
        let first = old.send(0, "chunk", &blob).unwrap();
        let (mut newest_claim, restored) = take(&new);
        assert_eq!(restored, Some(checkpoint(2)));
        let commit = Commit {
            first,
            chunks: 1,
            bytes: blob.len(),
            crc: crc32c::crc32c(&blob),
            claim: Some(new_claim.epoch),
        };
        new.send(0, "commit", &serde_json::to_vec(&commit).unwrap())
            .unwrap();
        assert_eq!(
            current(&new),
            Some(checkpoint(2)),
            "a commit under a superseded claim"
        );

        // The newest owner writes, and its checkpoint is the one restored.
        new.write(0, &checkpoint(5), &mut newest_claim).unwrap();
        assert_eq!(current(&old), Some(checkpoint(5)));
        assert!(low(&new) > low_before, "the newest owner trims");
        // The claim before it that superseded is gone with the trim; the newest owner's
        // commits still count, and the next owner restores them.
        new.write(0, &checkpoint(6), &mut newest_claim).unwrap();
        let (_, restored) = take(&old);
        assert_eq!(restored, Some(checkpoint(6)));
        // ...after which the previous owner is fenced in turn.
        let err = new.write(0, &checkpoint(7), &mut newest_claim).unwrap_err();
        assert!(matches!(err, Error::Fenced(_)), "{err}");
    }
}
