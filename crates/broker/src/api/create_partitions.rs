//! CreatePartitions: grow a topic's partition count.

use protocol::kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use protocol::kafka_protocol::messages::{CreatePartitionsRequest, CreatePartitionsResponse};
use protocol::ResponseError;

use super::create_topics::{topic_error, EXCESSIVE_PARTITIONS};
use super::{code, text};
use crate::topics::TopicError;
use crate::Broker;

pub fn handle(broker: &Broker, request: CreatePartitionsRequest) -> CreatePartitionsResponse {
    let mut response = CreatePartitionsResponse::default();
    // Like CreateTopics, a request that would add too many partitions is refused
    // whole. (Kafka's controller caps the records of one request at 10,000; it
    // has no clean error for it, so ours is CreateTopics' POLICY_VIOLATION.)
    let added: u64 = request
        .topics
        .iter()
        .filter_map(|t| {
            let current = broker.topics.get(&t.name.0)?.partition_count();
            Some((t.count.saturating_sub(current)).max(0) as u64)
        })
        .sum();
    let too_many = added > broker.config.max_partitions_per_request as u64;
    for t in request.topics {
        let mut result = CreatePartitionsTopicResult::default().with_name(t.name.clone());
        let outcome = match broker.topics.get(&t.name.0) {
            _ if too_many => Err((
                ResponseError::PolicyViolation,
                EXCESSIVE_PARTITIONS.to_string(),
            )),
            None => Err(topic_error(TopicError::Unknown)),
            Some(topic) => {
                let current = topic.partition_count();
                let added = (t.count - current).max(0) as usize;
                if t.count <= current {
                    Err(topic_error(TopicError::InvalidPartitions(format!(
                        "Topic currently has {current} partitions, which is higher than the requested {}.",
                        t.count
                    ))))
                } else if t.assignments.as_ref().is_some_and(|a| {
                    a.len() != added
                        || a.iter()
                            .any(|a| a.broker_ids.iter().any(|b| b.0 != broker.config.node_id))
                }) {
                    Err((
                        ResponseError::InvalidReplicaAssignment,
                        "Assignments must name only this broker, one per new partition".into(),
                    ))
                } else if request.validate_only {
                    broker
                        .topics
                        .check_partition_limit(added, &broker.config)
                        .map_err(topic_error)
                } else {
                    broker
                        .topics
                        .add_partitions(&topic, t.count, &broker.config, broker.now_ms())
                        .map_err(topic_error)
                }
            }
        };
        if let Err((err, message)) = outcome {
            result.error_code = code(err);
            result.error_message = Some(text(message));
        }
        response.results.push(result);
    }
    response
}
