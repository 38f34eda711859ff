//! Produce: validate the one v2 batch each partition carries, append it as sent,
//! and answer by acks — 0: no answer, 1: once in the page cache, -1 (all): once
//! fsync'd by the flusher's group commit. Batches from idempotent producers are
//! checked against their producer's sequence first (`idempotence.rs`), and
//! transactional ones against their producer's open transaction (`txn`). Runs on the
//! blocking pool, in order per connection (`Reply::InOrder`), and appends each
//! batch from the request's own buffer, without a copy.

use std::sync::Arc;

use protocol::kafka_protocol::messages::produce_request::PartitionProduceData;
use protocol::kafka_protocol::messages::produce_response::{
    PartitionProduceResponse, TopicProduceResponse,
};
use protocol::kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use protocol::record_batch::{batches, BatchError, BatchHeader};
use protocol::ResponseError;

use super::{code, text, Reply};
use crate::idempotence::Check;
use crate::topics::{Partition, Topic};
use crate::Broker;

pub fn handle(broker: &Arc<Broker>, request: ProduceRequest) -> Reply {
    let acks = request.acks;
    let mut response = ProduceResponse::default();
    let mut appended: Vec<Arc<Partition>> = Vec::new();
    let now_ms = broker.now_ms();
    for topic_data in request.topic_data {
        let topic = broker.topics.get(&topic_data.name.0);
        let max_batch_bytes = topic
            .as_ref()
            .map(|t| t.config().max_message_bytes(&broker.config));
        let mut topic_response = TopicProduceResponse::default().with_name(topic_data.name);
        for data in topic_data.partition_data {
            let index = data.index;
            let result = if !matches!(acks, -1..=1) {
                Err((ResponseError::InvalidRequiredAcks, None))
            } else {
                match (&topic, max_batch_bytes) {
                    (Some(topic), Some(max)) => append(broker, topic, data, max, now_ms),
                    _ => Err((ResponseError::UnknownTopicOrPartition, None)),
                }
            };
            let partition_response = match result {
                Ok((partition, base_offset, log_start_offset)) => {
                    appended.push(partition);
                    PartitionProduceResponse::default()
                        .with_index(index)
                        .with_base_offset(base_offset)
                        .with_log_append_time_ms(-1)
                        .with_log_start_offset(log_start_offset)
                }
                Err((err, message)) => PartitionProduceResponse::default()
                    .with_index(index)
                    .with_error_code(code(err))
                    .with_base_offset(-1)
                    .with_log_append_time_ms(-1)
                    .with_log_start_offset(-1)
                    .with_error_message(message.map(text)),
            };
            topic_response.partition_responses.push(partition_response);
        }
        response.responses.push(topic_response);
    }
    for partition in &appended {
        partition.appended();
    }
    match acks {
        0 => Reply::Now(None),
        -1 if !appended.is_empty() => {
            let broker = broker.clone();
            Reply::Later(Box::pin(async move {
                if let Err(e) = broker.flusher.flush(appended).await {
                    tracing::error!(error = %e, "acks=all produce could not be made durable");
                    for topic in &mut response.responses {
                        for p in &mut topic.partition_responses {
                            if p.error_code == 0 {
                                p.error_code = code(ResponseError::KafkaStorageError);
                                p.error_message = Some(text(e.clone()));
                            }
                        }
                    }
                }
                Some(response.into())
            }))
        }
        _ => Reply::now(response),
    }
}

type AppendResult = Result<(Arc<Partition>, i64, i64), (ResponseError, Option<String>)>;

fn append(
    broker: &Broker,
    topic: &Topic,
    data: PartitionProduceData,
    max_batch_bytes: usize,
    now_ms: i64,
) -> AppendResult {
    let partition = topic
        .partition(data.index)
        .ok_or((ResponseError::UnknownTopicOrPartition, None))?;
    let records = data.records.unwrap_or_default();
    let header = single_batch_header(&records)?;
    if header.total_bytes() > max_batch_bytes {
        return Err((
            ResponseError::MessageTooLarge,
            Some(format!(
                "batch of {} bytes exceeds max.message.bytes {max_batch_bytes}",
                header.total_bytes()
            )),
        ));
    }
    if header.is_control() {
        return Err((
            ResponseError::InvalidRecord,
            Some("control batches are written by the broker, never produced".into()),
        ));
    }
    if header.is_transactional() {
        if !header.has_producer_id() {
            return Err((
                ResponseError::InvalidRecord,
                Some("a transactional batch needs a producer id".into()),
            ));
        }
        // Checked against the producer's open transaction, which cannot end
        // before this append is done.
        return broker.txns.produce(
            header.producer_id,
            header.producer_epoch,
            &topic.name,
            data.index,
            || append_checked(broker, topic, partition, header, records, now_ms),
        );
    }
    append_checked(broker, topic, partition, header, records, now_ms)
}

