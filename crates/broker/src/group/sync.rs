//! SyncGroup v0-v5: the second phase of a rebalance. The leader sends every
//! member's assignment; followers wait for it. v5 checks protocol type and name.

use std::sync::Arc;

use bytes::Bytes;
use protocol::kafka_protocol::messages::{SyncGroupRequest, SyncGroupResponse};
use protocol::ResponseError;

use super::{Step, SyncOutcome, SyncRequest};
use crate::api::{code, text, Reply};
use crate::Broker;

pub fn handle(broker: &Arc<Broker>, request: SyncGroupRequest, version: i16) -> Reply {
    let now = |outcome: SyncOutcome| Reply::Now(Some(response(outcome, version).into()));
    let group_id = request.group_id.0.to_string();
    if group_id.is_empty() {
        return now(Err(ResponseError::InvalidGroupId));
    }
    let Some(cell) = broker.groups.get(&group_id) else {
        return now(Err(ResponseError::UnknownMemberId));
    };
    let member_id = request.member_id.to_string();
    let instance_id = if version >= 3 {
        request.group_instance_id.map(|s| s.to_string())
    } else {
        None
    };
    let (ptype, pname) = if version >= 5 {
        (
            request.protocol_type.map(|s| s.to_string()),
            request.protocol_name.map(|s| s.to_string()),
        )
    } else {
        (None, None)
    };
    let assignments: Vec<(String, Bytes)> = request
        .assignments
        .into_iter()
        .map(|a| (a.member_id.to_string(), a.assignment))
        .collect();
    let sync = SyncRequest {
        member_id,
        group_instance_id: instance_id,
        generation_id: request.generation_id,
        protocol_type: ptype,
        protocol_name: pname,
        assignments,
    };
    let step = broker.groups.with_group(&cell, |g, at, _| g.sync(sync, at));
    match step {
        Step::Now(outcome) => now(outcome),
        Step::Wait(answer) => Reply::Later(Box::pin(async move {
            let outcome = answer.await.unwrap_or(Err(ResponseError::UnknownMemberId));
            Some(response(outcome, version).into())
        })),
    }
}

fn response(outcome: SyncOutcome, version: i16) -> SyncGroupResponse {
    match outcome {
        Ok((ptype, pname, assignment)) => SyncGroupResponse::default()
            .with_protocol_type(if version >= 5 { ptype.map(text) } else { None })
            .with_protocol_name(if version >= 5 { pname.map(text) } else { None })
            .with_assignment(assignment),
        Err(e) => SyncGroupResponse::default().with_error_code(code(e)),
    }
}
