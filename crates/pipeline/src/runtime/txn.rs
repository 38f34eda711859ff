//! Exactly-once output (`SET 'delivery-guarantee' = 'exactly-once'`): everything a
//! pipeline emits (rows, late and dead-letter copies) goes through transactional
//! producers, committed with the input position it reflects, as Flink's Kafka sink
//! does in `EXACTLY_ONCE` mode. So a `read_committed` reader (librdkafka's default)
//! sees each row once: rows since the last commit are committed with the position
//! that covers their input, or not at all.
//!
//! - Each task (`tasks.rs`) has a producer of its own (transactional id: the tasks'
//!   group and the task) and commits its rows with its checkpoint
//!   ([`Txn::commit_checkpoint`]). Fencing: a task's new owner calls
//!   `init_transactions` before it claims the task (the loader): the broker aborts
//!   what the old owner left open (its rows since its last checkpoint are never
//!   read) and bumps the producer epoch, so the old owner's next write or commit is
//!   refused ([`Error::Fenced`]).
//! - Stage 1 (`route.rs`: stateless queries, and the dead letters of records that
//!   are not JSON) has one producer per instance (transactional id: the group and
//!   the instance) and commits its rows with the source offsets they reflect
//!   ([`Txn::commit_offsets`], `sendOffsetsToTransaction`), every checkpoint
//!   interval. Fencing is the group's (KIP-447): the broker refuses the offsets of a
//!   member whose generation is over, so an instance that lost its partitions
//!   without knowing cannot commit their rows; a rebalance aborts what is open.
//!   The records stage 1 routes to the tasks stay outside transactions (the tasks
//!   drop copies), so grouped queries do not wait for stage 1's commits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::TopicPartitionList;

use super::checkpoint::{commit_record, Checkpoint, Claim, StateTopic, CHUNK_BYTES};
use super::{flush, send, Delivery, DeliveryContext, Error, CLUSTER_TIMEOUT};

/// The offset of the last record delivered to each partition of the state topic.
#[derive(Default)]
pub struct StateOffsets {
    topic: String,
    last: Mutex<HashMap<i32, i64>>,
}

impl StateOffsets {
    pub fn delivered(&self, topic: &str, partition: i32, offset: i64) {
        if topic == self.topic {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let at = last.entry(partition).or_insert(offset);
            *at = (*at).max(offset);
        }
    }

    fn take(&self, partition: i32) -> Option<i64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.remove(&partition)
    }
}

/// A transactional producer, with a transaction open.
pub struct Txn {
    pub producer: ThreadedProducer<DeliveryContext>,
    delivery: Arc<Delivery>,
    state: Arc<StateOffsets>,
}

impl Txn {
    /// Creates the producer, fences any earlier one of `transactional_id` (aborting
    /// what it left open) and opens a transaction. `state_topic`: where
    /// [`Txn::commit_checkpoint`] writes (tasks), "" for none (stage 1).
    pub fn start(
        client: &ClientConfig,
        transactional_id: &str,
        state_topic: &str,
    ) -> Result<Txn, Error> {
        let delivery = Arc::new(Delivery::default());
        let state = Arc::new(StateOffsets {
            topic: state_topic.to_string(),
            ..StateOffsets::default()
        });
        let producer: ThreadedProducer<DeliveryContext> = client
            .clone()
            .set("transactional.id", transactional_id)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            // One producer per task: each holds at most 64 MiB of rows not yet
            // acknowledged (a full queue makes `send` wait for deliveries).
            .set("queue.buffering.max.kbytes", "65536")
            .set("message.max.bytes", "1048576")
            .set(
                "message.timeout.ms",
                CLUSTER_TIMEOUT.as_millis().to_string(),
            )
            .create_with_context(DeliveryContext(delivery.clone(), Some(state.clone())))
            .map_err(|e| Error::Cluster(e.to_string()))?;
        producer
            .init_transactions(CLUSTER_TIMEOUT)
            .map_err(|e| txn_error("start a transaction", e))?;
        producer
            .begin_transaction()
            .map_err(|e| txn_error("start a transaction", e))?;
        Ok(Txn {
            producer,
            delivery,
            state,
        })
    }

