//! LeaveGroup v0-v5: members leave at once instead of waiting for their session to
//! expire; v3+ removes several members (by member id, or by group instance id for
//! administrative removal of static members).

use protocol::kafka_protocol::messages::leave_group_response::MemberResponse;
use protocol::kafka_protocol::messages::{LeaveGroupRequest, LeaveGroupResponse};
use protocol::ResponseError;

use super::GroupState;
use crate::api::{code, text};
use crate::Broker;

pub fn handle(broker: &Broker, request: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
    let leaving: Vec<(String, Option<String>)> = if version >= 3 {
        request
            .members
            .iter()
            .map(|m| {
                (
                    m.member_id.to_string(),
                    m.group_instance_id.as_ref().map(|s| s.to_string()),
                )
            })
            .collect()
    } else {
        vec![(request.member_id.to_string(), None)]
    };
    let group_id = request.group_id.0.to_string();
    let (top, results): (Option<ResponseError>, Vec<Result<(), ResponseError>>) =
        if group_id.is_empty() {
            (Some(ResponseError::InvalidGroupId), Vec::new())
        } else {
            match broker.groups.get(&group_id) {
                None => (
                    None,
                    leaving
                        .iter()
                        .map(|_| Err(ResponseError::UnknownMemberId))
                        .collect(),
                ),
                Some(cell) => broker.groups.with_group(&cell, |g, at, config| {
                    if g.state == GroupState::Dead {
                        return (Some(ResponseError::CoordinatorNotAvailable), Vec::new());
                    }
                    let results = leaving
                        .iter()
                        .map(|(id, instance)| g.leave(id, instance.as_deref(), at, config))
                        .collect();
                    (None, results)
                }),
            }
        };
    if version < 3 {
        // One member: its error is the answer's.
        let error = top.or_else(|| results.iter().find_map(|r| r.err()));
        return LeaveGroupResponse::default().with_error_code(error.map_or(0, code));
    }
    let members = leaving
        .into_iter()
        .zip(results)
        .map(|((id, instance), result)| {
            MemberResponse::default()
                .with_member_id(text(id))
                .with_group_instance_id(instance.map(text))
                .with_error_code(result.err().map_or(0, code))
        })
        .collect();
    LeaveGroupResponse::default()
        .with_error_code(top.map_or(0, code))
        .with_members(members)
}
