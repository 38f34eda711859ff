//! Committed offsets, durable across crashes.
//!
//! **Why a log.** An OffsetCommit must be on stable storage before it is answered
//! ("acknowledged means kept"), and commits arrive often (every auto-commit interval
//! from every consumer). Appending one record batch per OffsetCommit to a
//! [`storage::PartitionLog`] makes that one sequential write plus an fsync shared
//! with every other commit and acks=all produce waiting at the same moment (the
//! broker's [`Flusher`] group-commits them), and it reuses the log's crash recovery: a
//! torn tail is cut at the last valid batch, so after `kill -9` the store holds
//! exactly a prefix of the commits, including every one that was answered. This is
//! what Kafka does with `__consumer_offsets`, minus replication.
//!
//! **Where.** `<data_dir>/__group_offsets/`, one partition log. The name has no
//! `-<n>` suffix on purpose: the topic registry removes `<topic>-<n>` directories
//! that no topic owns. It is not a topic: clients cannot see, fetch or produce it,
//! and retention never applies to it.
//!
//! **Record format.** This is the one place the broker builds record batches (every
//! other batch it stores is a producer's, byte for byte). Each batch is an
//! uncompressed v2 batch built with
//! [`protocol::record_batch::build_simple_batch`] (no keys, no headers); each record
//! value is one change, big-endian:
//!
//! ```text
//! u8 format = 1 | u8 kind | str group | ...
//!   kind 0, commit:         str topic | i32 partition | i64 offset | i32 leader_epoch
//!                           | i64 commit_timestamp_ms | nstr metadata
//!   kind 1, offset deleted: str topic | i32 partition            (OffsetDelete)
//!   kind 2, group deleted:  nothing more                         (DeleteGroups)
//! str  = i32 length + UTF-8 bytes
//! nstr = i32 length (-1 = null) + UTF-8 bytes
//! ```
//!
//! A record whose format or kind is unknown is skipped at replay with a warning, so a
//! newer broker's log still opens (what it added is lost, nothing else).
//!
//! **Replay.** [`OffsetsStore::open`] reads the log from start to end and applies the
//! changes in order: a commit sets a partition's offset, a deletion tombstone removes
//! it, a group tombstone removes all of the group's offsets. The result is the map
//! held in memory and answered from by OffsetFetch.
//!
//! **Visibility.** A change becomes visible in memory only once it is durable, in log
//! order: it waits in `pending` (keyed by its batch's last offset) until an fsync
//! covering it returns. If that fsync fails the commit is answered with an error and
//! not applied; it is still in the log and may reappear after a restart, as a
//! produce whose answer was an error may still have been written.
//!
//! **Compaction.** Each commit adds about 60 bytes plus the names per partition, so
//! a consumer of 100 partitions auto-committing every 5 s adds ~150 MB a day, almost
//! all of it superseded. Once the log is [`COMPACTION_RATIO`] times the size it had
//! after the last compaction, and at least `offsets_compaction_min_bytes`, it is
//! compacted (checked after each commit and at start-up):
//!
//! 1. under the state and log locks (no commit can land in between), the live set
//!    (the durable offsets plus the pending changes, which are already in the log)
//!    is appended again as ordinary commit records from offset S, starting a new
//!    segment (one change that removes nothing stands in for an empty set). A
//!    pending change whose fsync then fails is restated too: it was in the log and
//!    could reappear after a restart anyway (see Visibility);
//! 2. the log is fsync'd;
//! 3. the log start moves to S (a durable checkpoint), then the segments below S,
//!    which hold only superseded changes, are deleted.
//!
//! Crash safety needs no switch-over: replaying any suffix of the old log that
//! starts at a segment boundary, then the restated set, yields exactly the live set
//! (every offset the suffix leaves set is live, and the restatement sets every live
//! offset to its value). So a `kill -9` at any instant leaves a log that replays to
//! the same offsets: before step 3, the old log followed by a restatement (possibly
//! torn, then cut by recovery) of values it already holds; after the checkpoint,
//! the restated set, with or without the old segments still on disk below the log
//! start. No directory is renamed and no second log exists, so there is no state in
//! which old and new could mix. The log thus stays within twice its live size (or
//! the floor) plus one commit; the cost is one rewrite of the live set, amortised
//! over at least as many bytes of commits, during which commits wait.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use protocol::kafka_protocol::records::RecordBatchDecoder;
use protocol::record_batch::build_simple_batch;
use storage::{LogConfig, PartitionLog, StorageError};

use crate::flusher::Flusher;
use crate::topics::Partition;

