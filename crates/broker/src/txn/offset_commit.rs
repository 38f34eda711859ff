//! TxnOffsetCommit v0-v3: offsets a transaction commits for a group when it
//! commits (Kafka Streams' and `sendOffsetsToTransaction`'s way to make a read
//! and its results one atomic step). Kept with the transaction (durably) until it
//! ends: a commit writes them to the committed-offsets log, an abort drops them.
//! Until then an OffsetFetch that requires stable offsets is told to retry.
//! The group was added with AddOffsetsToTxn; a generation and member, when sent
//! (v3, KIP-447), are checked as OffsetCommit checks them.

use protocol::kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use protocol::kafka_protocol::messages::{TxnOffsetCommitRequest, TxnOffsetCommitResponse};
use protocol::ResponseError;

use super::{for_version, PendingOffset};
use crate::api::code;
use crate::group::offset_commit::validate_group;
use crate::Broker;

const FENCED_SINCE: i16 = 2;

pub fn handle(
    broker: &Broker,
    request: TxnOffsetCommitRequest,
    version: i16,
) -> TxnOffsetCommitResponse {
    let group = request.group_id.0.to_string();
    let max_metadata = broker.groups.config().max_offset_metadata_bytes;
    let mut offsets = Vec::new();
    let mut errors: Vec<(usize, usize, ResponseError)> = Vec::new();
    for (ti, t) in request.topics.iter().enumerate() {
        let topic = broker.topics.get(&t.name.0);
        for (pi, p) in t.partitions.iter().enumerate() {
            let exists = topic
                .as_ref()
                .is_some_and(|topic| topic.partition(p.partition_index).is_some());
            if !exists {
                errors.push((ti, pi, ResponseError::UnknownTopicOrPartition));
            } else if p
                .committed_metadata
                .as_ref()
                .is_some_and(|m| m.len() > max_metadata)
            {
                errors.push((ti, pi, ResponseError::OffsetMetadataTooLarge));
            } else {
                offsets.push(PendingOffset {
                    group: group.clone(),
                    topic: t.name.0.to_string(),
                    partition: p.partition_index,
                    offset: p.committed_offset,
                    leader_epoch: if version >= 2 {
                        p.committed_leader_epoch
                    } else {
                        -1
                    },
                    metadata: p.committed_metadata.as_ref().map(|m| m.to_string()),
                });
            }
        }
    }
    let member_checked = if version >= 3 && request.generation_id >= 0 {
        validate_group(
            broker,
            &group,
            &request.member_id,
            request.group_instance_id.as_deref(),
            request.generation_id,
        )
    } else {
        Ok(())
    };
    let outcome = member_checked.and_then(|()| {
        broker.txns.with_producer(
            &request.transactional_id.0,
            request.producer_id.0,
            request.producer_epoch,
            |meta| {
                if meta.state != super::TxnState::Ongoing || !meta.groups.contains(&group) {
                    return Err(ResponseError::InvalidTxnState);
                }
                let mut next = meta.clone();
                for o in &offsets {
                    next.offsets.retain(|p| {
                        !(p.group == o.group && p.topic == o.topic && p.partition == o.partition)
                    });
                    next.offsets.push(o.clone());
                }
                next.updated_ms = broker.now_ms();
                broker.txns.save(&next, common::Durability::Durable)?;
                *meta = next;
                Ok(())
            },
        )
    });
    let topics = request
        .topics
        .into_iter()
        .enumerate()
        .map(|(ti, t)| {
            let partitions = t
                .partitions
                .iter()
                .enumerate()
                .map(|(pi, p)| {
                    let own = errors
                        .iter()
                        .find(|(a, b, _)| (*a, *b) == (ti, pi))
                        .map(|(_, _, e)| *e);
                    let error = match (own, &outcome) {
                        (Some(e), _) => code(e),
                        (None, Ok(())) => 0,
                        (None, Err(e)) => code(for_version(*e, version, FENCED_SINCE)),
                    };
                    TxnOffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(error)
                })
                .collect();
            TxnOffsetCommitResponseTopic::default()
                .with_name(t.name)
                .with_partitions(partitions)
        })
        .collect();
    TxnOffsetCommitResponse::default().with_topics(topics)
}
