//! Heartbeat v0-v4: keeps a member's session alive and tells it when a rebalance
//! has begun (REBALANCE_IN_PROGRESS).

use protocol::kafka_protocol::messages::{HeartbeatRequest, HeartbeatResponse};
use protocol::ResponseError;

use crate::api::code;
use crate::Broker;

pub fn handle(broker: &Broker, request: HeartbeatRequest, version: i16) -> HeartbeatResponse {
    let group_id = request.group_id.0.to_string();
    let result = if group_id.is_empty() {
        Err(ResponseError::InvalidGroupId)
    } else {
        match broker.groups.get(&group_id) {
            None => Err(ResponseError::UnknownMemberId),
            Some(cell) => {
                let instance_id = if version >= 3 {
                    request.group_instance_id.as_deref()
                } else {
                    None
                };
                broker.groups.with_group(&cell, |g, at, _| {
                    g.heartbeat(&request.member_id, instance_id, request.generation_id, at)
                })
            }
        }
    };
    HeartbeatResponse::default().with_error_code(result.err().map_or(0, code))
}