/// The directory under the data directory.
pub const DIR_NAME: &str = "__group_offsets";

const FORMAT_V1: u8 = 1;
const KIND_COMMIT: u8 = 0;
const KIND_DELETE_OFFSET: u8 = 1;
const KIND_DELETE_GROUP: u8 = 2;
/// Bytes read from the log at a time during replay.
const REPLAY_READ_BYTES: usize = 1 << 20;
/// Compaction runs once the log is this many times the size it had after the last
/// one (so its cost, proportional to the live set, is amortised over at least as
/// many bytes of commits). Kafka cleans `__consumer_offsets` at a dirty ratio of
/// 0.5 (`log.cleaner.min.cleanable.ratio`): the same factor.
const COMPACTION_RATIO: u64 = 2;
/// Changes per batch when the live set is restated.
const SNAPSHOT_CHANGES_PER_BATCH: usize = 1000;
/// Bytes a record adds to its value in a batch (length, attributes, deltas, key,
/// header count), and a batch's header: for estimating the live set's size.
const RECORD_OVERHEAD_BYTES: u64 = 16;
const BATCH_OVERHEAD_BYTES: u64 = 61;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
    pub commit_timestamp_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffsetChange {
    Commit {
        group: String,
        topic: String,
        partition: i32,
        offset: CommittedOffset,
    },
    DeleteOffset {
        group: String,
        topic: String,
        partition: i32,
    },
    DeleteGroup {
        group: String,
    },
}

impl OffsetChange {
    fn group(&self) -> &str {
        match self {
            OffsetChange::Commit { group, .. }
            | OffsetChange::DeleteOffset { group, .. }
            | OffsetChange::DeleteGroup { group } => group,
        }
    }
}

type GroupOffsets = BTreeMap<(String, i32), CommittedOffset>;

#[derive(Default)]
struct State {
    committed: HashMap<String, GroupOffsets>,
    /// Appended, not yet known to be durable: batch last offset -> its changes.
    pending: BTreeMap<i64, Vec<OffsetChange>>,
    /// Compact once the log reaches this size.
    compact_at_bytes: u64,
    /// A compaction waits for its fsync (without the locks): no second one starts.
    compacting: bool,
}

impl State {
    fn apply(&mut self, change: OffsetChange) {
        match change {
            OffsetChange::Commit {
                group,
                topic,
                partition,
                offset,
            } => {
                self.committed
                    .entry(group)
                    .or_default()
                    .insert((topic, partition), offset);
            }
            OffsetChange::DeleteOffset {
                group,
                topic,
                partition,
            } => {
                if let Some(offsets) = self.committed.get_mut(&group) {
                    offsets.remove(&(topic, partition));
                    if offsets.is_empty() {
                        self.committed.remove(&group);
                    }
                }
            }
            OffsetChange::DeleteGroup { group } => {
                self.committed.remove(&group);
            }
        }
    }
}

/// Changes appended by [`OffsetsStore::append`], not yet durable: give it to
/// [`OffsetsStore::durable`]. Dropped unawaited, the changes stay pending until a
/// later fsync covers them.
#[must_use = "the changes become visible only through OffsetsStore::durable"]
#[derive(Debug)]
pub struct Appended {
    /// The last offset of the batch (`None`: there was nothing to append), or why
    /// the append failed.
    last_offset: Result<Option<i64>, String>,
}

pub struct OffsetsStore {
    /// The log, wrapped as a partition so that the broker's flusher can fsync it.
    partition: Arc<Partition>,
    state: Mutex<State>,
    /// `offsets_compaction_min_bytes`: no compaction below this size.
    compaction_min_bytes: u64,
}

/// Where a compaction stops early: tests leave each intermediate state on disk,
/// as a crash there would, and open the store again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Never,
    /// After this many batches of the restated live set, before the fsync.
    AfterSnapshotBatches(usize),
    /// After the fsync, before the log start moves past the superseded changes.
    BeforeDroppingOld,
}