    /// Writes `checkpoint` to `partition` of the state topic in the open
    /// transaction, commits it with the rows sent since the last commit, and opens
    /// the next. Returns the offset of the checkpoint's first chunk (what the state
    /// partition may be trimmed to).
    pub fn commit_checkpoint(
        &self,
        state: &StateTopic,
        partition: i32,
        checkpoint: &Checkpoint,
        claim: &Claim,
    ) -> Result<i64, Error> {
        let blob = checkpoint.encode();
        self.flush()?;
        self.state.take(partition);
        let mut chunks = 0i64;
        for chunk in blob.chunks(CHUNK_BYTES) {
            let record = BaseRecord::to(&state.name)
                .key(&b"chunk"[..])
                .payload(chunk)
                .partition(partition);
            send(&self.producer, record)?;
            chunks += 1;
        }
        self.flush()?;
        // One producer writes the partition, in order: the chunks are the records
        // just before the last one delivered. (Another writer between them would
        // be a new owner, which fenced this transaction: its commit fails below.)
        let last = self.state.take(partition).ok_or_else(|| {
            Error::Cluster("no offset was reported for a checkpoint's chunks".into())
        })?;
        let first = last - chunks + 1;
        let value = commit_record(first, chunks, &blob, claim);
        let record = BaseRecord::to(&state.name)
            .key(&b"commit"[..])
            .payload(&value[..])
            .partition(partition);
        send(&self.producer, record)?;
        self.flush()?;
        self.producer
            .commit_transaction(CLUSTER_TIMEOUT)
            .map_err(|e| txn_error("commit a checkpoint", e))?;
        self.producer
            .begin_transaction()
            .map_err(|e| txn_error("start a transaction", e))?;
        Ok(first)
    }

    /// Commits the rows sent since the last commit with `offsets`, the next source
    /// offsets to read of the group `group` describes (its member and generation:
    /// the broker refuses them from a member whose generation is over), and opens
    /// the next transaction. A refused commit is aborted ([`Error::Fenced`]: the
    /// rows are never read, and the run must start again from the group's offsets).
    pub fn commit_offsets(
        &self,
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
    ) -> Result<(), Error> {
        self.flush()?;
        let committed = self
            .producer
            .send_offsets_to_transaction(offsets, group, CLUSTER_TIMEOUT)
            .and_then(|()| self.producer.commit_transaction(CLUSTER_TIMEOUT));
        if let Err(e) = committed {
            let refused = matches!(&e, KafkaError::Transaction(err) if err.txn_requires_abort());
            if refused {
                self.abort()?;
                return Err(Error::Fenced(format!(
                    "the group refused this instance's offsets ({e}): its partitions moved"
                )));
            }
            return Err(txn_error("commit the source offsets", e));
        }
        self.producer
            .begin_transaction()
            .map_err(|e| txn_error("start a transaction", e))
    }

    /// Aborts the open transaction (its rows are never read) and opens the next.
    pub fn abort(&self) -> Result<(), Error> {
        self.producer
            .abort_transaction(CLUSTER_TIMEOUT)
            .map_err(|e| txn_error("abort a transaction", e))?;
        self.producer
            .begin_transaction()
            .map_err(|e| txn_error("start a transaction", e))
    }

    /// Waits for every record sent; a producer fenced meanwhile is
    /// [`Error::Fenced`].
    fn flush(&self) -> Result<(), Error> {
        flush(&self.producer, &self.delivery).map_err(|e| {
            match self.producer.client().fatal_error() {
                Some((_, reason)) => Error::Fenced(format!(
                    "another instance took this task's transactional id ({reason})"
                )),
                None => e,
            }
        })
    }
}

/// A transaction refused because another producer took the task's transactional
/// id is [`Error::Fenced`]; anything else is worth a retry of the run.
fn txn_error(what: &str, e: KafkaError) -> Error {
    let fenced = match &e {
        KafkaError::Transaction(err) => {
            err.is_fatal()
                || matches!(
                    err.code(),
                    RDKafkaErrorCode::Fenced
                        | RDKafkaErrorCode::ProducerFenced
                        | RDKafkaErrorCode::InvalidProducerEpoch
                )
        }
        _ => false,
    };
    if fenced {
        Error::Fenced(format!(
            "cannot {what}: another instance took this task's transactional id ({e})"
        ))
    } else {
        Error::Cluster(format!("cannot {what}: {e}"))
    }
}

