//! DescribeGroups v0-v5: state, protocol and members of each group. As in Kafka,
//! member metadata and assignments are shown only for a Stable group, and an
//! unknown group is described as Dead with no error.

use protocol::kafka_protocol::messages::describe_groups_response::{
    DescribedGroup, DescribedGroupMember,
};
use protocol::kafka_protocol::messages::{DescribeGroupsRequest, DescribeGroupsResponse};

use super::GroupState;
use crate::api::text;
use crate::Broker;

/// READ, DELETE and DESCRIBE, the operations on a group: all allowed (no ACLs).
const GROUP_OPERATIONS: i32 = (1 << 3) | (1 << 6) | (1 << 8);
const OPERATIONS_NOT_REQUESTED: i32 = i32::MIN;

pub fn handle(
    broker: &Broker,
    request: DescribeGroupsRequest,
    version: i16,
) -> DescribeGroupsResponse {
    let operations = if version >= 3 && request.include_authorized_operations {
        GROUP_OPERATIONS
    } else {
        OPERATIONS_NOT_REQUESTED
    };
    let groups = request
        .groups
        .into_iter()
        .map(|id| {
            let described = DescribedGroup::default()
                .with_group_id(id.clone())
                .with_authorized_operations(operations);
            let Some(cell) = broker.groups.get(&id.0) else {
                return described.with_group_state(text(GroupState::Dead.as_str()));
            };
            let group = cell.lock();
            let stable = group.state == GroupState::Stable;
            let protocol = if stable {
                group.protocol_name.clone().unwrap_or_default()
            } else {
                String::new()
            };
            let members = group
                .members
                .values()
                .map(|m| {
                    let member = DescribedGroupMember::default()
                        .with_member_id(text(m.id.clone()))
                        .with_group_instance_id(if version >= 4 {
                            m.group_instance_id.clone().map(text)
                        } else {
                            None
                        })
                        .with_client_id(text(m.client_id.clone()))
                        .with_client_host(text(m.client_host.clone()));
                    if stable {
                        member
                            .with_member_metadata(m.metadata(&protocol))
                            .with_member_assignment(m.assignment.clone())
                    } else {
                        member
                    }
                })
                .collect();
            described
                .with_group_state(text(group.state.as_str()))
                .with_protocol_type(text(group.protocol_type.clone().unwrap_or_default()))
                .with_protocol_data(text(protocol))
                .with_members(members)
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}