impl OffsetsStore {
    /// Opens (creating) `<data_dir>/__group_offsets`, replays it, and compacts it if
    /// it is already past the threshold.
    pub fn open(
        data_dir: &Path,
        now_ms: i64,
        compaction_min_bytes: u64,
    ) -> Result<OffsetsStore, StorageError> {
        let dir = data_dir.join(DIR_NAME);
        let config = LogConfig {
            retention_ms: -1,
            retention_bytes: -1,
            ..LogConfig::default()
        };
        let (mut log, report) = PartitionLog::open(&dir, config, now_ms)?;
        if report.truncated_bytes > 0 || report.rebuilt_indexes > 0 {
            tracing::warn!(
                truncated_bytes = report.truncated_bytes,
                rebuilt_indexes = report.rebuilt_indexes,
                "recovered the group offsets log"
            );
        }
        let end = log.log_end_offset();
        log.set_high_watermark(end);
        let mut state = State::default();
        let mut records = 0u64;
        log.for_each_batch(log.log_start_offset(), end, REPLAY_READ_BYTES, |header, batch| {
            let mut buf = Bytes::copy_from_slice(batch);
            let set = match RecordBatchDecoder::decode(&mut buf) {
                Ok(set) => set,
                Err(e) => {
                    tracing::warn!(offset = header.base_offset, error = %e, "skipping undecodable group offsets batch");
                    return;
                }
            };
            for record in set.records {
                match record.value.as_deref().map(decode_change) {
                    Some(Ok(change)) => {
                        state.apply(change);
                        records += 1;
                    }
                    Some(Err(why)) => tracing::warn!(
                        offset = record.offset,
                        why,
                        "skipping group offsets record"
                    ),
                    None => tracing::warn!(
                        offset = record.offset,
                        "skipping group offsets record without a value"
                    ),
                }
            }
        })?;
        tracing::info!(
            records,
            groups = state.committed.len(),
            "replayed committed offsets"
        );
        let partition = Arc::new(Partition::private_log(DIR_NAME, dir, log));
        let store = OffsetsStore {
            partition,
            state: Mutex::new(state),
            compaction_min_bytes,
        };
        {
            let mut state = store.state();
            let estimate = live_bytes_estimate(&state.committed);
            state.compact_at_bytes = store.threshold(estimate);
        }
        store.maybe_compact(now_ms);
        Ok(store)
    }

    /// The log size that triggers the next compaction, after one left it at
    /// `live_bytes`.
    fn threshold(&self, live_bytes: u64) -> u64 {
        live_bytes
            .saturating_mul(COMPACTION_RATIO)
            .max(self.compaction_min_bytes)
    }

    /// Compacts the log if it reached the threshold, at open (before any request,
    /// so the fsync may run under the locks). A failure is logged and retried only
    /// after `offsets_compaction_min_bytes` more: every commit is already durable
    /// without it.
    fn maybe_compact(&self, now_ms: i64) {
        let mut state = self.state();
        let mut log = self.partition.lock();
        let before = log.size_bytes();
        if before < state.compact_at_bytes {
            return;
        }
        let result = compact(&mut state, &mut log, now_ms, Stop::Never);
        self.compacted(&mut state, &log, before, result);
    }

    /// [`Self::maybe_compact`] while requests are served: the live set is restated
    /// under the locks, then fsync'd by the flusher with no lock held (commits go
    /// on meanwhile; they land after the restated set, which a replay reads first,
    /// so they stay in force), and only then are the superseded segments dropped.
    async fn maybe_compact_serving(&self, flusher: &Flusher, now_ms: i64) {
        let (before, snapshot_start) = {
            let mut state = self.state();
            let mut log = self.partition.lock();
            let before = log.size_bytes();
            if state.compacting || before < state.compact_at_bytes {
                return;
            }
            match restate(&mut state, &mut log, now_ms, Stop::Never) {
                Ok(snapshot_start) => {
                    let snapshot_start = snapshot_start.expect("Stop::Never runs to the end");
                    state.compacting = true;
                    (before, snapshot_start)
                }
                Err(e) => {
                    self.compacted(&mut state, &log, before, Err(e));
                    return;
                }
            }
        };
        let flushed = flusher.flush(vec![self.partition.clone()]).await;
        let mut state = self.state();
        let mut log = self.partition.lock();
        state.compacting = false;
        let result = match flushed {
            Ok(()) => drop_superseded(&mut log, snapshot_start),
            Err(e) => Err(StorageError::Io {
                path: log.dir().display().to_string(),
                source: std::io::Error::other(e),
            }),
        };
        self.compacted(&mut state, &log, before, result);
    }

    /// Sets the next threshold after a compaction that left the log as it is.
    fn compacted(
        &self,
        state: &mut State,
        log: &PartitionLog,
        before: u64,
        result: Result<(), StorageError>,
    ) {
        match result {
            Ok(()) => {
                let after = log.size_bytes();
                state.compact_at_bytes = self.threshold(after);
                tracing::info!(
                    before_bytes = before,
                    after_bytes = after,
                    next_at_bytes = state.compact_at_bytes,
                    "compacted the group offsets log"
                );
            }
            Err(e) => {
                state.compact_at_bytes = before.saturating_add(self.compaction_min_bytes);
                tracing::error!(error = %e, "compacting the group offsets log failed");
            }
        }
    }

