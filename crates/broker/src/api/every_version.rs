//! Every handler, at every version `SUPPORTED` advertises, answers a realistic
//! request with a response that encodes at that version. kafka-protocol refuses to
//! encode a field the version does not have when it is set to a non-default value,
//! which would close the client's connection; this finds such fields.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use protocol::codec::{encode_response, Request};
use protocol::kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use protocol::kafka_protocol::messages::create_topics_request::{
    CreatableTopic, CreatableTopicConfig,
};
use protocol::kafka_protocol::messages::delete_records_request::{
    DeleteRecordsPartition, DeleteRecordsTopic,
};
use protocol::kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use protocol::kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use protocol::kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use protocol::kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use protocol::kafka_protocol::messages::list_offsets_request::{
    ListOffsetsPartition, ListOffsetsTopic,
};
use protocol::kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use protocol::kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use protocol::kafka_protocol::messages::*;
use protocol::kafka_protocol::protocol::StrBytes;
use protocol::record_batch::build_simple_batch;
use protocol::{ApiKey, RequestKind};

use super::{dispatch, Reply, SUPPORTED};
use crate::{Broker, BrokerConfig, SystemClock};

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn requests(api: ApiKey, version: i16) -> Vec<RequestKind> {
    let topic = |n: &str| name(n);
    match api {
        ApiKey::ApiVersions => vec![ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("test"))
            .with_client_software_version(StrBytes::from_static_str("1.0"))
            .into()],
        ApiKey::Metadata => vec![
            MetadataRequest::default()
                .with_topics(if version == 0 { Some(vec![]) } else { None })
                .into(),
            MetadataRequest::default()
                .with_allow_auto_topic_creation(true)
                .with_topics(Some(vec![
                    MetadataRequestTopic::default().with_name(Some(topic("t"))),
                    MetadataRequestTopic::default().with_name(Some(topic("auto"))),
                    MetadataRequestTopic::default().with_name(Some(topic("bad/name"))),
                ]))
                .into(),
        ],
        ApiKey::Produce => vec![ProduceRequest::default()
            .with_acks(-1)
            .with_timeout_ms(1000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(topic("t"))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(Bytes::from(build_simple_batch(1, &[b"x"])))),
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(Bytes::from_static(b"junk"))),
                    PartitionProduceData::default()
                        .with_index(9)
                        .with_records(None),
                ])])
            .into()],
        ApiKey::Fetch => vec![FetchRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_max_bytes(1 << 20)
            .with_session_epoch(-1)
            .with_topics(vec![
                FetchTopic::default()
                    .with_topic(topic("t"))
                    .with_partitions(vec![
                        FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(0)
                            .with_partition_max_bytes(1 << 20),
                        FetchPartition::default()
                            .with_partition(0)
                            .with_fetch_offset(999),
                    ]),
                FetchTopic::default()
                    .with_topic(topic("missing"))
                    .with_partitions(vec![FetchPartition::default().with_partition(0)]),
            ])
            .into()],
        ApiKey::ListOffsets => vec![ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![ListOffsetsTopic::default()
                .with_name(topic("t"))
                .with_partitions(
                    [-1i64, -2, 0, 5_000]
                        .into_iter()
                        .map(|ts| {
                            ListOffsetsPartition::default()
                                .with_partition_index(0)
                                .with_timestamp(ts)
                        })
                        .collect(),
                )])
            .into()],
        ApiKey::CreateTopics => vec![CreateTopicsRequest::default()
            .with_validate_only(version % 2 == 0)
            .with_topics(vec![
                CreatableTopic::default()
                    .with_name(topic(&format!("new{version}")))
                    .with_num_partitions(2)
                    .with_replication_factor(1)
                    .with_configs(vec![CreatableTopicConfig::default()
                        .with_name(StrBytes::from_static_str("retention.ms"))
                        .with_value(Some(StrBytes::from_static_str("1000")))]),
                CreatableTopic::default()
                    .with_name(topic("t"))
                    .with_num_partitions(1)
                    .with_replication_factor(1),
                CreatableTopic::default()
                    .with_name(topic("x"))
                    .with_num_partitions(1)
                    .with_replication_factor(3),
            ])
            .into()],
        ApiKey::DeleteTopics => vec![DeleteTopicsRequest::default()
            .with_topic_names(vec![topic("gone"), topic("never")])
            .with_topics(vec![
                DeleteTopicState::default().with_name(Some(topic("gone"))),
                DeleteTopicState::default().with_name(Some(topic("never"))),
            ])
            .into()],
        ApiKey::CreatePartitions => vec![CreatePartitionsRequest::default()
            .with_validate_only(true)
            .with_topics(vec![
                CreatePartitionsTopic::default()
                    .with_name(topic("t"))
                    .with_count(4),
                CreatePartitionsTopic::default()
                    .with_name(topic("t"))
                    .with_count(1),
            ])
            .into()],
        ApiKey::DescribeConfigs => vec![DescribeConfigsRequest::default()
            .with_include_synonyms(true)
            .with_include_documentation(version >= 3)
            .with_resources(vec![
                DescribeConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(StrBytes::from_static_str("t")),
                DescribeConfigsResource::default()
                    .with_resource_type(4)
                    .with_resource_name(StrBytes::from_static_str("0")),
                DescribeConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(StrBytes::from_static_str("missing")),
            ])
            .into()],
        ApiKey::IncrementalAlterConfigs => vec![IncrementalAlterConfigsRequest::default()
            .with_resources(vec![AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(StrBytes::from_static_str("t"))
                .with_configs(vec![AlterableConfig::default()
                    .with_name(StrBytes::from_static_str("retention.ms"))
                    .with_config_operation(0)
                    .with_value(Some(StrBytes::from_static_str("60000")))])])
            .into()],
        ApiKey::AlterConfigs => vec![AlterConfigsRequest::default()
            .with_resources(vec![alter_configs_request::AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(StrBytes::from_static_str("t"))
                .with_configs(vec![alter_configs_request::AlterableConfig::default()
                    .with_name(StrBytes::from_static_str("no.such.config"))
                    .with_value(Some(StrBytes::from_static_str("1")))])])
            .into()],
        ApiKey::DeleteRecords => vec![DeleteRecordsRequest::default()
            .with_topics(vec![DeleteRecordsTopic::default()
                .with_name(topic("t"))
                .with_partitions(vec![
                    DeleteRecordsPartition::default()
                        .with_partition_index(0)
                        .with_offset(0),
                    DeleteRecordsPartition::default()
                        .with_partition_index(0)
                        .with_offset(1_000),
                ])])
            .into()],
        ApiKey::DescribeCluster => vec![DescribeClusterRequest::default().into()],
        ApiKey::DescribeLogDirs => vec![
            DescribeLogDirsRequest::default().with_topics(None).into(),
            DescribeLogDirsRequest::default()
                .with_topics(Some(vec![
                    describe_log_dirs_request::DescribableLogDirTopic::default()
                        .with_topic(name("t"))
                        .with_partitions(vec![0, 7]),
                    describe_log_dirs_request::DescribableLogDirTopic::default()
                        .with_topic(name("missing"))
                        .with_partitions(vec![0]),
                ]))
                .into(),
        ],
        ApiKey::InitProducerId => vec![
            InitProducerIdRequest::default()
                .with_transactional_id(None)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
                .into(),
            InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("tx"))))
                .with_transaction_timeout_ms(60_000)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
                .into(),
            InitProducerIdRequest::default()
                .with_transactional_id(Some(TransactionalId(StrBytes::from_static_str("tx"))))
                .with_transaction_timeout_ms(i32::MAX)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1)
                .into(),
        ],
        ApiKey::AddPartitionsToTxn => [("t", 0), ("missing", 0)]
            .into_iter()
            .map(|(t, p)| {
                AddPartitionsToTxnRequest::default()
                    .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_static_str(
                        "tx",
                    )))
                    .with_v3_and_below_producer_id(ProducerId(999))
                    .with_v3_and_below_producer_epoch(0)
                    .with_v3_and_below_topics(vec![
                        add_partitions_to_txn_request::AddPartitionsToTxnTopic::default()
                            .with_name(topic(t))
                            .with_partitions(vec![p]),
                    ])
                    .into()
            })
            .collect(),
        ApiKey::AddOffsetsToTxn => vec![AddOffsetsToTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_static_str("tx")))
            .with_producer_id(ProducerId(999))
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .into()],
        ApiKey::EndTxn => vec![EndTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_static_str("tx")))
            .with_producer_id(ProducerId(999))
            .with_committed(true)
            .into()],
        ApiKey::TxnOffsetCommit => vec![TxnOffsetCommitRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_static_str("tx")))
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_producer_id(ProducerId(999))
            .with_generation_id(-1)
            .with_topics(vec![
                txn_offset_commit_request::TxnOffsetCommitRequestTopic::default()
                    .with_name(topic("t"))
                    .with_partitions(vec![
                        txn_offset_commit_request::TxnOffsetCommitRequestPartition::default()
                            .with_committed_offset(1),
                    ]),
            ])
            .into()],
        ApiKey::FindCoordinator => vec![
            FindCoordinatorRequest::default()
                .with_key(if version < 4 {
                    StrBytes::from_static_str("g")
                } else {
                    StrBytes::default()
                })
                .with_coordinator_keys(if version >= 4 {
                    vec![StrBytes::from_static_str("g")]
                } else {
                    vec![]
                })
                .into(),
            FindCoordinatorRequest::default()
                .with_key_type(if version >= 1 { 9 } else { 0 })
                .with_key(if version < 4 {
                    StrBytes::from_static_str("g")
                } else {
                    StrBytes::default()
                })
                .with_coordinator_keys(if version >= 4 {
                    vec![StrBytes::from_static_str("g")]
                } else {
                    vec![]
                })
                .into(),
        ],
        ApiKey::JoinGroup => {
            let join = |session_ms| {
                JoinGroupRequest::default()
                    .with_group_id(GroupId(StrBytes::from_static_str("g")))
                    .with_session_timeout_ms(session_ms)
                    .with_rebalance_timeout_ms(10_000)
                    .with_protocol_type(StrBytes::from_static_str("consumer"))
                    .with_protocols(vec![join_group_request::JoinGroupRequestProtocol::default(
                    )
                    .with_name(StrBytes::from_static_str("range"))
                    .with_metadata(Bytes::from_static(b"\0\0\0\0\0\0\0\0"))])
            };
            // Answers that do not wait for a rebalance: a refused session timeout,
            // and from v4 on the MEMBER_ID_REQUIRED round.
            let mut requests = vec![join(1).into()];
            if version >= 4 {
                requests.push(join(10_000).into());
            }
            requests
        }
        ApiKey::SyncGroup => vec![SyncGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_member_id(StrBytes::from_static_str("m"))
            .into()],
        ApiKey::Heartbeat => vec![HeartbeatRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_member_id(StrBytes::from_static_str("m"))
            .into()],
        ApiKey::LeaveGroup => vec![LeaveGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_member_id(if version < 3 {
                StrBytes::from_static_str("m")
            } else {
                StrBytes::default()
            })
            .with_members(if version >= 3 {
                vec![leave_group_request::MemberIdentity::default()
                    .with_member_id(StrBytes::from_static_str("m"))]
            } else {
                vec![]
            })
            .into()],
        ApiKey::OffsetCommit => vec![OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_generation_id_or_member_epoch(-1)
            .with_topics(vec![
                offset_commit_request::OffsetCommitRequestTopic::default()
                    .with_name(topic("t"))
                    .with_partitions(vec![
                        offset_commit_request::OffsetCommitRequestPartition::default()
                            .with_committed_offset(1)
                            .with_committed_metadata(Some(StrBytes::from_static_str("m"))),
                        offset_commit_request::OffsetCommitRequestPartition::default()
                            .with_partition_index(5),
                    ]),
            ])
            .into()],
        ApiKey::OffsetFetch if version >= 8 => vec![OffsetFetchRequest::default()
            .with_groups(vec![
                offset_fetch_request::OffsetFetchRequestGroup::default()
                    .with_group_id(GroupId(StrBytes::from_static_str("g")))
                    .with_topics(None),
                offset_fetch_request::OffsetFetchRequestGroup::default()
                    .with_group_id(GroupId(StrBytes::from_static_str("g")))
                    .with_topics(Some(vec![
                        offset_fetch_request::OffsetFetchRequestTopics::default()
                            .with_name(topic("t"))
                            .with_partition_indexes(vec![0, 1]),
                    ])),
            ])
            .into()],
        ApiKey::OffsetFetch => vec![OffsetFetchRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_topics(if version >= 2 {
                None
            } else {
                Some(vec![
                    offset_fetch_request::OffsetFetchRequestTopic::default()
                        .with_name(topic("t"))
                        .with_partition_indexes(vec![0, 1]),
                ])
            })
            .into()],
        ApiKey::ListGroups => vec![ListGroupsRequest::default()
            .with_states_filter(if version >= 4 {
                vec![StrBytes::from_static_str("Empty")]
            } else {
                vec![]
            })
            .into()],
        ApiKey::DescribeGroups => vec![DescribeGroupsRequest::default()
            .with_groups(vec![
                GroupId(StrBytes::from_static_str("g")),
                GroupId(StrBytes::from_static_str("none")),
            ])
            .with_include_authorized_operations(version >= 3)
            .into()],
        ApiKey::DeleteGroups => vec![DeleteGroupsRequest::default()
            .with_groups_names(vec![
                GroupId(StrBytes::from_static_str("g")),
                GroupId(StrBytes::from_static_str("none")),
            ])
            .into()],
        ApiKey::OffsetDelete => vec![OffsetDeleteRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_topics(vec![
                offset_delete_request::OffsetDeleteRequestTopic::default()
                    .with_name(topic("t"))
                    .with_partitions(vec![
                        offset_delete_request::OffsetDeleteRequestPartition::default(),
                    ]),
            ])
            .into()],
        other => panic!("no sample request for {other:?}: add one"),
    }
}