/// Appends a batch whose header passed the checks that need no producer state:
/// an idempotent producer's sequence is checked here, under its partition's lock.
fn append_checked(
    broker: &Broker,
    topic: &Topic,
    partition: Arc<Partition>,
    header: BatchHeader,
    records: bytes::Bytes,
    now_ms: i64,
) -> AppendResult {
    let index = partition.index;
    // Lock order: producers, then log. Held across the append so that the check
    // and the record of a batch are one step for its producer.
    let mut producers = header.has_producer_id().then(|| partition.lock_producers());
    if let Some(states) = &producers {
        match states.check(&header, broker.config.max_producer_ids_per_partition) {
            Check::Append => {}
            Check::Duplicate { base_offset } => {
                let log = partition.lock();
                if let Some(reason) = log.offline_reason() {
                    return Err((ResponseError::KafkaStorageError, Some(reason.to_string())));
                }
                let start = log.log_start_offset();
                drop(log);
                drop(producers);
                return Ok((partition, base_offset, start));
            }
            Check::Reject(ResponseError::ThrottlingQuotaExceeded) => {
                let message = format!(
                    "partition {} of {} keeps the state of max_producer_ids_per_partition={} \
                     producer ids: a new one gets in once idle ones expire",
                    index, topic.name, broker.config.max_producer_ids_per_partition
                );
                return Err((ResponseError::ThrottlingQuotaExceeded, Some(message)));
            }
            Check::Reject(err) => {
                let message = format!(
                    "producer {} epoch {} sequence {} refused",
                    header.producer_id, header.producer_epoch, header.base_sequence
                );
                return Err((err, Some(message)));
            }
        }
    }
    let mut log = partition.lock();
    match log.append(&records, 0, now_ms) {
        Ok(info) => {
            let end = log.log_end_offset();
            log.set_high_watermark(end);
            let start = log.log_start_offset();
            drop(log);
            if let Some(states) = &mut producers {
                let header = BatchHeader {
                    base_offset: info.base_offset,
                    ..header
                };
                if states.record(&header, None) {
                    partition.publish_txns(states);
                }
            }
            drop(producers);
            (broker.metrics).produced(
                &topic.name,
                header.records_count as u64,
                records.len() as u64,
            );
            Ok((partition, info.base_offset, start))
        }
        Err(storage::StorageError::InvalidBatch(e)) => Err(batch_error(e)),
        Err(e) => {
            tracing::error!(topic = %topic.name, partition = index, error = %e, "append failed");
            Err((ResponseError::KafkaStorageError, Some(e.to_string())))
        }
    }
}

/// A v3+ produce request carries exactly one v2 batch per partition.
fn single_batch_header(records: &[u8]) -> Result<BatchHeader, (ResponseError, Option<String>)> {
    let mut iter = batches(records);
    let header = match iter.next() {
        None => return Err((ResponseError::InvalidRecord, Some("no record batch".into()))),
        Some(Err(e)) => return Err(batch_error(e)),
        Some(Ok((header, _))) => header,
    };
    if iter.next().is_some() {
        return Err((
            ResponseError::InvalidRecord,
            Some("a produce request must carry exactly one record batch per partition".into()),
        ));
    }
    Ok(header)
}

fn batch_error(e: BatchError) -> (ResponseError, Option<String>) {
    let err = match e {
        BatchError::UnsupportedMagic(_) | BatchError::InconsistentCount { .. } => {
            ResponseError::InvalidRecord
        }
        BatchError::UnknownCompression(_) => ResponseError::UnsupportedCompressionType,
        BatchError::Truncated { .. }
        | BatchError::BadLength(_)
        | BatchError::CrcMismatch { .. }
        | BatchError::TrailingBytes(_) => ResponseError::CorruptMessage,
    };
    (err, Some(e.to_string()))
}
