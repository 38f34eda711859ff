//! ListGroups v0-v4: every group this broker coordinates; v4 filters by state
//! (case-insensitive, as Kafka parses state names).

use protocol::kafka_protocol::messages::list_groups_response::ListedGroup;
use protocol::kafka_protocol::messages::{GroupId, ListGroupsRequest, ListGroupsResponse};

use crate::api::text;
use crate::Broker;

pub fn handle(broker: &Broker, request: ListGroupsRequest, version: i16) -> ListGroupsResponse {
    let states: Vec<String> = if version >= 4 {
        request
            .states_filter
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect()
    } else {
        Vec::new()
    };
    let mut groups = Vec::new();
    for cell in broker.groups.all() {
        let group = cell.lock();
        let state = group.state.as_str();
        if !states.is_empty() && !states.contains(&state.to_ascii_lowercase()) {
            continue;
        }
        groups.push(
            ListedGroup::default()
                .with_group_id(GroupId(text(group.id.clone())))
                .with_protocol_type(text(group.protocol_type.clone().unwrap_or_default()))
                .with_group_state(text(state)),
        );
    }
    ListGroupsResponse::default().with_groups(groups)
}
