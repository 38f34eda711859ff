//! Idempotent producers: per partition, the epoch of every producer id and the
//! sequence ranges of its last five batches, so that a retried batch is
//! acknowledged with its original offset instead of being written twice, and a
//! gap or a stale epoch is refused as Kafka refuses it.
//!
//! The answers follow Kafka 3.x (`ProducerAppendInfo.checkSequence`): a stale epoch
//! is INVALID_PRODUCER_EPOCH; a new epoch must start at sequence 0; within an epoch
//! a batch must follow the last one, else OUT_OF_ORDER_SEQUENCE_NUMBER (a retry of
//! a batch older than the last five included); a producer with no state here, new
//! or forgotten, is accepted at any sequence (UNKNOWN_PRODUCER_ID is never sent).
//!
//! Limit: a partition keeps the state of at most `max_producer_ids_per_partition`
//! producer ids. A batch from a producer id it has no state for, once it is full,
//! is refused with THROTTLING_QUOTA_EXCEEDED: retriable, as KIP-936 proposes for
//! unseen producer ids beyond a quota, so the producer retries and gets in once idle
//! producers expire. Kafka itself has no such limit (its state grows until expiry,
//! the OOM KIP-936 describes); refusing the new id keeps the state of producers
//! already writing, which evicting one would lose (its retries could then be
//! written twice).
//!
//! Expiry: a producer whose last batch's max timestamp is `producer_id_expiration_ms`
//! old is forgotten (Kafka's `producer.id.expiration.ms`, measured the same way),
//! when the broker opens and every `producer_id_expiration_check_interval_ms`; the
//! snapshot is rewritten without it, so a restart does not bring it back.
//!
//! Persistence: a snapshot (`producer-state.json` in the partition directory)
//! written by the background flush and at shutdown, labelled with the log end
//! offset it reflects. On open, batches at or beyond the recovered log end are
//! dropped from the snapshot (a crash may have cut them off) and the log after the
//! snapshot is replayed, batch headers only. A missing or unreadable snapshot
//! means replaying the whole log: correct, and as slow as the log is long.

use std::collections::{HashMap, VecDeque};

use protocol::record_batch::BatchHeader;
use protocol::ResponseError;

/// Kafka remembers this many batches per producer and partition.
pub const BATCHES_REMEMBERED: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct BatchMeta {
    first_seq: i32,
    last_seq: i32,
    base_offset: i64,
    last_offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<BatchMeta>,
    /// Max timestamp of the producer's last batch, what Kafka's expiry measures
    /// idleness from (`ProducerStateEntry.lastTimestamp`). Negative: unknown (a
    /// snapshot written before this field existed); the first expiry check then
    /// starts the idle clock.
    #[serde(default = "unknown_timestamp")]
    last_timestamp_ms: i64,
}

fn unknown_timestamp() -> i64 {
    -1
}

impl Default for ProducerEntry {
    fn default() -> Self {
        ProducerEntry {
            epoch: 0,
            batches: VecDeque::new(),
            last_timestamp_ms: unknown_timestamp(),
        }
    }
}

