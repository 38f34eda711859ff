//! A connection's requests take effect in the order they were sent (ARCHITECTURE.md),
//! even when the client pipelines them: each test sends many state-changing
//! requests on one connection before reading any answer, on a multi-threaded
//! runtime (where work started out of turn really does run out of turn), and checks
//! the state they leave: the last request's, as if they had run one at a time.
//! Several rounds each, since an ordering bug shows up by chance.

mod common;

use broker::BrokerConfig;
use common::*;
use protocol::kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use protocol::kafka_protocol::messages::create_topics_request::CreatableTopic;
use protocol::kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use protocol::kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use protocol::kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use protocol::kafka_protocol::messages::*;
use protocol::kafka_protocol::protocol::StrBytes;

const ROUNDS: usize = 5;

fn commit(group: &str, topic: &str, offset: i64) -> OffsetCommitRequest {
    OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.into())))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(topic_name(topic))
            .with_partitions(vec![OffsetCommitRequestPartition::default()
                .with_partition_index(0)
                .with_committed_offset(offset)
                .with_committed_leader_epoch(-1)])])
}

async fn committed(client: &mut Client, group: &str, topic: &str) -> i64 {
    let request = OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.into())))
        .with_topics(Some(vec![OffsetFetchRequestTopic::default()
            .with_name(topic_name(topic))
            .with_partition_indexes(vec![0])]));
    let response = client.call(request, 7).await;
    assert_eq!(response.error_code, 0);
    let p = &response.topics[0].partitions[0];
    assert_eq!(p.error_code, 0);
    p.committed_offset
}

/// The scenario: a consumer committing asynchronously after every record.
/// Every commit is answered, and the committed offset is the last one sent, now and
/// after a restart (the log holds them in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_offset_commits_leave_the_last_one_sent() {
    const COMMITS: i64 = 300;
    let mut dir = tempfile::tempdir().unwrap();
    for round in 0..ROUNDS {
        let broker = TestBroker::start_in(dir, BrokerConfig::default()).await;
        let mut client = Client::connect(broker.addr).await;
        let topic = format!("t{round}");
        create_topic(&mut client, &topic, 1).await;
        for offset in 1..=COMMITS {
            client.send_request(commit("g", &topic, offset), 8).await;
        }
        for offset in 1..=COMMITS {
            let response = client.receive::<OffsetCommitRequest>(8).await;
            let code = response.topics[0].partitions[0].error_code;
            assert_eq!(code, 0, "round {round}: commit of {offset} answered {code}");
        }
        assert_eq!(
            committed(&mut client, "g", &topic).await,
            COMMITS,
            "round {round}: an earlier commit overwrote a later one"
        );
        drop(client);
        dir = broker.stop().await;
        let broker = TestBroker::start_in(dir, BrokerConfig::default()).await;
        let mut client = Client::connect(broker.addr).await;
        assert_eq!(
            committed(&mut client, "g", &topic).await,
            COMMITS,
            "round {round}: after a restart"
        );
        drop(client);
        dir = broker.stop().await;
    }
}

/// Commit, delete, commit, ... of one offset: the last request decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_commits_and_offset_deletes_apply_in_order() {
    use protocol::kafka_protocol::messages::offset_delete_request::{
        OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
    };
    let broker = TestBroker::start(BrokerConfig::default()).await;
    let mut client = Client::connect(broker.addr).await;
    create_topic(&mut client, "t", 1).await;
    let delete = || {
        OffsetDeleteRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_topics(vec![OffsetDeleteRequestTopic::default()
                .with_name(topic_name("t"))
                .with_partitions(vec![
                    OffsetDeleteRequestPartition::default().with_partition_index(0)
                ])])
    };
    for round in 0..ROUNDS as i64 * 20 {
        // Ends with a commit on even rounds, with a deletion on odd ones.
        for i in 0..10 {
            client
                .send_request(commit("g", "t", round * 100 + i), 8)
                .await;
            if i < 9 || round % 2 == 1 {
                client.send_request(delete(), 0).await;
            }
        }
        for i in 0..10 {
            let r = client.receive::<OffsetCommitRequest>(8).await;
            let code = r.topics[0].partitions[0].error_code;
            assert_eq!(code, 0, "round {round}: commit {i}");
            if i < 9 || round % 2 == 1 {
                let r = client.receive::<OffsetDeleteRequest>(0).await;
                assert_eq!(r.error_code, 0, "round {round}: deletion {i}");
            }
        }
        let expected = if round % 2 == 0 { round * 100 + 9 } else { -1 };
        assert_eq!(
            committed(&mut client, "g", "t").await,
            expected,
            "round {round}"
        );
    }
    broker.stop().await;
}

