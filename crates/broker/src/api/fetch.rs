//! Fetch: serve record batches straight from segment files (no decoding), waiting
//! up to `max_wait_ms` for `min_bytes` to arrive. Limits: the request's
//! `max_bytes` and per-partition `partition_max_bytes` (the first batch is always
//! returned whole, KIP-74), the broker's `fetch_max_bytes`, and the broker-wide
//! `fetch_memory_bytes` budget for record data being assembled into responses.
//! Every look at the log (header scans, reads) runs on the blocking pool; the wait
//! between looks holds no thread.
//!
//! Incremental fetch sessions (KIP-227) are declined the way the protocol allows:
//! session id 0 in every answer, so clients keep sending full fetches.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use bytes::Bytes;
use protocol::kafka_protocol::messages::fetch_response::{
    AbortedTransaction, FetchableTopicResponse, PartitionData,
};
use protocol::kafka_protocol::messages::{FetchRequest, FetchResponse, ProducerId, TopicName};
use protocol::ResponseError;
use storage::{ReadSlice, StorageError};
use uuid::Uuid;

use super::{code, MemoryHold, Reply};
use crate::topics::Partition;
use crate::Broker;

const READ_COMMITTED: i8 = 1;

struct Wanted {
    index: i32,
    fetch_offset: i64,
    max_bytes: usize,
    target: Result<Arc<Partition>, ResponseError>,
}

struct WantedTopic {
    name: TopicName,
    id: Uuid,
    partitions: Vec<Wanted>,
}

/// What the request asks for, as a look needs it.
#[derive(Clone, Copy)]
struct Asked {
    max_bytes: usize,
    min_bytes: usize,
    /// Isolation level 1: nothing past the last stable offset.
    read_committed: bool,
}

/// One partition's answer before its bytes are loaded.
struct Located {
    error: Option<ResponseError>,
    high_watermark: i64,
    last_stable_offset: i64,
    log_start_offset: i64,
    slice: Option<ReadSlice>,
}

pub fn handle(broker: &Arc<Broker>, request: FetchRequest, version: i16) -> Reply {
    if version >= 7 && request.session_id != 0 {
        return Reply::now(session_error(
            ResponseError::FetchSessionIdNotFound,
            request.session_id,
        ));
    }
    if version >= 7 && !matches!(request.session_epoch, -1 | 0) {
        return Reply::now(session_error(ResponseError::InvalidFetchSessionEpoch, 0));
    }
    let topics = resolve(broker, &request);
    let max_bytes = if version >= 3 {
        request.max_bytes.max(0) as usize
    } else {
        usize::MAX
    };
    let max_bytes = max_bytes.min(broker.config.fetch_max_bytes);
    let min_bytes = request.min_bytes.max(0) as usize;
    let max_wait = Duration::from_millis(request.max_wait_ms.max(0) as u64);
    let read_committed = request.isolation_level == READ_COMMITTED;
    let asked = Asked {
        max_bytes,
        min_bytes,
        read_committed,
    };
    let broker = broker.clone();
    Reply::Holding(Box::pin(async move {
        let deadline = tokio::time::Instant::now() + max_wait;
        let topics = Arc::new(topics);
        // Wait on this fetch's partitions only, as Kafka's delayed-fetch purgatory
        // does: an append elsewhere costs this fetch nothing. Watch before the
        // first look, so that an append after a look is not missed (the
        // notification keeps a permit until it is awaited).
        let appended = Arc::new(Notify::new());
        let may_wait = !max_wait.is_zero() && min_bytes > 0;
        if may_wait {
            for partition in topics
                .iter()
                .flat_map(|t| &t.partitions)
                .filter_map(|w| w.target.as_ref().ok())
            {
                partition.watch_appends(&appended);
            }
        }
        let mut must_answer = !may_wait;
        let (reads, hold) = loop {
            let look = if reads_nothing(&topics, read_committed) {
                // Every partition is caught up (or fails): the look touches no
                // file, so the hop to the blocking pool (most of what an idle long
                // poll costs) is saved.
                Ok(look(&broker, &topics, asked, must_answer))
            } else {
                let (broker, topics) = (broker.clone(), topics.clone());
                tokio::task::spawn_blocking(move || look(&broker, &topics, asked, must_answer))
                    .await
            };
            let storage_error = || {
                let response = FetchResponse::default()
                    .with_error_code(code(ResponseError::KafkaStorageError));
                Some((response.into(), None))
            };
            match look {
                Err(e) => {
                    tracing::error!(error = %e, "fetch look did not complete");
                    return storage_error();
                }
                Ok(Look::Read(reads, hold)) => break (reads, hold),
                Ok(Look::Unread(located)) => match read_later(&broker, located).await {
                    Some(read) => break read,
                    None => return storage_error(),
                },
                Ok(Look::Wait(located)) => tokio::select! {
                    _ = appended.notified() => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        if total_bytes(&located) == 0 {
                            break (read_all(located, false), None);
                        }
                        must_answer = true; // look once more, and read
                    }
                },
            }
        };
        let response = respond(&topics, reads, read_committed);
        Some((response.into(), hold))
    }))
}

