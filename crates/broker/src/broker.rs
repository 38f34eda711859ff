//! The broker's shared state: configuration, the topic registry, the flusher, the
//! append notifications long-polling fetches wait on, and the fetch memory budget.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::config::BrokerConfig;
use crate::flusher::Flusher;
use crate::group::{GroupConfig, GroupCoordinator};
use crate::metrics::BrokerMetrics;
use crate::topics::{write_atomically, TopicError, TopicRegistry};
use crate::txn::TxnCoordinator;

/// Time as the broker sees it; tests may substitute their own.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another broker")]
    Locked(String),
    #[error("{0}")]
    Topics(#[from] TopicError),
}

pub struct Broker {
    pub config: BrokerConfig,
    pub cluster_id: String,
    /// Host and port clients are told to connect to.
    pub advertised_host: String,
    pub advertised_port: i32,
    pub topics: TopicRegistry,
    pub flusher: Flusher,
    /// Consumer groups and their committed offsets.
    pub groups: GroupCoordinator,
    /// Bytes of record data all fetch responses being built or sent may hold
    /// together; a fetch holds its share until its answer is written.
    pub fetch_memory: Arc<Semaphore>,
    /// Bytes of encoded fetch answers not yet written to their sockets: what
    /// `fetch_memory` bounds, measured where the memory really is.
    pub fetch_answer_bytes: Gauge,
    /// Fetches waiting for their share of `fetch_memory`.
    pub fetch_memory_waiting: Gauge,
    /// Fetches waiting for the answer of an earlier fetch on their connection to
    /// be written (fetches on one connection run one at a time).
    pub fetch_waiting_turn: Gauge,
    pub producer_ids: ProducerIds,
    /// Transactional ids and their open transactions.
    pub txns: TxnCoordinator,
    /// What `GET /metrics` shows of this broker (`metrics` module).
    pub metrics: Arc<BrokerMetrics>,
    clock: Arc<dyn Clock>,
    _lock: fs::File,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ClusterMeta {
    cluster_id: String,
}

impl Broker {
    pub fn open(
        config: BrokerConfig,
        advertised_host: String,
        advertised_port: i32,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Broker>, OpenError> {
        let dir = config.data_dir.clone();
        let dir_err = |source| OpenError::DataDir {
            path: dir.display().to_string(),
            source,
        };
        fs::create_dir_all(&dir).map_err(dir_err)?;
        let lock = lock_data_dir(&dir)?;
        let cluster_id = load_or_create_cluster_id(&dir)?;
        raise_open_file_limit();
        let topics = TopicRegistry::open(&dir, &config, clock.now_ms())?;
        let fetch_memory = Arc::new(Semaphore::new(config.fetch_memory_bytes));
        let groups =
            GroupCoordinator::open(&dir, GroupConfig::from_broker(&config), clock.now_ms())
                .map_err(|e| {
                    OpenError::Topics(TopicError::Storage(format!("group offsets: {e}")))
                })?;
        let producer_ids = ProducerIds::open(&dir)?;
        let txns = TxnCoordinator::open(&dir).map_err(|e| {
            OpenError::Topics(TopicError::Storage(format!("transaction state: {e}")))
        })?;
        let metrics = Arc::new(BrokerMetrics::default());
        let broker = Arc::new(Broker {
            config,
            cluster_id,
            advertised_host,
            advertised_port,
            topics,
            flusher: Flusher::start(metrics.clone()),
            groups,
            fetch_memory,
            fetch_answer_bytes: Gauge::default(),
            fetch_memory_waiting: Gauge::default(),
            fetch_waiting_turn: Gauge::default(),
            producer_ids,
            txns,
            metrics,
            clock,
            _lock: lock,
        });
        // Kafka drops expired producers when it loads a snapshot; so do we.
        broker.expire_producers();
        Ok(broker)
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Flushes every partition and records its recovery point, so that the next
    /// start validates nothing.
    pub fn shutdown(&self) {
        for topic in self.topics.all() {
            for p in topic.partitions() {
                if let Err(e) = p.lock().flush() {
                    tracing::error!(topic = %p.topic, partition = p.index, error = %e, "flush at shutdown failed");
                }
                if let Err(e) = p.save_producer_state() {
                    tracing::error!(topic = %p.topic, partition = p.index, error = %e, "producer state snapshot failed");
                }
            }
        }
    }

    /// Periodic work: retention and the background flush. Runs until the broker is
    /// dropped by everyone else.
    pub async fn run_background(self: Arc<Self>) {
        let retention_every = Duration::from_millis(self.config.retention_check_interval_ms.max(1));
        let flush_every = Duration::from_millis(self.config.flush_interval_ms.max(1));
        let expiry_every =
            Duration::from_millis(self.config.producer_id_expiration_check_interval_ms.max(1));
        let txn_every =
            Duration::from_millis(self.config.transaction_abort_check_interval_ms.max(1));
        // Transactions a crash left prepared are finished before anything else;
        // until then their ids answer CONCURRENT_TRANSACTIONS (retriable).
        let broker = self.clone();
        let _ = tokio::task::spawn_blocking(move || broker.txns.recover(&broker)).await;
        let mut txn_expiry = tokio::time::interval(txn_every);
        txn_expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retention = tokio::time::interval(retention_every);
        let mut flush = tokio::time::interval(flush_every);
        let mut expiry = tokio::time::interval(expiry_every);
        retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = expiry.tick() => {
                    let broker = self.clone();
                    let _ = tokio::task::spawn_blocking(move || broker.expire_producers()).await;
                }
                _ = txn_expiry.tick() => {
                    let broker = self.clone();
                    let _ = tokio::task::spawn_blocking(move || broker.txns.expire(&broker)).await;
                }
                _ = retention.tick() => {
                    let broker = self.clone();
                    let _ = tokio::task::spawn_blocking(move || broker.apply_retention()).await;
                }
                _ = flush.tick(), if self.config.flush_interval_ms > 0 => {
                    let partitions: Vec<_> = self.topics.all().iter().flat_map(|t| t.partitions()).collect();
                    let dirty: Vec<_> = partitions
                        .iter()
                        .filter(|p| {
                            let log = p.lock();
                            log.recovery_point() < log.log_end_offset()
                        })
                        .cloned()
                        .collect();
                    if !dirty.is_empty() {
                        if let Err(e) = self.flusher.flush(dirty).await {
                            tracing::error!(error = %e, "background flush failed");
                        }
                    }
                    // Every partition, not only the dirty ones: acks=all producers keep
                    // theirs flushed, and a missing snapshot means a full replay at start.
                    let _ = tokio::task::spawn_blocking(move || {
                        for p in partitions {
                            if let Err(e) = p.save_producer_state() {
                                tracing::error!(topic = %p.topic, partition = p.index, error = %e, "producer state snapshot failed");
                            }
                        }
                    })
                    .await;
                }
            }
        }
    }

