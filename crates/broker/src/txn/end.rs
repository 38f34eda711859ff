//! EndTxn v0-v3: commit or abort the open transaction. Answered once every
//! partition's marker is fsync'd and a commit's offsets are durable (see the
//! module doc of `txn`). Runs in the request's turn on the blocking pool.

use protocol::kafka_protocol::messages::{EndTxnRequest, EndTxnResponse};

use super::for_version;
use crate::api::code;
use crate::Broker;

const FENCED_SINCE: i16 = 2;

pub fn handle(broker: &Broker, request: EndTxnRequest, version: i16) -> EndTxnResponse {
    let outcome = broker.txns.end(
        broker,
        &request.transactional_id.0,
        request.producer_id.0,
        request.producer_epoch,
        request.committed,
    );
    EndTxnResponse::default().with_error_code(
        outcome.map_or_else(|e| code(for_version(e, version, FENCED_SINCE)), |()| 0),
    )
}
