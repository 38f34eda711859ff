//! The transaction coordinator (Kafka's `TransactionCoordinator`, on one node):
//! transactional ids, their producer id and epoch, and the transaction each has
//! open: the partitions it wrote to, the groups whose offsets it commits, and those
//! offsets until it ends. One module per API (`add_partitions.rs`,
//! `add_offsets.rs`, `offset_commit.rs`, `end.rs`); InitProducerId with a
//! transactional id comes here from `api/init_producer_id.rs`.
//!
//! How a transaction ends: its state becomes `PrepareCommit` or `PrepareAbort`
//! (durable), a marker (a control batch, `Partition::append_marker`) goes to each
//! of its partitions, the markers are fsync'd, a commit's offsets are written to
//! the committed-offsets log (durable), and only then is the id `Empty` again and
//! the client answered. A crash in between leaves the prepared state on disk and
//! [`TxnCoordinator::recover`] finishes it at start-up (a marker written twice is
//! harmless: the second ends nothing). Until a partition's marker is written, its
//! last stable offset stays at the transaction's first batch there.
//!
//! Fencing: `InitProducerId` bumps the id's epoch (aborting a transaction left
//! open, its markers carrying the new epoch); any request with an older epoch is
//! refused with `PRODUCER_FENCED` (`INVALID_PRODUCER_EPOCH` for a produce and for
//! older API versions, as Kafka answers), and a transactional produce is accepted
//! only for a partition added to its producer's open transaction, checked here
//! while the batch is appended, so a transaction cannot end between the check and
//! the append.
//!
//! Persistence: one file per producer id, `__transactions/<producer id>.json`,
//! rewritten (durably) at every change a crash must not lose; loaded at start.
//!
//! Limits: `max_transactional_ids` ids kept (a new one past it gets
//! `THROTTLING_QUOTA_EXCEEDED`), `transaction_max_timeout_ms`; idle ids are
//! forgotten after `transactional_id_expiration_ms`.
//!
//! Lock order: an id's entry, then a partition's `producers`, then its log. The
//! maps (`ids`, `by_producer`) are only held to look an entry up or insert one.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use protocol::record_batch::ControlType;
use protocol::ResponseError;
use serde::{Deserialize, Serialize};

use crate::group::{CommittedOffset, OffsetChange};
use crate::topics::Partition;
use crate::Broker;

pub mod add_offsets;
pub mod add_partitions;
pub mod end;
pub mod offset_commit;

const DIR: &str = "__transactions";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    /// No transaction open.
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
}

/// An offset a transaction commits for a group when it commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOffset {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnMeta {
    pub transactional_id: String,
    pub producer_id: i64,
    pub epoch: i16,
    pub timeout_ms: i32,
    pub state: TxnState,
    /// How the last transaction ended (`true`: committed), so that a retried
    /// EndTxn gets the answer the first one got.
    pub last_committed: Option<bool>,
    pub partitions: BTreeSet<(String, i32)>,
    pub groups: BTreeSet<String>,
    pub offsets: Vec<PendingOffset>,
    /// When the open transaction began (its first partition or group).
    pub started_ms: i64,
    /// The last request that changed this id: what expiry measures from.
    pub updated_ms: i64,
    /// The epoch before the coordinator bumped it to abort a transaction past its
    /// timeout: the producer may still name it to InitProducerId (KIP-360) to go
    /// on with the next epoch instead of being fenced.
    #[serde(default)]
    pub bumped_from: Option<i16>,
    /// Forgotten (expired) while a request held the entry: look it up again.
    #[serde(skip)]
    removed: bool,
}

type Entry = Arc<Mutex<TxnMeta>>;

fn lock(entry: &Entry) -> MutexGuard<'_, TxnMeta> {
    entry.lock().unwrap_or_else(|p| p.into_inner())
}

/// A failed request: the error and, for the log, why.
pub type TxnError = ResponseError;

pub struct TxnCoordinator {
    dir: PathBuf,
    ids: Mutex<HashMap<String, Entry>>,
    by_producer: Mutex<HashMap<i64, Entry>>,
}

