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
use std::sync::Arc;

use protocol::record_batch::{control_type, BatchHeader, ControlType};
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
    /// The offset of this producer's first batch in its open transaction here, if
    /// one is open (Kafka's `currentTxnFirstOffset`): the last stable offset stays
    /// at or before it until the transaction's marker is written.
    #[serde(default)]
    txn_first_offset: Option<i64>,
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
            txn_first_offset: None,
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

/// A transaction aborted in this partition: a `read_committed` fetch that returns
/// records in `first_offset..=last_offset` names it, so the client drops the
/// producer's records there (`last_offset` is the abort marker's offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// What a fetch needs of a partition's transactions, published after each change
/// so that a fetch never waits for `producers` (held across appends).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnView {
    /// The first offset of the oldest open transaction: the last stable offset is
    /// this or the high watermark, whichever is lower.
    pub first_unstable: Option<i64>,
    /// In the order of their markers; shared with the partition's state (copied
    /// only when an abort or retention changes it while a fetch holds it).
    pub aborted: Arc<Vec<AbortedTxn>>,
}

impl TxnView {
    /// The aborted transactions a `read_committed` fetch of `from..upto` must name.
    pub fn aborted_between(&self, from: i64, upto: i64) -> Vec<AbortedTxn> {
        let start = self.aborted.partition_point(|a| a.last_offset < from);
        self.aborted[start..]
            .iter()
            .filter(|a| a.first_offset < upto)
            .copied()
            .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProducerStates {
    producers: HashMap<i64, ProducerEntry>,
    /// Transactions aborted here whose markers are still in the log, in marker order.
    #[serde(default)]
    aborted: Arc<Vec<AbortedTxn>>,
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
        if entry.txn_first_offset.is_some() && !header.is_transactional() {
            // Kafka's rule (ProducerAppendInfo): a producer with a transaction open
            // here writes only inside it until its marker.
            return Check::Reject(ResponseError::InvalidTxnState);
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

    /// Records a batch that is now in the log (appended, or met while replaying):
    /// `control` is the marker a control batch carries. Returns whether the
    /// partition's [`TxnView`] changed (a transaction began or ended here).
    pub fn record(&mut self, header: &BatchHeader, control: Option<ControlType>) -> bool {
        self.end_offset = self.end_offset.max(header.last_offset() + 1);
        let entry = self.producers.entry(header.producer_id).or_default();
        if header.producer_epoch != entry.epoch {
            // A coordinator's marker may carry a bumped epoch (an abort that
            // fences the producer): older epochs are refused from here on.
            entry.epoch = header.producer_epoch;
            entry.batches.clear();
        }
        entry.last_timestamp_ms = header.max_timestamp;
        if header.is_control() {
            let Some(first_offset) = entry.txn_first_offset.take() else {
                return false; // a marker for a transaction with nothing here
            };
            if control == Some(ControlType::Abort) {
                Arc::make_mut(&mut self.aborted).push(AbortedTxn {
                    producer_id: header.producer_id,
                    first_offset,
                    last_offset: header.base_offset,
                });
            }
            return true;
        }
        entry.batches.push_back(BatchMeta {
            first_seq: header.base_sequence,
            last_seq: last_seq(header),
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
        });
        while entry.batches.len() > BATCHES_REMEMBERED {
            entry.batches.pop_front();
        }
        if header.is_transactional() && entry.txn_first_offset.is_none() {
            entry.txn_first_offset = Some(header.base_offset);
            return true;
        }
        false
    }

    /// What a fetch needs of the transactions here.
    pub fn txn_view(&self) -> TxnView {
        TxnView {
            first_unstable: self
                .producers
                .values()
                .filter_map(|e| e.txn_first_offset)
                .min(),
            aborted: self.aborted.clone(),
        }
    }

    /// Whether any transaction is open or was aborted here: what crash recovery
    /// cannot trim from a snapshot ahead of the log (see [`load`]).
    fn has_transactions(&self) -> bool {
        !self.aborted.is_empty()
            || self
                .producers
                .values()
                .any(|e| e.txn_first_offset.is_some())
    }

    /// Forgets aborted transactions whose markers are before `log_start_offset`
    /// (retention or DeleteRecords took them). Returns whether any went.
    pub fn forget_aborted_before(&mut self, log_start_offset: i64) -> bool {
        if self
            .aborted
            .first()
            .is_none_or(|a| a.last_offset >= log_start_offset)
        {
            return false; // in marker order: nothing before the start
        }
        Arc::make_mut(&mut self.aborted).retain(|a| a.last_offset >= log_start_offset);
        true
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
            // A producer with an open transaction stays until its marker (Kafka
            // expires only producers without one).
            e.txn_first_offset.is_some()
                || now_ms.saturating_sub(e.last_timestamp_ms) < expiration_ms
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
        // A snapshot ahead of the log (a crash cut batches off) is trimmed to it;
        // one with transactions is not (an open transaction's start or an abort
        // marker may be among the batches cut off): the log is replayed whole.
        Some(s) if s.end_offset > log_end && s.has_transactions() => ProducerStates {
            end_offset: log.log_start_offset(),
            ..Default::default()
        },
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
    log.for_each_batch(from, log_end, REPLAY_READ_BYTES, |header, batch| {
        if header.last_offset() >= from && header.has_producer_id() {
            let control = header.is_control().then(|| control_type(batch)).flatten();
            states.record(header, control);
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
        s.record(&a, None);
        let b = header(7, 0, 3, 2, 3);
        assert_eq!(s.check(&b, NO_LIMIT), Check::Append);
        s.record(&b, None);
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
            s.record(&h, None);
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
        s.record(&header(1, 2, 0, 1, 0), None);
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
        s.record(&old, None);
        let mut recent = header(2, 0, 0, 1, 1);
        recent.max_timestamp = 5_000;
        s.record(&recent, None);
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
        s.record(&h, None);
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
        s.record(&header(1, 0, 0, 1, 0), None);
        let mut h = header(1, 0, 1, 1, 1);
        h.base_sequence = 1;
        s.record(&h, None);
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
            s.record(&h, None);
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
        s.record(&old, None);
        for pid in 1..3 {
            let mut recent = header(pid, 0, 1, 1, 3 + pid);
            recent.max_timestamp = 1_000;
            s.record(&recent, None);
        }
        assert_eq!(s.expire(1_000, 1_000), 1);
        assert_eq!(s.check(&header(9, 0, 0, 1, 6), 3), Check::Append);
    }

    fn txn_batch(pid: i64, epoch: i16, seq: i32, records: usize, base_offset: i64) -> BatchHeader {
        let mut h = header(pid, epoch, seq, records, base_offset);
        h.attributes |= 0x10; // transactional
        h
    }

    fn marker(pid: i64, epoch: i16, kind: ControlType, offset: i64) -> BatchHeader {
        let batch = protocol::record_batch::build_control_batch(pid, epoch, kind, 0, 0);
        BatchHeader {
            base_offset: offset,
            ..BatchHeader::parse(&batch).unwrap()
        }
    }

    #[test]
    fn open_transactions_hold_the_stable_offset_and_aborts_are_listed() {
        let mut s = ProducerStates::default();
        assert!(!s.record(&header(9, 0, 0, 2, 0), None), "not transactional");
        assert!(
            s.record(&txn_batch(1, 0, 0, 2, 2), None),
            "a transaction opens at 2"
        );
        assert!(
            !s.record(&txn_batch(1, 0, 2, 1, 4), None),
            "still the same one"
        );
        assert!(s.record(&txn_batch(2, 0, 0, 1, 5), None));
        assert_eq!(s.txn_view().first_unstable, Some(2));
        assert!(s.record(
            &marker(1, 0, ControlType::Abort, 6),
            Some(ControlType::Abort)
        ));
        let view = s.txn_view();
        assert_eq!(
            view.first_unstable,
            Some(5),
            "producer 2's transaction is still open"
        );
        let aborted = AbortedTxn {
            producer_id: 1,
            first_offset: 2,
            last_offset: 6,
        };
        assert_eq!(*view.aborted, vec![aborted]);
        assert!(s.record(
            &marker(2, 0, ControlType::Commit, 7),
            Some(ControlType::Commit)
        ));
        let view = s.txn_view();
        assert_eq!(view.first_unstable, None);
        assert_eq!(view.aborted.len(), 1, "a commit lists nothing");
        assert!(
            !s.record(
                &marker(2, 0, ControlType::Commit, 8),
                Some(ControlType::Commit)
            ),
            "a second marker ends nothing"
        );
        // Which aborted transactions a fetch of a range names.
        assert_eq!(view.aborted_between(0, 3), vec![aborted]);
        assert_eq!(view.aborted_between(6, 100), vec![aborted]);
        assert!(
            view.aborted_between(7, 100).is_empty(),
            "its marker is before the range"
        );
        assert!(
            view.aborted_between(0, 2).is_empty(),
            "it starts after the range"
        );
        assert!(!s.forget_aborted_before(6));
        assert!(s.forget_aborted_before(7));
        assert!(s.txn_view().aborted.is_empty());
    }

    #[test]
    fn a_producer_with_an_open_transaction_writes_only_inside_it() {
        let mut s = ProducerStates::default();
        s.record(&txn_batch(1, 0, 0, 1, 0), None);
        assert_eq!(
            s.check(&header(1, 0, 1, 1, 1), NO_LIMIT),
            Check::Reject(ResponseError::InvalidTxnState)
        );
        assert_eq!(s.check(&txn_batch(1, 0, 1, 1, 1), NO_LIMIT), Check::Append);
        s.record(
            &marker(1, 0, ControlType::Commit, 1),
            Some(ControlType::Commit),
        );
        assert_eq!(s.check(&header(1, 0, 1, 1, 2), NO_LIMIT), Check::Append);
    }

    #[test]
    fn a_marker_with_a_bumped_epoch_fences_the_old_one() {
        let mut s = ProducerStates::default();
        s.record(&txn_batch(1, 3, 0, 1, 0), None);
        s.record(
            &marker(1, 4, ControlType::Abort, 1),
            Some(ControlType::Abort),
        );
        assert_eq!(
            s.check(&txn_batch(1, 3, 1, 1, 2), NO_LIMIT),
            Check::Reject(ResponseError::InvalidProducerEpoch)
        );
        assert_eq!(s.check(&txn_batch(1, 4, 0, 1, 2), NO_LIMIT), Check::Append);
    }

    #[test]
    fn a_producer_with_an_open_transaction_does_not_expire() {
        let mut s = ProducerStates::default();
        let mut open = txn_batch(1, 0, 0, 1, 0);
        open.max_timestamp = 0;
        s.record(&open, None);
        assert_eq!(s.expire(1_000_000, 10), 0);
        s.record(
            &marker(1, 0, ControlType::Commit, 1),
            Some(ControlType::Commit),
        );
        assert_eq!(s.expire(1_000_000, 10), 1);
    }

    #[test]
    fn a_snapshot_ahead_of_the_log_with_transactions_is_replaced_by_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) =
            storage::PartitionLog::open(dir.path(), storage::LogConfig::default(), 0).unwrap();
        let mut batch = build_simple_batch(0, &[b"a"]);
        protocol::record_batch::set_producer(&mut batch, 1, 0, 0);
        protocol::record_batch::set_transactional(&mut batch);
        log.append(&batch, 0, 0).unwrap();
        // A snapshot that saw the transaction aborted at offset 1, which the log
        // lost: the transaction is open again after a load.
        let mut ahead = ProducerStates::default();
        ahead.record(&txn_batch(1, 0, 0, 1, 0), None);
        ahead.record(
            &marker(1, 0, ControlType::Abort, 1),
            Some(ControlType::Abort),
        );
        std::fs::write(
            dir.path().join(SNAPSHOT_FILE),
            serde_json::to_vec(&ahead).unwrap(),
        )
        .unwrap();
        let loaded = load(dir.path(), &log).unwrap();
        assert_eq!(loaded.txn_view().first_unstable, Some(0));
        assert!(loaded.txn_view().aborted.is_empty());
        // With the marker in the log, a load from no snapshot sees the abort.
        let mut m = protocol::record_batch::build_control_batch(1, 0, ControlType::Abort, 0, 0);
        protocol::record_batch::set_base_offset(&mut m, 1);
        log.append(&m, 0, 0).unwrap();
        std::fs::remove_file(dir.path().join(SNAPSHOT_FILE)).unwrap();
        let loaded = load(dir.path(), &log).unwrap();
        assert_eq!(loaded.txn_view().first_unstable, None);
        assert_eq!(loaded.txn_view().aborted.len(), 1);
    }
}
