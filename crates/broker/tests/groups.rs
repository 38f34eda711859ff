//! The group coordinator driven over real TCP with raw Kafka requests, on a broker
//! served in-process: rebalances step by step with generation checks, the
//! member-id-required round, session expiry, static membership, leave, committed
//! offsets across a restart, delete/list/describe, and groups rebalancing at once.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use broker::group::GroupConfig;
use broker::BrokerConfig;
use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use protocol::kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use protocol::kafka_protocol::messages::leave_group_request::MemberIdentity;
use protocol::kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use protocol::kafka_protocol::messages::offset_delete_request::{
    OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
};
use protocol::kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics,
};
use protocol::kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use protocol::kafka_protocol::messages::*;
use protocol::kafka_protocol::protocol::{Encodable, StrBytes};
use protocol::ResponseError;

// ---- harness (tests/common, with group settings for fast tests) -----------------

/// Session timeouts down to 100 ms and no initial rebalance delay, so that tests
/// run in fractions of a second.
fn fast_groups() -> GroupConfig {
    GroupConfig {
        min_session_timeout_ms: 100,
        initial_rebalance_delay_ms: 0,
        ..GroupConfig::default()
    }
}

async fn start_broker() -> TestBroker {
    start_broker_in(tempfile::tempdir().unwrap(), fast_groups()).await
}

async fn start_broker_in(dir: tempfile::TempDir, groups: GroupConfig) -> TestBroker {
    let setup = Setup {
        groups: Some(groups),
        ..Setup::default()
    };
    TestBroker::start_with(dir, BrokerConfig::default(), setup).await
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn code(e: ResponseError) -> i16 {
    e.code()
}

/// ConsumerProtocol subscription metadata (version 1) for `topics`.
fn subscription(topics: &[&str]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_i16(1);
    ConsumerProtocolSubscription::default()
        .with_topics(topics.iter().map(|t| s(t)).collect())
        .encode(&mut buf, 1)
        .unwrap();
    buf.freeze()
}

#[derive(Clone)]
struct JoinSpec {
    group: String,
    instance: Option<String>,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    session_ms: i32,
    rebalance_ms: i32,
}

impl JoinSpec {
    fn consumer(group: &str, topics: &[&str]) -> JoinSpec {
        JoinSpec {
            group: group.into(),
            instance: None,
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), subscription(topics))],
            session_ms: 10_000,
            rebalance_ms: 10_000,
        }
    }

    fn request(&self, member_id: &str) -> JoinGroupRequest {
        JoinGroupRequest::default()
            .with_group_id(GroupId(s(&self.group)))
            .with_session_timeout_ms(self.session_ms)
            .with_rebalance_timeout_ms(self.rebalance_ms)
            .with_member_id(s(member_id))
            .with_group_instance_id(self.instance.as_deref().map(s))
            .with_protocol_type(s(&self.protocol_type))
            .with_protocols(
                self.protocols
                    .iter()
                    .map(|(n, m)| {
                        JoinGroupRequestProtocol::default()
                            .with_name(s(n))
                            .with_metadata(m.clone())
                    })
                    .collect(),
            )
    }
}

/// A member: its connection and what its last JoinGroup answered.
struct Member {
    client: Client,
    spec: JoinSpec,
    id: String,
    generation: i32,
    join: JoinGroupResponse,
}

impl Member {
    /// Joins as a new member the v9 way: MEMBER_ID_REQUIRED first (dynamic members),
    /// then the real JoinGroup, which waits for the rebalance.
    async fn join_new(addr: SocketAddr, spec: JoinSpec) -> Member {
        let mut client = Client::connect(addr).await;
        let mut id = String::new();
        if spec.instance.is_none() {
            let first = client.call(spec.request(""), 9).await;
            assert_eq!(first.error_code, code(ResponseError::MemberIdRequired));
            assert!(
                first.member_id.starts_with("test-"),
                "member id {}",
                first.member_id.as_str()
            );
            id = first.member_id.to_string();
        }
        let join = client.call(spec.request(&id), 9).await;
        assert_eq!(join.error_code, 0, "join of {id} failed");
        Member {
            client,
            spec,
            id: join.member_id.to_string(),
            generation: join.generation_id,
            join,
        }
    }

    /// Rejoins with its member id (after REBALANCE_IN_PROGRESS).
    async fn rejoin(mut self) -> Member {
        let join = self.client.call(self.spec.request(&self.id), 9).await;
        assert_eq!(join.error_code, 0, "rejoin of {} failed", self.id);
        self.generation = join.generation_id;
        self.join = join;
        self
    }

    fn is_leader(&self) -> bool {
        self.join.leader.as_str() == self.id
    }

    async fn sync(&mut self, assignments: &[(&str, &[u8])]) -> SyncGroupResponse {
        let request = SyncGroupRequest::default()
            .with_group_id(GroupId(s(&self.spec.group)))
            .with_generation_id(self.generation)
            .with_member_id(s(&self.id))
            .with_group_instance_id(self.spec.instance.as_deref().map(s))
            .with_protocol_type(Some(s("consumer")))
            .with_protocol_name(self.join.protocol_name.clone())
            .with_assignments(
                assignments
                    .iter()
                    .map(|(m, a)| {
                        SyncGroupRequestAssignment::default()
                            .with_member_id(s(m))
                            .with_assignment(Bytes::copy_from_slice(a))
                    })
                    .collect(),
            );
        self.client.call(request, 5).await
    }

