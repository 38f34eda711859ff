//! The group state machine driven directly, with time passed in: join, sync,
//! heartbeat, leave, rebalance and expiry transitions, static members, and the
//! coordinator's group limit. No sockets, no timer task: `on_deadlines(now)` is what
//! the timer task would call at `now`.

use std::time::Duration;

use bytes::Bytes;
use protocol::ResponseError;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::*;

const SESSION: Duration = Duration::from_secs(10);
const REBALANCE: Duration = Duration::from_secs(5);
const INITIAL_DELAY_MS: u64 = 3_000;

fn config() -> GroupConfig {
    GroupConfig {
        initial_rebalance_delay_ms: INITIAL_DELAY_MS,
        ..GroupConfig::default()
    }
}

fn group() -> Group {
    let mut g = Group::new("g");
    g.initial_delay_ms = INITIAL_DELAY_MS;
    g
}

fn join_request(member_id: &str, instance: Option<&str>) -> JoinRequest {
    JoinRequest {
        member_id: member_id.to_string(),
        group_instance_id: instance.map(str::to_string),
        client_id: "client".into(),
        client_host: "/127.0.0.1".into(),
        session_timeout: SESSION,
        rebalance_timeout: REBALANCE,
        protocol_type: CONSUMER_PROTOCOL_TYPE.into(),
        protocols: vec![("range".into(), Bytes::from_static(b"meta"))],
        require_known_member_id: true,
        supports_skip_assignment: true,
    }
}

fn sync_request(g: &Group, member_id: &str, assignments: Vec<(String, Bytes)>) -> SyncRequest {
    SyncRequest {
        member_id: member_id.to_string(),
        group_instance_id: g.members[member_id].group_instance_id.clone(),
        generation_id: g.generation_id,
        protocol_type: Some(CONSUMER_PROTOCOL_TYPE.into()),
        protocol_name: Some("range".into()),
        assignments,
    }
}

fn now_answer<T: std::fmt::Debug>(step: Step<T>) -> T {
    match step {
        Step::Now(t) => t,
        Step::Wait(_) => panic!("expected an answer now, the request waits"),
    }
}

fn waiting<T>(step: Step<T>) -> oneshot::Receiver<T> {
    match step {
        Step::Wait(rx) => rx,
        Step::Now(_) => panic!("expected the request to wait"),
    }
}

/// The answer sent to a waiting request, if any yet.
fn answered<T>(rx: &mut oneshot::Receiver<T>) -> Option<T> {
    rx.try_recv().ok()
}

/// A v4+ dynamic member's two JoinGroups: MEMBER_ID_REQUIRED with its id, then the
/// join that waits for the rebalance.
fn join_new(g: &mut Group, now: Instant) -> (String, oneshot::Receiver<JoinOutcome>) {
    let first = now_answer(g.join(join_request("", None), now, &config()));
    assert_eq!(first.error, Some(ResponseError::MemberIdRequired));
    let id = first.member_id;
    assert!(!id.is_empty());
    let rx = waiting(g.join(join_request(&id, None), now, &config()));
    (id, rx)
}

/// A group of dynamic members, through its first rebalance to Stable; returns the
/// member ids (the first is the leader) and the time it got there.
fn stable_group(members: usize) -> (Group, Vec<String>, Instant) {
    let mut g = group();
    let t0 = Instant::now();
    let joined: Vec<_> = (0..members).map(|_| join_new(&mut g, t0)).collect();
    // Members joined during the initial delay extend it, up to the rebalance timeout.
    g.on_deadlines(t0 + Duration::from_millis(INITIAL_DELAY_MS), &config());
    let t1 = t0 + REBALANCE;
    g.on_deadlines(t1, &config());
    assert_eq!(g.state, GroupState::CompletingRebalance);
    let ids: Vec<String> = joined.iter().map(|(id, _)| id.clone()).collect();
    for (_, mut rx) in joined {
        assert!(answered(&mut rx).is_some());
    }
    let leader = g.leader.clone().unwrap();
    let assignments = ids
        .iter()
        .map(|id| (id.clone(), Bytes::from(format!("for {id}"))))
        .collect();
    let mut follower_syncs: Vec<_> = ids
        .iter()
        .filter(|id| **id != leader)
        .map(|id| waiting(g.sync(sync_request(&g, id, vec![]), t1)))
        .collect();
    let mut leader_sync = waiting(g.sync(sync_request(&g, &leader, assignments), t1));
    assert_eq!(g.state, GroupState::Stable);
    assert!(answered(&mut leader_sync).unwrap().is_ok());
    for rx in &mut follower_syncs {
        assert!(answered(rx).unwrap().is_ok());
    }
    let mut ordered = vec![leader.clone()];
    ordered.extend(ids.into_iter().filter(|id| *id != leader));
    (g, ordered, t1)
}