    #[cfg(test)]
    fn compact_and_stop(&self, now_ms: i64, stop: Stop) -> Result<(), StorageError> {
        let mut state = self.state();
        let mut log = self.partition.lock();
        compact(&mut state, &mut log, now_ms, stop)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `changes` as one batch and applies them once they are durable. An
    /// error means the change is not visible (it may still survive in the log).
    /// For callers that need nothing else in between; a request handler calls
    /// [`OffsetsStore::append`] in the request's turn and awaits
    /// [`OffsetsStore::durable`] after.
    pub async fn commit(
        &self,
        flusher: &Flusher,
        changes: Vec<OffsetChange>,
        now_ms: i64,
    ) -> Result<(), String> {
        let appended = self.append(changes, now_ms);
        self.durable(flusher, appended, now_ms).await
    }

    /// Appends `changes` as one batch to the log, now: the order of `append` calls
    /// is the order in which the changes take effect (a replay applies the log in
    /// order, and [`OffsetsStore::durable`] makes changes visible in log order).
    /// So a request handler calls it in its connection's turn, never from a
    /// future that may first be polled after a later request's (ARCHITECTURE.md,
    /// "requests take effect in the order they arrive"). Does file I/O: call it
    /// from the blocking pool.
    /// A failed append is reported by `durable`, so that a handler has one
    /// outcome to answer from.
    pub fn append(&self, changes: Vec<OffsetChange>, now_ms: i64) -> Appended {
        let last_offset = if changes.is_empty() {
            Ok(None)
        } else {
            self.append_batch(changes, now_ms)
                .map(Some)
                .map_err(|e| e.to_string())
        };
        Appended { last_offset }
    }

    /// Waits until the appended changes are durable, then makes them visible. An
    /// error means they are not visible (they may still survive in the log).
    pub async fn durable(
        &self,
        flusher: &Flusher,
        appended: Appended,
        now_ms: i64,
    ) -> Result<(), String> {
        let Some(ticket) = appended.last_offset? else {
            return Ok(());
        };
        let result = flusher.flush(vec![self.partition.clone()]).await;
        self.settle(ticket, result.is_ok());
        if result.is_ok() {
            self.maybe_compact_serving(flusher, now_ms).await;
        }
        result
    }

    fn append_batch(&self, changes: Vec<OffsetChange>, now_ms: i64) -> Result<i64, StorageError> {
        let values: Vec<Vec<u8>> = changes.iter().map(encode_change).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        let batch = build_simple_batch(now_ms, &refs);
        let mut state = self.state();
        let mut log = self.partition.lock();
        let info = log.append(&batch, 0, now_ms)?;
        let end = log.log_end_offset();
        log.set_high_watermark(end);
        drop(log);
        debug_assert!(
            state.pending.keys().all(|k| *k < info.last_offset),
            "log offsets grow"
        );
        state.pending.insert(info.last_offset, changes);
        Ok(info.last_offset)
    }

    /// An fsync covering the batch ending at `ticket` returned: everything up to it
    /// is durable (if `durable`), so it becomes visible, in log order.
    fn settle(&self, ticket: i64, durable: bool) {
        let mut state = self.state();
        if !durable {
            state.pending.remove(&ticket);
            return;
        }
        let ready: Vec<i64> = state.pending.range(..=ticket).map(|(k, _)| *k).collect();
        for key in ready {
            for change in state.pending.remove(&key).expect("listed") {
                state.apply(change);
            }
        }
    }

    pub fn fetch(&self, group: &str, topic: &str, partition: i32) -> Option<CommittedOffset> {
        self.state()
            .committed
            .get(group)
            .and_then(|o| o.get(&(topic.to_string(), partition)).cloned())
    }

    /// All committed offsets of `group`, by topic and partition.
    pub fn group_offsets(&self, group: &str) -> Vec<(String, i32, CommittedOffset)> {
        self.state()
            .committed
            .get(group)
            .map(|o| {
                o.iter()
                    .map(|((t, p), c)| (t.clone(), *p, c.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Will `group` have an offset for the partition once everything appended is
    /// durable? What a request deciding from earlier requests' effects must ask
    /// (they may still be waiting for their fsync): [`OffsetsStore::fetch`] answers
    /// only what is durable.
    pub fn has_offset(&self, group: &str, topic: &str, partition: i32) -> bool {
        let state = self.state();
        for change in state.pending.values().rev().flat_map(|c| c.iter().rev()) {
            match change {
                OffsetChange::Commit {
                    group: g,
                    topic: t,
                    partition: p,
                    ..
                } if g == group && t == topic && *p == partition => return true,
                OffsetChange::DeleteOffset {
                    group: g,
                    topic: t,
                    partition: p,
                } if g == group && t == topic && *p == partition => return false,
                OffsetChange::DeleteGroup { group: g } if g == group => return false,
                _ => {}
            }
        }
        state
            .committed
            .get(group)
            .is_some_and(|o| o.contains_key(&(topic.to_string(), partition)))
    }

    /// Does `group` have offsets, committed or on their way?
    pub fn has_offsets(&self, group: &str) -> bool {
        let state = self.state();
        state.committed.get(group).is_some_and(|o| !o.is_empty())
            || state.pending.values().flatten().any(|c| c.group() == group)
    }

    /// Groups that have committed offsets.
    pub fn groups(&self) -> Vec<String> {
        self.state().committed.keys().cloned().collect()
    }

    pub fn size_bytes(&self) -> u64 {
        self.partition.lock().size_bytes()
    }
}

/// Rewrites the log down to its live set, with the state and log locks held (in
/// that order, as `append` takes them) throughout: at open, and in tests. While
/// requests are served, [`OffsetsStore::maybe_compact_serving`] runs the same two
/// halves ([`restate`], [`drop_superseded`]) with the fsync between them outside
/// the locks: a commit landing then follows the restated set in the log, so a
/// replay applies it after the set, as it should.
///
/// The live set, what a replay yields now, is appended again as ordinary commit
/// records from offset S, starting a fresh segment; once that is fsync'd the log
/// start moves to S, durably, and the segments below S are deleted. Replaying from
/// any segment boundary at or below S and then the restated set yields exactly the
/// live set, so a crash at any instant leaves a log that replays to the same
/// offsets: before the log start moves, the old log with a (possibly torn, and
/// then cut) restatement of values it already holds; after, the restated set.
fn compact(
    state: &mut State,
    log: &mut PartitionLog,
    now_ms: i64,
    stop: Stop,
) -> Result<(), StorageError> {
    let Some(snapshot_start) = restate(state, log, now_ms, stop)? else {
        return Ok(());
    };
    log.flush()?;
    if stop == Stop::BeforeDroppingOld {
        return Ok(());
    }
    drop_superseded(log, snapshot_start)
}

/// The first half of [`compact`]: appends the live set from a new segment on and
/// returns where it starts (not yet fsync'd); `None` when a test's `stop` cut it
/// short. Under the state and log locks.
fn restate(
    state: &mut State,
    log: &mut PartitionLog,
    now_ms: i64,
    stop: Stop,
) -> Result<Option<i64>, StorageError> {
    let mut changes = live_changes(state);
    if changes.is_empty() {
        // Nothing is live. One change that removes nothing stands in for the
        // empty set, so that the superseded changes can still go.
        changes.push(OffsetChange::DeleteGroup {
            group: String::new(),
        });
    }
    let snapshot_start = log.log_end_offset();
    for (i, chunk) in changes.chunks(SNAPSHOT_CHANGES_PER_BATCH).enumerate() {
        if stop == Stop::AfterSnapshotBatches(i) {
            return Ok(None);
        }
        let values: Vec<Vec<u8>> = chunk.iter().map(encode_change).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        let batch = build_simple_batch(now_ms, &refs);
        if i == 0 {
            // Start the restated set in a new segment: every segment before it then
            // holds only superseded changes and can be deleted whole.
            log.roll()?;
        }
        log.append(&batch, 0, now_ms)?;
    }
    let end = log.log_end_offset();
    log.set_high_watermark(end);
    Ok(Some(snapshot_start))
}

/// The second half of [`compact`], once the restated set is durable: the log start
/// moves to it, durably, and the segments below are deleted.
fn drop_superseded(log: &mut PartitionLog, snapshot_start: i64) -> Result<(), StorageError> {
    log.delete_records_before(snapshot_start)?;
    debug_assert_eq!(log.log_start_offset(), snapshot_start);
    Ok(())
}

/// What a replay of the log yields now: the durable offsets with the pending
/// changes (already in the log, ahead of the restated set) applied, as commits in
/// a stable order.
fn live_changes(state: &State) -> Vec<OffsetChange> {
    let mut live = State {
        committed: state.committed.clone(),
        ..State::default()
    };
    for change in state.pending.values().flatten() {
        live.apply(change.clone());
    }
    let mut groups: Vec<(String, GroupOffsets)> = live.committed.into_iter().collect();
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    groups
        .into_iter()
        .flat_map(|(group, offsets)| {
            offsets
                .into_iter()
                .map(move |((topic, partition), offset)| OffsetChange::Commit {
                    group: group.clone(),
                    topic,
                    partition,
                    offset,
                })
        })
        .collect()
}

/// About the bytes the live set takes once restated.
fn live_bytes_estimate(committed: &HashMap<String, GroupOffsets>) -> u64 {
    let mut records = 0u64;
    let mut bytes = 0u64;
    for (group, offsets) in committed {
        for ((topic, _), offset) in offsets {
            records += 1;
            // format, kind, 4 length prefixes, partition, offset, epoch, timestamp
            let fixed = 2 + 4 * 3 + 4 + 8 + 4 + 8;
            let metadata = offset.metadata.as_ref().map_or(0, String::len);
            bytes += (fixed + group.len() + topic.len() + metadata) as u64 + RECORD_OVERHEAD_BYTES;
        }
    }
    bytes + records.div_ceil(SNAPSHOT_CHANGES_PER_BATCH as u64) * BATCH_OVERHEAD_BYTES
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode_change(change: &OffsetChange) -> Vec<u8> {
    let mut out = vec![FORMAT_V1];
    match change {
        OffsetChange::Commit {
            group,
            topic,
            partition,
            offset,
        } => {
            out.push(KIND_COMMIT);
            put_str(&mut out, group);
            put_str(&mut out, topic);
            out.extend_from_slice(&partition.to_be_bytes());
            out.extend_from_slice(&offset.offset.to_be_bytes());
            out.extend_from_slice(&offset.leader_epoch.to_be_bytes());
            out.extend_from_slice(&offset.commit_timestamp_ms.to_be_bytes());
            match &offset.metadata {
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(m) => put_str(&mut out, m),
            }
        }
        OffsetChange::DeleteOffset {
            group,
            topic,
            partition,
        } => {
            out.push(KIND_DELETE_OFFSET);
            put_str(&mut out, group);
            put_str(&mut out, topic);
            out.extend_from_slice(&partition.to_be_bytes());
        }
        OffsetChange::DeleteGroup { group } => {
            out.push(KIND_DELETE_GROUP);
            put_str(&mut out, group);
        }
    }
    out
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.rest.len() < n {
            return Err("truncated value");
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn i32(&mut self) -> Result<i32, &'static str> {
        Ok(i32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, &'static str> {
        Ok(i64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn nstr(&mut self) -> Result<Option<String>, &'static str> {
        let len = self.i32()?;
        if len < 0 {
            return Ok(None);
        }
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| "string is not UTF-8")
    }
    fn str(&mut self) -> Result<String, &'static str> {
        self.nstr()?.ok_or("null string")
    }
}

fn decode_change(value: &[u8]) -> Result<OffsetChange, &'static str> {
    let mut r = Reader { rest: value };
    if r.u8()? != FORMAT_V1 {
        return Err("unknown format version");
    }
    let kind = r.u8()?;
    let group = r.str()?;
    let change = match kind {
        KIND_COMMIT => {
            let topic = r.str()?;
            let partition = r.i32()?;
            let offset = r.i64()?;
            let leader_epoch = r.i32()?;
            let commit_timestamp_ms = r.i64()?;
            let metadata = r.nstr()?;
            OffsetChange::Commit {
                group,
                topic,
                partition,
                offset: CommittedOffset {
                    offset,
                    leader_epoch,
                    metadata,
                    commit_timestamp_ms,
                },
            }
        }
        KIND_DELETE_OFFSET => {
            let topic = r.str()?;
            let partition = r.i32()?;
            OffsetChange::DeleteOffset {
                group,
                topic,
                partition,
            }
        }
        KIND_DELETE_GROUP => OffsetChange::DeleteGroup { group },
        _ => return Err("unknown record kind"),
    };
    if !r.rest.is_empty() {
        return Err("trailing bytes");
    }
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_round_trips_and_damage_is_refused() {
        let changes = vec![
            OffsetChange::Commit {
                group: "g".into(),
                topic: "t".into(),
                partition: 3,
                offset: CommittedOffset {
                    offset: 42,
                    leader_epoch: 7,
                    metadata: Some("m".into()),
                    commit_timestamp_ms: 9,
                },
            },
            OffsetChange::Commit {
                group: "".into(),
                topic: "t".into(),
                partition: 0,
                offset: CommittedOffset {
                    offset: -1,
                    leader_epoch: -1,
                    metadata: None,
                    commit_timestamp_ms: 0,
                },
            },
            OffsetChange::DeleteOffset {
                group: "g".into(),
                topic: "t".into(),
                partition: 3,
            },
            OffsetChange::DeleteGroup { group: "g".into() },
        ];
        for change in changes {
            let bytes = encode_change(&change);
            assert_eq!(decode_change(&bytes), Ok(change.clone()));
            for cut in 0..bytes.len() {
                assert!(
                    decode_change(&bytes[..cut]).is_err(),
                    "{change:?} cut at {cut}"
                );
            }
        }
        assert_eq!(decode_change(&[2, 0]), Err("unknown format version"));
    }

    type Snapshot = BTreeMap<(String, String, i32), CommittedOffset>;

    fn everything(store: &OffsetsStore) -> Snapshot {
        let mut all = Snapshot::new();
        for group in store.groups() {
            for (topic, partition, offset) in store.group_offsets(&group) {
                all.insert((group.clone(), topic, partition), offset);
            }
        }
        all
    }

    fn commit(group: &str, topic: &str, partition: i32, offset: i64) -> OffsetChange {
        OffsetChange::Commit {
            group: group.into(),
            topic: topic.into(),
            partition,
            offset: CommittedOffset {
                offset,
                leader_epoch: (offset % 3) as i32 - 1,
                metadata: (offset % 2 == 0).then(|| format!("m{offset}")),
                commit_timestamp_ms: 1_000 + offset,
            },
        }
    }

    /// Commits that overwrite, delete offsets and delete a group: 1199 offsets stay
    /// live, more than one restated batch holds.
    async fn fill(store: &OffsetsStore, flusher: &Flusher) {
        for round in 0..3i64 {
            for g in 0..4 {
                let group = format!("g{g}");
                let all: Vec<OffsetChange> = (0..2)
                    .flat_map(|t| (0..200).map(move |p| (t, p)))
                    .map(|(t, p)| commit(&group, &format!("t{t}"), p, round * 1000 + p as i64))
                    .collect();
                for chunk in all.chunks(400) {
                    store.commit(flusher, chunk.to_vec(), 0).await.unwrap();
                }
            }
        }
        let deletions = vec![
            OffsetChange::DeleteOffset {
                group: "g1".into(),
                topic: "t0".into(),
                partition: 5,
            },
            OffsetChange::DeleteGroup { group: "g3".into() },
        ];
        store.commit(flusher, deletions, 0).await.unwrap();
        assert_eq!(everything(store).len(), 3 * 400 - 1);
    }

    /// Equal maps, or a short account of the first difference.
    fn same(got: &Snapshot, expected: &Snapshot, when: &str) {
        let missing = expected.iter().find(|(k, v)| got.get(*k) != Some(*v));
        let extra = got.keys().find(|k| !expected.contains_key(*k));
        assert!(
            missing.is_none() && extra.is_none(),
            "{when}: {} offsets, expected {}; first missing or changed {missing:?}, first extra {extra:?}",
            got.len(),
            expected.len()
        );
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_crash_at_any_step_of_compaction_loses_no_offset() {
        #[derive(Debug, Clone, Copy)]
        enum Crash {
            At(Stop),
            /// Mid-way through writing the restated set: its last batch torn.
            TornSnapshot,
            /// The log start moved durably, the old segments not deleted yet.
            BeforeSegmentsDeleted,
            None,
        }
        let crashes = [
            Crash::At(Stop::AfterSnapshotBatches(0)),
            Crash::At(Stop::AfterSnapshotBatches(1)),
            Crash::TornSnapshot,
            Crash::At(Stop::BeforeDroppingOld),
            Crash::BeforeSegmentsDeleted,
            Crash::None,
        ];
        let flusher = Flusher::start(Default::default());
        for crash in crashes {
            let data = tempfile::tempdir().unwrap();
            let dir = data.path().join(DIR_NAME);
            let store = OffsetsStore::open(data.path(), 0, u64::MAX).unwrap();
            fill(&store, &flusher).await;
            let expected = everything(&store);
            let size_before = store.size_bytes();
            let backup = tempfile::tempdir().unwrap();
            for name in files(&dir) {
                std::fs::copy(dir.join(&name), backup.path().join(&name)).unwrap();
            }
            let stop = match crash {
                Crash::At(stop) => stop,
                Crash::TornSnapshot => Stop::AfterSnapshotBatches(1),
                Crash::BeforeSegmentsDeleted | Crash::None => Stop::Never,
            };
            store.compact_and_stop(7, stop).unwrap();
            drop(store); // as a kill: nothing more is written or flushed
            match crash {
                Crash::TornSnapshot => {
                    let last = files(&dir)
                        .into_iter()
                        .rfind(|n| n.ends_with(".log"))
                        .unwrap();
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .open(dir.join(last))
                        .unwrap();
                    let len = file.metadata().unwrap().len();
                    file.set_len(len - 5).unwrap();
                }
                Crash::BeforeSegmentsDeleted => {
                    let now = files(&dir);
                    let restored: Vec<String> = files(backup.path())
                        .into_iter()
                        .filter(|n| !now.contains(n))
                        .collect();
                    assert!(!restored.is_empty(), "compaction deleted old segments");
                    for name in restored {
                        std::fs::copy(backup.path().join(&name), dir.join(&name)).unwrap();
                    }
                }
                _ => {}
            }

            let store = OffsetsStore::open(data.path(), 0, u64::MAX).unwrap();
            same(&everything(&store), &expected, &format!("after {crash:?}"));
            if matches!(crash, Crash::None) {
                assert!(
                    store.size_bytes() < size_before / 2,
                    "{} bytes of {size_before} left",
                    store.size_bytes()
                );
            }
            // The log goes on from there, and compacts again (at open) to the same.
            store
                .commit(&flusher, vec![commit("g0", "t0", 0, 99_999)], 0)
                .await
                .unwrap();
            let mut expected = expected;
            let OffsetChange::Commit { offset, .. } = commit("g0", "t0", 0, 99_999) else {
                unreachable!()
            };
            expected.insert(("g0".into(), "t0".into(), 0), offset);
            drop(store);
            let store = OffsetsStore::open(data.path(), 0, 1).unwrap();
            same(
                &everything(&store),
                &expected,
                &format!("compacted at open after {crash:?}"),
            );
            drop(store);
            let store = OffsetsStore::open(data.path(), 0, u64::MAX).unwrap();
            same(
                &everything(&store),
                &expected,
                &format!("reopened after {crash:?}"),
            );
        }
    }

    #[tokio::test]
    async fn compaction_keeps_the_log_bounded_by_the_live_offsets() {
        const MIN_BYTES: u64 = 4 * 1024;
        let data = tempfile::tempdir().unwrap();
        let flusher = Flusher::start(Default::default());
        let store = OffsetsStore::open(data.path(), 0, MIN_BYTES).unwrap();
        let mut written = 0u64;
        for i in 0..1_000i64 {
            let changes: Vec<OffsetChange> = (0..4)
                .map(|p| commit("g", "t", p, i * 10 + p as i64))
                .collect();
            let before = store.size_bytes();
            store.commit(&flusher, changes, i).await.unwrap();
            written += store.size_bytes().saturating_sub(before);
            // Four live offsets: the log never grows much past the floor.
            assert!(
                store.size_bytes() <= MIN_BYTES + 1024,
                "commit {i}: {} bytes",
                store.size_bytes()
            );
        }
        assert!(written > 20 * MIN_BYTES, "{written} bytes were committed");
        let segments = store.partition.lock().segment_count();
        assert!(segments <= 2, "{segments} segments");
        let expected = everything(&store);
        drop(store);
        let store = OffsetsStore::open(data.path(), 0, MIN_BYTES).unwrap();
        assert_eq!(everything(&store), expected);
        assert_eq!(store.fetch("g", "t", 3).unwrap().offset, 9_993);

        // Everything deleted: the log still shrinks to (almost) nothing.
        store
            .commit(
                &flusher,
                vec![OffsetChange::DeleteGroup { group: "g".into() }],
                0,
            )
            .await
            .unwrap();
        store.compact_and_stop(0, Stop::Never).unwrap();
        assert!(store.size_bytes() < 200, "{} bytes", store.size_bytes());
        drop(store);
        let store = OffsetsStore::open(data.path(), 0, MIN_BYTES).unwrap();
        assert!(store.groups().is_empty());
    }

    #[test]
    fn tombstones_remove_what_commits_set() {
        let mut state = State::default();
        let commit = |p| OffsetChange::Commit {
            group: "g".into(),
            topic: "t".into(),
            partition: p,
            offset: CommittedOffset {
                offset: 1,
                leader_epoch: -1,
                metadata: None,
                commit_timestamp_ms: 0,
            },
        };
        state.apply(commit(0));
        state.apply(commit(1));
        state.apply(OffsetChange::DeleteOffset {
            group: "g".into(),
            topic: "t".into(),
            partition: 0,
        });
        assert_eq!(state.committed["g"].len(), 1);
        state.apply(OffsetChange::DeleteGroup { group: "g".into() });
        assert!(state.committed.is_empty());
    }
}
