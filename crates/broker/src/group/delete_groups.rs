//! DeleteGroups v0-v2: an Empty group goes, with its committed offsets (a group
//! tombstone in the offsets log, durable before the answer); a group with members
//! is NON_EMPTY_GROUP.

use std::sync::Arc;

use protocol::kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use protocol::kafka_protocol::messages::{DeleteGroupsRequest, DeleteGroupsResponse};
use protocol::ResponseError;

use super::OffsetChange;
use crate::api::{code, Reply};
use crate::Broker;

pub fn handle(broker: &Arc<Broker>, request: DeleteGroupsRequest) -> Reply {
    let mut results = Vec::with_capacity(request.groups_names.len());
    let mut tombstones = Vec::new();
    for id in request.groups_names {
        let result = broker.groups.delete(&id.0);
        if result.is_ok() && broker.groups.offsets().has_offsets(&id.0) {
            tombstones.push(OffsetChange::DeleteGroup {
                group: id.0.to_string(),
            });
        }
        results.push(
            DeletableGroupResult::default()
                .with_group_id(id)
                .with_error_code(result.err().map_or(0, code)),
        );
    }
    let mut response = DeleteGroupsResponse::default().with_results(results);
    if tombstones.is_empty() {
        return Reply::Now(Some(response.into()));
    }
    let deleted: Vec<String> = tombstones
        .iter()
        .map(|t| match t {
            OffsetChange::DeleteGroup { group } => group.clone(),
            _ => unreachable!("only group tombstones here"),
        })
        .collect();
    // In the request's turn (dispatched as Reply::InOrder); only the fsync waits.
    let now_ms = broker.now_ms();
    let appended = broker.groups.offsets().append(tombstones, now_ms);
    let broker = broker.clone();
    Reply::Later(Box::pin(async move {
        let offsets = broker.groups.offsets();
        let durable = offsets.durable(&broker.flusher, appended, now_ms).await;
        if let Err(e) = durable {
            tracing::error!(groups = ?deleted, error = %e, "group deletion could not be made durable");
            for r in &mut response.results {
                if r.error_code == 0 && deleted.iter().any(|g| **g == *r.group_id.0) {
                    r.error_code = code(ResponseError::CoordinatorNotAvailable);
                }
            }
        }
        Some(response.into())
    }))
}