#[test]
fn first_rebalance_waits_for_the_initial_delay_and_the_leader_gets_the_members() {
    let mut g = group();
    let t0 = Instant::now();
    let (a, mut a_join) = join_new(&mut g, t0);
    assert_eq!(g.state, GroupState::PreparingRebalance);
    let (b, mut b_join) = join_new(&mut g, t0 + Duration::from_millis(100));
    g.on_deadlines(t0 + Duration::from_millis(INITIAL_DELAY_MS - 1), &config());
    assert!(
        answered(&mut a_join).is_none(),
        "completed before the initial delay"
    );
    // New members arrived during the delay: it is extended once more.
    g.on_deadlines(t0 + Duration::from_millis(INITIAL_DELAY_MS), &config());
    assert!(answered(&mut a_join).is_none());
    assert_eq!(g.state, GroupState::PreparingRebalance);
    g.on_deadlines(t0 + Duration::from_millis(2 * INITIAL_DELAY_MS), &config());
    let a_outcome = answered(&mut a_join).expect("a is answered");
    let b_outcome = answered(&mut b_join).expect("b is answered");
    assert_eq!(g.state, GroupState::CompletingRebalance);
    assert_eq!((a_outcome.generation_id, b_outcome.generation_id), (1, 1));
    assert_eq!(a_outcome.leader, a);
    assert_eq!(b_outcome.leader, a);
    assert_eq!(a_outcome.protocol_name.as_deref(), Some("range"));
    let mut listed: Vec<_> = a_outcome.members.iter().map(|m| m.0.clone()).collect();
    listed.sort();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(listed, expected, "the leader sees every member");
    assert!(b_outcome.members.is_empty(), "a follower sees none");
}

#[test]
fn the_leaders_sync_makes_the_group_stable_and_hands_out_assignments() {
    let (mut g, ids, t) = stable_group(2);
    assert_eq!(g.generation_id, 1);
    // A late SyncGroup in Stable is answered at once with the member's assignment.
    let (_, _, assignment) =
        now_answer(g.sync(sync_request(&g, &ids[1], vec![]), t)).expect("assignment");
    assert_eq!(assignment, Bytes::from(format!("for {}", ids[1])));
    // Wrong generation, unknown member.
    let mut stale = sync_request(&g, &ids[1], vec![]);
    stale.generation_id = 0;
    assert_eq!(
        now_answer(g.sync(stale, t)).unwrap_err(),
        ResponseError::IllegalGeneration
    );
    let mut unknown = sync_request(&g, &ids[1], vec![]);
    unknown.member_id = "nobody".into();
    assert_eq!(
        now_answer(g.sync(unknown, t)).unwrap_err(),
        ResponseError::UnknownMemberId
    );
}

#[test]
fn heartbeats_answer_by_state_and_keep_sessions_alive() {
    let (mut g, ids, t) = stable_group(2);
    let generation = g.generation_id;
    assert_eq!(g.heartbeat(&ids[0], None, generation, t), Ok(()));
    assert_eq!(
        g.heartbeat(&ids[0], None, generation - 1, t),
        Err(ResponseError::IllegalGeneration)
    );
    assert_eq!(
        g.heartbeat("nobody", None, generation, t),
        Err(ResponseError::UnknownMemberId)
    );
    // Heartbeats just inside the session keep both members through 3 sessions.
    let mut at = t;
    for _ in 0..3 {
        at += SESSION - Duration::from_millis(1);
        for id in &ids {
            assert_eq!(g.heartbeat(id, None, generation, at), Ok(()));
        }
        g.on_deadlines(at, &config());
        assert_eq!(g.state, GroupState::Stable);
        assert_eq!(g.members.len(), 2);
    }
    // A new member: the others learn of the rebalance from their heartbeat.
    let (_, _) = join_new(&mut g, at);
    assert_eq!(g.state, GroupState::PreparingRebalance);
    assert_eq!(
        g.heartbeat(&ids[0], None, generation, at),
        Err(ResponseError::RebalanceInProgress)
    );
}

#[test]
fn a_rebalance_completes_once_every_member_has_rejoined() {
    let (mut g, ids, t) = stable_group(2);
    let (c, mut c_join) = join_new(&mut g, t);
    assert_eq!(g.state, GroupState::PreparingRebalance);
    let mut a_join = waiting(g.join(join_request(&ids[0], None), t, &config()));
    assert!(answered(&mut a_join).is_none(), "b has not rejoined yet");
    let mut b_join = waiting(g.join(join_request(&ids[1], None), t, &config()));
    // All three are in: the join phase ends at once, not at the rebalance timeout.
    assert_eq!(g.state, GroupState::CompletingRebalance);
    assert_eq!(g.generation_id, 2);
    for rx in [&mut a_join, &mut b_join, &mut c_join] {
        assert_eq!(answered(rx).unwrap().generation_id, 2);
    }
    assert!(g.members.contains_key(&c));
    assert!(g.is_leader(&ids[0]), "the leader stays the leader");
}

