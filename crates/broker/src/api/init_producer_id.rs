//! InitProducerId. Without a transactional id (an idempotent producer): always a
//! fresh producer id at epoch 0. Kafka's TransactionCoordinator.handleInitProducerId
//! "blindly accepts" such a request and hands out a new id, even when the KIP-360
//! form (v3+, the producer's current id and epoch) is sent: an idempotent producer
//! bumping its epoch gets a new id, and its sequences start again at 0 everywhere.
//! With a transactional id: the id's producer id and its next epoch, from the
//! transaction coordinator (`txn`), which aborts a transaction left open.
//! A request naming only one of id and epoch is malformed (KafkaApis answers
//! INVALID_REQUEST).

use protocol::kafka_protocol::messages::{
    InitProducerIdRequest, InitProducerIdResponse, ProducerId,
};
use protocol::ResponseError;

use super::code;
use crate::txn::for_version;
use crate::Broker;

/// The first version that may be told `PRODUCER_FENCED` (KIP-588).
const FENCED_SINCE: i16 = 4;

pub fn handle(
    broker: &Broker,
    request: InitProducerIdRequest,
    version: i16,
) -> InitProducerIdResponse {
    let response = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if (request.producer_id.0 == -1) != (request.producer_epoch == -1) {
        return response.with_error_code(code(ResponseError::InvalidRequest));
    }
    if let Some(id) = request
        .transactional_id
        .as_ref()
        .filter(|id| !id.0.is_empty())
    {
        let current = (request.producer_id.0 != -1)
            .then_some((request.producer_id.0, request.producer_epoch));
        return match broker.txns.init_producer_id(
            broker,
            &id.0,
            request.transaction_timeout_ms,
            current,
        ) {
            Ok((producer_id, epoch)) => response
                .with_producer_id(ProducerId(producer_id))
                .with_producer_epoch(epoch),
            Err(e) => response.with_error_code(code(for_version(e, version, FENCED_SINCE))),
        };
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
