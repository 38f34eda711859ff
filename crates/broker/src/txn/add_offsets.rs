//! AddOffsetsToTxn v0-v3: a group whose offsets the open transaction will commit
//! (`TxnOffsetCommit` follows, to this broker as the group's coordinator).

use protocol::kafka_protocol::messages::{AddOffsetsToTxnRequest, AddOffsetsToTxnResponse};

use super::for_version;
use crate::api::code;
use crate::Broker;

const FENCED_SINCE: i16 = 2;

pub fn handle(
    broker: &Broker,
    request: AddOffsetsToTxnRequest,
    version: i16,
) -> AddOffsetsToTxnResponse {
    let group = request.group_id.0.to_string();
    let outcome = broker.txns.add(
        broker,
        &request.transactional_id.0,
        request.producer_id.0,
        request.producer_epoch,
        |meta| {
            meta.groups.insert(group);
        },
    );
    AddOffsetsToTxnResponse::default().with_error_code(
        outcome.map_or_else(|e| code(for_version(e, version, FENCED_SINCE)), |()| 0),
    )
}