#[test]
fn members_that_do_not_rejoin_in_time_are_dropped() {
    let (mut g, ids, t) = stable_group(2);
    let (_c, mut c_join) = join_new(&mut g, t);
    let mut a_join = waiting(g.join(join_request(&ids[0], None), t, &config()));
    // b never rejoins: at the rebalance timeout the generation goes on without it.
    g.on_deadlines(t + REBALANCE - Duration::from_millis(1), &config());
    assert_eq!(g.state, GroupState::PreparingRebalance);
    g.on_deadlines(t + REBALANCE, &config());
    assert_eq!(g.state, GroupState::CompletingRebalance);
    assert!(!g.members.contains_key(&ids[1]));
    assert_eq!(g.members.len(), 2);
    assert!(answered(&mut a_join).is_some() && answered(&mut c_join).is_some());
    assert_eq!(
        g.heartbeat(&ids[1], None, g.generation_id, t + REBALANCE),
        Err(ResponseError::UnknownMemberId)
    );
}

#[test]
fn an_expired_session_removes_the_member_and_rebalances() {
    let (mut g, ids, t) = stable_group(2);
    let generation = g.generation_id;
    // a heartbeats, b is silent.
    let half = t + SESSION / 2;
    assert_eq!(g.heartbeat(&ids[0], None, generation, half), Ok(()));
    assert_eq!(g.next_deadline(), Some(t + SESSION), "b's session is next");
    g.on_deadlines(t + SESSION - Duration::from_millis(1), &config());
    assert_eq!(g.members.len(), 2);
    g.on_deadlines(t + SESSION, &config());
    assert!(!g.members.contains_key(&ids[1]), "b expired");
    assert_eq!(g.state, GroupState::PreparingRebalance);
    // a rejoins alone: the next generation has only a.
    let mut a_join = waiting(g.join(join_request(&ids[0], None), t + SESSION, &config()));
    let outcome = answered(&mut a_join).expect("complete: every member rejoined");
    assert_eq!(outcome.generation_id, generation + 1);
    assert_eq!(outcome.members.len(), 1);
}

#[test]
fn a_member_that_never_syncs_is_removed_at_the_rebalance_timeout() {
    let mut g = group();
    let t0 = Instant::now();
    let (a, _a_join) = join_new(&mut g, t0);
    let (b, _b_join) = join_new(&mut g, t0);
    let t1 = t0 + Duration::from_millis(2 * INITIAL_DELAY_MS);
    g.on_deadlines(t0 + Duration::from_millis(INITIAL_DELAY_MS), &config());
    g.on_deadlines(t1, &config());
    assert_eq!(g.state, GroupState::CompletingRebalance);
    let leader = g.leader.clone().unwrap();
    let follower = if leader == a { b } else { a };
    let assignments = vec![(leader.clone(), Bytes::from_static(b"x"))];
    let mut leader_sync = waiting(g.sync(sync_request(&g, &leader, assignments), t1));
    assert!(answered(&mut leader_sync).unwrap().is_ok());
    assert_eq!(g.state, GroupState::Stable);
    // The follower's SyncGroup never comes.
    g.on_deadlines(t1 + REBALANCE, &config());
    assert!(!g.members.contains_key(&follower));
    assert_eq!(g.state, GroupState::PreparingRebalance);
}

#[test]
fn leaving_rebalances_and_the_last_leave_empties_the_group() {
    let (mut g, ids, t) = stable_group(2);
    assert_eq!(g.leave(&ids[1], None, t, &config()), Ok(()));
    assert_eq!(g.state, GroupState::PreparingRebalance);
    assert_eq!(
        g.leave(&ids[1], None, t, &config()),
        Err(ResponseError::UnknownMemberId),
        "a second leave"
    );
    assert_eq!(g.leave(&ids[0], None, t, &config()), Ok(()));
    assert!(g.members.is_empty());
    // The join phase ends with nobody: the group is Empty, a new generation.
    g.on_deadlines(t + REBALANCE, &config());
    assert_eq!(g.state, GroupState::Empty);
    assert!(g.is_idle());
    assert!(g.leader.is_none());
}

