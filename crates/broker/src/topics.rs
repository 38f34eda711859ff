//! The topic registry: which topics exist, their ids, partitions and configs.
//!
//! On disk, `meta/<topic>.json` names a topic (written atomically: temp file, fsync,
//! rename, fsync of the directory) and `<topic>-<partition>/` holds each partition's
//! log. Creation writes partition directories first and the metadata file last;
//! deletion removes the metadata file first. So a crash leaves at worst partition
//! directories without a topic, which start-up removes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

use tokio::sync::Notify;

use storage::{PartitionLog, StorageError, TimestampLookup, TimestampOffset};

use protocol::record_batch::{build_control_batch, BatchHeader, ControlType};
use uuid::Uuid;

use crate::idempotence::{self, ProducerStates, TxnView};

use crate::config::BrokerConfig;
use crate::topic_config::TopicConfig;

pub const MAX_TOPIC_NAME_CHARS: usize = 249;
const META_DIR: &str = "meta";

pub struct Partition {
    pub topic: String,
    pub index: i32,
    pub dir: PathBuf,
    pub log: Mutex<PartitionLog>,
    /// Idempotent producers' sequences. Lock order: `producers` before `log`.
    pub producers: Mutex<ProducerStates>,
    /// The transactions a fetch must know of, published from `producers` after
    /// each change (a fetch never waits for `producers`, held across appends).
    txns: Mutex<Arc<TxnView>>,
    /// Long-polling fetches waiting for an append here (Kafka's delayed-fetch
    /// purgatory, keyed by partition): an append wakes only these. Dropped fetches
    /// leave dead entries, pruned whenever the list is touched.
    fetch_waiters: Mutex<Vec<Weak<Notify>>>,
}

impl Partition {
    /// A log that belongs to no topic (the committed-offsets log), as a partition
    /// so that the flusher's group commit fsyncs it like any other. No producer
    /// writes there: its producer state stays empty.
    pub fn private_log(name: &str, dir: PathBuf, log: PartitionLog) -> Partition {
        Partition {
            topic: name.to_string(),
            index: 0,
            dir,
            log: Mutex::new(log),
            producers: Mutex::new(ProducerStates::default()),
            txns: Mutex::default(),
            fetch_waiters: Mutex::default(),
        }
    }

    /// Opens (creating or recovering) the partition's log and its producer state.
    pub fn open(
        data_dir: &Path,
        topic: &str,
        index: i32,
        config: storage::LogConfig,
        now_ms: i64,
    ) -> Result<Partition, TopicError> {
        let dir = partition_dir(data_dir, topic, index);
        let (log, report) = PartitionLog::open(&dir, config, now_ms)?;
        if report.truncated_bytes > 0 || report.rebuilt_indexes > 0 {
            tracing::warn!(
                topic,
                partition = index,
                truncated_bytes = report.truncated_bytes,
                rebuilt_indexes = report.rebuilt_indexes,
                "recovered partition log"
            );
        }
        let producers = idempotence::load(&dir, &log)?;
        let txns = Mutex::new(Arc::new(producers.txn_view()));
        Ok(Partition {
            topic: topic.to_string(),
            index,
            dir,
            log: Mutex::new(log),
            producers: Mutex::new(producers),
            txns,
            fetch_waiters: Mutex::default(),
        })
    }

    /// Has `waiter` notified (`notify_one`, which keeps a permit if it is not
    /// waiting yet) after every append from now on, for as long as it lives.
    pub fn watch_appends(&self, waiter: &Arc<Notify>) {
        let mut waiters = self.fetch_waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.retain(|w| w.strong_count() > 0);
        waiters.push(Arc::downgrade(waiter));
    }

    /// Wakes the fetches waiting on this partition (after an append).
    pub fn appended(&self) {
        let mut waiters = self.fetch_waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.retain(|w| match w.upgrade() {
            Some(waiter) => {
                waiter.notify_one();
                true
            }
            None => false,
        });
    }

    /// Fetches registered and still alive (for tests and metrics).
    pub fn fetch_waiter_count(&self) -> usize {
        let waiters = self.fetch_waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.iter().filter(|w| w.strong_count() > 0).count()
    }

