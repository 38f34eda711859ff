//! DescribeCluster: this one broker, which is also the controller.

use protocol::kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use protocol::kafka_protocol::messages::{
    BrokerId, DescribeClusterRequest, DescribeClusterResponse,
};

use super::text;
use crate::Broker;

/// DescribeCluster v1 `endpoint_type`: brokers (not controllers).
const ENDPOINT_TYPE_BROKERS: i8 = 1;

pub fn handle(broker: &Broker, _request: DescribeClusterRequest) -> DescribeClusterResponse {
    DescribeClusterResponse::default()
        .with_endpoint_type(ENDPOINT_TYPE_BROKERS)
        .with_cluster_id(text(broker.cluster_id.clone()))
        .with_controller_id(BrokerId(broker.config.node_id))
        .with_cluster_authorized_operations(i32::MIN)
        .with_brokers(vec![DescribeClusterBroker::default()
            .with_broker_id(BrokerId(broker.config.node_id))
            .with_host(text(broker.advertised_host.clone()))
            .with_port(broker.advertised_port)])
}