/// What to do with a batch from an idempotent producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Append,
    /// Already in the log: acknowledge with the original base offset.
    Duplicate {
        base_offset: i64,
    },
    Reject(ResponseError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProducerStates {
    producers: HashMap<i64, ProducerEntry>,
    /// The log end offset this state reflects.
    pub end_offset: i64,
    /// `end_offset` when the snapshot was last written.
    #[serde(skip)]
    saved_end_offset: i64,
    /// Producers were expired since the snapshot was last written.
    #[serde(skip)]
    expired_since_save: bool,
}

/// Sequence numbers wrap from i32::MAX to 0.
fn add_seq(seq: i32, n: i32) -> i32 {
    ((seq as i64 + n as i64) % (i32::MAX as i64 + 1)) as i32
}

fn last_seq(header: &BatchHeader) -> i32 {
    add_seq(header.base_sequence, header.last_offset_delta)
}

impl ProducerStates {
    /// What to do with `header`'s batch; a producer id without state is refused
    /// once `max_producers` ids have state here.
    pub fn check(&self, header: &BatchHeader, max_producers: usize) -> Check {
        debug_assert!(header.has_producer_id());
        let first = header.base_sequence;
        if first < 0 {
            return Check::Reject(ResponseError::InvalidRecord);
        }
        // No state for this producer: it is new, or its state was lost (expired
        // after `producer_id_expiration_ms`, or its batches were cut off). Kafka 3.x
        // (ProducerAppendInfo.checkSequence) accepts any sequence then, so that a
        // producer whose state went away can go on; it no longer answers
        // UNKNOWN_PRODUCER_ID here, and neither do we.
        let Some(entry) = self.producers.get(&header.producer_id) else {
            if self.producers.len() >= max_producers {
                return Check::Reject(ResponseError::ThrottlingQuotaExceeded);
            }
            return Check::Append;
        };
        if header.producer_epoch < entry.epoch {
            return Check::Reject(ResponseError::InvalidProducerEpoch);
        }
        if header.producer_epoch > entry.epoch {
            // A bumped epoch starts its sequences again at 0.
            return if first == 0 {
                Check::Append
            } else {
                Check::Reject(ResponseError::OutOfOrderSequenceNumber)
            };
        }
        let last = last_seq(header);
        if let Some(b) = entry
            .batches
            .iter()
            .find(|b| b.first_seq == first && b.last_seq == last)
        {
            return Check::Duplicate {
                base_offset: b.base_offset,
            };
        }
        // Anything else must follow the last batch: a gap, and a retry of a batch
        // older than the last five, are both out of order (Kafka says the same).
        match entry.batches.back() {
            Some(prev) if first == add_seq(prev.last_seq, 1) => Check::Append,
            None if first == 0 => Check::Append,
            _ => Check::Reject(ResponseError::OutOfOrderSequenceNumber),
        }
    }

    /// Records a batch that is now in the log (appended, or met while replaying).
    pub fn record(&mut self, header: &BatchHeader) {
        let entry = self.producers.entry(header.producer_id).or_default();
        if header.producer_epoch != entry.epoch {
            entry.epoch = header.producer_epoch;
            entry.batches.clear();
        }
        entry.last_timestamp_ms = header.max_timestamp;
        entry.batches.push_back(BatchMeta {
            first_seq: header.base_sequence,
            last_seq: last_seq(header),
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
        });
        while entry.batches.len() > BATCHES_REMEMBERED {
            entry.batches.pop_front();
        }
        self.end_offset = self.end_offset.max(header.last_offset() + 1);
    }

    /// Forgets batches at or beyond `log_end_offset` (cut off by crash recovery).
    pub fn truncate(&mut self, log_end_offset: i64) {
        for entry in self.producers.values_mut() {
            entry.batches.retain(|b| b.last_offset < log_end_offset);
        }
        self.producers.retain(|_, e| !e.batches.is_empty());
        self.end_offset = self.end_offset.min(log_end_offset);
    }

    /// Forgets producers whose last batch is `expiration_ms` or more older than
    /// `now_ms` (Kafka's `producer.id.expiration.ms`; the timestamp is the batch's
    /// max timestamp, as Kafka measures it). A forgotten producer's next batch is
    /// accepted with any sequence, so retries of its old batches can no longer be
    /// recognised. Returns how many were dropped.
    pub fn expire(&mut self, now_ms: i64, expiration_ms: i64) -> usize {
        let before = self.producers.len();
        self.producers.retain(|_, e| {
            if e.last_timestamp_ms < 0 {
                e.last_timestamp_ms = now_ms;
            }
            now_ms.saturating_sub(e.last_timestamp_ms) < expiration_ms
        });
        let expired = before - self.producers.len();
        if expired > 0 {
            self.expired_since_save = true;
        }
        expired
    }

    pub fn producer_count(&self) -> usize {
        self.producers.len()
    }
}

const SNAPSHOT_FILE: &str = "producer-state.json";
/// Bytes read per step while replaying the log after the snapshot.
const REPLAY_READ_BYTES: usize = 1 << 20;

/// Loads the snapshot in `dir` and brings it up to the log end by replaying batch
/// headers after it.
pub fn load(
    dir: &std::path::Path,
    log: &storage::PartitionLog,
) -> Result<ProducerStates, crate::topics::TopicError> {
    use crate::topics::TopicError;
    let log_end = log.log_end_offset();
    let snapshot = std::fs::read(dir.join(SNAPSHOT_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<ProducerStates>(&bytes).ok());
    let mut states = match snapshot {
        Some(mut s) => {
            s.truncate(log_end);
            s
        }
        None => ProducerStates {
            end_offset: log.log_start_offset(),
            ..Default::default()
        },
    };
    let from = states.end_offset;
    log.for_each_batch(from, log_end, REPLAY_READ_BYTES, |header, _| {
        if header.last_offset() >= from && header.has_producer_id() {
            states.record(header);
        }
    })
    .map_err(TopicError::from)?;
    states.end_offset = log_end;
    states.saved_end_offset = states.end_offset;
    Ok(states)
}

/// Writes the snapshot when it changed since the last save, without fsync: a lost
/// snapshot only costs a longer replay, and one that is ahead of the log (it names
/// batches a crash or a failed fsync cut off) is trimmed to the log end by [`load`],
/// so it never vouches for a batch the log does not hold.
pub fn save_if_changed(
    dir: &std::path::Path,
    states: &mut ProducerStates,
) -> Result<(), crate::topics::TopicError> {
    if states.end_offset == states.saved_end_offset && !states.expired_since_save {
        return Ok(());
    }
    let json = serde_json::to_vec(&*states)
        .map_err(|e| crate::topics::TopicError::Storage(e.to_string()))?;
    common::write_file_atomically(&dir.join(SNAPSHOT_FILE), &json, common::Durability::Lazy)
        .map_err(|e| crate::topics::TopicError::Storage(e.to_string()))?;
    states.saved_end_offset = states.end_offset;
    states.expired_since_save = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::record_batch::{build_simple_batch, BatchHeader};

    const NO_LIMIT: usize = usize::MAX;

    fn header(pid: i64, epoch: i16, seq: i32, records: usize, base_offset: i64) -> BatchHeader {
        let values: Vec<&[u8]> = vec![b"v"; records];
        let batch = build_simple_batch(0, &values);
        let mut h = BatchHeader::parse(&batch).unwrap();
        h.producer_id = pid;
        h.producer_epoch = epoch;
        h.base_sequence = seq;
        h.base_offset = base_offset;
        h
    }

    #[test]
    fn in_order_batches_append_and_retries_are_duplicates() {
        let mut s = ProducerStates::default();
        let a = header(7, 0, 0, 3, 0);
        assert_eq!(s.check(&a, NO_LIMIT), Check::Append);
        s.record(&a);
        let b = header(7, 0, 3, 2, 3);
        assert_eq!(s.check(&b, NO_LIMIT), Check::Append);
        s.record(&b);
        assert_eq!(
            s.check(&header(7, 0, 0, 3, 99), NO_LIMIT),
            Check::Duplicate { base_offset: 0 }
        );
        assert_eq!(
            s.check(&header(7, 0, 3, 2, 99), NO_LIMIT),
            Check::Duplicate { base_offset: 3 }
        );
        assert_eq!(
            s.check(&header(7, 0, 6, 1, 99), NO_LIMIT),
            Check::Reject(ResponseError::OutOfOrderSequenceNumber)
        );
        assert_eq!(s.check(&header(7, 0, 5, 1, 99), NO_LIMIT), Check::Append);
    }

    #[test]
    fn only_five_batches_are_remembered() {
        let mut s = ProducerStates::default();
        for i in 0..6 {
            let h = header(1, 0, i, 1, i as i64);
            assert_eq!(s.check(&h, NO_LIMIT), Check::Append);
            s.record(&h);
        }
        // The first batch has been forgotten: a retry of it is now out of order.
        assert_eq!(
            s.check(&header(1, 0, 0, 1, 0), NO_LIMIT),
            Check::Reject(ResponseError::OutOfOrderSequenceNumber)
        );
        assert_eq!(
            s.check(&header(1, 0, 1, 1, 0), NO_LIMIT),
            Check::Duplicate { base_offset: 1 }
        );
    }

    #[test]
    fn epochs_fence_and_reset_sequences() {
        let mut s = ProducerStates::default();
        s.record(&header(1, 2, 0, 1, 0));
        assert_eq!(
            s.check(&header(1, 1, 1, 1, 0), NO_LIMIT),
            Check::Reject(ResponseError::InvalidProducerEpoch)
        );
        assert_eq!(
            s.check(&header(1, 3, 5, 1, 0), NO_LIMIT),
            Check::Reject(ResponseError::OutOfOrderSequenceNumber)
        );
        assert_eq!(s.check(&header(1, 3, 0, 1, 0), NO_LIMIT), Check::Append);
        // A producer without state may start anywhere (its state may have expired).
        assert_eq!(s.check(&header(2, 0, 4, 1, 0), NO_LIMIT), Check::Append);
        assert_eq!(
            s.check(&header(2, 0, -1, 1, 0), NO_LIMIT),
            Check::Reject(ResponseError::InvalidRecord)
        );
    }

    #[test]
    fn idle_producers_expire_and_then_start_anywhere() {
        let mut s = ProducerStates::default();
        let mut old = header(1, 0, 0, 1, 0);
        old.max_timestamp = 1_000;
        s.record(&old);
        let mut recent = header(2, 0, 0, 1, 1);
        recent.max_timestamp = 5_000;
        s.record(&recent);
        assert_eq!(s.expire(10_999, 10_000), 0, "idle for 9999 ms only");
        assert_eq!(s.expire(11_000, 10_000), 1, "idle for exactly the limit");
        assert_eq!(s.producer_count(), 1);
        // Producer 1 is forgotten: a gap is no longer detectable, as in Kafka.
        assert_eq!(s.check(&header(1, 0, 7, 1, 2), NO_LIMIT), Check::Append);
        assert_eq!(
            s.check(&header(2, 0, 7, 1, 2), NO_LIMIT),
            Check::Reject(ResponseError::OutOfOrderSequenceNumber)
        );
    }

    #[test]
    fn expiry_is_saved_and_a_snapshot_without_timestamps_starts_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ProducerStates::default();
        let mut h = header(1, 0, 0, 1, 0);
        h.max_timestamp = 0;
        s.record(&h);
        save_if_changed(dir.path(), &mut s).unwrap();
        assert_eq!(s.expire(100, 10), 1);
        save_if_changed(dir.path(), &mut s).unwrap();
        let saved: ProducerStates =
            serde_json::from_slice(&std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap())
                .unwrap();
        assert_eq!(saved.producer_count(), 0, "the expiry reached the snapshot");

        // A snapshot from before `last_timestamp_ms` existed.
        let json = br#"{"producers":{"9":{"epoch":0,"batches":[]}},"end_offset":0}"#;
        let mut old: ProducerStates = serde_json::from_slice(json).unwrap();
        assert_eq!(
            old.expire(1_000, 10),
            0,
            "unknown age: the clock starts now"
        );
        assert_eq!(old.expire(1_009, 10), 0);
        assert_eq!(old.expire(1_010, 10), 1);
    }

    #[test]
    fn sequences_wrap_and_truncation_forgets_cut_batches() {
        let mut s = ProducerStates::default();
        s.record(&header(1, 0, 0, 1, 0));
        let mut h = header(1, 0, 1, 1, 1);
        h.base_sequence = 1;
        s.record(&h);
        assert_eq!(add_seq(i32::MAX, 1), 0);
        s.truncate(1);
        assert_eq!(
            s.check(&header(1, 0, 1, 1, 1), NO_LIMIT),
            Check::Append,
            "batch at offset 1 was cut off"
        );
        s.truncate(0);
        assert_eq!(s.producer_count(), 0);
    }

    #[test]
    fn new_producer_ids_past_the_limit_are_refused_known_ones_go_on() {
        let mut s = ProducerStates::default();
        for pid in 0..3 {
            let h = header(pid, 0, 0, 1, pid);
            assert_eq!(s.check(&h, 3), Check::Append);
            s.record(&h);
        }
        assert_eq!(
            s.check(&header(9, 0, 0, 1, 3), 3),
            Check::Reject(ResponseError::ThrottlingQuotaExceeded)
        );
        // Producers with state are checked as before, retries included.
        assert_eq!(s.check(&header(1, 0, 1, 1, 3), 3), Check::Append);
        assert_eq!(
            s.check(&header(1, 0, 0, 1, 3), 3),
            Check::Duplicate { base_offset: 1 }
        );
        // Once one expires, a new id gets its place.
        let mut old = header(0, 0, 1, 1, 3);
        old.max_timestamp = 0;
        s.record(&old);
        for pid in 1..3 {
            let mut recent = header(pid, 0, 1, 1, 3 + pid);
            recent.max_timestamp = 1_000;
            s.record(&recent);
        }
        assert_eq!(s.expire(1_000, 1_000), 1);
        assert_eq!(s.check(&header(9, 0, 0, 1, 6), 3), Check::Append);
    }
}
