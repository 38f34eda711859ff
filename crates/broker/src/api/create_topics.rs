//! CreateTopics, validated as Kafka validates: names, partition counts, a
//! replication factor this cluster can meet, manual assignments, configs.

use std::collections::HashMap;

use protocol::kafka_protocol::messages::create_topics_request::CreatableTopic;
use protocol::kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use protocol::kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};
use protocol::ResponseError;

use super::configs::effective_configs;
use super::{code, text};
use crate::topic_config::{TopicConfig, SOURCE_DYNAMIC_TOPIC};
use crate::topics::TopicError;
use crate::Broker;

pub fn handle(broker: &Broker, request: CreateTopicsRequest, version: i16) -> CreateTopicsResponse {
    let mut mentions: HashMap<String, usize> = HashMap::new();
    for t in &request.topics {
        *mentions.entry(t.name.0.to_string()).or_default() += 1;
    }
    let mut response = CreateTopicsResponse::default();
    // As Kafka's controller does, before looking at any topic: a request for too
    // many partitions is refused whole.
    let requested: u64 = request
        .topics
        .iter()
        .map(|t| requested_partitions(broker, t))
        .sum();
    let too_many = requested > broker.config.max_partitions_per_request as u64;
    for t in request.topics {
        let name = t.name.0.to_string();
        let mut result = CreatableTopicResult::default().with_name(t.name.clone());
        let outcome = if too_many {
            Err((
                ResponseError::PolicyViolation,
                EXCESSIVE_PARTITIONS.to_string(),
            ))
        } else if mentions[&name] > 1 {
            Err((
                ResponseError::InvalidRequest,
                format!("Topic {name} is listed more than once in the request"),
            ))
        } else {
            plan(broker, &t).and_then(|(partitions, config)| {
                if request.validate_only {
                    return Ok((partitions, config, None));
                }
                broker
                    .topics
                    .create(
                        &name,
                        partitions,
                        config.clone(),
                        &broker.config,
                        broker.now_ms(),
                    )
                    .map(|topic| (partitions, config, Some(topic.id)))
                    .map_err(topic_error)
            })
        };
        match outcome {
            Ok((partitions, config, id)) => {
                result.num_partitions = partitions;
                result.replication_factor = 1;
                if let Some(id) = id {
                    result.topic_id = id;
                }
                if version >= 5 {
                    let entries = effective_configs(broker, &config)
                        .into_iter()
                        .map(|(def, value, explicit)| {
                            CreatableTopicConfigs::default()
                                .with_name(text(def.name))
                                .with_value(Some(text(value)))
                                .with_config_source(if explicit {
                                    SOURCE_DYNAMIC_TOPIC
                                } else {
                                    crate::topic_config::SOURCE_DEFAULT
                                })
                        })
                        .collect();
                    result.configs = Some(entries);
                }
            }
            Err((err, message)) => {
                result.error_code = code(err);
                result.error_message = Some(text(message));
                result.num_partitions = -1;
                result.replication_factor = -1;
            }
        }
        response.topics.push(result);
    }
    response
}

/// Kafka's words for a request over `max_partitions_per_request`.
pub(crate) const EXCESSIVE_PARTITIONS: &str = "Excessively large number of partitions per request.";

/// Partitions a topic of the request would have, counted as Kafka counts them for
/// the per-request limit (nonsense counts are refused later, one by one).
fn requested_partitions(broker: &Broker, t: &CreatableTopic) -> u64 {
    if !t.assignments.is_empty() {
        return t.assignments.len() as u64;
    }
    match t.num_partitions {
        -1 => broker.config.num_partitions as u64,
        n if n > 0 => n as u64,
        _ => 0,
    }
}

pub(crate) fn topic_error(e: TopicError) -> (ResponseError, String) {
    let err = match &e {
        TopicError::InvalidName(_) => ResponseError::InvalidTopicException,
        TopicError::AlreadyExists(_) => ResponseError::TopicAlreadyExists,
        TopicError::Unknown => ResponseError::UnknownTopicOrPartition,
        TopicError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        TopicError::LimitReached(_) => ResponseError::PolicyViolation,
        TopicError::Storage(_) => ResponseError::KafkaStorageError,
    };
    (err, e.to_string())
}

fn plan(
    broker: &Broker,
    t: &CreatableTopic,
) -> Result<(i32, TopicConfig), (ResponseError, String)> {
    broker.topics.check_create(&t.name.0).map_err(topic_error)?;
    let partitions = if t.assignments.is_empty() {
        let partitions = if t.num_partitions == -1 {
            broker.config.num_partitions
        } else {
            t.num_partitions
        };
        if partitions < 1 {
            return Err((
                ResponseError::InvalidPartitions,
                "Number of partitions was set to an invalid non-positive value.".into(),
            ));
        }
        let replication = if t.replication_factor == -1 {
            1
        } else {
            t.replication_factor
        };
        if replication < 1 {
            return Err((
                ResponseError::InvalidReplicationFactor,
                "Replication factor must be larger than 0.".into(),
            ));
        }
        if replication > 1 {
            return Err((
                ResponseError::InvalidReplicationFactor,
                format!(
                    "Unable to replicate the partition {replication} time(s): The target replication factor of \
                     {replication} cannot be reached because only 1 broker(s) are registered."
                ),
            ));
        }
        partitions
    } else {
        if t.num_partitions != -1 || t.replication_factor != -1 {
            return Err((
                ResponseError::InvalidRequest,
                "Both numPartitions or replicationFactor and replicasAssignments were set. Both cannot be used at \
                 the same time."
                    .into(),
            ));
        }
        let count = t.assignments.len() as i32;
        let mut seen = vec![false; count as usize];
        for a in &t.assignments {
            let slot = usize::try_from(a.partition_index)
                .ok()
                .filter(|i| *i < seen.len());
            let Some(slot) = slot.filter(|i| !seen[*i]) else {
                return Err((
                    ResponseError::InvalidReplicaAssignment,
                    "Partitions should be a consecutive 0-based integer sequence".into(),
                ));
            };
            seen[slot] = true;
            if a.broker_ids.len() != 1 || a.broker_ids[0].0 != broker.config.node_id {
                return Err((
                    ResponseError::InvalidReplicaAssignment,
                    format!(
                        "Replica assignment must name exactly broker {}",
                        broker.config.node_id
                    ),
                ));
            }
        }
        count
    };
    let config = TopicConfig::from_pairs(t.configs.iter().map(|c| (&*c.name, c.value.as_deref())))
        .map_err(|message| (ResponseError::InvalidConfig, message))?;
    // Checked here too so that validate-only answers as creation would.
    broker
        .topics
        .check_partition_limit(partitions as usize, &broker.config)
        .map_err(topic_error)?;
    Ok((partitions, config))
}