    async fn heartbeat(&mut self) -> i16 {
        heartbeat(
            &mut self.client,
            &self.spec.group,
            &self.id,
            self.generation,
            self.spec.instance.as_deref(),
        )
        .await
    }
}

async fn heartbeat(
    client: &mut Client,
    group: &str,
    member: &str,
    generation: i32,
    instance: Option<&str>,
) -> i16 {
    let request = HeartbeatRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_generation_id(generation)
        .with_member_id(s(member))
        .with_group_instance_id(instance.map(s));
    client.call(request, 4).await.error_code
}

/// Heartbeats until the answer is REBALANCE_IN_PROGRESS; fails after 5 s.
async fn await_rebalance(
    c: &mut Client,
    group: &str,
    member: &str,
    generation: i32,
    instance: Option<&str>,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let error = heartbeat(c, group, member, generation, instance).await;
        if error == code(ResponseError::RebalanceInProgress) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no rebalance in group {group} after 5 s (last answer {error})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn describe(client: &mut Client, group: &str) -> describe_groups_response::DescribedGroup {
    let r = client
        .call(
            DescribeGroupsRequest::default().with_groups(vec![GroupId(s(group))]),
            5,
        )
        .await;
    r.groups.into_iter().next().unwrap()
}

async fn commit(
    client: &mut Client,
    group: &str,
    member: &str,
    generation: i32,
    offsets: &[(&str, i32, i64, Option<&str>)],
) -> Vec<(String, i32, i16)> {
    let mut topics: Vec<OffsetCommitRequestTopic> = Vec::new();
    for (topic, partition, offset, metadata) in offsets {
        let p = OffsetCommitRequestPartition::default()
            .with_partition_index(*partition)
            .with_committed_offset(*offset)
            .with_committed_leader_epoch(3)
            .with_committed_metadata(metadata.map(s));
        match topics.iter_mut().find(|t| t.name.0.as_str() == *topic) {
            Some(t) => t.partitions.push(p),
            None => topics.push(
                OffsetCommitRequestTopic::default()
                    .with_name(TopicName(s(topic)))
                    .with_partitions(vec![p]),
            ),
        }
    }
    let request = OffsetCommitRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(s(member))
        .with_topics(topics);
    let response = client.call(request, 8).await;
    response
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.name.0.to_string(), p.partition_index, p.error_code))
        })
        .collect()
}

