//! ListOffsets: earliest (-2), latest (-1) or the first offset at or after a
//! timestamp: the exact record, as Kafka answers, also inside compressed batches
//! (decompressed for the lookup, without the partition lock; runs on the blocking
//! pool). Latest is the high watermark for read_uncommitted (isolation level 0)
//! and the last stable offset for read_committed (1), as Kafka answers.

use protocol::kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use protocol::kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};
use protocol::ResponseError;

use super::code;
use crate::Broker;

const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
const READ_COMMITTED: i8 = 1;

/// `leader_epoch` exists from v4 on.
const LEADER_EPOCH_SINCE: i16 = 4;

pub fn handle(broker: &Broker, request: ListOffsetsRequest, version: i16) -> ListOffsetsResponse {
    let epoch = |e: i32| if version >= LEADER_EPOCH_SINCE { e } else { -1 };
    let mut response = ListOffsetsResponse::default();
    for t in request.topics {
        let topic = broker.topics.get(&t.name.0);
        let mut topic_response = ListOffsetsTopicResponse::default().with_name(t.name);
        for p in t.partitions {
            let answer =
                ListOffsetsPartitionResponse::default().with_partition_index(p.partition_index);
            let partition = topic
                .as_ref()
                .and_then(|topic| topic.partition(p.partition_index));
            let answer = match partition {
                None => answer.with_error_code(code(ResponseError::UnknownTopicOrPartition)),
                Some(_) if p.current_leader_epoch > 0 => {
                    answer.with_error_code(code(ResponseError::UnknownLeaderEpoch))
                }
                Some(partition) => {
                    let found = match p.timestamp {
                        LATEST => {
                            let hwm = partition.lock().high_watermark();
                            let end = if request.isolation_level == READ_COMMITTED {
                                partition.last_stable_offset(hwm)
                            } else {
                                hwm
                            };
                            Ok(Some((end, -1)))
                        }
                        EARLIEST => Ok(Some((partition.lock().log_start_offset(), -1))),
                        ts if ts >= 0 => partition
                            .offset_for_timestamp(ts, broker.config.timestamp_lookup_max_bytes)
                            .map(|found| found.map(|f| (f.offset, f.timestamp)))
                            .map_err(|e| (ResponseError::KafkaStorageError, e.to_string())),
                        _ => Err((
                            ResponseError::InvalidRequest,
                            format!("unsupported timestamp {}", p.timestamp),
                        )),
                    };
                    match found {
                        Ok(Some((offset, timestamp))) => answer
                            .with_offset(offset)
                            .with_timestamp(timestamp)
                            .with_leader_epoch(epoch(0)),
                        Ok(None) => answer
                            .with_offset(-1)
                            .with_timestamp(-1)
                            .with_leader_epoch(-1),
                        Err((err, why)) => {
                            tracing::warn!(topic = %partition.topic, partition = partition.index, why, "ListOffsets failed");
                            answer
                                .with_error_code(code(err))
                                .with_offset(-1)
                                .with_timestamp(-1)
                        }
                    }
                }
            };
            topic_response.partitions.push(answer);
        }
        response.topics.push(topic_response);
    }
    response
}