impl TxnCoordinator {
    /// Loads every transactional id's state from `<data_dir>/__transactions/`.
    pub fn open(data_dir: &std::path::Path) -> std::io::Result<TxnCoordinator> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        let mut ids = HashMap::new();
        let mut by_producer = HashMap::new();
        for file in std::fs::read_dir(&dir)? {
            let path = file?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue; // a temporary file of an interrupted write
            }
            let bytes = std::fs::read(&path)?;
            let meta: TxnMeta = serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
            let entry = Arc::new(Mutex::new(meta.clone()));
            by_producer.insert(meta.producer_id, entry.clone());
            ids.insert(meta.transactional_id, entry);
        }
        Ok(TxnCoordinator {
            dir,
            ids: Mutex::new(ids),
            by_producer: Mutex::new(by_producer),
        })
    }

    fn file(&self, producer_id: i64) -> PathBuf {
        self.dir.join(format!("{producer_id}.json"))
    }

    fn save(&self, meta: &TxnMeta, durability: common::Durability) -> Result<(), TxnError> {
        let json = serde_json::to_vec(meta).expect("transaction state serialises");
        common::write_file_atomically(&self.file(meta.producer_id), &json, durability).map_err(
            |e| {
                tracing::error!(transactional_id = %meta.transactional_id, error = %e, "cannot write transaction state");
                ResponseError::KafkaStorageError
            },
        )
    }

    fn entry(&self, transactional_id: &str) -> Option<Entry> {
        let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.get(transactional_id).cloned()
    }

    /// Runs `f` on the state of `transactional_id`, locked; `None` when the id is
    /// unknown.
    fn with_id<R>(&self, transactional_id: &str, f: impl FnOnce(&mut TxnMeta) -> R) -> Option<R> {
        loop {
            let entry = self.entry(transactional_id)?;
            let mut meta = lock(&entry);
            if meta.removed {
                continue;
            }
            return Some(f(&mut meta));
        }
    }

    /// InitProducerId for a transactional id: a producer id (new for a new id) and
    /// the next epoch, which fences every producer holding an older one. A
    /// transaction left open is aborted first, with markers carrying the new epoch.
    /// `current` is the producer's id and epoch when it sends them (KIP-360): they
    /// must be the id's current ones.
    pub fn init_producer_id(
        &self,
        broker: &Broker,
        transactional_id: &str,
        timeout_ms: i32,
        current: Option<(i64, i16)>,
    ) -> Result<(i64, i16), TxnError> {
        if timeout_ms < 1 || timeout_ms > broker.config.transaction_max_timeout_ms {
            return Err(ResponseError::InvalidTransactionTimeout);
        }
        let now_ms = broker.now_ms();
        let entry = loop {
            if let Some(entry) = self.entry(transactional_id) {
                break entry;
            }
            let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            if ids.contains_key(transactional_id) {
                continue;
            }
            if ids.len() >= broker.config.max_transactional_ids {
                return Err(ResponseError::ThrottlingQuotaExceeded);
            }
            let producer_id = broker.producer_ids.next().map_err(|e| {
                tracing::error!(error = %e, "cannot reserve producer ids");
                ResponseError::KafkaStorageError
            })?;
            let entry = Arc::new(Mutex::new(TxnMeta {
                transactional_id: transactional_id.to_string(),
                producer_id,
                epoch: -1, // the bump below makes it 0
                timeout_ms,
                state: TxnState::Empty,
                last_committed: None,
                partitions: BTreeSet::new(),
                groups: BTreeSet::new(),
                offsets: Vec::new(),
                started_ms: now_ms,
                updated_ms: now_ms,
                bumped_from: None,
                removed: false,
            }));
            ids.insert(transactional_id.to_string(), entry.clone());
            let mut by_producer = self.by_producer.lock().unwrap_or_else(|p| p.into_inner());
            by_producer.insert(producer_id, entry.clone());
            break entry;
        };
        let mut meta = lock(&entry);
        if meta.removed {
            drop(meta);
            return self.init_producer_id(broker, transactional_id, timeout_ms, current);
        }
        if let Some((producer_id, epoch)) = current {
            let known = epoch == meta.epoch || Some(epoch) == meta.bumped_from;
            if producer_id != meta.producer_id || !known {
                return Err(ResponseError::ProducerFenced);
            }
        }
        match meta.state {
            TxnState::Empty => {}
            TxnState::Ongoing => {
                // Abort with the new epoch: the old producer's batches and
                // requests are refused from the markers on.
                let mut next = meta.clone();
                next.epoch = meta.epoch + 1;
                next.state = TxnState::PrepareAbort;
                self.save(&next, common::Durability::Durable)?;
                *meta = next;
                self.finish(broker, &mut meta)?;
            }
            TxnState::PrepareCommit | TxnState::PrepareAbort => {
                self.finish(broker, &mut meta)?;
            }
        }
        let mut next = meta.clone();
        next.epoch = meta.epoch + 1; // a new id's -1 becomes 0
        next.timeout_ms = timeout_ms;
        next.updated_ms = now_ms;
        next.bumped_from = None;
        let exhausted = next.epoch >= i16::MAX - 1;
        if exhausted {
            // Kafka's answer to an exhausted epoch: a new producer id at epoch 0.
            next.producer_id = broker.producer_ids.next().map_err(|e| {
                tracing::error!(error = %e, "cannot reserve producer ids");
                ResponseError::KafkaStorageError
            })?;
            next.epoch = 0;
        }
        self.save(&next, common::Durability::Durable)?;
        if exhausted {
            let _ = std::fs::remove_file(self.file(meta.producer_id));
            let mut by_producer = self.by_producer.lock().unwrap_or_else(|p| p.into_inner());
            by_producer.remove(&meta.producer_id);
            by_producer.insert(next.producer_id, entry.clone());
        }
        *meta = next;
        Ok((meta.producer_id, meta.epoch))
    }

    /// Runs `append` (a transactional batch's append) only when `producer_id` at
    /// `epoch` has a transaction open that `topic`/`partition` was added to; the
    /// transaction cannot end meanwhile.
    pub fn produce<T>(
        &self,
        producer_id: i64,
        epoch: i16,
        topic: &str,
        partition: i32,
        append: impl FnOnce() -> Result<T, (ResponseError, Option<String>)>,
    ) -> Result<T, (ResponseError, Option<String>)> {
        let entry = {
            let by_producer = self.by_producer.lock().unwrap_or_else(|p| p.into_inner());
            by_producer.get(&producer_id).cloned()
        };
        let Some(entry) = entry else {
            return Err((
                ResponseError::InvalidProducerIdMapping,
                Some(format!("producer id {producer_id} has no transactional id")),
            ));
        };
        let meta = lock(&entry);
        if meta.removed || meta.producer_id != producer_id {
            return Err((ResponseError::InvalidProducerIdMapping, None));
        }
        if epoch != meta.epoch {
            return Err((
                ResponseError::InvalidProducerEpoch,
                Some(format!(
                    "producer {producer_id} epoch {epoch} is not the current epoch {}",
                    meta.epoch
                )),
            ));
        }
        if meta.state != TxnState::Ongoing
            || !meta.partitions.contains(&(topic.to_string(), partition))
        {
            return Err((
                ResponseError::InvalidTxnState,
                Some(format!(
                    "partition {partition} of {topic} is not in an open transaction of {}",
                    meta.transactional_id
                )),
            ));
        }
        append()
    }

    /// The checks every request about an open transaction makes, then `f`.
    fn with_producer<R>(
        &self,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        f: impl FnOnce(&mut TxnMeta) -> Result<R, TxnError>,
    ) -> Result<R, TxnError> {
        self.with_id(transactional_id, |meta| {
            if meta.producer_id != producer_id {
                return Err(ResponseError::InvalidProducerIdMapping);
            }
            if epoch != meta.epoch {
                return Err(ResponseError::ProducerFenced);
            }
            f(meta)
        })
        .unwrap_or(Err(ResponseError::InvalidProducerIdMapping))
    }

    /// Adds partitions or a group to the open transaction (opening it).
    fn add(
        &self,
        broker: &Broker,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        change: impl FnOnce(&mut TxnMeta),
    ) -> Result<(), TxnError> {
        let now_ms = broker.now_ms();
        self.with_producer(transactional_id, producer_id, epoch, |meta| {
            if matches!(meta.state, TxnState::PrepareCommit | TxnState::PrepareAbort) {
                return Err(ResponseError::ConcurrentTransactions);
            }
            let mut next = meta.clone();
            change(&mut next);
            if next.state == TxnState::Empty {
                next.state = TxnState::Ongoing;
                next.started_ms = now_ms;
            }
            next.updated_ms = now_ms;
            if next != *meta {
                self.save(&next, common::Durability::Durable)?;
                *meta = next;
            }
            Ok(())
        })
    }

    /// Ends the open transaction: see the module's doc for the steps.
    pub fn end(
        &self,
        broker: &Broker,
        transactional_id: &str,
        producer_id: i64,
        epoch: i16,
        commit: bool,
    ) -> Result<(), TxnError> {
        self.with_producer(transactional_id, producer_id, epoch, |meta| {
            let prepared = if commit {
                TxnState::PrepareCommit
            } else {
                TxnState::PrepareAbort
            };
            match meta.state {
                TxnState::Empty if meta.last_committed == Some(commit) => return Ok(()),
                TxnState::Empty => return Err(ResponseError::InvalidTxnState),
                TxnState::Ongoing => {
                    let mut next = meta.clone();
                    next.state = prepared;
                    self.save(&next, common::Durability::Durable)?;
                    *meta = next;
                }
                state if state == prepared => {} // a retry after a failure: finish it
                _ => return Err(ResponseError::InvalidTxnState),
            }
            self.finish(broker, meta)
        })
    }

    /// Finishes a prepared transaction: markers to its partitions (fsync'd), a
    /// commit's offsets (durable), then the id is empty again. On an error the
    /// state stays prepared, to be finished by a retry or at the next start.
    /// Blocks on fsyncs: call from the blocking pool.
    fn finish(&self, broker: &Broker, meta: &mut TxnMeta) -> Result<(), TxnError> {
        let commit = match meta.state {
            TxnState::PrepareCommit => true,
            TxnState::PrepareAbort => false,
            _ => return Ok(()),
        };
        let marker = if commit {
            ControlType::Commit
        } else {
            ControlType::Abort
        };
        let now_ms = broker.now_ms();
        let mut written: Vec<Arc<Partition>> = Vec::new();
        for (topic, index) in &meta.partitions {
            // A partition deleted since holds nothing of the transaction.
            let Some(partition) = broker.topics.get(topic).and_then(|t| t.partition(*index)) else {
                continue;
            };
            if let Err(e) = partition.append_marker(meta.producer_id, meta.epoch, marker, now_ms) {
                tracing::error!(topic, partition = index, error = %e, "cannot write a transaction marker");
                return Err(ResponseError::KafkaStorageError);
            }
            written.push(partition);
        }
        let changes: Vec<OffsetChange> = if commit {
            meta.offsets
                .iter()
                .map(|o| OffsetChange::Commit {
                    group: o.group.clone(),
                    topic: o.topic.clone(),
                    partition: o.partition,
                    offset: CommittedOffset {
                        offset: o.offset,
                        leader_epoch: o.leader_epoch,
                        metadata: o.metadata.clone(),
                        commit_timestamp_ms: now_ms,
                    },
                })
                .collect()
        } else {
            Vec::new()
        };
        let groups: BTreeSet<String> = meta.offsets.iter().map(|o| o.group.clone()).collect();
        let durable = block_on(async {
            if !written.is_empty() {
                broker.flusher.flush(written.clone()).await?;
            }
            if !changes.is_empty() {
                broker
                    .groups
                    .offsets()
                    .commit(&broker.flusher, changes, now_ms)
                    .await?;
            }
            Ok::<(), String>(())
        });
        for partition in &written {
            partition.appended();
        }
        if let Err(e) = durable {
            tracing::error!(transactional_id = %meta.transactional_id, error = %e, "transaction end could not be made durable");
            return Err(ResponseError::KafkaStorageError);
        }
        for group in &groups {
            broker.groups.ensure_group(group);
        }
        let mut next = meta.clone();
        next.state = TxnState::Empty;
        next.last_committed = Some(commit);
        next.partitions.clear();
        next.groups.clear();
        next.offsets.clear();
        next.updated_ms = now_ms;
        // Lazy: a crash that loses this write leaves the prepared state, and
        // finishing it again at start-up changes nothing.
        self.save(&next, common::Durability::Lazy)?;
        *meta = next;
        Ok(())
    }

    /// Finishes every transaction a crash left prepared (at start-up).
    pub fn recover(&self, broker: &Broker) {
        let entries: Vec<Entry> = {
            let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            ids.values().cloned().collect()
        };
        for entry in entries {
            let mut meta = lock(&entry);
            if matches!(meta.state, TxnState::PrepareCommit | TxnState::PrepareAbort) {
                if let Err(e) = self.finish(broker, &mut meta) {
                    tracing::error!(transactional_id = %meta.transactional_id, error = ?e, "cannot finish a prepared transaction");
                }
            }
        }
    }

    /// Aborts transactions open longer than their timeout, bumping the epoch so
    /// that their producer is fenced (as Kafka does), and forgets ids idle for
    /// `transactional_id_expiration_ms`. Blocks on fsyncs.
    pub fn expire(&self, broker: &Broker) {
        let now_ms = broker.now_ms();
        let entries: Vec<Entry> = {
            let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            ids.values().cloned().collect()
        };
        for entry in entries {
            let mut meta = lock(&entry);
            if meta.removed {
                continue;
            }
            let timed_out = meta.state == TxnState::Ongoing
                && now_ms.saturating_sub(meta.started_ms) >= i64::from(meta.timeout_ms);
            if timed_out {
                tracing::info!(transactional_id = %meta.transactional_id, timeout_ms = meta.timeout_ms, "aborting a transaction past its timeout");
                let mut next = meta.clone();
                next.epoch = meta.epoch.saturating_add(1);
                next.bumped_from = Some(meta.epoch);
                next.state = TxnState::PrepareAbort;
                if self.save(&next, common::Durability::Durable).is_ok() {
                    *meta = next;
                    let _ = self.finish(broker, &mut meta);
                }
                continue;
            }
            let idle = meta.state == TxnState::Empty
                && now_ms.saturating_sub(meta.updated_ms)
                    >= broker.config.transactional_id_expiration_ms;
            if idle {
                if let Err(e) = std::fs::remove_file(self.file(meta.producer_id)) {
                    tracing::error!(error = %e, "cannot remove an expired transactional id");
                    continue;
                }
                meta.removed = true;
                let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
                ids.remove(&meta.transactional_id);
                let mut by_producer = self.by_producer.lock().unwrap_or_else(|p| p.into_inner());
                by_producer.remove(&meta.producer_id);
            }
        }
    }

    /// The partitions of `group` whose offsets an open transaction will commit:
    /// an OffsetFetch that requires stable offsets gets `UNSTABLE_OFFSET_COMMIT`
    /// for them (KIP-447).
    pub fn pending_offsets(&self, group: &str) -> BTreeSet<(String, i32)> {
        let entries: Vec<Entry> = {
            let ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
            ids.values().cloned().collect()
        };
        let mut pending = BTreeSet::new();
        for entry in entries {
            let meta = lock(&entry);
            if meta.state != TxnState::Empty && meta.groups.contains(group) {
                pending.extend(
                    meta.offsets
                        .iter()
                        .filter(|o| o.group == group)
                        .map(|o| (o.topic.clone(), o.partition)),
                );
            }
        }
        pending
    }

    /// The transactional ids known (for tests and metrics).
    pub fn len(&self) -> usize {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Waits for `future` from a thread of the blocking pool (or any thread outside
/// the runtime's workers).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(future),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for one wait")
            .block_on(future),
    }
}

/// Kafka answers `INVALID_PRODUCER_EPOCH` where it would say `PRODUCER_FENCED` to
/// request versions older than `fenced_since` (KIP-588).
pub fn for_version(err: ResponseError, version: i16, fenced_since: i16) -> ResponseError {
    if err == ResponseError::ProducerFenced && version < fenced_since {
        ResponseError::InvalidProducerEpoch
    } else {
        err
    }
}