/// OffsetFetch v7 for `partitions` of `topic`: (partition, offset, leader epoch, metadata).
async fn fetch_offsets(
    client: &mut Client,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Vec<(i32, i64, i32, String)> {
    let request = OffsetFetchRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_topics(Some(vec![OffsetFetchRequestTopic::default()
            .with_name(TopicName(s(topic)))
            .with_partition_indexes(partitions.to_vec())]));
    let response = client.call(request, 7).await;
    assert_eq!(response.error_code, 0);
    response.topics[0]
        .partitions
        .iter()
        .map(|p| {
            assert_eq!(p.error_code, 0);
            (
                p.partition_index,
                p.committed_offset,
                p.committed_leader_epoch,
                p.metadata.as_deref().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Forms a group of `n` members of the same generation: each newcomer's join
/// starts a rebalance, which the members already there notice and rejoin.
async fn form_group(addr: SocketAddr, spec: &JoinSpec, n: usize) -> Vec<Member> {
    let mut members = vec![Member::join_new(addr, spec.clone()).await];
    let mut probe = Client::connect(addr).await;
    for _ in 1..n {
        let newcomer = tokio::spawn(Member::join_new(addr, spec.clone()));
        let (id, generation) = (members[0].id.clone(), members[0].generation);
        await_rebalance(
            &mut probe,
            &spec.group,
            &id,
            generation,
            spec.instance.as_deref(),
        )
        .await;
        let rejoins: Vec<_> = members
            .into_iter()
            .map(|m| tokio::spawn(m.rejoin()))
            .collect();
        members = Vec::new();
        for r in rejoins {
            members.push(r.await.unwrap());
        }
        members.push(newcomer.await.unwrap());
        let generation = members[0].generation;
        assert!(members.iter().all(|m| m.generation == generation));
    }
    members
}

// ---- tests ------------------------------------------------------------------------

#[tokio::test]
async fn find_coordinator_answers_this_broker_in_every_version() {
    let broker = start_broker().await;
    let mut client = Client::connect(broker.addr).await;
    for version in 0..=3 {
        let r = client
            .call(
                FindCoordinatorRequest::default()
                    .with_key(s("g"))
                    .with_key_type(0),
                version,
            )
            .await;
        assert_eq!(
            (r.error_code, r.node_id.0, r.host.as_str(), r.port),
            (0, 0, "127.0.0.1", broker.addr.port() as i32)
        );
    }
    let r = client
        .call(
            FindCoordinatorRequest::default()
                .with_key_type(1)
                .with_coordinator_keys(vec![s("a"), s("b")]),
            4,
        )
        .await;
    assert_eq!(r.coordinators.len(), 2);
    for (c, key) in r.coordinators.iter().zip(["a", "b"]) {
        assert_eq!(
            (c.key.as_str(), c.error_code, c.port),
            (key, 0, broker.addr.port() as i32)
        );
    }
    let r = client
        .call(
            FindCoordinatorRequest::default()
                .with_key(s("g"))
                .with_key_type(7),
            3,
        )
        .await;
    assert_eq!(r.error_code, code(ResponseError::InvalidRequest));
    broker.stop().await;
}

#[tokio::test]
async fn three_members_join_sync_and_heartbeat_through_generations() {
    let broker = start_broker().await;
    let addr = broker.addr;
    let spec = JoinSpec::consumer("g3", &["t"]);

    // One member: generation 1, it leads and sees itself.
    let mut m1 = Member::join_new(addr, spec.clone()).await;
    assert_eq!(m1.generation, 1);
    assert!(m1.is_leader());
    assert_eq!(m1.join.members.len(), 1);
    assert_eq!(m1.join.protocol_name.as_deref(), Some("range"));
    assert_eq!(m1.join.protocol_type.as_deref(), Some("consumer"));
    let id1 = m1.id.clone();
    let sync = m1.sync(&[(&id1, b"a1")]).await;
    assert_eq!((sync.error_code, &sync.assignment[..]), (0, &b"a1"[..]));
    assert_eq!(m1.heartbeat().await, 0);
    assert_eq!(
        describe(&mut m1.client, "g3").await.group_state.as_str(),
        "Stable"
    );

    // A second member starts a rebalance: m1 learns of it from its heartbeat.
    let m2 = tokio::spawn(Member::join_new(addr, spec.clone()));
    let mut m1_client_check = Client::connect(addr).await;
    await_rebalance(&mut m1_client_check, "g3", &id1, m1.generation, None).await;
    // A follower-to-be cannot sync in the middle of a rebalance.
    assert_eq!(
        m1.sync(&[]).await.error_code,
        code(ResponseError::RebalanceInProgress)
    );
    let m1 = m1.rejoin().await;
    let m2 = m2.await.unwrap();
    assert_eq!((m1.generation, m2.generation), (2, 2));
    assert!(m1.is_leader() && !m2.is_leader());
    assert_eq!(m1.join.members.len(), 2, "the leader sees every member");
    assert!(m2.join.members.is_empty(), "followers see none");
    assert_eq!(m2.join.leader, m1.join.leader);

    // A third member; m2 still heartbeats with generation 2, a stale generation is
    // refused, and so is an unknown member.
    let m3 = tokio::spawn(Member::join_new(addr, spec.clone()));
    let mut probe = Client::connect(addr).await;
    await_rebalance(&mut probe, "g3", &id1, 2, None).await;
    assert_eq!(
        heartbeat(&mut probe, "g3", &m2.id, 1, None).await,
        code(ResponseError::IllegalGeneration)
    );
    assert_eq!(
        heartbeat(&mut probe, "g3", "nobody", 2, None).await,
        code(ResponseError::UnknownMemberId)
    );
    let (m1, m2) = tokio::join!(m1.rejoin(), m2.rejoin());
    let m3 = m3.await.unwrap();
    let mut members = vec![m1, m2, m3];
    assert!(members.iter().all(|m| m.generation == 3));
    assert_eq!(members.iter().filter(|m| m.is_leader()).count(), 1);
    let leader_at = members.iter().position(Member::is_leader).unwrap();
    assert_eq!(members[leader_at].join.members.len(), 3);

    // Followers' SyncGroup waits for the leader's assignment.
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    let mut leader = members.swap_remove(leader_at);
    let mut waiting: Vec<_> = members
        .into_iter()
        .map(|mut m| {
            tokio::spawn(async move {
                let r = m.sync(&[]).await;
                (m, r)
            })
        })
        .collect();
    // Without the leader's assignment, followers get no answer (a bounded check for
    // an absence, not a synchronisation).
    for w in &mut waiting {
        assert!(
            tokio::time::timeout(Duration::from_millis(300), w)
                .await
                .is_err(),
            "a follower's SyncGroup returned early"
        );
    }
    let assignments: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| (id.clone(), format!("for-{id}").into_bytes()))
        .collect();
    let refs: Vec<(&str, &[u8])> = assignments
        .iter()
        .map(|(i, a)| (i.as_str(), a.as_slice()))
        .collect();
    let r = leader.sync(&refs).await;
    assert_eq!(r.error_code, 0);
    assert_eq!(r.assignment, Bytes::from(format!("for-{}", leader.id)));
    for w in waiting {
        let (mut m, r) = w.await.unwrap();
        assert_eq!(r.error_code, 0);
        assert_eq!(r.assignment, Bytes::from(format!("for-{}", m.id)));
        assert_eq!(r.protocol_name.as_deref(), Some("range"));
        assert_eq!(m.heartbeat().await, 0);
    }
    let described = describe(&mut leader.client, "g3").await;
    assert_eq!(described.group_state.as_str(), "Stable");
    assert_eq!(described.members.len(), 3);
    assert!(described
        .members
        .iter()
        .all(|m| m.client_id.as_str() == "test" && !m.member_assignment.is_empty()));
    broker.stop().await;
}

#[tokio::test]
async fn a_member_that_stops_heartbeating_is_expired_and_the_others_rebalance() {
    let broker = start_broker().await;
    let addr = broker.addr;
    let spec = JoinSpec {
        session_ms: 400,
        rebalance_ms: 5_000,
        ..JoinSpec::consumer("gx", &["t"])
    };
    let mut formed = form_group(addr, &spec, 2).await;
    let mut second = formed.pop().unwrap();
    let mut first = formed.pop().unwrap();
    let generation = first.generation;
    let (leader, follower) = if first.is_leader() {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    let (lid, fid) = (leader.id.clone(), follower.id.clone());
    let follower_sync = {
        let mut c = Client::connect(addr).await;
        let (fid, g) = (fid.clone(), generation);
        tokio::spawn(async move {
            let r = SyncGroupRequest::default()
                .with_group_id(GroupId(s("gx")))
                .with_generation_id(g)
                .with_member_id(s(&fid));
            c.call(r, 3).await.error_code
        })
    };
    assert_eq!(
        leader.sync(&[(&lid, b"x"), (&fid, b"y")]).await.error_code,
        0
    );
    assert_eq!(follower_sync.await.unwrap(), 0);

    // Only the leader keeps heartbeating: the follower expires after 400 ms, and
    // the leader is told to rejoin; it then forms the next generation alone.
    let started = Instant::now();
    let mut told = false;
    while started.elapsed() < Duration::from_secs(5) {
        let e = leader.heartbeat().await;
        if e == code(ResponseError::RebalanceInProgress) {
            told = true;
            break;
        }
        assert_eq!(e, 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(told, "no rebalance after the follower stopped heartbeating");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "expired before its session timeout"
    );
    let mut c = Client::connect(addr).await;
    assert_eq!(
        heartbeat(&mut c, "gx", &fid, generation, None).await,
        code(ResponseError::UnknownMemberId)
    );
    let leader = if first.id == lid { first } else { second };
    let leader = leader.rejoin().await;
    assert_eq!(leader.generation, generation + 1);
    assert_eq!(leader.join.members.len(), 1);
    broker.stop().await;
}

#[tokio::test]
async fn static_member_rejoining_replaces_its_old_id_without_a_rebalance() {
    let broker = start_broker().await;
    let addr = broker.addr;
    let spec_a = JoinSpec {
        instance: Some("host-a".into()),
        ..JoinSpec::consumer("gs", &["t"])
    };
    let spec_b = JoinSpec {
        instance: Some("host-b".into()),
        ..JoinSpec::consumer("gs", &["t"])
    };
    let mut a = Member::join_new(addr, spec_a.clone()).await;
    assert!(a.id.starts_with("host-a-"));
    let ida = a.id.clone();
    assert_eq!(a.sync(&[(&ida, b"A")]).await.error_code, 0);
    let b = tokio::spawn(Member::join_new(addr, spec_b.clone()));
    let mut probe = Client::connect(addr).await;
    await_rebalance(&mut probe, "gs", &ida, 1, Some("host-a")).await;
    let mut a = a.rejoin().await;
    let mut b = b.await.unwrap();
    assert_eq!((a.generation, b.generation), (2, 2));
    let (ida, idb) = (a.id.clone(), b.id.clone());
    let members = &a.join.members;
    assert!(
        members
            .iter()
            .any(|m| m.group_instance_id.as_deref() == Some("host-b")),
        "leader sees instance ids"
    );
    let b_sync = tokio::spawn(async move {
        let r = b.sync(&[]).await;
        (b, r)
    });
    assert_eq!(a.sync(&[(&ida, b"A"), (&idb, b"B")]).await.error_code, 0);
    let (b, r) = b_sync.await.unwrap();
    assert_eq!(&r.assignment[..], b"B");
    drop(b); // "restarts": no LeaveGroup, as a static member does

    // b comes back with an unknown member id and the same instance id: it gets a new
    // member id, the same generation and its assignment, and nobody rebalances.
    let mut b2 = Member::join_new(addr, spec_b.clone()).await;
    assert_ne!(b2.id, idb);
    assert_eq!(b2.generation, 2);
    assert_ne!(b2.join.leader.as_str(), b2.id, "a follower");
    assert_eq!(a.heartbeat().await, 0, "no rebalance for a static rejoin");
    let r = b2.sync(&[]).await;
    assert_eq!((r.error_code, &r.assignment[..]), (0, &b"B"[..]));
    assert_eq!(b2.heartbeat().await, 0);
    // The old member id is fenced.
    let mut c = Client::connect(addr).await;
    assert_eq!(
        heartbeat(&mut c, "gs", &idb, 2, Some("host-b")).await,
        code(ResponseError::FencedInstanceId)
    );
    assert_eq!(
        heartbeat(&mut c, "gs", &idb, 2, None).await,
        code(ResponseError::UnknownMemberId)
    );

    // An administrator removes the static member by instance id (LeaveGroup v3+).
    let leave = LeaveGroupRequest::default()
        .with_group_id(GroupId(s("gs")))
        .with_members(vec![
            MemberIdentity::default()
                .with_member_id(s(""))
                .with_group_instance_id(Some(s("host-b"))),
            MemberIdentity::default()
                .with_member_id(s(""))
                .with_group_instance_id(Some(s("host-z"))),
        ]);
    let r = c.call(leave, 5).await;
    assert_eq!(r.error_code, 0);
    assert_eq!(
        r.members.iter().map(|m| m.error_code).collect::<Vec<_>>(),
        vec![0, code(ResponseError::UnknownMemberId)]
    );
    assert_eq!(
        a.heartbeat().await,
        code(ResponseError::RebalanceInProgress)
    );
    broker.stop().await;
}

#[tokio::test]
async fn leaving_members_trigger_a_rebalance_and_an_empty_group_remains_with_its_offsets() {
    let broker = start_broker().await;
    let addr = broker.addr;
    let mut admin = Client::connect(addr).await;
    create_topic(&mut admin, "lt", 2).await;
    let spec = JoinSpec::consumer("gl", &["lt"]);
    let mut a = Member::join_new(addr, spec.clone()).await;
    let ida = a.id.clone();
    assert_eq!(a.sync(&[(&ida, b"all")]).await.error_code, 0);
    let errors = commit(
        &mut a.client,
        "gl",
        &ida,
        a.generation,
        &[("lt", 0, 5, None)],
    )
    .await;
    assert_eq!(errors, vec![("lt".into(), 0, 0)]);
    let b = tokio::spawn(Member::join_new(addr, spec.clone()));
    let mut probe = Client::connect(addr).await;
    await_rebalance(&mut probe, "gl", &ida, 1, None).await;
    // While the group prepares to rebalance, a member may still commit for the
    // generation it has (Kafka refuses only between JoinGroup and SyncGroup).
    let errors = commit(&mut a.client, "gl", &ida, 1, &[("lt", 0, 6, None)]).await;
    assert_eq!(errors[0].2, 0);
    let errors = commit(&mut a.client, "gl", &ida, 0, &[("lt", 0, 7, None)]).await;
    assert_eq!(errors[0].2, code(ResponseError::IllegalGeneration));
    let a = a.rejoin().await;
    let b = b.await.unwrap();
    assert_eq!(a.generation, 2);

    // LeaveGroup v0 for b: a must rejoin, and forms generation 3 alone.
    let r = admin
        .call(
            LeaveGroupRequest::default()
                .with_group_id(GroupId(s("gl")))
                .with_member_id(s(&b.id)),
            0,
        )
        .await;
    assert_eq!(r.error_code, 0);
    let r = admin
        .call(
            LeaveGroupRequest::default()
                .with_group_id(GroupId(s("gl")))
                .with_member_id(s(&b.id)),
            1,
        )
        .await;
    assert_eq!(
        r.error_code,
        code(ResponseError::UnknownMemberId),
        "already gone"
    );
    let mut a = a.rejoin().await;
    assert_eq!((a.generation, a.join.members.len()), (3, 1));
    let ida = a.id.clone();
    assert_eq!(a.sync(&[(&ida, b"all")]).await.error_code, 0);

    // The last member leaves: the group is Empty and keeps its offsets.
    let r = admin
        .call(
            LeaveGroupRequest::default()
                .with_group_id(GroupId(s("gl")))
                .with_members(vec![MemberIdentity::default().with_member_id(s(&ida))]),
            5,
        )
        .await;
    assert_eq!((r.error_code, r.members[0].error_code), (0, 0));
    let described = describe(&mut admin, "gl").await;
    assert_eq!(
        (described.group_state.as_str(), described.members.len()),
        ("Empty", 0)
    );
    assert_eq!(fetch_offsets(&mut admin, "gl", "lt", &[0]).await[0].1, 6);
    broker.stop().await;
}

#[tokio::test]
async fn offsets_are_committed_with_metadata_and_survive_a_restart() {
    let broker = start_broker().await;
    let mut client = Client::connect(broker.addr).await;
    create_topic(&mut client, "ot", 3).await;
    // Outside group management (generation -1, no member): the group is created Empty.
    let errors = commit(
        &mut client,
        "go",
        "",
        -1,
        &[
            ("ot", 0, 10, Some("first")),
            ("ot", 1, 20, None),
            ("ot", 7, 1, None),
            ("nope", 0, 1, None),
        ],
    )
    .await;
    assert_eq!(
        errors,
        vec![
            ("ot".into(), 0, 0),
            ("ot".into(), 1, 0),
            ("ot".into(), 7, code(ResponseError::UnknownTopicOrPartition)),
            (
                "nope".into(),
                0,
                code(ResponseError::UnknownTopicOrPartition)
            ),
        ]
    );
    // Later commits win; metadata too large is refused.
    let long = "m".repeat(5000);
    let errors = commit(
        &mut client,
        "go",
        "",
        -1,
        &[("ot", 0, 11, Some("second")), ("ot", 2, 1, Some(&long))],
    )
    .await;
    assert_eq!(
        errors,
        vec![
            ("ot".into(), 0, 0),
            ("ot".into(), 2, code(ResponseError::OffsetMetadataTooLarge))
        ]
    );
    // A group under management refuses commits from non-members and old generations.
    let errors = commit(&mut client, "nogroup", "m", 3, &[("ot", 0, 1, None)]).await;
    assert_eq!(errors[0].2, code(ResponseError::IllegalGeneration));

    let expected = vec![
        (0, 11, 3, "second".to_string()),
        (1, 20, 3, String::new()),
        (2, -1, -1, String::new()),
    ];
    assert_eq!(
        fetch_offsets(&mut client, "go", "ot", &[0, 1, 2]).await,
        expected
    );
    // Unknown groups answer -1 for everything.
    assert_eq!(
        fetch_offsets(&mut client, "unknown", "ot", &[0]).await,
        vec![(0, -1, -1, String::new())]
    );

    drop(client);
    let dir = broker.stop().await;
    let broker = start_broker_in(dir, fast_groups()).await;
    let mut client = Client::connect(broker.addr).await;
    assert_eq!(
        fetch_offsets(&mut client, "go", "ot", &[0, 1, 2]).await,
        expected
    );
    // v8, several groups at once; null topics = everything committed.
    let request = OffsetFetchRequest::default().with_groups(vec![
        OffsetFetchRequestGroup::default()
            .with_group_id(GroupId(s("go")))
            .with_topics(None),
        OffsetFetchRequestGroup::default()
            .with_group_id(GroupId(s("other")))
            .with_topics(Some(vec![OffsetFetchRequestTopics::default()
                .with_name(TopicName(s("ot")))
                .with_partition_indexes(vec![0])])),
    ]);
    let r = client.call(request.with_require_stable(true), 8).await;
    assert_eq!(r.groups.len(), 2);
    let all: Vec<(i32, i64)> = r.groups[0].topics[0]
        .partitions
        .iter()
        .map(|p| (p.partition_index, p.committed_offset))
        .collect();
    assert_eq!(all, vec![(0, 11), (1, 20)]);
    assert_eq!(r.groups[1].topics[0].partitions[0].committed_offset, -1);
    // The group came back, Empty.
    let listed = client.call(ListGroupsRequest::default(), 4).await;
    assert!(listed
        .groups
        .iter()
        .any(|g| g.group_id.0.as_str() == "go" && g.group_state.as_str() == "Empty"));
    broker.stop().await;
}

#[tokio::test]
async fn groups_are_listed_by_state_deleted_when_empty_and_offsets_deleted_unless_subscribed() {
    let broker = start_broker().await;
    let addr = broker.addr;
    let mut admin = Client::connect(addr).await;
    create_topic(&mut admin, "dt", 1).await;
    create_topic(&mut admin, "other", 1).await;
    assert!(commit(
        &mut admin,
        "empty-one",
        "",
        -1,
        &[("dt", 0, 1, None), ("other", 0, 2, None)]
    )
    .await
    .iter()
    .all(|e| e.2 == 0));
    let mut active = Member::join_new(addr, JoinSpec::consumer("active-one", &["dt"])).await;
    let id = active.id.clone();
    assert_eq!(active.sync(&[(&id, b"x")]).await.error_code, 0);
    let g = active.generation;
    assert!(commit(
        &mut active.client,
        "active-one",
        &id,
        g,
        &[("dt", 0, 1, None), ("other", 0, 1, None)]
    )
    .await
    .iter()
    .all(|e| e.2 == 0));

    let names = |r: &ListGroupsResponse| {
        let mut v: Vec<String> = r.groups.iter().map(|g| g.group_id.0.to_string()).collect();
        v.sort();
        v
    };
    let all = admin.call(ListGroupsRequest::default(), 2).await;
    assert_eq!(names(&all), vec!["active-one", "empty-one"]);
    assert!(all
        .groups
        .iter()
        .all(|g| g.protocol_type.as_str() == "consumer" || g.group_id.0.as_str() == "empty-one"));
    let stable = admin
        .call(
            ListGroupsRequest::default().with_states_filter(vec![s("stable")]),
            4,
        )
        .await;
    assert_eq!(names(&stable), vec!["active-one"]);
    let empty = admin
        .call(
            ListGroupsRequest::default().with_states_filter(vec![s("Empty"), s("Dead")]),
            4,
        )
        .await;
    assert_eq!(names(&empty), vec!["empty-one"]);

    // OffsetDelete: a subscribed topic of a live consumer group is protected.
    let delete_offsets = |group: &str, topic: &str| {
        OffsetDeleteRequest::default()
            .with_group_id(GroupId(s(group)))
            .with_topics(vec![OffsetDeleteRequestTopic::default()
                .with_name(TopicName(s(topic)))
                .with_partitions(vec![
                    OffsetDeleteRequestPartition::default().with_partition_index(0)
                ])])
    };
    let r = admin.call(delete_offsets("active-one", "dt"), 0).await;
    assert_eq!(
        (r.error_code, r.topics[0].partitions[0].error_code),
        (0, code(ResponseError::GroupSubscribedToTopic))
    );
    let r = admin.call(delete_offsets("active-one", "other"), 0).await;
    assert_eq!((r.error_code, r.topics[0].partitions[0].error_code), (0, 0));
    assert_eq!(
        fetch_offsets(&mut admin, "active-one", "other", &[0]).await[0].1,
        -1
    );
    assert_eq!(
        fetch_offsets(&mut admin, "active-one", "dt", &[0]).await[0].1,
        1
    );
    let r = admin.call(delete_offsets("no-such-group", "dt"), 0).await;
    assert_eq!(r.error_code, code(ResponseError::GroupIdNotFound));

    // DeleteGroups: the Empty group goes with its offsets; the live one is refused.
    let r = admin
        .call(
            DeleteGroupsRequest::default().with_groups_names(vec![
                GroupId(s("empty-one")),
                GroupId(s("active-one")),
                GroupId(s("never-was")),
            ]),
            2,
        )
        .await;
    let codes: Vec<i16> = r.results.iter().map(|r| r.error_code).collect();
    assert_eq!(
        codes,
        vec![
            0,
            code(ResponseError::NonEmptyGroup),
            code(ResponseError::GroupIdNotFound)
        ]
    );
    assert_eq!(
        fetch_offsets(&mut admin, "empty-one", "dt", &[0]).await[0].1,
        -1
    );
    assert_eq!(
        names(&admin.call(ListGroupsRequest::default(), 4).await),
        vec!["active-one"]
    );
    assert_eq!(
        describe(&mut admin, "empty-one").await.group_state.as_str(),
        "Dead"
    );

    // The deletion is durable: after a restart the group's offsets stay gone.
    drop(admin);
    drop(active);
    let dir = broker.stop().await;
    let broker = start_broker_in(dir, fast_groups()).await;
    let mut admin = Client::connect(broker.addr).await;
    assert_eq!(
        fetch_offsets(&mut admin, "empty-one", "dt", &[0]).await[0].1,
        -1
    );
    assert_eq!(
        fetch_offsets(&mut admin, "active-one", "other", &[0]).await[0].1,
        -1
    );
    assert_eq!(
        fetch_offsets(&mut admin, "active-one", "dt", &[0]).await[0].1,
        1
    );
    broker.stop().await;
}

#[tokio::test]
async fn join_errors_member_id_required_and_protocol_checks() {
    let broker = start_broker().await;
    let mut c = Client::connect(broker.addr).await;
    let spec = JoinSpec::consumer("gp", &["t"]);
    // Empty group id, session timeout out of bounds.
    let r = c
        .call(
            JoinSpec {
                group: String::new(),
                ..spec.clone()
            }
            .request(""),
            5,
        )
        .await;
    assert_eq!(r.error_code, code(ResponseError::InvalidGroupId));
    let r = c
        .call(
            JoinSpec {
                session_ms: 10,
                ..spec.clone()
            }
            .request(""),
            5,
        )
        .await;
    assert_eq!(r.error_code, code(ResponseError::InvalidSessionTimeout));
    // A known member id of an unknown group.
    let r = c.call(spec.request("who"), 5).await;
    assert_eq!(r.error_code, code(ResponseError::UnknownMemberId));
    // v3: no MEMBER_ID_REQUIRED round; v3 answers carry "" for a missing protocol name.
    let r = c.call(spec.request(""), 3).await;
    assert_eq!((r.error_code, r.generation_id), (0, 1));
    let leader = r.member_id.to_string();
    // A member with another protocol type, or no protocol in common, is refused.
    let mut other = Client::connect(broker.addr).await;
    let r = other
        .call(
            JoinSpec {
                protocol_type: "connect".into(),
                ..spec.clone()
            }
            .request(""),
            7,
        )
        .await;
    assert_eq!(r.error_code, code(ResponseError::InconsistentGroupProtocol));
    let r = other
        .call(
            JoinSpec {
                protocols: vec![("roundrobin".into(), subscription(&["t"]))],
                ..spec.clone()
            }
            .request(""),
            7,
        )
        .await;
    assert_eq!(r.error_code, code(ResponseError::InconsistentGroupProtocol));
    assert_eq!(r.protocol_name, None, "v7+: null protocol name on errors");
    // SyncGroup v5 checks the protocol name against the group's.
    let r = c
        .call(
            SyncGroupRequest::default()
                .with_group_id(GroupId(s("gp")))
                .with_generation_id(1)
                .with_member_id(s(&leader))
                .with_protocol_type(Some(s("consumer")))
                .with_protocol_name(Some(s("roundrobin"))),
            5,
        )
        .await;
    assert_eq!(r.error_code, code(ResponseError::InconsistentGroupProtocol));
    // Protocol selection: the one most members prefer among those all support.
    let spec2 = JoinSpec {
        group: "sel".into(),
        protocols: vec![
            ("roundrobin".into(), subscription(&["t"])),
            ("range".into(), subscription(&["t"])),
        ],
        ..spec.clone()
    };
    let r = c.call(spec2.request(""), 3).await;
    assert_eq!(
        (r.error_code, r.protocol_name.as_deref()),
        (0, Some("roundrobin"))
    );
    broker.stop().await;
}

#[tokio::test]
async fn two_groups_rebalance_at_once_without_waiting_on_each_other() {
    let broker = start_broker().await;
    let addr = broker.addr;
    // Group "slow": two members, then one stops responding: its rebalance waits the
    // full 3 s rebalance timeout for it.
    let slow_spec = JoinSpec {
        session_ms: 30_000,
        rebalance_ms: 3_000,
        ..JoinSpec::consumer("slow", &["t"])
    };
    let mut formed = form_group(addr, &slow_spec, 2).await;
    let mut b = formed.pop().unwrap();
    let a = formed.pop().unwrap();
    let generation = a.generation;
    // A third member triggers a rebalance; only it and `a` rejoin, `b` is silent.
    let c = tokio::spawn(Member::join_new(addr, slow_spec.clone()));
    let mut probe = Client::connect(addr).await;
    await_rebalance(&mut probe, "slow", &a.id, generation, None).await;
    let started = Instant::now();
    let a_rejoin = tokio::spawn(a.rejoin());

    // Meanwhile "fast" forms, rebalances for a second member and stabilises.
    let fast = JoinSpec::consumer("fast", &["t"]);
    let f1 = Member::join_new(addr, fast.clone()).await;
    let f2 = tokio::spawn(Member::join_new(addr, fast.clone()));
    let id1 = f1.id.clone();
    await_rebalance(&mut probe, "fast", &id1, 1, None).await;
    let f1 = f1.rejoin().await;
    let f2 = f2.await.unwrap();
    assert_eq!((f1.generation, f2.generation), (2, 2));
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "fast group waited for the slow one: {:?}",
        started.elapsed()
    );

    // The slow group completes at its rebalance timeout without b.
    let a = a_rejoin.await.unwrap();
    let c = c.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(2_500),
        "slow group did not wait for b: {:?}",
        started.elapsed()
    );
    assert_eq!(
        (a.generation, c.generation),
        (generation + 1, generation + 1)
    );
    let leader = if a.is_leader() { &a } else { &c };
    assert_eq!(leader.join.members.len(), 2, "b was dropped");
    assert_eq!(b.heartbeat().await, code(ResponseError::UnknownMemberId));
    broker.stop().await;
}

#[tokio::test]
async fn the_initial_rebalance_delay_gathers_members_starting_together() {
    let config = GroupConfig {
        initial_rebalance_delay_ms: 300,
        ..fast_groups()
    };
    let broker = start_broker_in(tempfile::tempdir().unwrap(), config).await;
    let spec = JoinSpec::consumer("gi", &["t"]);
    let joins: Vec<_> = (0..3)
        .map(|_| tokio::spawn(Member::join_new(broker.addr, spec.clone())))
        .collect();
    let mut members = Vec::new();
    for j in joins {
        members.push(j.await.unwrap());
    }
    assert!(
        members.iter().all(|m| m.generation == 1),
        "one generation for all three"
    );
    assert_eq!(
        members
            .iter()
            .filter(|m| m.is_leader())
            .map(|m| m.join.members.len())
            .collect::<Vec<_>>(),
        vec![3]
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_new_group_past_max_groups_is_refused_with_coordinator_not_available() {
    let groups = GroupConfig {
        max_groups: 2,
        ..fast_groups()
    };
    let broker = start_broker_in(tempfile::tempdir().unwrap(), groups).await;
    let mut client = Client::connect(broker.addr).await;
    create_topic(&mut client, "t", 1).await;
    let mut a = Member::join_new(broker.addr, JoinSpec::consumer("a", &["t"])).await;
    // A simple commit (no generation, no member) creates group "b".
    let committed = commit(&mut client, "b", "", -1, &[("t", 0, 5, None)]).await;
    assert_eq!(committed, vec![("t".to_string(), 0, 0)]);

    // A third group, by JoinGroup or by commit: refused, retriable.
    let third = JoinSpec::consumer("c", &["t"]);
    let refused = client.call(third.request(""), 9).await;
    assert_eq!(
        refused.error_code,
        code(ResponseError::CoordinatorNotAvailable)
    );
    let committed = commit(&mut client, "d", "", -1, &[("t", 0, 1, None)]).await;
    assert_eq!(
        committed,
        vec![(
            "t".to_string(),
            0,
            code(ResponseError::CoordinatorNotAvailable)
        )]
    );
    // Existing groups go on.
    let committed = commit(&mut client, "b", "", -1, &[("t", 0, 6, None)]).await;
    assert_eq!(committed, vec![("t".to_string(), 0, 0)]);
    assert_eq!(a.heartbeat().await, 0);
    broker.stop().await;
}