/// CreatePartitions to 2, 3, ..., 20: each is valid only after the one before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_partition_increases_all_succeed() {
    let broker = TestBroker::start(BrokerConfig::default()).await;
    let mut client = Client::connect(broker.addr).await;
    for round in 0..ROUNDS {
        let topic = format!("p{round}");
        create_topic(&mut client, &topic, 1).await;
        for count in 2..=20 {
            let request = CreatePartitionsRequest::default()
                .with_timeout_ms(5000)
                .with_topics(vec![CreatePartitionsTopic::default()
                    .with_name(topic_name(&topic))
                    .with_count(count)
                    .with_assignments(None)]);
            client.send_request(request, 3).await;
        }
        for count in 2..=20 {
            let r = client.receive::<CreatePartitionsRequest>(3).await;
            assert_eq!(
                r.results[0].error_code, 0,
                "round {round}: increase to {count}: {:?}",
                r.results[0].error_message
            );
        }
        let t = broker.broker.topics.get(&topic).unwrap();
        assert_eq!(t.partition_count(), 20);
    }
    broker.stop().await;
}

/// Create, delete, create, ... of one topic name, then a config set to 1, 2, ...:
/// every request succeeds and the last one's value stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_admin_requests_apply_in_order() {
    let broker = TestBroker::start(BrokerConfig::default()).await;
    let mut client = Client::connect(broker.addr).await;
    for round in 0..ROUNDS {
        let topic = format!("a{round}");
        let create = || {
            CreateTopicsRequest::default().with_topics(vec![CreatableTopic::default()
                .with_name(topic_name(&topic))
                .with_num_partitions(1)
                .with_replication_factor(1)])
        };
        let delete = || DeleteTopicsRequest::default().with_topic_names(vec![topic_name(&topic)]);
        for _ in 0..10 {
            client.send_request(create(), 7).await;
            client.send_request(delete(), 5).await;
        }
        client.send_request(create(), 7).await;
        const CONFIGS: i64 = 30;
        for value in 1..=CONFIGS {
            let request = IncrementalAlterConfigsRequest::default().with_resources(vec![
                AlterConfigsResource::default()
                    .with_resource_type(2)
                    .with_resource_name(StrBytes::from_string(topic.clone()))
                    .with_configs(vec![AlterableConfig::default()
                        .with_name(StrBytes::from_static_str("retention.ms"))
                        .with_config_operation(0)
                        .with_value(Some(StrBytes::from_string(
                            (value * 60_000).to_string(),
                        )))]),
            ]);
            client.send_request(request, 1).await;
        }
        for i in 0..10 {
            let r = client.receive::<CreateTopicsRequest>(7).await;
            assert_eq!(r.topics[0].error_code, 0, "round {round}: create {i}");
            let r = client.receive::<DeleteTopicsRequest>(5).await;
            assert_eq!(r.responses[0].error_code, 0, "round {round}: delete {i}");
        }
        let r = client.receive::<CreateTopicsRequest>(7).await;
        assert_eq!(r.topics[0].error_code, 0, "round {round}: last create");
        for value in 1..=CONFIGS {
            let r = client.receive::<IncrementalAlterConfigsRequest>(1).await;
            assert_eq!(
                r.responses[0].error_code, 0,
                "round {round}: config {value}"
            );
        }
        let t = broker
            .broker
            .topics
            .get(&topic)
            .expect("the last create stands");
        assert_eq!(
            t.config().overrides.get("retention.ms").map(String::as_str),
            Some((CONFIGS * 60_000).to_string().as_str()),
            "round {round}"
        );
    }
    broker.stop().await;
}
