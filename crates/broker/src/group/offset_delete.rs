//! OffsetDelete v0: removes committed offsets of a group (tombstones in the offsets
//! log). An Empty group may lose any; a consumer group with members only those of
//! topics no member subscribes to (GROUP_SUBSCRIBED_TO_TOPIC otherwise, read from the
//! members' ConsumerProtocol subscriptions); any other group with members is
//! NON_EMPTY_GROUP.

use std::sync::Arc;

use protocol::kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use protocol::kafka_protocol::messages::{OffsetDeleteRequest, OffsetDeleteResponse};
use protocol::ResponseError;

use super::{GroupState, OffsetChange, CONSUMER_PROTOCOL_TYPE};
use crate::api::{code, Reply};
use crate::Broker;

enum Eligible {
    All,
    /// Only topics nobody subscribes to; the set is those subscribed.
    Unsubscribed(Vec<String>),
}

pub fn handle(broker: &Arc<Broker>, request: OffsetDeleteRequest) -> Reply {
    let group_id = request.group_id.0.to_string();
    let error = |e: ResponseError| {
        Reply::Now(Some(
            OffsetDeleteResponse::default()
                .with_error_code(code(e))
                .into(),
        ))
    };
    let Some(cell) = broker.groups.get(&group_id) else {
        return error(ResponseError::GroupIdNotFound);
    };
    let requested: Vec<String> = request
        .topics
        .iter()
        .map(|t| t.name.0.to_string())
        .collect();
    let eligible = {
        let group = cell.lock();
        match group.state {
            GroupState::Dead => return error(ResponseError::GroupIdNotFound),
            GroupState::Empty => Eligible::All,
            _ if group.protocol_type.as_deref() == Some(CONSUMER_PROTOCOL_TYPE) => {
                Eligible::Unsubscribed(
                    requested
                        .iter()
                        .filter(|t| group.is_subscribed_to(t))
                        .cloned()
                        .collect(),
                )
            }
            _ => return error(ResponseError::NonEmptyGroup),
        }
    };
    let mut tombstones = Vec::new();
    let mut response = OffsetDeleteResponse::default();
    for topic in request.topics {
        let name = topic.name.0.to_string();
        let known = broker.topics.get(&name);
        let subscribed = matches!(&eligible, Eligible::Unsubscribed(s) if s.contains(&name));
        let partitions = topic
            .partitions
            .iter()
            .map(|p| {
                let index = p.partition_index;
                let err = if known.as_ref().is_none_or(|t| t.partition(index).is_none()) {
                    Some(ResponseError::UnknownTopicOrPartition)
                } else if subscribed {
                    Some(ResponseError::GroupSubscribedToTopic)
                } else {
                    // Counting commits still waiting for their fsync: a
                    // deletion pipelined right after a commit deletes it.
                    if broker.groups.offsets().has_offset(&group_id, &name, index) {
                        tombstones.push(OffsetChange::DeleteOffset {
                            group: group_id.clone(),
                            topic: name.clone(),
                            partition: index,
                        });
                    }
                    None
                };
                OffsetDeleteResponsePartition::default()
                    .with_partition_index(index)
                    .with_error_code(err.map_or(0, code))
            })
            .collect();
        response.topics.push(
            OffsetDeleteResponseTopic::default()
                .with_name(topic.name)
                .with_partitions(partitions),
        );
    }
    if tombstones.is_empty() {
        return Reply::Now(Some(response.into()));
    }
    // In the request's turn (dispatched as Reply::InOrder); only the fsync waits.
    let now_ms = broker.now_ms();
    let appended = broker.groups.offsets().append(tombstones, now_ms);
    let broker = broker.clone();
    Reply::Later(Box::pin(async move {
        let offsets = broker.groups.offsets();
        let durable = offsets.durable(&broker.flusher, appended, now_ms).await;
        if let Err(e) = durable {
            tracing::error!(group = %group_id, error = %e, "offset deletion could not be made durable");
            return Some(
                OffsetDeleteResponse::default()
                    .with_error_code(code(ResponseError::CoordinatorNotAvailable))
                    .into(),
            );
        }
        // An Empty group left without offsets is gone, as Kafka's cleanup does.
        broker.groups.remove_if_idle(&cell);
        Some(response.into())
    }))
}