    pub fn lock_producers(&self) -> std::sync::MutexGuard<'_, ProducerStates> {
        self.producers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes what fetches see of the transactions here, after `states`
    /// changed them (call with `producers` held, so publications keep its order).
    pub fn publish_txns(&self, states: &ProducerStates) {
        let view = Arc::new(states.txn_view());
        *self.txns.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }

    /// The transactions a fetch must know of (open ones bound the last stable
    /// offset; aborted ones are named to `read_committed` readers).
    pub fn txns(&self) -> Arc<TxnView> {
        self.txns.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The last stable offset: the high watermark, or the first offset of the
    /// oldest open transaction when that is lower.
    pub fn last_stable_offset(&self, high_watermark: i64) -> i64 {
        self.txns()
            .first_unstable
            .map_or(high_watermark, |first| first.min(high_watermark))
    }

    /// Appends a transaction's marker for `producer_id` (written by the
    /// transaction coordinator, never sent by a client). Returns its offset; the
    /// caller makes it durable (the flusher) and wakes fetches (`appended`).
    pub fn append_marker(
        &self,
        producer_id: i64,
        producer_epoch: i16,
        marker: ControlType,
        now_ms: i64,
    ) -> Result<i64, TopicError> {
        let batch = build_control_batch(producer_id, producer_epoch, marker, 0, now_ms);
        let mut states = self.lock_producers();
        let mut log = self.lock();
        let info = log.append(&batch, 0, now_ms)?;
        let end = log.log_end_offset();
        log.set_high_watermark(end);
        drop(log);
        let header = BatchHeader::parse(&batch).map_err(|e| TopicError::Storage(e.to_string()))?;
        let header = BatchHeader {
            base_offset: info.base_offset,
            ..header
        };
        if states.record(&header, Some(marker)) {
            self.publish_txns(&states);
        }
        Ok(info.base_offset)
    }

    /// Writes the producer-state snapshot if it changed since the last one.
    pub fn save_producer_state(&self) -> Result<(), TopicError> {
        let mut states = self.lock_producers();
        // Every idempotent append holds `producers`, so the state covers the log
        // up to its current end. An empty state is saved too: without a snapshot,
        // opening the partition would replay its whole log.
        let (end, start) = {
            let log = self.lock();
            (log.log_end_offset(), log.log_start_offset())
        };
        states.end_offset = end;
        if states.forget_aborted_before(start) {
            self.publish_txns(&states);
        }
        idempotence::save_if_changed(&self.dir, &mut states)
    }

    /// Forgets idle producers (`producer_id_expiration_ms`) and, when any went,
    /// rewrites the snapshot so that a restart does not bring them back.
    pub fn expire_producers(&self, now_ms: i64, expiration_ms: i64) -> Result<usize, TopicError> {
        let expired = self.lock_producers().expire(now_ms, expiration_ms);
        if expired > 0 {
            self.save_producer_state()?;
        }
        Ok(expired)
    }

    /// ListOffsets by timestamp: the first offset whose record timestamp is
    /// `>= timestamp`. The lock is held only to find the batch from headers; its
    /// records are read and decompressed without it (call from a blocking thread).
    pub fn offset_for_timestamp(
        &self,
        timestamp: i64,
        max_decompressed_bytes: u64,
    ) -> Result<Option<TimestampOffset>, StorageError> {
        let mut from_offset = i64::MIN;
        loop {
            let lookup = self.lock().lookup_timestamp(timestamp, from_offset)?;
            match lookup {
                TimestampLookup::Found(found) => return Ok(Some(found)),
                TimestampLookup::NotFound => return Ok(None),
                TimestampLookup::Search(batch) => match batch.search(max_decompressed_bytes)? {
                    Some(found) => return Ok(Some(found)),
                    // Each round moves past one batch, so this ends.
                    None => from_offset = batch.next_offset(),
                },
            }
        }
    }

    /// Locks the log. A panic while holding the lock is a bug already reported;
    /// the log's own state is consistent between calls, so carry on with it.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, PartitionLog> {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Topic {
    pub name: String,
    pub id: Uuid,
    partitions: RwLock<Vec<Arc<Partition>>>,
    config: RwLock<TopicConfig>,
}

impl Topic {
    pub fn partitions(&self) -> Vec<Arc<Partition>> {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    pub fn partition(&self, index: i32) -> Option<Arc<Partition>> {
        let parts = self.partitions.read().unwrap_or_else(|p| p.into_inner());
        usize::try_from(index)
            .ok()
            .and_then(|i| parts.get(i).cloned())
    }
    pub fn partition_count(&self) -> i32 {
        self.partitions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len() as i32
    }
    pub fn config(&self) -> TopicConfig {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TopicMeta {
    name: String,
    id: Uuid,
    partitions: i32,
    config: TopicConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("{0}")]
    InvalidName(String),
    #[error("Topic '{0}' already exists.")]
    AlreadyExists(String),
    #[error("This server does not host this topic-partition.")]
    Unknown,
    #[error("{0}")]
    InvalidPartitions(String),
    /// A broker limit (`max_partitions`) would be exceeded.
    #[error("{0}")]
    LimitReached(String),
    #[error("storage error: {0}")]
    Storage(String),
}

impl From<storage::StorageError> for TopicError {
    fn from(e: storage::StorageError) -> Self {
        TopicError::Storage(e.to_string())
    }
}
fn io_err(path: &Path, e: std::io::Error) -> TopicError {
    TopicError::Storage(format!("{}: {e}", path.display()))
}

/// Kafka's rules for topic names.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    let bad = |m: String| Err(TopicError::InvalidName(m));
    if name.is_empty() {
        return bad("Topic name is illegal, it can't be empty".into());
    }
    if name == "." || name == ".." {
        return bad("Topic name cannot be \".\" or \"..\"".into());
    }
    if name.len() > MAX_TOPIC_NAME_CHARS {
        return bad(format!(
            "Topic name is illegal, it can't be longer than {MAX_TOPIC_NAME_CHARS} characters, topic name: {name}"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad(format!(
            "Topic name \"{name}\" is illegal, it contains a character other than ASCII alphanumerics, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// `a.b` and `a_b` collide in Kafka's metric names, so Kafka refuses the second.
fn collision_key(name: &str) -> String {
    name.replace('.', "_")
}

pub struct TopicRegistry {
    data_dir: PathBuf,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serialises create/delete/alter so that disk and memory change together.
    admin: Mutex<()>,
}

impl TopicRegistry {
    /// Loads every topic under `data_dir`, recovering each partition's log.
    pub fn open(data_dir: &Path, broker: &BrokerConfig, now_ms: i64) -> Result<Self, TopicError> {
        let meta_dir = data_dir.join(META_DIR);
        fs::create_dir_all(&meta_dir).map_err(|e| io_err(&meta_dir, e))?;
        let mut topics = BTreeMap::new();
        for entry in fs::read_dir(&meta_dir).map_err(|e| io_err(&meta_dir, e))? {
            let path = entry.map_err(|e| io_err(&meta_dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                let _ = fs::remove_file(&path); // temp file of an interrupted write
                continue;
            }
            let text = fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
            let meta: TopicMeta = serde_json::from_str(&text)
                .map_err(|e| TopicError::Storage(format!("{}: {e}", path.display())))?;
            // Values on disk are checked again: the code reading them relies on it.
            TopicConfig::from_pairs(
                meta.config
                    .overrides
                    .iter()
                    .map(|(k, v)| (k.as_str(), Some(v.as_str()))),
            )
            .map_err(|e| TopicError::Storage(format!("{}: {e}", path.display())))?;
            let log_config = meta.config.log_config(broker);
            let mut partitions = Vec::with_capacity(meta.partitions as usize);
            for index in 0..meta.partitions {
                partitions.push(Arc::new(Partition::open(
                    data_dir,
                    &meta.name,
                    index,
                    log_config.clone(),
                    now_ms,
                )?));
            }
            let topic = Topic {
                name: meta.name.clone(),
                id: meta.id,
                partitions: RwLock::new(partitions),
                config: RwLock::new(meta.config),
            };
            topics.insert(meta.name, Arc::new(topic));
        }
        remove_orphan_partitions(data_dir, &topics)?;
        Ok(TopicRegistry {
            data_dir: data_dir.to_path_buf(),
            topics: RwLock::new(topics),
            admin: Mutex::new(()),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
    pub fn get_by_id(&self, id: Uuid) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|t| t.id == id)
            .cloned()
    }
    pub fn all(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Checks that a topic could be created, without creating it.
    pub fn check_create(&self, name: &str) -> Result<(), TopicError> {
        validate_name(name)?;
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        if topics.contains_key(name) {
            return Err(TopicError::AlreadyExists(name.into()));
        }
        let key = collision_key(name);
        if let Some(other) = topics.keys().find(|t| collision_key(t) == key) {
            return Err(TopicError::InvalidName(format!(
                "Topic '{name}' collides with existing topic: {other}"
            )));
        }
        Ok(())
    }

    /// Partitions hosted, over every topic.
    pub fn partition_total(&self) -> usize {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|t| t.partition_count() as usize)
            .sum()
    }

    /// Checks that `adding` more partitions stay within `max_partitions`.
    pub fn check_partition_limit(
        &self,
        adding: usize,
        broker: &BrokerConfig,
    ) -> Result<(), TopicError> {
        let hosted = self.partition_total();
        if hosted.saturating_add(adding) > broker.max_partitions {
            return Err(TopicError::LimitReached(format!(
                "Adding {adding} partition(s) would exceed this broker's limit of {} partitions \
                 (max_partitions); it hosts {hosted}.",
                broker.max_partitions
            )));
        }
        Ok(())
    }

    pub fn create(
        &self,
        name: &str,
        partitions: i32,
        config: TopicConfig,
        broker: &BrokerConfig,
        now_ms: i64,
    ) -> Result<Arc<Topic>, TopicError> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        self.check_create(name)?;
        if partitions < 1 {
            return Err(TopicError::InvalidPartitions(
                "Number of partitions must be larger than 0.".into(),
            ));
        }
        // Under the admin lock, so concurrent creations cannot pass it together.
        self.check_partition_limit(partitions as usize, broker)?;
        let log_config = config.log_config(broker);
        let mut logs = Vec::with_capacity(partitions as usize);
        for index in 0..partitions {
            logs.push(Arc::new(Partition::open(
                &self.data_dir,
                name,
                index,
                log_config.clone(),
                now_ms,
            )?));
        }
        let topic = Arc::new(Topic {
            name: name.to_string(),
            id: Uuid::new_v4(),
            partitions: RwLock::new(logs),
            config: RwLock::new(config),
        });
        self.persist(&topic)?;
        self.topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), topic.clone());
        tracing::info!(topic = name, partitions, "created topic");
        Ok(topic)
    }

    pub fn delete(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let topic = self.get(name).ok_or(TopicError::Unknown)?;
        let meta = self.meta_path(name);
        fs::remove_file(&meta).map_err(|e| io_err(&meta, e))?;
        common::sync_parent_dir(&meta).map_err(|e| TopicError::Storage(e.to_string()))?;
        self.topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        for p in topic.partitions() {
            let dir = partition_dir(&self.data_dir, name, p.index);
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove partition directory");
            }
        }
        tracing::info!(topic = name, "deleted topic");
        Ok(topic)
    }

    pub fn add_partitions(
        &self,
        topic: &Topic,
        count: i32,
        broker: &BrokerConfig,
        now_ms: i64,
    ) -> Result<(), TopicError> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let current = topic.partition_count();
        if count <= current {
            return Err(TopicError::InvalidPartitions(format!(
                "Topic currently has {current} partitions, which is higher than the requested {count}."
            )));
        }
        self.check_partition_limit((count - current) as usize, broker)?;
        let log_config = topic.config().log_config(broker);
        let mut added = Vec::new();
        for index in current..count {
            added.push(Arc::new(Partition::open(
                &self.data_dir,
                &topic.name,
                index,
                log_config.clone(),
                now_ms,
            )?));
        }
        {
            let mut parts = topic.partitions.write().unwrap_or_else(|p| p.into_inner());
            parts.extend(added);
        }
        self.persist(topic)
    }

    /// Replaces a topic's explicit configs and applies them to its logs.
    pub fn set_config(
        &self,
        topic: &Topic,
        config: TopicConfig,
        broker: &BrokerConfig,
    ) -> Result<(), TopicError> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let log_config = config.log_config(broker);
        *topic.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        self.persist(topic)?;
        for p in topic.partitions() {
            p.lock().set_config(log_config.clone());
        }
        Ok(())
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.data_dir.join(META_DIR).join(format!("{name}.json"))
    }

    fn persist(&self, topic: &Topic) -> Result<(), TopicError> {
        let meta = TopicMeta {
            name: topic.name.clone(),
            id: topic.id,
            partitions: topic.partition_count(),
            config: topic.config(),
        };
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|e| TopicError::Storage(e.to_string()))?;
        write_atomically(&self.meta_path(&topic.name), &json)
    }
}

pub fn partition_dir(data_dir: &Path, topic: &str, index: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{index}"))
}

/// Writes `bytes` so that after a crash the file holds either the old or the new
/// contents, durably ([`common::write_file_atomically`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TopicError> {
    common::write_file_atomically(path, bytes, common::Durability::Durable)
        .map_err(|e| TopicError::Storage(e.to_string()))
}

/// Removes `<topic>-<n>` directories that no topic owns (a crash mid-create or
/// mid-delete).
fn remove_orphan_partitions(
    data_dir: &Path,
    topics: &BTreeMap<String, Arc<Topic>>,
) -> Result<(), TopicError> {
    for entry in fs::read_dir(data_dir).map_err(|e| io_err(data_dir, e))? {
        let entry = entry.map_err(|e| io_err(data_dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Some((topic, index)) = name.rsplit_once('-') else {
            continue;
        };
        let Ok(index) = index.parse::<i32>() else {
            continue;
        };
        if !entry.path().is_dir() {
            continue;
        }
        let owned = topics
            .get(topic)
            .is_some_and(|t| index < t.partition_count());
        if !owned {
            tracing::warn!(dir = %entry.path().display(), "removing partition directory no topic owns");
            fs::remove_dir_all(entry.path()).map_err(|e| io_err(&entry.path(), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(validate_name("votes.v1_x-y").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"a".repeat(250)).is_err());
        assert!(validate_name(&"a".repeat(249)).is_ok());
    }

    /// Whether `waiter` holds a notification: `timeout` polls the future once
    /// before it looks at the (zero) deadline.
    async fn notified(waiter: &Notify) -> bool {
        tokio::time::timeout(std::time::Duration::ZERO, waiter.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn an_append_wakes_only_the_fetches_waiting_on_its_partition() {
        let tmp = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let dir = tmp.path().join(name);
            let (log, _) = PartitionLog::open(&dir, storage::LogConfig::default(), 0).unwrap();
            Partition::private_log(name, dir, log)
        };
        let (a, b) = (open("a-0"), open("b-0"));
        let on_a = Arc::new(Notify::new());
        let on_both = Arc::new(Notify::new());
        a.watch_appends(&on_a);
        a.watch_appends(&on_both);
        b.watch_appends(&on_both);

        b.appended();
        assert!(
            !notified(&on_a).await,
            "an append to b does not wake a fetch on a"
        );
        assert!(notified(&on_both).await);
        a.appended();
        assert!(notified(&on_a).await, "kept until awaited");
        assert!(!notified(&on_a).await, "one notification per wake");

        drop(on_both);
        assert_eq!((a.fetch_waiter_count(), b.fetch_waiter_count()), (1, 0));
        a.appended();
        b.appended();
        assert_eq!(
            a.fetch_waiters.lock().unwrap().len(),
            1,
            "dead waiters are pruned"
        );
        assert_eq!(b.fetch_waiters.lock().unwrap().len(), 0);
    }
}
