//! AddPartitionsToTxn v0-v3: the partitions a transactional producer is about to
//! write to join its open transaction (opening it), before any batch goes there.
//! Every partition must exist; when one does not, nothing is added and the others
//! answer `OPERATION_NOT_ATTEMPTED`, as Kafka answers.

use protocol::kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use protocol::kafka_protocol::messages::{AddPartitionsToTxnRequest, AddPartitionsToTxnResponse};
use protocol::ResponseError;

use super::for_version;
use crate::api::code;
use crate::Broker;

/// The first version that may be told `PRODUCER_FENCED`.
const FENCED_SINCE: i16 = 2;

pub fn handle(
    broker: &Broker,
    request: AddPartitionsToTxnRequest,
    version: i16,
) -> AddPartitionsToTxnResponse {
    let wanted: Vec<(String, i32, bool)> = request
        .v3_and_below_topics
        .iter()
        .flat_map(|t| {
            let topic = broker.topics.get(&t.name.0);
            t.partitions.iter().map(move |&p| {
                let exists = topic.as_ref().is_some_and(|t| t.partition(p).is_some());
                (t.name.0.to_string(), p, exists)
            })
        })
        .collect();
    let all_exist = wanted.iter().all(|(_, _, exists)| *exists);
    let outcome = if all_exist {
        broker.txns.add(
            broker,
            &request.v3_and_below_transactional_id.0,
            request.v3_and_below_producer_id.0,
            request.v3_and_below_producer_epoch,
            |meta| {
                meta.partitions
                    .extend(wanted.iter().map(|(t, p, _)| (t.clone(), *p)));
            },
        )
    } else {
        Ok(())
    };
    let error_for = |exists: bool| -> i16 {
        match &outcome {
            _ if !all_exist && !exists => code(ResponseError::UnknownTopicOrPartition),
            _ if !all_exist => code(ResponseError::OperationNotAttempted),
            Ok(()) => 0,
            Err(e) => code(for_version(*e, version, FENCED_SINCE)),
        }
    };
    let results = request
        .v3_and_below_topics
        .into_iter()
        .map(|t| {
            let topic = broker.topics.get(&t.name.0);
            let partitions = t
                .partitions
                .iter()
                .map(|&p| {
                    let exists = topic.as_ref().is_some_and(|t| t.partition(p).is_some());
                    AddPartitionsToTxnPartitionResult::default()
                        .with_partition_index(p)
                        .with_partition_error_code(error_for(exists))
                })
                .collect();
            AddPartitionsToTxnTopicResult::default()
                .with_name(t.name)
                .with_results_by_partition(partitions)
        })
        .collect();
    AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(results)
}
