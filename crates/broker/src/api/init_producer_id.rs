//! InitProducerId for idempotent producers: always a fresh producer id at epoch 0.
//!
//! Kafka's TransactionCoordinator.handleInitProducerId "blindly accepts" a request
//! without a transactional id and hands out a new id, even when the KIP-360 form
//! (v3+, the producer's current id and epoch) is sent: an idempotent producer
//! bumping its epoch gets a new id, and its sequences start again at 0 everywhere.
//! A request naming only one of id and epoch is malformed (KafkaApis answers
//! INVALID_REQUEST). Transactional ids are refused until transactions exist.

use protocol::kafka_protocol::messages::{
    InitProducerIdRequest, InitProducerIdResponse, ProducerId,
};
use protocol::ResponseError;

use super::code;
use crate::Broker;

pub fn handle(broker: &Broker, request: InitProducerIdRequest) -> InitProducerIdResponse {
    let response = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if request.transactional_id.is_some() {
        return response.with_error_code(code(ResponseError::UnsupportedVersion));
    }
    if (request.producer_id.0 == -1) != (request.producer_epoch == -1) {
        return response.with_error_code(code(ResponseError::InvalidRequest));
    }
    match broker.producer_ids.next() {
        Ok(id) => response
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(0),
        Err(e) => {
            tracing::error!(error = %e, "cannot reserve producer ids");
            response.with_error_code(code(ResponseError::KafkaStorageError))
        }
    }
}
