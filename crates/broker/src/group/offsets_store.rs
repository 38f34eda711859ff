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
//! **Record format.** Each batch is an uncompressed v2 batch built with
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
//! **Not compacted yet.** The log only grows: about 60 bytes plus the names for each
//! committed partition, so a consumer of 100 partitions auto-committing every 5 s
//! adds ~150 MB a day, and replay at start-up reads all of it. Compaction (rewrite
//! the live map as a fresh segment, drop the old ones) is the next step; until then
//! the size is bounded only by the disk.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use protocol::kafka_protocol::records::RecordBatchDecoder;
use protocol::record_batch::{batches, build_simple_batch};
use storage::{LogConfig, PartitionLog, StorageError};

use crate::flusher::Flusher;
use crate::idempotence::ProducerStates;
use crate::topics::Partition;

/// The directory under the data directory.
pub const DIR_NAME: &str = "__group_offsets";

const FORMAT_V1: u8 = 1;
const KIND_COMMIT: u8 = 0;
const KIND_DELETE_OFFSET: u8 = 1;
const KIND_DELETE_GROUP: u8 = 2;
/// Bytes read from the log at a time during replay.
const REPLAY_READ_BYTES: usize = 1 << 20;

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

pub struct OffsetsStore {
    /// The log, wrapped as a partition so that the broker's flusher can fsync it.
    partition: Arc<Partition>,
    state: Mutex<State>,
}

impl OffsetsStore {
    /// Opens (creating) `<data_dir>/__group_offsets` and replays it.
    pub fn open(data_dir: &Path, now_ms: i64) -> Result<OffsetsStore, StorageError> {
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
        let mut offset = log.log_start_offset();
        let mut records = 0u64;
        while offset < end {
            let slice = log.read(offset, REPLAY_READ_BYTES, end)?;
            if slice.len == 0 {
                break;
            }
            let bytes = slice.load().map_err(|source| StorageError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            for item in batches(&bytes) {
                let (header, batch) = item?;
                offset = header.last_offset() + 1;
                let mut buf = Bytes::copy_from_slice(batch);
                let set = match RecordBatchDecoder::decode(&mut buf) {
                    Ok(set) => set,
                    Err(e) => {
                        tracing::warn!(offset = header.base_offset, error = %e, "skipping undecodable group offsets batch");
                        continue;
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
            }
        }
        tracing::info!(
            records,
            groups = state.committed.len(),
            "replayed committed offsets"
        );
        let partition = Arc::new(Partition {
            topic: DIR_NAME.to_string(),
            index: 0,
            dir,
            log: Mutex::new(log),
            // No producer writes here: the state stays empty.
            producers: Mutex::new(ProducerStates::default()),
        });
        Ok(OffsetsStore {
            partition,
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `changes` as one batch and applies them once they are durable. An
    /// error means the change is not visible (it may still survive in the log).
    pub async fn commit(
        &self,
        flusher: &Flusher,
        changes: Vec<OffsetChange>,
        now_ms: i64,
    ) -> Result<(), String> {
        if changes.is_empty() {
            return Ok(());
        }
        let ticket = self.append(changes, now_ms).map_err(|e| e.to_string())?;
        let result = flusher.flush(vec![self.partition.clone()]).await;
        self.settle(ticket, result.is_ok());
        result
    }

    fn append(&self, changes: Vec<OffsetChange>, now_ms: i64) -> Result<i64, StorageError> {
        let values: Vec<Vec<u8>> = changes.iter().map(encode_change).collect();
        let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
        let mut batch = build_simple_batch(now_ms, &refs);
        let mut state = self.state();
        let mut log = self.partition.lock();
        let info = log.append(&mut batch, 0, now_ms)?;
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