fn session_error(err: ResponseError, session_id: i32) -> FetchResponse {
    FetchResponse::default()
        .with_error_code(code(err))
        .with_session_id(session_id)
}

fn resolve(broker: &Broker, request: &FetchRequest) -> Vec<WantedTopic> {
    request
        .topics
        .iter()
        .map(|t| {
            let by_id = t.topic.0.is_empty() && !t.topic_id.is_nil();
            let topic = if by_id {
                broker.topics.get_by_id(t.topic_id)
            } else {
                broker.topics.get(&t.topic.0)
            };
            let missing = if by_id {
                ResponseError::UnknownTopicId
            } else {
                ResponseError::UnknownTopicOrPartition
            };
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let target = match &topic {
                        _ if p.current_leader_epoch > 0 => Err(ResponseError::UnknownLeaderEpoch),
                        Some(topic) => topic
                            .partition(p.partition)
                            .ok_or(ResponseError::UnknownTopicOrPartition),
                        None => Err(missing),
                    };
                    Wanted {
                        index: p.partition,
                        fetch_offset: p.fetch_offset,
                        max_bytes: p.partition_max_bytes.max(0) as usize,
                        target,
                    }
                })
                .collect();
            WantedTopic {
                name: t.topic.clone(),
                id: topic.map(|t| t.id).unwrap_or(t.topic_id),
                partitions,
            }
        })
        .collect()
}

/// Whether a look now would find nothing to read in any partition: each is
/// caught up (fetch offset at or past its high watermark) or fails, so `locate`
/// answers from memory without scanning a segment file. An append just after this
/// check may make the look scan its batch's header, which is in the page cache.
fn reads_nothing(topics: &[WantedTopic], read_committed: bool) -> bool {
    topics
        .iter()
        .flat_map(|t| &t.partitions)
        .all(|w| match &w.target {
            Err(_) => true,
            Ok(partition) => {
                let log = partition.lock();
                let hwm = log.high_watermark();
                let upto = if read_committed {
                    partition.last_stable_offset(hwm)
                } else {
                    hwm
                };
                w.fetch_offset >= upto || w.fetch_offset < log.log_start_offset()
            }
        })
}

/// Finds the byte ranges to return, under each partition's lock, without reading them.
fn locate(topics: &[WantedTopic], max_bytes: usize, read_committed: bool) -> Vec<Vec<Located>> {
    let mut total = 0usize;
    topics
        .iter()
        .map(|t| {
            t.partitions
                .iter()
                .map(|w| {
                    let partition = match &w.target {
                        Ok(p) => p,
                        Err(e) => {
                            return Located { error: Some(*e), high_watermark: -1, last_stable_offset: -1, log_start_offset: -1, slice: None }
                        }
                    };
                    let log = partition.lock();
                    let high_watermark = log.high_watermark();
                    let last_stable_offset = partition.last_stable_offset(high_watermark);
                    // A read_committed reader sees nothing past the last stable offset.
                    let upto = if read_committed { last_stable_offset } else { high_watermark };
                    let log_start_offset = log.log_start_offset();
                    let remaining = max_bytes.saturating_sub(total);
                    let (error, slice) = if total > 0 && remaining == 0 {
                        (None, None)
                    } else {
                        match log.read(w.fetch_offset, w.max_bytes.min(remaining), upto) {
                            // Only the first non-empty partition may exceed the limits.
                            Ok(slice) if total > 0 && slice.len > remaining => (None, None),
                            Ok(slice) => {
                                total += slice.len;
                                (None, Some(slice))
                            }
                            Err(StorageError::OffsetOutOfRange { .. }) => (Some(ResponseError::OffsetOutOfRange), None),
                            Err(e) => {
                                tracing::error!(topic = %partition.topic, partition = w.index, error = %e, "fetch read failed");
                                (Some(ResponseError::KafkaStorageError), None)
                            }
                        }
                    };
                    Located { error, high_watermark, last_stable_offset, log_start_offset, slice }
                })
                .collect()
        })
        .collect()
}

/// Kafka answers once `min_bytes` are there, so `min_bytes` 0 (or negative, read
/// as 0) means at once, even with nothing to return.
fn satisfied(located: &[Vec<Located>], min_bytes: usize) -> bool {
    let mut bytes = 0usize;
    for l in located.iter().flatten() {
        if l.error.is_some() {
            return true; // errors are answered at once
        }
        bytes += l.slice.as_ref().map_or(0, |s| s.len);
    }
    bytes >= min_bytes
}

fn total_bytes(located: &[Vec<Located>]) -> usize {
    located
        .iter()
        .flatten()
        .filter_map(|l| l.slice.as_ref())
        .map(|s| s.len)
        .sum()
}

/// What one look at the partitions found.
enum Look {
    /// Not `min_bytes` yet: wait for an append or the deadline.
    Wait(Vec<Vec<Located>>),
    /// To answer with, once the fetch memory for it is free.
    Unread(Vec<Vec<Located>>),
    /// Read already: the fetch memory was free at once.
    Read(Vec<Vec<Read>>, MemoryHold),
}

