//! Metadata: this broker, and the topics asked for (all when none are named),
//! creating unknown ones when auto-creation is on and the client allows it.

use protocol::kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use protocol::kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse, TopicName};
use protocol::ResponseError;
use uuid::Uuid;

use super::{code, text};
use crate::topic_config::TopicConfig;
use crate::topics::{Topic, TopicError};
use crate::Broker;

/// Kafka's "authorized operations not requested" marker.
const OPERATIONS_OMITTED: i32 = i32::MIN;

pub fn handle(broker: &Broker, request: MetadataRequest, version: i16) -> MetadataResponse {
    let node = BrokerId(broker.config.node_id);
    let mut response = MetadataResponse::default();
    response.brokers = vec![MetadataResponseBroker::default()
        .with_node_id(node)
        .with_host(text(broker.advertised_host.clone()))
        .with_port(broker.advertised_port)];
    response.cluster_id = Some(text(broker.cluster_id.clone()));
    response.controller_id = node;
    response.cluster_authorized_operations = OPERATIONS_OMITTED;
    // v0 sends an empty list for "all topics"; v1+ sends null.
    let all = match &request.topics {
        None => true,
        Some(list) => list.is_empty() && version == 0,
    };
    if all {
        response.topics = broker
            .topics
            .all()
            .iter()
            .map(|t| describe(broker, t))
            .collect();
        return response;
    }
    // v4+ lets the client say no; before v4 auto-creation is always allowed.
    let may_create =
        broker.config.auto_create_topics && (version < 4 || request.allow_auto_topic_creation);
    for requested in request.topics.unwrap_or_default() {
        let entry = match requested.name {
            Some(name) => lookup_by_name(broker, &name.0, may_create),
            None => match broker.topics.get_by_id(requested.topic_id) {
                Some(topic) => describe(broker, &topic),
                None => error_topic(None, requested.topic_id, ResponseError::UnknownTopicId),
            },
        };
        response.topics.push(entry);
    }
    response
}

fn lookup_by_name(broker: &Broker, name: &str, may_create: bool) -> MetadataResponseTopic {
    if let Some(topic) = broker.topics.get(name) {
        return describe(broker, &topic);
    }
    if !may_create {
        return error_topic(
            Some(name),
            Uuid::nil(),
            ResponseError::UnknownTopicOrPartition,
        );
    }
    match broker.topics.create(
        name,
        broker.config.num_partitions,
        TopicConfig::default(),
        &broker.config,
        broker.now_ms(),
    ) {
        Ok(topic) => describe(broker, &topic),
        // Lost a race with another creator: describe what exists.
        Err(TopicError::AlreadyExists(_)) => match broker.topics.get(name) {
            Some(topic) => describe(broker, &topic),
            None => error_topic(Some(name), Uuid::nil(), ResponseError::LeaderNotAvailable),
        },
        Err(TopicError::InvalidName(_)) => error_topic(
            Some(name),
            Uuid::nil(),
            ResponseError::InvalidTopicException,
        ),
        // As when Kafka's controller refuses an automatic creation: the topic is
        // just not there.
        Err(e @ TopicError::LimitReached(_)) => {
            tracing::warn!(topic = name, error = %e, "not auto-creating topic");
            error_topic(
                Some(name),
                Uuid::nil(),
                ResponseError::UnknownTopicOrPartition,
            )
        }
        Err(e) => {
            tracing::error!(topic = name, error = %e, "auto-creating topic failed");
            error_topic(Some(name), Uuid::nil(), ResponseError::KafkaStorageError)
        }
    }
}

fn error_topic(name: Option<&str>, id: Uuid, err: ResponseError) -> MetadataResponseTopic {
    MetadataResponseTopic::default()
        .with_error_code(code(err))
        .with_name(name.map(|n| TopicName(text(n))))
        .with_topic_id(id)
        .with_topic_authorized_operations(OPERATIONS_OMITTED)
}

pub(crate) fn describe(broker: &Broker, topic: &Topic) -> MetadataResponseTopic {
    let node = BrokerId(broker.config.node_id);
    let partitions = (0..topic.partition_count())
        .map(|index| {
            MetadataResponsePartition::default()
                .with_partition_index(index)
                .with_leader_id(node)
                .with_leader_epoch(0)
                .with_replica_nodes(vec![node])
                .with_isr_nodes(vec![node])
        })
        .collect();
    MetadataResponseTopic::default()
        .with_name(Some(TopicName(text(topic.name.clone()))))
        .with_topic_id(topic.id)
        .with_partitions(partitions)
        .with_topic_authorized_operations(OPERATIONS_OMITTED)
}