#[test]
fn a_pending_member_that_never_joins_expires() {
    let mut g = group();
    let t0 = Instant::now();
    let first = now_answer(g.join(join_request("", None), t0, &config()));
    assert_eq!(first.error, Some(ResponseError::MemberIdRequired));
    assert!(!g.is_idle());
    g.on_deadlines(t0 + SESSION, &config());
    assert!(g.is_idle(), "the id handed out expired unused");
    let late = now_answer(g.join(
        join_request(&first.member_id, None),
        t0 + SESSION,
        &config(),
    ));
    assert_eq!(late.error, Some(ResponseError::UnknownMemberId));
}

#[test]
fn the_group_size_limit_counts_pending_members() {
    let small = GroupConfig {
        max_group_size: 2,
        ..config()
    };
    let mut g = group();
    let t0 = Instant::now();
    for _ in 0..2 {
        let r = now_answer(g.join(join_request("", None), t0, &small));
        assert_eq!(r.error, Some(ResponseError::MemberIdRequired));
    }
    let third = now_answer(g.join(join_request("", None), t0, &small));
    assert_eq!(third.error, Some(ResponseError::GroupMaxSizeReached));
}

#[test]
fn a_static_member_rejoining_takes_its_place_without_a_rebalance() {
    let mut g = group();
    let t0 = Instant::now();
    // Static members get their id at once (no MEMBER_ID_REQUIRED round).
    let mut a_join = waiting(g.join(join_request("", Some("instance-a")), t0, &config()));
    let (b, _b_join) = join_new(&mut g, t0);
    let t1 = t0 + Duration::from_millis(INITIAL_DELAY_MS);
    g.on_deadlines(t1, &config());
    g.on_deadlines(t1 + Duration::from_millis(INITIAL_DELAY_MS), &config());
    let a_outcome = answered(&mut a_join).expect("joined");
    let old_a = a_outcome.member_id.clone();
    assert!(old_a.starts_with("instance-a-"));
    let leader = g.leader.clone().unwrap();
    let t2 = t1 + Duration::from_millis(INITIAL_DELAY_MS);
    let mut leader_sync = waiting(g.sync(
        sync_request(
            &g,
            &leader,
            vec![(old_a.clone(), Bytes::from_static(b"a's"))],
        ),
        t2,
    ));
    assert!(answered(&mut leader_sync).unwrap().is_ok());
    assert_eq!(g.state, GroupState::Stable);
    let follower = if leader == b { &old_a } else { &b };
    assert!(now_answer(g.sync(sync_request(&g, follower, vec![]), t2)).is_ok());
    let generation = g.generation_id;

    // a restarts: same instance id, no member id. No rebalance; the old id is fenced.
    let rejoin = now_answer(g.join(join_request("", Some("instance-a")), t2, &config()));
    assert_eq!(rejoin.error, None);
    assert_ne!(rejoin.member_id, old_a);
    assert_eq!(rejoin.generation_id, generation);
    assert_eq!(g.state, GroupState::Stable);
    assert_eq!(
        g.heartbeat(&old_a, Some("instance-a"), generation, t2),
        Err(ResponseError::FencedInstanceId)
    );
    assert_eq!(
        g.heartbeat(&rejoin.member_id, Some("instance-a"), generation, t2),
        Ok(())
    );
    // Its assignment came with it.
    let (_, _, assignment) =
        now_answer(g.sync(sync_request(&g, &rejoin.member_id, vec![]), t2)).expect("assignment");
    assert_eq!(assignment, Bytes::from_static(b"a's"));

    // A static member is not dropped for missing a rebalance, only when its
    // session expires; a leave by instance id removes it.
    assert_eq!(g.leave("", Some("instance-a"), t2, &config()), Ok(()));
    assert!(!g.members.contains_key(&rejoin.member_id));
    assert_eq!(
        g.leave("", Some("instance-a"), t2, &config()),
        Err(ResponseError::UnknownMemberId)
    );
}

#[test]
fn the_coordinator_refuses_groups_past_max_groups() {
    let dir = tempfile::tempdir().unwrap();
    let limited = GroupConfig {
        max_groups: 2,
        ..config()
    };
    let coordinator = GroupCoordinator::open(dir.path(), limited, 0).unwrap();
    let a = coordinator.get_or_create("a").unwrap();
    coordinator.get_or_create("b").unwrap();
    assert!(
        Arc::ptr_eq(&coordinator.get_or_create("a").unwrap(), &a),
        "existing group"
    );
    assert_eq!(
        coordinator.get_or_create("c").err(),
        Some(ResponseError::CoordinatorNotAvailable)
    );
    // Once a group is gone, a new one gets its place.
    coordinator.delete("b").unwrap();
    coordinator.get_or_create("c").unwrap();
    assert_eq!(coordinator.all().len(), 2);
}