#[tokio::test]
async fn every_supported_version_encodes() {
    let dir = tempfile::tempdir().unwrap();
    let config = BrokerConfig {
        data_dir: dir.path().to_path_buf(),
        ..BrokerConfig::default()
    };
    let broker = Broker::open(config, "127.0.0.1".into(), 9092, Arc::new(SystemClock)).unwrap();
    let now = broker.now_ms();
    broker
        .topics
        .create("t", 1, Default::default(), &broker.config, now)
        .unwrap();
    for (api, min, max) in SUPPORTED {
        for version in *min..=*max {
            if *api == ApiKey::DeleteTopics {
                let _ = broker
                    .topics
                    .create("gone", 1, Default::default(), &broker.config, now);
            }
            for body in requests(*api, version) {
                let header = RequestHeader::default()
                    .with_request_api_key(*api as i16)
                    .with_request_api_version(version);
                let request = Request {
                    header,
                    api_key: *api,
                    body,
                };
                let mut reply = dispatch(&broker, request, "127.0.0.1:1".parse().unwrap());
                if let Reply::InOrder(work) = reply {
                    reply = work();
                }
                let response = match reply {
                    Reply::Now(r) => r,
                    Reply::Later(f) => f.await,
                    Reply::Holding(f) => f.await.map(|(body, _hold)| body),
                    Reply::InOrder(_) => panic!("{api:?} v{version}: in-order work gave more"),
                };
                let response =
                    response.unwrap_or_else(|| panic!("{api:?} v{version} gave no response"));
                let mut out = BytesMut::new();
                encode_response(1, *api, version, &response, &mut out)
                    .unwrap_or_else(|e| panic!("{api:?} v{version}: {e}"));
            }
        }
    }
}
