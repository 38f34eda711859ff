//! JoinGroup v0-v9: the first phase of a rebalance. A new dynamic member on v4+
//! first gets MEMBER_ID_REQUIRED with its id; v5+ static members
//! (`group.instance.id`) keep their place across restarts. The answer waits until
//! the rebalance's join phase completes ([`super::Group::join`]).

use std::sync::Arc;
use std::time::Duration;

use protocol::kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use protocol::kafka_protocol::messages::{JoinGroupRequest, JoinGroupResponse};
use protocol::ResponseError;

use super::{JoinOutcome, JoinRequest, Step};
use crate::api::{code, text, Reply};
use crate::Broker;

/// Times a JoinGroup retries a group that was dropped while it looked it up.
const DEAD_GROUP_RETRIES: usize = 3;

pub fn handle(
    broker: &Arc<Broker>,
    client_id: String,
    client_host: String,
    request: JoinGroupRequest,
    version: i16,
) -> Reply {
    let group_id = request.group_id.0.to_string();
    let member_id = request.member_id.to_string();
    let now = |outcome: JoinOutcome| Reply::Now(Some(response(outcome, version).into()));
    let config = broker.groups.config();
    if group_id.is_empty() {
        return now(JoinOutcome::error(
            &member_id,
            ResponseError::InvalidGroupId,
        ));
    }
    let session_ms = request.session_timeout_ms;
    if session_ms < config.min_session_timeout_ms || session_ms > config.max_session_timeout_ms {
        return now(JoinOutcome::error(
            &member_id,
            ResponseError::InvalidSessionTimeout,
        ));
    }
    // v0 has no rebalance timeout: the session timeout serves as both.
    let rebalance_ms = if version == 0 {
        session_ms
    } else {
        request.rebalance_timeout_ms.max(0)
    };
    let join = JoinRequest {
        member_id: member_id.clone(),
        group_instance_id: if version >= 5 {
            request.group_instance_id.map(|s| s.to_string())
        } else {
            None
        },
        client_id,
        client_host,
        session_timeout: Duration::from_millis(session_ms as u64),
        rebalance_timeout: Duration::from_millis(rebalance_ms as u64),
        protocol_type: request.protocol_type.to_string(),
        protocols: request
            .protocols
            .into_iter()
            .map(|p| (p.name.to_string(), p.metadata))
            .collect(),
        require_known_member_id: version >= 4,
        supports_skip_assignment: version >= 9,
    };
    let mut attempt = 0;
    let step = loop {
        attempt += 1;
        let cell = if member_id.is_empty() {
            match broker.groups.get_or_create(&group_id) {
                Ok(cell) => cell,
                Err(e) => return now(JoinOutcome::error(&member_id, e)),
            }
        } else {
            match broker.groups.get(&group_id) {
                Some(cell) => cell,
                None => {
                    return now(JoinOutcome::error(
                        &member_id,
                        ResponseError::UnknownMemberId,
                    ))
                }
            }
        };
        let step = broker
            .groups
            .with_group(&cell, |g, at, config| g.join(join.clone(), at, config));
        let dropped = matches!(&step, Step::Now(o) if o.error == Some(ResponseError::CoordinatorNotAvailable));
        if dropped && member_id.is_empty() && attempt < DEAD_GROUP_RETRIES {
            continue;
        }
        break step;
    };
    match step {
        Step::Now(outcome) => now(outcome),
        Step::Wait(answer) => Reply::Later(Box::pin(async move {
            // A dropped sender: the member was removed while it waited.
            let outcome = answer
                .await
                .unwrap_or_else(|_| JoinOutcome::error("", ResponseError::UnknownMemberId));
            Some(response(outcome, version).into())
        })),
    }
}

fn response(outcome: JoinOutcome, version: i16) -> JoinGroupResponse {
    // Before v7 the protocol name is not nullable: "" stands for none.
    let protocol_name = match outcome.protocol_name {
        Some(name) => Some(text(name)),
        None if version < 7 => Some(text("")),
        None => None,
    };
    let members = outcome
        .members
        .into_iter()
        .map(|(id, instance, metadata)| {
            JoinGroupResponseMember::default()
                .with_member_id(text(id))
                .with_group_instance_id(if version >= 5 {
                    instance.map(text)
                } else {
                    None
                })
                .with_metadata(metadata)
        })
        .collect();
    JoinGroupResponse::default()
        .with_error_code(outcome.error.map_or(0, code))
        .with_generation_id(outcome.generation_id)
        .with_protocol_type(outcome.protocol_type.map(text))
        .with_protocol_name(protocol_name)
        .with_leader(text(outcome.leader))
        .with_skip_assignment(outcome.skip_assignment && version >= 9)
        .with_member_id(text(outcome.member_id))
        .with_members(members)
}
