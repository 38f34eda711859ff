//! Exactly-once output (`SET 'delivery-guarantee' = 'exactly-once'`): each task
//! writes its rows and its checkpoints through a transactional producer of its own
//! (transactional id: the tasks' group and the task), and commits at each of its
//! checkpoints, as Flink's Kafka sink does in `EXACTLY_ONCE` mode. So a
//! `read_committed` reader (librdkafka's default) sees each row once: rows since
//! the last checkpoint are committed with the checkpoint that covers their input,
//! or not at all.
//!
//! Fencing: a task's new owner calls `init_transactions` before it claims the task
//! (`tasks.rs`, the loader): the broker aborts what the old owner left open (its
//! rows since its last checkpoint are never read) and bumps the producer epoch, so
//! the old owner's next write or commit is refused ([`Error::Fenced`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

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

/// A task's transactional producer, with a transaction open.
pub struct TaskTxn {
    pub producer: ThreadedProducer<DeliveryContext>,
    delivery: Arc<Delivery>,
    state: Arc<StateOffsets>,
}

impl TaskTxn {
    /// Creates the producer, fences any earlier one of `transactional_id` (aborting
    /// what it left open) and opens a transaction.
    pub fn start(
        client: &ClientConfig,
        transactional_id: &str,
        state_topic: &str,
    ) -> Result<TaskTxn, Error> {
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
        Ok(TaskTxn {
            producer,
            delivery,
            state,
        })
    }

    /// Writes `checkpoint` to `partition` of the state topic in the open
    /// transaction, commits it with the rows sent since the last commit, and opens
    /// the next. Returns the offset of the checkpoint's first chunk (what the state
    /// partition may be trimmed to).
    pub fn commit(
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

    fn row(txn: &TaskTxn, value: &str) {
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

        let old = TaskTxn::start(&client, "task-0", "eos.state").unwrap();
        let old_claim = state.claim(0).unwrap();
        row(&old, "old-1");
        old.commit(&state, 0, &checkpoint(1), &old_claim).unwrap();
        row(&old, "old-2");

        // The task moves; the old owner does not know yet. The new one fences it
        // (its open transaction, old-2, is aborted) and restores checkpoint 1.
        let new = TaskTxn::start(&client, "task-0", "eos.state").unwrap();
        let new_claim = state.claim(0).unwrap();
        assert_eq!(
            state.last_before(0, &new_claim).unwrap(),
            Some(checkpoint(1))
        );

        // The old owner's next row and checkpoint are refused.
        row(&old, "old-3");
        let err = old
            .commit(&state, 0, &checkpoint(2), &old_claim)
            .unwrap_err();
        assert!(matches!(err, Error::Fenced(_)), "{err}");
        assert!(err.is_transient());

        row(&new, "new-1");
        let first = new.commit(&state, 0, &checkpoint(3), &new_claim).unwrap();
        state.trim(&state.name, &[(0, first)]);
        assert_eq!(committed(&client, "eos.out"), ["old-1", "new-1"]);
        // The next owner restores the new one's checkpoint, markers and all.
        let next = TaskTxn::start(&client, "task-0", "eos.state").unwrap();
        let next_claim = state.claim(0).unwrap();
        assert_eq!(
            state.last_before(0, &next_claim).unwrap(),
            Some(checkpoint(3))
        );
        drop(next);
    }
}
