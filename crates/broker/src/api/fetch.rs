//! Fetch: serve record batches straight from segment files (no decoding), waiting
//! up to `max_wait_ms` for `min_bytes` to arrive. Limits: the request's
//! `max_bytes` and per-partition `partition_max_bytes` (the first batch is always
//! returned whole, KIP-74), the broker's `fetch_max_bytes`, and the broker-wide
//! `fetch_memory_bytes` budget for record data being assembled into responses.
//!
//! Incremental fetch sessions (KIP-227) are declined the way the protocol allows:
//! session id 0 in every answer, so clients keep sending full fetches.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use bytes::Bytes;
use protocol::kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use protocol::kafka_protocol::messages::{FetchRequest, FetchResponse, TopicName};
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

/// One partition's answer before its bytes are loaded.
struct Located {
    error: Option<ResponseError>,
    high_watermark: i64,
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
    let broker = broker.clone();
    Reply::Holding(Box::pin(async move {
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut located = locate(&topics, max_bytes);
        if !satisfied(&located, min_bytes) {
            // Wait on this fetch's partitions only, as Kafka's delayed-fetch
            // purgatory does: an append elsewhere costs this fetch nothing. Watch
            // first, then look again, so that an append in between is not missed
            // (the notification keeps a permit until it is awaited).
            let appended = Arc::new(Notify::new());
            for partition in topics
                .iter()
                .flat_map(|t| &t.partitions)
                .filter_map(|w| w.target.as_ref().ok())
            {
                partition.watch_appends(&appended);
            }
            located = locate(&topics, max_bytes);
            while !satisfied(&located, min_bytes) {
                tokio::select! {
                    _ = appended.notified() => {}
                    _ = tokio::time::sleep_until(deadline) => break,
                }
                located = locate(&topics, max_bytes);
            }
        }
        let (response, hold) = load(&broker, &topics, located, read_committed).await;
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

/// Finds the byte ranges to return, under each partition's lock, without reading them.
fn locate(topics: &[WantedTopic], max_bytes: usize) -> Vec<Vec<Located>> {
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
                            return Located { error: Some(*e), high_watermark: -1, log_start_offset: -1, slice: None }
                        }
                    };
                    let log = partition.lock();
                    let high_watermark = log.high_watermark();
                    let log_start_offset = log.log_start_offset();
                    let remaining = max_bytes.saturating_sub(total);
                    let (error, slice) = if total > 0 && remaining == 0 {
                        (None, None)
                    } else {
                        match log.read(w.fetch_offset, w.max_bytes.min(remaining), high_watermark) {
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
                    Located { error, high_watermark, log_start_offset, slice }
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

async fn load(
    broker: &Broker,
    topics: &[WantedTopic],
    located: Vec<Vec<Located>>,
    read_committed: bool,
) -> (FetchResponse, MemoryHold) {
    let total: usize = located
        .iter()
        .flatten()
        .filter_map(|l| l.slice.as_ref())
        .map(|s| s.len)
        .sum();
    let budget = broker.config.fetch_memory_bytes.min(u32::MAX as usize);
    // Held until the encoded answer is written (see `Reply::Holding`). One fetch
    // larger than the whole budget takes all of it rather than never running. An
    // error means the semaphore was closed: shutting down; answer anyway.
    let waiting = broker.fetch_memory_waiting.count(1);
    let hold = broker
        .fetch_memory
        .clone()
        .acquire_many_owned(total.min(budget) as u32)
        .await
        .ok();
    drop(waiting);
    // The positioned reads run on the blocking pool, all of one fetch in one go: a
    // read that misses the page cache waits for the disk, which must not stall the
    // runtime worker and every connection it serves.
    let loaded = if total == 0 {
        read_all(located, false)
    } else {
        match tokio::task::spawn_blocking(move || read_all(located, true)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "fetch reads did not complete");
                let response = FetchResponse::default()
                    .with_error_code(code(ResponseError::KafkaStorageError));
                return (response, hold);
            }
        }
    };
    let mut response = FetchResponse::default();
    for (topic, partitions) in topics.iter().zip(loaded) {
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
            topic_response.partitions.push(
                PartitionData::default()
                    .with_partition_index(wanted.index)
                    .with_error_code(error.map_or(0, code))
                    .with_high_watermark(l.high_watermark)
                    .with_last_stable_offset(l.high_watermark)
                    .with_log_start_offset(l.log_start_offset)
                    .with_aborted_transactions(read_committed.then(Vec::new))
                    .with_records(Some(records)),
            );
        }
        response.responses.push(topic_response);
    }
    (response, hold)
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
