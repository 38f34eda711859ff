//! FindCoordinator v0-v4: this broker is a single node, so it coordinates every
//! group (key type 0) and every transactional id (key type 1). v4 batches keys.

use protocol::kafka_protocol::messages::find_coordinator_response::Coordinator;
use protocol::kafka_protocol::messages::{
    BrokerId, FindCoordinatorRequest, FindCoordinatorResponse,
};
use protocol::ResponseError;

use crate::api::{code, text};
use crate::Broker;

const KEY_TYPE_GROUP: i8 = 0;
const KEY_TYPE_TRANSACTION: i8 = 1;

pub fn handle(
    broker: &Broker,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let known_type = matches!(request.key_type, KEY_TYPE_GROUP | KEY_TYPE_TRANSACTION);
    let bad_type = || format!("unknown coordinator key type {}", request.key_type);
    if version >= 4 {
        let coordinators = request
            .coordinator_keys
            .iter()
            .map(|key| {
                let c = Coordinator::default().with_key(key.clone());
                if known_type {
                    c.with_node_id(BrokerId(broker.config.node_id))
                        .with_host(text(broker.advertised_host.clone()))
                        .with_port(broker.advertised_port)
                } else {
                    c.with_node_id(BrokerId(-1))
                        .with_port(-1)
                        .with_error_code(code(ResponseError::InvalidRequest))
                        .with_error_message(Some(text(bad_type())))
                }
            })
            .collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    let response = FindCoordinatorResponse::default();
    if !known_type {
        return response
            .with_error_code(code(ResponseError::InvalidRequest))
            .with_error_message((version >= 1).then(|| text(bad_type())))
            .with_node_id(BrokerId(-1))
            .with_port(-1);
    }
    response
        .with_node_id(BrokerId(broker.config.node_id))
        .with_host(text(broker.advertised_host.clone()))
        .with_port(broker.advertised_port)
}
