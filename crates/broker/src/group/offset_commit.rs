//! OffsetCommit v2-v8: validate against the group (generation, member), then
//! append one batch to the offsets log and answer once it is fsync'd. The
//! validation and the append run in the request's turn (dispatched as
//! [`Reply::InOrder`]): a connection's pipelined commits take effect in the order
//! sent, and only the wait for the fsync overlaps with later requests.

use std::sync::Arc;

use protocol::kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use protocol::kafka_protocol::messages::{OffsetCommitRequest, OffsetCommitResponse};
use protocol::ResponseError;

use super::{CommittedOffset, OffsetChange};
use crate::api::{code, Reply};
use crate::Broker;

pub fn handle(broker: &Arc<Broker>, request: OffsetCommitRequest, version: i16) -> Reply {
    let group_id = request.group_id.0.to_string();
    let member_id = request.member_id.to_string();
    let instance_id = if version >= 7 {
        request.group_instance_id.as_ref().map(|s| s.to_string())
    } else {
        None
    };
    let generation_id = request.generation_id_or_member_epoch;
    let group_error = validate_group(
        broker,
        &group_id,
        &member_id,
        instance_id.as_deref(),
        generation_id,
    );
    let max_metadata = broker.groups.config().max_offset_metadata_bytes;
    let now_ms = broker.now_ms();
    let mut changes = Vec::new();
    let mut response = OffsetCommitResponse::default();
    for topic in request.topics {
        let known = broker.topics.get(&topic.name.0);
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for p in topic.partitions {
            let exists = known
                .as_ref()
                .is_some_and(|t| t.partition(p.partition_index).is_some());
            let error = if !exists {
                Some(ResponseError::UnknownTopicOrPartition)
            } else if let Err(e) = group_error {
                Some(e)
            } else if p
                .committed_metadata
                .as_ref()
                .is_some_and(|m| m.len() > max_metadata)
            {
                Some(ResponseError::OffsetMetadataTooLarge)
            } else {
                changes.push(OffsetChange::Commit {
                    group: group_id.clone(),
                    topic: topic.name.0.to_string(),
                    partition: p.partition_index,
                    offset: CommittedOffset {
                        offset: p.committed_offset,
                        leader_epoch: if version >= 6 {
                            p.committed_leader_epoch
                        } else {
                            -1
                        },
                        metadata: p.committed_metadata.map(|m| m.to_string()),
                        commit_timestamp_ms: now_ms,
                    },
                });
                None
            };
            partitions.push(
                OffsetCommitResponsePartition::default()
                    .with_partition_index(p.partition_index)
                    .with_error_code(error.map_or(0, code)),
            );
        }
        response.topics.push(
            OffsetCommitResponseTopic::default()
                .with_name(topic.name)
                .with_partitions(partitions),
        );
    }
    if changes.is_empty() {
        return Reply::Now(Some(response.into()));
    }
    let appended = broker.groups.offsets().append(changes, now_ms);
    // The group exists from now on, for the requests that follow this one (its
    // offsets are on their way: `has_offsets` counts them), not only once they
    // are durable.
    broker.groups.ensure_group(&group_id);
    let broker = broker.clone();
    Reply::Later(Box::pin(async move {
        let offsets = broker.groups.offsets();
        let durable = offsets.durable(&broker.flusher, appended, now_ms).await;
        if let Err(e) = durable {
            tracing::error!(group = %group_id, error = %e, "offset commit could not be made durable");
            // Kafka's answer to a storage failure here: retriable, find the
            // coordinator again.
            for topic in &mut response.topics {
                for p in &mut topic.partitions {
                    if p.error_code == 0 {
                        p.error_code = code(ResponseError::NotCoordinator);
                    }
                }
            }
        }
        Some(response.into())
    }))
}

/// Kafka's group checks for a commit. A commit outside group management
/// (generation < 0, no member id) to an unknown group creates it, Empty.
pub(crate) fn validate_group(
    broker: &Broker,
    group_id: &str,
    member_id: &str,
    instance_id: Option<&str>,
    generation_id: i32,
) -> Result<(), ResponseError> {
    let cell = match broker.groups.get(group_id) {
        Some(cell) => cell,
        None if generation_id < 0 => broker.groups.get_or_create(group_id)?,
        None => return Err(ResponseError::IllegalGeneration),
    };
    broker.groups.with_group(&cell, |g, at, _| {
        g.validate_commit(member_id, instance_id, generation_id, at)
    })
}