/// Against a real broker (in-process, on a free loopback port): two instances that
/// both believe they own a task.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};

    use super::*;
    use crate::runtime::test_broker::Broker;

    fn checkpoint(n: u8) -> Checkpoint {
        Checkpoint {
            plan_hash: 7,
            offsets: vec![("repartition".into(), 0, n as i64)],
            // Two chunks: the first chunk's offset is worked out from the last.
            operators: vec![vec![n; CHUNK_BYTES + 10]],
        }
    }

    fn row(txn: &Txn, value: &str) {
        send(
            &txn.producer,
            BaseRecord::to("eos.out").payload(value.as_bytes()),
        )
        .unwrap();
    }

    /// What a read_committed reader (librdkafka's default) reads of `topic`.
    fn committed(client: &ClientConfig, topic: &str) -> Vec<String> {
        let consumer: BaseConsumer = client
            .clone()
            .set("group.id", "eos-reader")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        loop {
            match consumer.poll(Duration::from_secs(10)) {
                Some(Ok(m)) => out.push(String::from_utf8(m.payload().unwrap().to_vec()).unwrap()),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return out,
                other => panic!("reading {topic}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_stale_owner_can_neither_commit_nor_emit_a_row() {
        let broker = Broker::start();
        broker.create_topic("eos.state", 1);
        broker.create_topic("eos.out", 1);
        let client = broker.client();
        let state = StateTopic::open(&client, "eos.state", Duration::from_secs(10)).unwrap();

        let old = Txn::start(&client, "task-0", "eos.state").unwrap();
        let old_claim = state.claim(0).unwrap();
        row(&old, "old-1");
        old.commit_checkpoint(&state, 0, &checkpoint(1), &old_claim)
            .unwrap();
        row(&old, "old-2");

        // The task moves; the old owner does not know yet. The new one fences it
        // (its open transaction, old-2, is aborted) and restores checkpoint 1.
        let new = Txn::start(&client, "task-0", "eos.state").unwrap();
        let new_claim = state.claim(0).unwrap();
        assert_eq!(
            state.last_before(0, &new_claim).unwrap(),
            Some(checkpoint(1))
        );

        // The old owner's next row and checkpoint are refused.
        row(&old, "old-3");
        let err = old
            .commit_checkpoint(&state, 0, &checkpoint(2), &old_claim)
            .unwrap_err();
        assert!(matches!(err, Error::Fenced(_)), "{err}");
        assert!(err.is_transient());

        row(&new, "new-1");
        let first = new
            .commit_checkpoint(&state, 0, &checkpoint(3), &new_claim)
            .unwrap();
        state.trim(&state.name, &[(0, first)]);
        assert_eq!(committed(&client, "eos.out"), ["old-1", "new-1"]);
        // The next owner restores the new one's checkpoint, markers and all.
        let next = Txn::start(&client, "task-0", "eos.state").unwrap();
        let next_claim = state.claim(0).unwrap();
        assert_eq!(
            state.last_before(0, &next_claim).unwrap(),
            Some(checkpoint(3))
        );
        drop(next);
    }

    /// A member of `group` reading `topic`, once it holds its partition.
    fn member(client: &ClientConfig, group: &str, topic: &str) -> BaseConsumer {
        let consumer: BaseConsumer = client
            .clone()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while consumer.assignment().unwrap().count() == 0 {
            assert!(std::time::Instant::now() < deadline, "no assignment");
            let _ = consumer.poll(Duration::from_millis(50));
        }
        consumer
    }

    fn at(topic: &str, offset: i64) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
            .unwrap();
        tpl
    }

    /// Stage 1's fencing (KIP-447): an instance whose group membership ended
    /// without it noticing cannot commit the rows of the records it read.
    #[test]
    fn a_member_whose_generation_is_over_cannot_commit_its_rows() {
        let broker = Broker::start();
        broker.create_topic("eos.src", 1);
        broker.create_topic("eos.out", 1);
        let client = broker.client();

        let old = member(&client, "eos-g", "eos.src");
        let old_group = old.group_metadata().unwrap();
        let old_txn = Txn::start(&client, "eos-g-a", "").unwrap();
        row(&old_txn, "a-1");
        old_txn
            .commit_offsets(&at("eos.src", 1), &old_group)
            .unwrap();
        row(&old_txn, "a-2");
        // Its membership ends (here: it leaves; a lapsed session ends the same way)
        // and another instance takes the partition.
        drop(old);
        let new = member(&client, "eos-g", "eos.src");
        let new_txn = Txn::start(&client, "eos-g-b", "").unwrap();
        row(&new_txn, "b-2");
        new_txn
            .commit_offsets(&at("eos.src", 2), &new.group_metadata().unwrap())
            .unwrap();

        let err = old_txn
            .commit_offsets(&at("eos.src", 3), &old_group)
            .unwrap_err();
        assert!(matches!(err, Error::Fenced(_)), "{err}");
        assert_eq!(committed(&client, "eos.out"), ["a-1", "b-2"]);
        let offsets = new.committed(Duration::from_secs(10)).unwrap();
        assert_eq!(
            offsets.find_partition("eos.src", 0).unwrap().offset(),
            Offset::Offset(2)
        );
        // The stale instance's producer is usable again after the abort.
        row(&old_txn, "a-3");
        old_txn.abort().unwrap();
        assert_eq!(committed(&client, "eos.out"), ["a-1", "b-2"]);
    }
}
