//! OffsetFetch v1-v8: committed offsets, with their metadata and leader epoch; -1
//! for partitions without one. `topics` null (v2+) means every committed offset of
//! the group; v8 asks for several groups at once. `require_stable` (v7+, KIP-447):
//! a partition whose offset an open transaction will commit (`TxnOffsetCommit`)
//! answers `UNSTABLE_OFFSET_COMMIT`, retriable, until the transaction ends.

use protocol::kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use protocol::kafka_protocol::messages::{OffsetFetchRequest, OffsetFetchResponse, TopicName};

use std::collections::BTreeSet;

use protocol::ResponseError;

use super::CommittedOffset;
use crate::api::{code, text};
use crate::Broker;

/// One partition's answer: (partition, committed offset if any).
type Fetched = Vec<(String, Vec<(i32, Option<CommittedOffset>)>)>;

pub fn handle(broker: &Broker, request: OffsetFetchRequest, version: i16) -> OffsetFetchResponse {
    if version >= 8 {
        let groups = request
            .groups
            .into_iter()
            .map(|g| {
                let wanted = g.topics.map(|ts| {
                    ts.into_iter()
                        .map(|t| (t.name.0.to_string(), t.partition_indexes))
                        .collect()
                });
                let pending = pending(broker, &g.group_id, request.require_stable);
                let topics = fetch(broker, &g.group_id, wanted)
                    .into_iter()
                    .map(|(name, partitions)| {
                        let ps = partitions
                            .into_iter()
                            .map(|(index, c)| {
                                let (c, error) = stable(&pending, &name, index, c);
                                let (offset, epoch, metadata) = split(c);
                                OffsetFetchResponsePartitions::default()
                                    .with_partition_index(index)
                                    .with_committed_offset(offset)
                                    .with_committed_leader_epoch(epoch)
                                    .with_metadata(Some(text(metadata)))
                                    .with_error_code(error)
                            })
                            .collect();
                        OffsetFetchResponseTopics::default()
                            .with_name(topic_name(name))
                            .with_partitions(ps)
                    })
                    .collect();
                OffsetFetchResponseGroup::default()
                    .with_group_id(g.group_id)
                    .with_topics(topics)
            })
            .collect();
        return OffsetFetchResponse::default().with_groups(groups);
    }
    let wanted = request.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes))
            .collect()
    });
    let pending = pending(
        broker,
        &request.group_id,
        version >= 7 && request.require_stable,
    );
    let topics = fetch(broker, &request.group_id, wanted)
        .into_iter()
        .map(|(name, partitions)| {
            let ps = partitions
                .into_iter()
                .map(|(index, c)| {
                    let (c, error) = stable(&pending, &name, index, c);
                    let (offset, epoch, metadata) = split(c);
                    OffsetFetchResponsePartition::default()
                        .with_partition_index(index)
                        .with_committed_offset(offset)
                        .with_committed_leader_epoch(if version >= 5 { epoch } else { -1 })
                        .with_metadata(Some(text(metadata)))
                        .with_error_code(error)
                })
                .collect();
            OffsetFetchResponseTopic::default()
                .with_name(topic_name(name))
                .with_partitions(ps)
        })
        .collect();
    OffsetFetchResponse::default().with_topics(topics)
}

/// The partitions of `group` an open transaction will commit, when the request
/// requires stable offsets.
fn pending(broker: &Broker, group: &str, require_stable: bool) -> BTreeSet<(String, i32)> {
    if require_stable {
        broker.txns.pending_offsets(group)
    } else {
        BTreeSet::new()
    }
}

/// A partition with a pending transactional commit: no offset, and the error
/// that makes the client ask again.
fn stable(
    pending: &BTreeSet<(String, i32)>,
    topic: &str,
    index: i32,
    committed: Option<CommittedOffset>,
) -> (Option<CommittedOffset>, i16) {
    if pending.contains(&(topic.to_string(), index)) {
        (None, code(ResponseError::UnstableOffsetCommit))
    } else {
        (committed, 0)
    }
}

fn topic_name(name: String) -> TopicName {
    TopicName(text(name))
}

fn split(c: Option<CommittedOffset>) -> (i64, i32, String) {
    match c {
        Some(c) => (c.offset, c.leader_epoch, c.metadata.unwrap_or_default()),
        None => (-1, -1, String::new()),
    }
}

/// `wanted` None: everything the group committed.
fn fetch(broker: &Broker, group: &str, wanted: Option<Vec<(String, Vec<i32>)>>) -> Fetched {
    let store = broker.groups.offsets();
    match wanted {
        Some(topics) => topics
            .into_iter()
            .map(|(topic, partitions)| {
                let found = partitions
                    .into_iter()
                    .map(|p| (p, store.fetch(group, &topic, p)))
                    .collect();
                (topic, found)
            })
            .collect(),
        None => {
            let mut out: Fetched = Vec::new();
            for (topic, partition, committed) in store.group_offsets(group) {
                match out.last_mut() {
                    Some((t, ps)) if *t == topic => ps.push((partition, Some(committed))),
                    _ => out.push((topic, vec![(partition, Some(committed))])),
                }
            }
            out
        }
    }
}