    /// Forgets, on every partition, idempotent producers idle for
    /// `producer_id_expiration_ms` or longer. Returns how many were dropped.
    pub fn expire_producers(&self) -> usize {
        let now_ms = self.now_ms();
        let mut total = 0;
        for topic in self.topics.all() {
            for p in topic.partitions() {
                match p.expire_producers(now_ms, self.config.producer_id_expiration_ms) {
                    Ok(0) => {}
                    Ok(n) => {
                        total += n;
                        tracing::info!(topic = %p.topic, partition = p.index, producers = n, "expired idle producers");
                    }
                    Err(e) => {
                        tracing::error!(topic = %p.topic, partition = p.index, error = %e, "producer state snapshot failed")
                    }
                }
            }
        }
        total
    }

    fn apply_retention(&self) {
        let now_ms = self.now_ms();
        for topic in self.topics.all() {
            for p in topic.partitions() {
                match p.lock().apply_retention(now_ms) {
                    Ok(r) if r.deleted_segments > 0 => tracing::info!(
                        topic = %p.topic, partition = p.index, segments = r.deleted_segments,
                        bytes = r.deleted_bytes, "retention deleted segments"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(topic = %p.topic, partition = p.index, error = %e, "retention failed")
                    }
                }
            }
        }
    }
}

/// A count that goes up and down, with its high-water mark.
#[derive(Debug, Default)]
pub struct Gauge {
    value: AtomicUsize,
    max: AtomicUsize,
}

impl Gauge {
    pub fn add(&self, n: usize) {
        let value = self.value.fetch_add(n, Ordering::Relaxed) + n;
        self.max.fetch_max(value, Ordering::Relaxed);
    }
    pub fn sub(&self, n: usize) {
        let before = self.value.fetch_sub(n, Ordering::Relaxed);
        debug_assert!(before >= n, "gauge below zero");
    }
    pub fn value(&self) -> usize {
        self.value.load(Ordering::Relaxed)
    }
    /// The highest value since the start.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }
    /// Adds `n` until the returned guard is dropped.
    pub fn count(&self, n: usize) -> Counted<'_> {
        self.add(n);
        Counted { gauge: self, n }
    }
}

