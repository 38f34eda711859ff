//! Group commit. acks=all produce requests ask the flusher to make their
//! partitions durable; one thread takes every request that is waiting, fsyncs each
//! partition involved once, and answers them all. Concurrent producers therefore
//! share fsyncs, and no fsync runs on the async runtime or under a partition lock.
//!
//! The `recovery-point` files of the partitions flushed are written after the
//! answers and at most once per `CHECKPOINT_INTERVAL`: writing one (a rename over
//! the old file) cost about half as much as the fsync itself, on the latency path of
//! every acks=all produce. A file that lags only makes a restart validate a little
//! more of the log.
//!
//! A failed fsync is final: every request waiting on it gets the error, and the
//! partition goes offline (`PartitionLog::fail`: cut back to its last good fsync;
//! produce, fetch and flush answer `KAFKA_STORAGE_ERROR`) until the broker is
//! restarted, so no later fsync, which the kernel would report as a success, can
//! vouch for the bytes the failed one covered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::metrics::BrokerMetrics;
use crate::topics::Partition;

struct FlushRequest {
    partitions: Vec<Arc<Partition>>,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Clone)]
pub struct Flusher {
    tx: mpsc::Sender<FlushRequest>,
    /// Partition fsyncs so far; with group commit, far fewer than flush requests.
    syncs: Arc<AtomicU64>,
}

impl Flusher {
    /// Starts the flusher thread; it ends when every `Flusher` clone is dropped.
    /// Each fsync is counted and timed in `metrics`.
    pub fn start(metrics: Arc<BrokerMetrics>) -> Flusher {
        let (tx, rx) = mpsc::channel::<FlushRequest>();
        let syncs = Arc::new(AtomicU64::new(0));
        let counter = syncs.clone();
        std::thread::Builder::new()
            .name("freshet-flusher".into())
            .spawn(move || run(rx, &counter, &metrics))
            .expect("spawn flusher thread");
        Flusher { tx, syncs }
    }

    /// Partitions fsync'd so far (one count per partition per shared fsync; a
    /// partition already durable costs nothing and counts nothing).
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Resolves once everything appended to `partitions` before this call is on
    /// stable storage. An error names the partition whose fsync failed.
    pub async fn flush(&self, partitions: Vec<Arc<Partition>>) -> Result<(), String> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(FlushRequest { partitions, done })
            .map_err(|_| "flusher stopped".to_string())?;
        wait.await.map_err(|_| "flusher stopped".to_string())?
    }
}

/// How often, at most, the flusher writes the recovery points of what it flushed.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

fn run(rx: mpsc::Receiver<FlushRequest>, syncs: &AtomicU64, metrics: &BrokerMetrics) {
    // Partitions flushed whose recovery-point file may lag.
    let mut unrecorded: HashMap<*const Partition, Arc<Partition>> = HashMap::new();
    let mut last_checkpoint = Instant::now();
    loop {
        let first = if unrecorded.is_empty() {
            match rx.recv() {
                Ok(first) => Some(first),
                Err(_) => break,
            }
        } else {
            match rx.recv_timeout(CHECKPOINT_INTERVAL.saturating_sub(last_checkpoint.elapsed())) {
                Ok(first) => Some(first),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        };
        if let Some(first) = first {
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            let mut results: HashMap<*const Partition, Result<(), String>> = HashMap::new();
            for request in &batch {
                for p in &request.partitions {
                    results
                        .entry(Arc::as_ptr(p))
                        .or_insert_with(|| flush_partition(p, syncs, metrics));
                    unrecorded
                        .entry(Arc::as_ptr(p))
                        .or_insert_with(|| p.clone());
                }
            }
            for request in batch {
                let result = request
                    .partitions
                    .iter()
                    .map(|p| results[&Arc::as_ptr(p)].clone())
                    .find(|r| r.is_err())
                    .unwrap_or(Ok(()));
                let _ = request.done.send(result); // the requester may have gone away
            }
        }
        if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            for (_, p) in unrecorded.drain() {
                write_recovery_point(&p);
            }
            last_checkpoint = Instant::now();
        }
    }
    for (_, p) in unrecorded.drain() {
        write_recovery_point(&p);
    }
}

fn write_recovery_point(p: &Partition) {
    let mut log = p.lock();
    if !log.dir().exists() {
        return; // the topic was deleted meanwhile
    }
    if let Err(e) = log.write_recovery_point() {
        // Not fatal: the data is synced; the next open validates more.
        tracing::warn!(topic = %p.topic, partition = p.index, error = %e, "cannot write the recovery point");
    }
}

fn flush_partition(
    p: &Partition,
    syncs: &AtomicU64,
    metrics: &BrokerMetrics,
) -> Result<(), String> {
    let handle = p
        .lock()
        .flush_handle()
        .map_err(|e| format!("{}-{}: {e}", p.topic, p.index))?;
    if !handle.files.is_empty() {
        syncs.fetch_add(1, Ordering::Relaxed);
        metrics.fsyncs.inc();
    }
    let started = Instant::now();
    let synced = handle.sync();
    if !handle.files.is_empty() {
        metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    if let Err(e) = synced {
        metrics.fsync_failures.inc();
        let reason = format!("fsync of {}-{} failed: {e}", p.topic, p.index);
        // Final for the bytes it covered: the log cuts back to its last good fsync
        // and goes offline, and the producers' sequences of the batches cut are
        // forgotten with them, so a retry is never answered as a duplicate of a
        // batch that may not be on disk. Lock order: producers, then log.
        let mut producers = p.lock_producers();
        let mut log = p.lock();
        log.fail(&reason);
        producers.truncate(log.log_end_offset());
        return Err(reason);
    }
    p.lock().mark_flushed(handle.up_to_offset);
    Ok(())
}
