//! DeleteRecords: move a partition's log start offset up to the given offset
//! (-1 = the high watermark); whole segments below it are removed.

use protocol::kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use protocol::kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse};
use protocol::ResponseError;

use super::code;
use crate::Broker;

pub fn handle(broker: &Broker, request: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let mut response = DeleteRecordsResponse::default();
    for t in request.topics {
        let topic = broker.topics.get(&t.name.0);
        let mut topic_response = DeleteRecordsTopicResult::default().with_name(t.name);
        for p in t.partitions {
            let result =
                DeleteRecordsPartitionResult::default().with_partition_index(p.partition_index);
            let partition = topic
                .as_ref()
                .and_then(|topic| topic.partition(p.partition_index));
            let result = match partition {
                None => result
                    .with_error_code(code(ResponseError::UnknownTopicOrPartition))
                    .with_low_watermark(-1),
                Some(partition) => {
                    let mut log = partition.lock();
                    let high_watermark = log.high_watermark();
                    let target = if p.offset == -1 {
                        high_watermark
                    } else {
                        p.offset
                    };
                    if target < 0 || target > high_watermark {
                        result
                            .with_error_code(code(ResponseError::OffsetOutOfRange))
                            .with_low_watermark(-1)
                    } else {
                        match log.delete_records_before(target) {
                            Ok(low_watermark) => result.with_low_watermark(low_watermark),
                            Err(e) => {
                                tracing::error!(topic = %partition.topic, partition = partition.index, error = %e, "DeleteRecords failed");
                                result
                                    .with_error_code(code(ResponseError::KafkaStorageError))
                                    .with_low_watermark(-1)
                            }
                        }
                    }
                }
            };
            topic_response.partitions.push(result);
        }
        response.topics.push(topic_response);
    }
    response
}