/// One look, on the blocking pool: locating a range scans batch headers in the
/// segment file from the nearest index entry, and the reads are `pread`s, so both
/// may wait for the disk. When the answer is due and its share of
/// `fetch_memory_bytes` is free, the ranges are read in the same task.
fn look(broker: &Broker, topics: &[WantedTopic], asked: Asked, must_answer: bool) -> Look {
    let located = locate(topics, asked.max_bytes, asked.read_committed);
    if !must_answer && !satisfied(&located, asked.min_bytes) {
        return Look::Wait(located);
    }
    let total = total_bytes(&located);
    if total == 0 {
        return Look::Read(read_all(located, false), None);
    }
    // The semaphore hands freed memory to waiting fetches first, so taking it
    // here never overtakes a fetch already waiting in `read_later`.
    match broker
        .fetch_memory
        .clone()
        .try_acquire_many_owned(memory_share(broker, total))
    {
        Ok(permit) => Look::Read(read_all(located, true), Some(permit)),
        Err(tokio::sync::TryAcquireError::NoPermits) => Look::Unread(located),
        // Closed: shutting down; answer anyway.
        Err(tokio::sync::TryAcquireError::Closed) => Look::Read(read_all(located, true), None),
    }
}

/// What a fetch of `total` record bytes holds of `fetch_memory_bytes` until its
/// answer is written: one fetch larger than the whole budget takes all of it
/// rather than never running.
fn memory_share(broker: &Broker, total: usize) -> u32 {
    let budget = broker.config.fetch_memory_bytes.min(u32::MAX as usize);
    total.min(budget) as u32
}

/// Waits for the fetch's share of the memory budget, then reads on the blocking
/// pool. The hold is kept until the encoded answer is written (see
/// `Reply::Holding`). An error from the semaphore means it was closed: shutting
/// down; answer anyway.
async fn read_later(
    broker: &Broker,
    located: Vec<Vec<Located>>,
) -> Option<(Vec<Vec<Read>>, MemoryHold)> {
    let share = memory_share(broker, total_bytes(&located));
    let waiting = broker.fetch_memory_waiting.count(1);
    let hold = broker
        .fetch_memory
        .clone()
        .acquire_many_owned(share)
        .await
        .ok();
    drop(waiting);
    match tokio::task::spawn_blocking(move || read_all(located, true)).await {
        Ok(reads) => Some((reads, hold)),
        Err(e) => {
            tracing::error!(error = %e, "fetch reads did not complete");
            None
        }
    }
}

fn respond(topics: &[WantedTopic], reads: Vec<Vec<Read>>, read_committed: bool) -> FetchResponse {
    let mut response = FetchResponse::default();
    for (topic, partitions) in topics.iter().zip(reads) {
        let mut topic_response = FetchableTopicResponse::default()
            .with_topic(topic.name.clone())
            .with_topic_id(topic.id);
        for (wanted, (l, read)) in topic.partitions.iter().zip(partitions) {
            let mut error = l.error;
            let records = match read {
                None => Bytes::new(),
                Some(Ok(bytes)) => bytes,
                Some(Err(e)) => {
                    tracing::error!(index = wanted.index, error = %e, "fetch load failed");
                    error = Some(ResponseError::KafkaStorageError);
                    Bytes::new()
                }
            };
            // The transactions aborted in what is returned, for the client to
            // drop their records (Kafka names those overlapping the fetched range).
            let aborted = match (&wanted.target, read_committed && !records.is_empty()) {
                (Ok(partition), true) => partition
                    .txns()
                    .aborted_between(wanted.fetch_offset, l.last_stable_offset)
                    .into_iter()
                    .map(|a| {
                        AbortedTransaction::default()
                            .with_producer_id(ProducerId(a.producer_id))
                            .with_first_offset(a.first_offset)
                    })
                    .collect(),
                _ => Vec::new(),
            };
            topic_response.partitions.push(
                PartitionData::default()
                    .with_partition_index(wanted.index)
                    .with_error_code(error.map_or(0, code))
                    .with_high_watermark(l.high_watermark)
                    .with_last_stable_offset(l.last_stable_offset)
                    .with_log_start_offset(l.log_start_offset)
                    .with_aborted_transactions(read_committed.then_some(aborted))
                    .with_records(Some(records)),
            );
        }
        response.responses.push(topic_response);
    }
    response
}

/// A located partition with its bytes read (`None`: nothing to read).
type Read = (Located, Option<std::io::Result<Bytes>>);

/// Reads every located slice (when `read`; else there is nothing to read).
fn read_all(located: Vec<Vec<Located>>, read: bool) -> Vec<Vec<Read>> {
    located
        .into_iter()
        .map(|partitions| {
            partitions
                .into_iter()
                .map(|l| {
                    let bytes = l.slice.as_ref().filter(|_| read).map(ReadSlice::load);
                    (l, bytes)
                })
                .collect()
        })
        .collect()
}