pub struct Counted<'a> {
    gauge: &'a Gauge,
    n: usize,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.gauge.sub(self.n);
    }
}

/// Hands out producer ids. Ids are reserved on disk a block at a time, so an id is
/// never given out twice, even across a crash.
pub struct ProducerIds {
    path: std::path::PathBuf,
    /// (next id to hand out, first id not yet reserved on disk)
    state: std::sync::Mutex<(i64, i64)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ProducerIdBlock {
    next_block_start: i64,
}

const PRODUCER_ID_BLOCK: i64 = 1000;

impl ProducerIds {
    fn open(dir: &Path) -> Result<ProducerIds, OpenError> {
        let path = dir.join("producer-ids.json");
        let start = match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<ProducerIdBlock>(&bytes)
                    .map_err(|e| {
                        OpenError::Topics(TopicError::Storage(format!("{}: {e}", path.display())))
                    })?
                    .next_block_start
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => {
                return Err(OpenError::DataDir {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        Ok(ProducerIds {
            path,
            state: std::sync::Mutex::new((start, start)),
        })
    }

    pub fn next(&self) -> Result<i64, TopicError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 == state.1 {
            let reserved = state.1 + PRODUCER_ID_BLOCK;
            let json = serde_json::to_vec(&ProducerIdBlock {
                next_block_start: reserved,
            })
            .expect("serialize");
            write_atomically(&self.path, &json)?;
            state.1 = reserved;
        }
        let id = state.0;
        state.0 += 1;
        Ok(id)
    }
}

fn lock_data_dir(dir: &Path) -> Result<fs::File, OpenError> {
    let path = dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| OpenError::DataDir {
            path: path.display().to_string(),
            source,
        })?;
    // An exclusive flock, released when the process exits however it exits.
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(OpenError::Locked(dir.display().to_string())),
        Err(fs::TryLockError::Error(source)) => Err(OpenError::DataDir {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn load_or_create_cluster_id(dir: &Path) -> Result<String, OpenError> {
    let path = dir.join("cluster.json");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let meta: ClusterMeta = serde_json::from_str(&text).map_err(|e| {
                OpenError::Topics(TopicError::Storage(format!("{}: {e}", path.display())))
            })?;
            Ok(meta.cluster_id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Kafka cluster ids are a UUID in URL-safe base64 without padding (22 chars).
            let cluster_id = base64_url(uuid::Uuid::new_v4().as_bytes());
            let json = serde_json::to_vec(&ClusterMeta {
                cluster_id: cluster_id.clone(),
            })
            .expect("serialize");
            write_atomically(&path, &json)?;
            Ok(cluster_id)
        }
        Err(source) => Err(OpenError::DataDir {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Each partition keeps a few files open; lift the soft descriptor limit to the
/// hard one so that thousands of partitions fit.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we pass; no other memory.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_id_is_22_url_safe_chars() {
        let id = super::base64_url(&[0xff; 16]);
        assert_eq!(id.len(), 22);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }
}
