//! The group coordinator: Apache Kafka's classic consumer-group protocol
//! (JoinGroup / SyncGroup / Heartbeat / LeaveGroup) and committed offsets, one
//! module per API. This module holds the coordinator's state and the group state
//! machine; [`offsets_store`] keeps committed offsets durable.
//!
//! Shape, following Kafka's `GroupCoordinator` and `GroupMetadata`:
//! - Each group is a [`GroupCell`]: its state behind its own `std` mutex, never held
//!   across an `.await`, so groups rebalancing at once do not wait on each other. The
//!   registry of groups has its own mutex, held only to look a group up.
//! - A JoinGroup or SyncGroup that must wait is answered through a `oneshot` channel
//!   kept in the member; the state machine sends on it when the rebalance completes
//!   (or drops it when the member is removed, which the handler answers as
//!   UNKNOWN_MEMBER_ID).
//! - Deadlines (rebalance timeout, initial rebalance delay, member sessions, pending
//!   members, pending SyncGroups) are kept in the group as `tokio::time::Instant`s. A
//!   group that has any deadline runs one timer task that sleeps until the earliest
//!   and is woken through a `Notify` whenever the state changes; an idle group has no
//!   task.
//! - Group state (members, generations, assignments) lives in memory only, as in
//!   Kafka before it persists group metadata: after a restart every group with
//!   committed offsets comes back Empty, and members rejoin (their heartbeats answer
//!   UNKNOWN_MEMBER_ID). Only offsets are durable.
//!
//! Locks are taken in this order: registry, then one group, then the offsets store.
//!
//! Architecture invariant: nothing in this module does file I/O except
//! [`offsets_store`], and nothing awaits while holding a group's lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use protocol::kafka_protocol::messages::ConsumerProtocolSubscription;
use protocol::kafka_protocol::protocol::Decodable;
use protocol::ResponseError;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

pub mod delete_groups;
pub mod describe_groups;
pub mod find_coordinator;
pub mod heartbeat;
pub mod join;
pub mod leave;
pub mod list_groups;
pub mod offset_commit;
pub mod offset_delete;
pub mod offset_fetch;
pub mod offsets_store;
pub mod sync;
#[cfg(test)]
mod tests;

pub use offsets_store::{CommittedOffset, OffsetChange, OffsetsStore};

/// The protocol type of Kafka consumers, whose member metadata we can decode.
pub const CONSUMER_PROTOCOL_TYPE: &str = "consumer";

/// Kafka's `group.*` broker settings, with Kafka's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    /// `group.min.session.timeout.ms`: a JoinGroup asking for less is refused.
    pub min_session_timeout_ms: i32,
    /// `group.max.session.timeout.ms`.
    pub max_session_timeout_ms: i32,
    /// `group.initial.rebalance.delay.ms`: the first rebalance of an empty group waits
    /// this long (extended while new members keep arriving) so that members starting
    /// together land in one generation.
    pub initial_rebalance_delay_ms: u64,
    /// `group.max.size`.
    pub max_group_size: usize,
    /// `max_groups`: groups coordinated at once; a new one past it is refused with
    /// COORDINATOR_NOT_AVAILABLE (see [`GroupCoordinator::get_or_create`]).
    pub max_groups: usize,
    /// `offset.metadata.max.bytes`.
    pub max_offset_metadata_bytes: usize,
    /// How long a new member's first JoinGroup may wait (Kafka's 5 minutes).
    pub new_member_join_timeout_ms: u64,
    /// `offsets_compaction_min_bytes`: the committed-offsets log is not compacted
    /// below this size (read when the store opens).
    pub offsets_compaction_min_bytes: u64,
}

impl GroupConfig {
    /// The group settings of a broker configuration (one place for their defaults).
    pub fn from_broker(c: &crate::BrokerConfig) -> Self {
        GroupConfig {
            min_session_timeout_ms: c.group_min_session_timeout_ms,
            max_session_timeout_ms: c.group_max_session_timeout_ms,
            initial_rebalance_delay_ms: c.group_initial_rebalance_delay_ms,
            max_group_size: c.group_max_size,
            max_groups: c.max_groups,
            max_offset_metadata_bytes: c.offset_metadata_max_bytes,
            new_member_join_timeout_ms: NEW_MEMBER_JOIN_TIMEOUT_MS,
            offsets_compaction_min_bytes: c.offsets_compaction_min_bytes,
        }
    }
}

/// Kafka's fixed wait for a new member's first JoinGroup.
const NEW_MEMBER_JOIN_TIMEOUT_MS: u64 = 300_000;

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig::from_broker(&crate::BrokerConfig::default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }
}

/// What a JoinGroup is answered with, before it is shaped for a request version.
#[derive(Debug, Clone, Default)]
pub struct JoinOutcome {
    pub error: Option<ResponseError>,
    pub generation_id: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    pub skip_assignment: bool,
    /// (member id, group instance id, metadata): only for the leader.
    pub members: Vec<(String, Option<String>, Bytes)>,
}

impl JoinOutcome {
    fn error(member_id: &str, error: ResponseError) -> JoinOutcome {
        JoinOutcome {
            error: Some(error),
            generation_id: -1,
            member_id: member_id.to_string(),
            ..Default::default()
        }
    }
}

/// A SyncGroup answer: protocol type, protocol name and the member's assignment.
pub type SyncOutcome = Result<(Option<String>, Option<String>, Bytes), ResponseError>;

/// Either an answer now or one the state machine will send.
pub enum Step<T> {
    Now(T),
    Wait(oneshot::Receiver<T>),
}

/// A JoinGroup as the state machine sees it.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// v4+: a new dynamic member first gets MEMBER_ID_REQUIRED and an id.
    pub require_known_member_id: bool,
    /// v9+ knows `skip_assignment` (KIP-814).
    pub supports_skip_assignment: bool,
}

/// A SyncGroup as the state machine sees it.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub generation_id: i32,
    /// v5+: checked against the group's when present.
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    /// The leader's assignments, by member id (empty from followers).
    pub assignments: Vec<(String, Bytes)>,
}

pub struct Member {
    pub id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    pub assignment: Bytes,
    awaiting_join: Option<oneshot::Sender<JoinOutcome>>,
    awaiting_sync: Option<oneshot::Sender<SyncOutcome>>,
    /// When the member is expired unless it heartbeats (or is kept alive by a
    /// pending JoinGroup/SyncGroup).
    deadline: Instant,
    /// Joined and not yet through a completed rebalance: its JoinGroup may wait only
    /// `new_member_join_timeout_ms`.
    is_new: bool,
}

impl Member {
    pub fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }

    fn is_awaiting_join(&self) -> bool {
        self.awaiting_join.is_some()
    }

    /// Kafka's `hasSatisfiedHeartbeat` turned around: may this member be expired now?
    fn expired(&self, now: Instant) -> bool {
        if !self.is_new && (self.awaiting_join.is_some() || self.awaiting_sync.is_some()) {
            return false;
        }
        now >= self.deadline
    }

    fn expiry(&self) -> Option<Instant> {
        if !self.is_new && (self.awaiting_join.is_some() || self.awaiting_sync.is_some()) {
            None
        } else {
            Some(self.deadline)
        }
    }

    /// The topics this member subscribes to, from its ConsumerProtocol metadata for
    /// `protocol`; `None` if it does not decode.
    pub fn subscribed_topics(&self, protocol: Option<&str>) -> Option<Vec<String>> {
        let metadata = match protocol {
            Some(p) => self.metadata(p),
            None => self.protocols.first().map(|(_, m)| m.clone())?,
        };
        decode_subscription(&metadata)
    }
}

/// Decodes a ConsumerProtocol subscription: an i16 version, then the body. Newer
/// versions than we know are read as the newest we know (the format only grows).
pub fn decode_subscription(metadata: &Bytes) -> Option<Vec<String>> {
    let mut buf = metadata.clone();
    if buf.len() < 2 {
        return None;
    }
    let version = i16::from_be_bytes([buf[0], buf[1]]);
    if version < 0 {
        return None;
    }
    let _ = bytes::Buf::get_i16(&mut buf);
    let subscription = ConsumerProtocolSubscription::decode(&mut buf, version.min(3)).ok()?;
    Some(subscription.topics.iter().map(|t| t.to_string()).collect())
}

enum JoinTimer {
    /// `group.initial.rebalance.delay.ms` for a group that was Empty: never completes
    /// early; extended while new members arrive, up to the rebalance timeout.
    Initial {
        deadline: Instant,
        remaining: Duration,
    },
    /// Completes when every member has rejoined, or at the deadline.
    Normal { deadline: Instant },
}

impl JoinTimer {
    fn deadline(&self) -> Instant {
        match self {
            JoinTimer::Initial { deadline, .. } | JoinTimer::Normal { deadline } => *deadline,
        }
    }
}

pub struct Group {
    pub id: String,
    pub state: GroupState,
    pub generation_id: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED, with their expiry.
    pending_members: HashMap<String, Instant>,
    /// group.instance.id -> member id.
    static_members: HashMap<String, String>,
    /// Members of this generation that have not sent SyncGroup yet.
    pending_sync: BTreeSet<String>,
    pending_sync_deadline: Option<Instant>,
    join_timer: Option<JoinTimer>,
    new_member_added: bool,
    /// `group.initial.rebalance.delay.ms`, copied in so the state machine needs no
    /// config for it.
    initial_delay_ms: u64,
    timer_running: bool,
}

impl Group {
    fn new(id: &str) -> Group {
        Group {
            id: id.to_string(),
            state: GroupState::Empty,
            generation_id: 0,
            protocol_type: None,
            protocol_name: None,
            leader: None,
            members: BTreeMap::new(),
            pending_members: HashMap::new(),
            static_members: HashMap::new(),
            pending_sync: BTreeSet::new(),
            pending_sync_deadline: None,
            join_timer: None,
            new_member_added: false,
            initial_delay_ms: 0,
            timer_running: false,
        }
    }

    pub fn is_leader(&self, member_id: &str) -> bool {
        self.leader.as_deref() == Some(member_id)
    }

    fn is_idle(&self) -> bool {
        self.state == GroupState::Empty
            && self.members.is_empty()
            && self.pending_members.is_empty()
    }

    /// Kafka's `validateCurrentMember`: a static member must map to this member id,
    /// and the member must be in the group.
    pub fn validate_member(
        &self,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), ResponseError> {
        if let Some(instance) = instance_id {
            match self.static_members.get(instance) {
                Some(current) if current != member_id => {
                    return Err(ResponseError::FencedInstanceId)
                }
                Some(_) => {}
                None => return Err(ResponseError::UnknownMemberId),
            }
        }
        if !self.members.contains_key(member_id) {
            return Err(ResponseError::UnknownMemberId);
        }
        Ok(())
    }

    fn supports_protocols(&self, protocol_type: &str, protocols: &[(String, Bytes)]) -> bool {
        if self.state == GroupState::Empty {
            return !protocol_type.is_empty() && !protocols.is_empty();
        }
        self.protocol_type.as_deref() == Some(protocol_type)
            && protocols.iter().any(|(name, _)| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == name))
            })
    }

    /// The protocol most members prefer among those all of them support.
    fn select_protocol(&self) -> Option<String> {
        let candidates: Vec<&String> = match self.members.values().next() {
            None => return None,
            Some(first) => first
                .protocols
                .iter()
                .map(|(n, _)| n)
                .filter(|n| {
                    self.members
                        .values()
                        .all(|m| m.protocols.iter().any(|(p, _)| p == *n))
                })
                .collect(),
        };
        let mut votes: Vec<(&String, usize)> = candidates.iter().map(|c| (*c, 0)).collect();
        for m in self.members.values() {
            if let Some((name, _)) = m.protocols.iter().find(|(n, _)| candidates.contains(&n)) {
                if let Some(v) = votes.iter_mut().find(|(c, _)| *c == name) {
                    v.1 += 1;
                }
            }
        }
        // Most votes wins; ties go to the earlier candidate (the first member's order).
        let mut best: Option<(&String, usize)> = None;
        for (c, n) in votes {
            if best.is_none_or(|(_, b)| n > b) {
                best = Some((c, n));
            }
        }
        best.map(|(c, _)| c.clone())
    }

    fn rebalance_timeout(&self) -> Duration {
        self.members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default()
    }

    fn all_members_joined(&self) -> bool {
        self.pending_members.is_empty() && self.members.values().all(Member::is_awaiting_join)
    }

    fn current_member_metadata(&self) -> Vec<(String, Option<String>, Bytes)> {
        let protocol = self.protocol_name.clone().unwrap_or_default();
        self.members
            .values()
            .map(|m| {
                (
                    m.id.clone(),
                    m.group_instance_id.clone(),
                    m.metadata(&protocol),
                )
            })
            .collect()
    }

    fn outcome_for(&self, member_id: &str, with_members: bool) -> JoinOutcome {
        JoinOutcome {
            error: None,
            generation_id: self.generation_id,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone(),
            leader: self.leader.clone().unwrap_or_default(),
            member_id: member_id.to_string(),
            skip_assignment: false,
            members: if with_members {
                self.current_member_metadata()
            } else {
                Vec::new()
            },
        }
    }

    /// The earliest moment something must happen without a request arriving.
    fn next_deadline(&self) -> Option<Instant> {
        let members = self.members.values().filter_map(Member::expiry);
        let pending = self.pending_members.values().copied();
        let timers = self
            .join_timer
            .as_ref()
            .map(JoinTimer::deadline)
            .into_iter()
            .chain(self.pending_sync_deadline);
        members.chain(pending).chain(timers).min()
    }

    // ---- the state machine ------------------------------------------------------

    pub fn join(
        &mut self,
        request: JoinRequest,
        now: Instant,
        config: &GroupConfig,
    ) -> Step<JoinOutcome> {
        let step = self.join_inner(request, now, config);
        self.try_complete_join(now);
        step
    }

    fn join_inner(
        &mut self,
        request: JoinRequest,
        now: Instant,
        config: &GroupConfig,
    ) -> Step<JoinOutcome> {
        let member_id = request.member_id.clone();
        if self.state == GroupState::Dead {
            // Deleted or dropped while we looked it up: the client finds the
            // coordinator again and rejoins a fresh group.
            return Step::Now(JoinOutcome::error(
                &member_id,
                ResponseError::CoordinatorNotAvailable,
            ));
        }
        if !self.supports_protocols(&request.protocol_type, &request.protocols) {
            return Step::Now(JoinOutcome::error(
                &member_id,
                ResponseError::InconsistentGroupProtocol,
            ));
        }
        if member_id.is_empty() {
            let known_static = request
                .group_instance_id
                .as_ref()
                .and_then(|i| self.static_members.get(i))
                .cloned();
            if known_static.is_none()
                && self.members.len() + self.pending_members.len() >= config.max_group_size
            {
                return Step::Now(JoinOutcome::error("", ResponseError::GroupMaxSizeReached));
            }
            let prefix = request
                .group_instance_id
                .as_deref()
                .unwrap_or(&request.client_id);
            let new_id = format!("{prefix}-{}", uuid::Uuid::new_v4());
            return match known_static {
                Some(old_id) => self.replace_static_member(&old_id, new_id, request, now),
                None if request.group_instance_id.is_none() && request.require_known_member_id => {
                    self.pending_members
                        .insert(new_id.clone(), now + request.session_timeout);
                    Step::Now(JoinOutcome::error(&new_id, ResponseError::MemberIdRequired))
                }
                None => self.add_member(new_id, request, now, config),
            };
        }
        if self.pending_members.contains_key(&member_id) {
            return self.add_member(member_id, request, now, config);
        }
        if let Err(e) = self.validate_member(&member_id, request.group_instance_id.as_deref()) {
            return Step::Now(JoinOutcome::error(&member_id, e));
        }
        let matches = self.members[&member_id].protocols == request.protocols;
        match self.state {
            GroupState::PreparingRebalance => self.update_member(request, now, config),
            GroupState::CompletingRebalance if matches => {
                // It missed our JoinGroup answer: give it again.
                let leader = self.is_leader(&member_id);
                Step::Now(self.outcome_for(&member_id, leader))
            }
            GroupState::Stable if matches && !self.is_leader(&member_id) => {
                Step::Now(self.outcome_for(&member_id, false))
            }
            // A leader's JoinGroup in Stable forces a rebalance (its view of topic
            // metadata may have changed); changed metadata does too.
            GroupState::CompletingRebalance | GroupState::Stable => {
                self.update_member(request, now, config)
            }
            GroupState::Empty | GroupState::Dead => Step::Now(JoinOutcome::error(
                &member_id,
                ResponseError::UnknownMemberId,
            )),
        }
    }

    fn add_member(
        &mut self,
        id: String,
        request: JoinRequest,
        now: Instant,
        config: &GroupConfig,
    ) -> Step<JoinOutcome> {
        if self.state == GroupState::PreparingRebalance && self.generation_id == 0 {
            self.new_member_added = true;
        }
        if self.members.is_empty() {
            self.protocol_type = Some(request.protocol_type.clone());
        }
        let (tx, rx) = oneshot::channel();
        let member = Member {
            id: id.clone(),
            group_instance_id: request.group_instance_id.clone(),
            client_id: request.client_id,
            client_host: request.client_host,
            session_timeout: request.session_timeout,
            rebalance_timeout: request.rebalance_timeout,
            protocol_type: request.protocol_type,
            protocols: request.protocols,
            assignment: Bytes::new(),
            awaiting_join: Some(tx),
            awaiting_sync: None,
            deadline: now + Duration::from_millis(config.new_member_join_timeout_ms),
            is_new: true,
        };
        if self.leader.is_none() {
            self.leader = Some(id.clone());
        }
        if let Some(instance) = &request.group_instance_id {
            self.static_members.insert(instance.clone(), id.clone());
        }
        self.pending_members.remove(&id);
        self.members.insert(id, member);
        self.maybe_prepare_rebalance(now, config);
        Step::Wait(rx)
    }

    fn update_member(
        &mut self,
        request: JoinRequest,
        now: Instant,
        config: &GroupConfig,
    ) -> Step<JoinOutcome> {
        let (tx, rx) = oneshot::channel();
        let member = self
            .members
            .get_mut(&request.member_id)
            .expect("validated member");
        member.protocols = request.protocols;
        member.rebalance_timeout = request.rebalance_timeout;
        member.session_timeout = request.session_timeout;
        member.client_id = request.client_id;
        if let Some(previous) = member.awaiting_join.replace(tx) {
            // The client gave up on its earlier JoinGroup and sent another.
            let _ = previous.send(JoinOutcome::error(
                &member.id,
                ResponseError::RebalanceInProgress,
            ));
        }
        self.maybe_prepare_rebalance(now, config);
        Step::Wait(rx)
    }

    /// A static member rejoined with an unknown member id: it takes over its old
    /// member id's place, and the old id is fenced.
    fn replace_static_member(
        &mut self,
        old_id: &str,
        new_id: String,
        request: JoinRequest,
        now: Instant,
    ) -> Step<JoinOutcome> {
        let previous_leader = self.leader.clone().unwrap_or_default();
        let mut member = self
            .members
            .remove(old_id)
            .expect("static member is a member");
        if let Some(join) = member.awaiting_join.take() {
            let _ = join.send(JoinOutcome::error(old_id, ResponseError::FencedInstanceId));
        }
        if let Some(sync) = member.awaiting_sync.take() {
            let _ = sync.send(Err(ResponseError::FencedInstanceId));
        }
        member.id = new_id.clone();
        member.deadline = now + request.session_timeout;
        member.protocols = request.protocols;
        member.rebalance_timeout = request.rebalance_timeout;
        member.session_timeout = request.session_timeout;
        member.client_id = request.client_id;
        member.client_host = request.client_host;
        if self.leader.as_deref() == Some(old_id) {
            self.leader = Some(new_id.clone());
        }
        if self.pending_sync.remove(old_id) {
            self.pending_sync.insert(new_id.clone());
        }
        let instance = request
            .group_instance_id
            .clone()
            .expect("static member has an instance id");
        self.static_members.insert(instance, new_id.clone());
        self.members.insert(new_id.clone(), member);
        match self.state {
            GroupState::Stable if self.select_protocol() == self.protocol_name => {
                // Nothing that matters to the assignment changed: no rebalance. A
                // leader must not compute an assignment a Stable group would not
                // hand out: v9+ is told to skip it; older versions are given the
                // previous leader id so that they do not see themselves as leader.
                let is_leader = self.is_leader(&new_id);
                let mut outcome = self.outcome_for(&new_id, false);
                if is_leader && request.supports_skip_assignment {
                    outcome.skip_assignment = true;
                    outcome.members = self.current_member_metadata();
                } else {
                    outcome.leader = previous_leader;
                }
                Step::Now(outcome)
            }
            GroupState::Stable | GroupState::CompletingRebalance => {
                let (tx, rx) = oneshot::channel();
                self.members
                    .get_mut(&new_id)
                    .expect("just inserted")
                    .awaiting_join = Some(tx);
                self.prepare_rebalance(now);
                Step::Wait(rx)
            }
            GroupState::PreparingRebalance => {
                let (tx, rx) = oneshot::channel();
                self.members
                    .get_mut(&new_id)
                    .expect("just inserted")
                    .awaiting_join = Some(tx);
                Step::Wait(rx)
            }
            GroupState::Empty | GroupState::Dead => {
                unreachable!("a group with members is neither Empty nor Dead")
            }
        }
    }

    pub fn sync(&mut self, request: SyncRequest, now: Instant) -> Step<SyncOutcome> {
        let SyncRequest {
            member_id,
            group_instance_id: instance_id,
            generation_id,
            protocol_type,
            protocol_name,
            assignments,
        } = request;
        let (member_id, instance_id) = (member_id.as_str(), instance_id.as_deref());
        let (protocol_type, protocol_name) = (protocol_type.as_deref(), protocol_name.as_deref());
        if self.state == GroupState::Dead {
            return Step::Now(Err(ResponseError::CoordinatorNotAvailable));
        }
        if let Err(e) = self.validate_member(member_id, instance_id) {
            return Step::Now(Err(e));
        }
        if generation_id != self.generation_id {
            return Step::Now(Err(ResponseError::IllegalGeneration));
        }
        if protocol_type.is_some_and(|t| self.protocol_type.as_deref() != Some(t))
            || protocol_name.is_some_and(|n| self.protocol_name.as_deref() != Some(n))
        {
            return Step::Now(Err(ResponseError::InconsistentGroupProtocol));
        }
        match self.state {
            GroupState::Empty | GroupState::Dead => Step::Now(Err(ResponseError::UnknownMemberId)),
            GroupState::PreparingRebalance => Step::Now(Err(ResponseError::RebalanceInProgress)),
            GroupState::CompletingRebalance => {
                let (tx, rx) = oneshot::channel();
                self.members
                    .get_mut(member_id)
                    .expect("validated")
                    .awaiting_sync = Some(tx);
                self.remove_pending_sync(member_id);
                if self.is_leader(member_id) {
                    let mut given: HashMap<String, Bytes> = assignments.into_iter().collect();
                    for m in self.members.values_mut() {
                        m.assignment = given.remove(&m.id).unwrap_or_default();
                    }
                    self.propagate_assignment(None, now);
                    self.state = GroupState::Stable;
                    tracing::info!(group = %self.id, generation = self.generation_id, members = self.members.len(), "group is stable");
                }
                Step::Wait(rx)
            }
            GroupState::Stable => {
                self.remove_pending_sync(member_id);
                let member = self.members.get_mut(member_id).expect("validated");
                member.deadline = now + member.session_timeout;
                Step::Now(Ok((
                    self.protocol_type.clone(),
                    self.protocol_name.clone(),
                    member.assignment.clone(),
                )))
            }
        }
    }

    fn remove_pending_sync(&mut self, member_id: &str) {
        self.pending_sync.remove(member_id);
        if self.pending_sync.is_empty() {
            self.pending_sync_deadline = None;
        }
    }

    /// Answers every waiting SyncGroup: with its assignment, or with `error` (and an
    /// emptied assignment).
    fn propagate_assignment(&mut self, error: Option<ResponseError>, now: Instant) {
        let (ptype, pname) = (self.protocol_type.clone(), self.protocol_name.clone());
        for m in self.members.values_mut() {
            if error.is_some() {
                m.assignment = Bytes::new();
            }
            if let Some(tx) = m.awaiting_sync.take() {
                let answer = match error {
                    Some(e) => Err(e),
                    None => Ok((ptype.clone(), pname.clone(), m.assignment.clone())),
                };
                let _ = tx.send(answer);
                m.deadline = now + m.session_timeout;
            }
        }
    }

    pub fn heartbeat(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation_id: i32,
        now: Instant,
    ) -> Result<(), ResponseError> {
        if self.state == GroupState::Dead {
            return Err(ResponseError::CoordinatorNotAvailable);
        }
        self.validate_member(member_id, instance_id)?;
        if generation_id != self.generation_id {
            return Err(ResponseError::IllegalGeneration);
        }
        let member = self.members.get_mut(member_id).expect("validated");
        member.deadline = now + member.session_timeout;
        match self.state {
            GroupState::Empty | GroupState::Dead => Err(ResponseError::UnknownMemberId),
            GroupState::PreparingRebalance => Err(ResponseError::RebalanceInProgress),
            // A member may heartbeat between its JoinGroup and SyncGroup answers.
            GroupState::CompletingRebalance | GroupState::Stable => Ok(()),
        }
    }

    /// One member of a LeaveGroup: by member id, or (member id empty) by instance id.
    pub fn leave(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        now: Instant,
        config: &GroupConfig,
    ) -> Result<(), ResponseError> {
        if member_id.is_empty() {
            let current = instance_id
                .and_then(|i| self.static_members.get(i))
                .cloned();
            let current = current.ok_or(ResponseError::UnknownMemberId)?;
            self.remove_member_and_update(&current, now, config);
            return Ok(());
        }
        if self.pending_members.contains_key(member_id) {
            self.remove_pending_member(member_id, now);
            return Ok(());
        }
        self.validate_member(member_id, instance_id)?;
        self.remove_member_and_update(member_id, now, config);
        Ok(())
    }

    /// OffsetCommit's group checks (Kafka's `validateOffsetCommit`); refreshes the
    /// member's session when it passes.
    pub fn validate_commit(
        &mut self,
        member_id: &str,
        instance_id: Option<&str>,
        generation_id: i32,
        now: Instant,
    ) -> Result<(), ResponseError> {
        if self.state == GroupState::Dead {
            return Err(ResponseError::CoordinatorNotAvailable);
        }
        if generation_id >= 0 || !member_id.is_empty() || instance_id.is_some() {
            self.validate_member(member_id, instance_id)?;
            if generation_id != self.generation_id {
                return Err(ResponseError::IllegalGeneration);
            }
        } else if self.state != GroupState::Empty {
            // Outside group management, only an Empty group takes commits.
            return Err(ResponseError::UnknownMemberId);
        }
        if self.state == GroupState::CompletingRebalance {
            return Err(ResponseError::RebalanceInProgress);
        }
        if let Some(member) = self.members.get_mut(member_id) {
            member.deadline = now + member.session_timeout;
        }
        Ok(())
    }

    /// Is any member subscribed to `topic` (decoded from its ConsumerProtocol
    /// metadata; undecodable metadata subscribes to nothing)?
    pub fn is_subscribed_to(&self, topic: &str) -> bool {
        let protocol = self.protocol_name.as_deref();
        self.members.values().any(|m| {
            m.subscribed_topics(protocol)
                .is_some_and(|topics| topics.iter().any(|t| t == topic))
        })
    }

    fn remove_member(&mut self, member_id: &str) -> Option<Member> {
        let member = self.members.remove(member_id);
        if let Some(instance) = member.as_ref().and_then(|m| m.group_instance_id.as_ref()) {
            if self.static_members.get(instance).map(String::as_str) == Some(member_id) {
                self.static_members.remove(instance);
            }
        }
        if self.is_leader(member_id) {
            self.leader = self.members.keys().next().cloned();
        }
        self.pending_members.remove(member_id);
        self.remove_pending_sync(member_id);
        member
    }

    /// Kafka's `removeMemberAndUpdateGroup`: a member leaves or expires.
    fn remove_member_and_update(&mut self, member_id: &str, now: Instant, config: &GroupConfig) {
        // Dropping the member drops its pending JoinGroup/SyncGroup senders: those
        // requests are answered UNKNOWN_MEMBER_ID, so a live client rejoins.
        drop(self.remove_member(member_id));
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.maybe_prepare_rebalance(now, config)
            }
            GroupState::PreparingRebalance => self.try_complete_join(now),
            GroupState::Empty | GroupState::Dead => {}
        }
    }

    fn remove_pending_member(&mut self, member_id: &str, now: Instant) {
        self.pending_members.remove(member_id);
        if self.state == GroupState::PreparingRebalance {
            self.try_complete_join(now);
        }
    }

    fn maybe_prepare_rebalance(&mut self, now: Instant, _config: &GroupConfig) {
        if matches!(
            self.state,
            GroupState::Stable | GroupState::CompletingRebalance | GroupState::Empty
        ) {
            self.prepare_rebalance(now);
        }
    }

    fn prepare_rebalance(&mut self, now: Instant) {
        if self.state == GroupState::CompletingRebalance {
            self.propagate_assignment(Some(ResponseError::RebalanceInProgress), now);
        }
        self.pending_sync_deadline = None;
        let timeout = self.rebalance_timeout();
        self.join_timer = Some(if self.state == GroupState::Empty {
            let delay = Duration::from_millis(self.initial_delay_ms);
            JoinTimer::Initial {
                deadline: now + delay,
                remaining: timeout.saturating_sub(delay),
            }
        } else {
            JoinTimer::Normal {
                deadline: now + timeout,
            }
        });
        tracing::info!(group = %self.id, generation = self.generation_id, members = self.members.len(), "preparing to rebalance");
        self.state = GroupState::PreparingRebalance;
        // As Kafka's tryCompleteElseWatch: done at once if nobody is missing.
        self.try_complete_join(now);
    }

    fn try_complete_join(&mut self, now: Instant) {
        if self.state == GroupState::PreparingRebalance
            && matches!(self.join_timer, Some(JoinTimer::Normal { .. }))
            && self.all_members_joined()
        {
            self.complete_join(now);
        }
    }

    /// Kafka's `onCompleteJoin`: members that did not rejoin (dynamic ones) are
    /// dropped, the next generation starts and every waiting JoinGroup is answered.
    fn complete_join(&mut self, now: Instant) {
        self.join_timer = None;
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| !m.is_awaiting_join() && m.group_instance_id.is_none())
            .map(|m| m.id.clone())
            .collect();
        for id in gone {
            tracing::info!(group = %self.id, member = %id, "removing member that did not rejoin in time");
            self.remove_member(&id);
        }
        if self.state == GroupState::Dead {
            return;
        }
        if !self.members.is_empty() && !self.elect_joined_leader() {
            // Only static members that did not rejoin are left: wait another
            // rebalance timeout for them (their sessions expire meanwhile).
            self.join_timer = Some(JoinTimer::Normal {
                deadline: now + self.rebalance_timeout(),
            });
            return;
        }
        self.generation_id += 1;
        self.pending_sync.clear();
        self.pending_sync_deadline = None;
        if self.members.is_empty() {
            self.protocol_name = None;
            self.state = GroupState::Empty;
            tracing::info!(group = %self.id, generation = self.generation_id, "group is empty");
            return;
        }
        self.protocol_name = self.select_protocol();
        self.state = GroupState::CompletingRebalance;
        tracing::info!(
            group = %self.id, generation = self.generation_id, members = self.members.len(),
            protocol = ?self.protocol_name, "rebalance joined; waiting for the leader's assignment"
        );
        let leader_view = self.current_member_metadata();
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let mut outcome = self.outcome_for(&id, false);
            if self.is_leader(&id) {
                outcome.members = leader_view.clone();
            }
            let member = self.members.get_mut(&id).expect("listed");
            if let Some(tx) = member.awaiting_join.take() {
                let _ = tx.send(outcome);
            }
            member.deadline = now + member.session_timeout;
            member.is_new = false;
            self.pending_sync.insert(id);
        }
        self.pending_sync_deadline = Some(now + self.rebalance_timeout());
    }

    fn elect_joined_leader(&mut self) -> bool {
        let Some(leader) = self.leader.clone() else {
            return false;
        };
        if self
            .members
            .get(&leader)
            .is_some_and(Member::is_awaiting_join)
        {
            return true;
        }
        match self.members.values().find(|m| m.is_awaiting_join()) {
            Some(m) => {
                self.leader = Some(m.id.clone());
                true
            }
            None => false,
        }
    }

    /// Everything whose deadline has passed: expired members and pending members,
    /// the end of a rebalance's join phase, members that never sent SyncGroup.
    fn on_deadlines(&mut self, now: Instant, config: &GroupConfig) {
        if self.state == GroupState::Dead {
            return;
        }
        let expired: Vec<String> = self
            .members
            .values()
            .filter(|m| m.expired(now))
            .map(|m| m.id.clone())
            .collect();
        for id in expired {
            tracing::info!(group = %self.id, member = %id, "member session expired; removing it");
            self.remove_member_and_update(&id, now, config);
        }
        let expired: Vec<String> = self
            .pending_members
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.remove_pending_member(&id, now);
        }
        if self
            .join_timer
            .as_ref()
            .is_some_and(|t| t.deadline() <= now)
        {
            match self.join_timer.take() {
                Some(JoinTimer::Initial { remaining, .. })
                    if self.new_member_added && !remaining.is_zero() =>
                {
                    self.new_member_added = false;
                    let delay = Duration::from_millis(self.initial_delay_ms).min(remaining);
                    self.join_timer = Some(JoinTimer::Initial {
                        deadline: now + delay,
                        remaining: remaining - delay,
                    });
                }
                _ => {
                    self.new_member_added = false;
                    self.complete_join(now);
                }
            }
        }
        if self.pending_sync_deadline.is_some_and(|d| d <= now) {
            self.pending_sync_deadline = None;
            if matches!(
                self.state,
                GroupState::CompletingRebalance | GroupState::Stable
            ) && !self.pending_sync.is_empty()
            {
                let laggards: Vec<String> = self.pending_sync.iter().cloned().collect();
                tracing::info!(group = %self.id, members = ?laggards, "removing members that sent no SyncGroup in time");
                for id in laggards {
                    self.remove_member(&id);
                }
                self.prepare_rebalance(now);
            }
        }
    }
}

/// One group: its state and the wake-up of its timer task.
pub struct GroupCell {
    pub id: String,
    state: Mutex<Group>,
    wake: Notify,
}

impl GroupCell {
    pub fn lock(&self) -> MutexGuard<'_, Group> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Shared {
    groups: Mutex<HashMap<String, Arc<GroupCell>>>,
    offsets: OffsetsStore,
    config: RwLock<GroupConfig>,
}

/// The coordinator of every group on this broker (a single node coordinates all).
pub struct GroupCoordinator {
    shared: Arc<Shared>,
}

impl GroupCoordinator {
    /// Opens the offsets log under `data_dir` and replays it: every group with
    /// committed offsets exists again, Empty.
    pub fn open(
        data_dir: &Path,
        config: GroupConfig,
        now_ms: i64,
    ) -> Result<GroupCoordinator, storage::StorageError> {
        let offsets = OffsetsStore::open(data_dir, now_ms, config.offsets_compaction_min_bytes)?;
        let mut groups = HashMap::new();
        for id in offsets.groups() {
            groups.insert(id.clone(), new_cell(&id, &config));
        }
        Ok(GroupCoordinator {
            shared: Arc::new(Shared {
                groups: Mutex::new(groups),
                offsets,
                config: RwLock::new(config),
            }),
        })
    }

    pub fn config(&self) -> GroupConfig {
        self.shared
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the settings (tests shorten the session-timeout bounds and delays).
    pub fn set_config(&self, config: GroupConfig) {
        for cell in self.all() {
            cell.lock().initial_delay_ms = config.initial_rebalance_delay_ms;
        }
        *self
            .shared
            .config
            .write()
            .unwrap_or_else(|p| p.into_inner()) = config;
    }

    pub fn offsets(&self) -> &OffsetsStore {
        &self.shared.offsets
    }

    fn registry(&self) -> MutexGuard<'_, HashMap<String, Arc<GroupCell>>> {
        self.shared.groups.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<GroupCell>> {
        self.registry().get(id).cloned()
    }

    /// The group `id`, created Empty if it does not exist and fewer than
    /// `max_groups` do. Past the limit the answer is COORDINATOR_NOT_AVAILABLE: Kafka
    /// has no code for "too many groups", and this one is what its coordinator
    /// answers when it cannot take a group on now. It is retriable, so a consumer
    /// backs off and retries (librdkafka and the Java client both do), and gets in
    /// once a group is deleted or drops out (Empty, no offsets), instead of failing
    /// for good as GROUP_MAX_SIZE_REACHED (a member limit) would make it.
    pub fn get_or_create(&self, id: &str) -> Result<Arc<GroupCell>, ResponseError> {
        let config = self.config();
        let mut registry = self.registry();
        if let Some(cell) = registry.get(id) {
            return Ok(cell.clone());
        }
        if registry.len() >= config.max_groups {
            tracing::warn!(group = %id, max_groups = config.max_groups,
                "group limit reached: refusing a new group with COORDINATOR_NOT_AVAILABLE");
            return Err(ResponseError::CoordinatorNotAvailable);
        }
        let cell = new_cell(id, &config);
        registry.insert(id.to_string(), cell.clone());
        Ok(cell)
    }

    /// Every group, in id order.
    pub fn all(&self) -> Vec<Arc<GroupCell>> {
        let mut cells: Vec<_> = self.registry().values().cloned().collect();
        cells.sort_by(|a, b| a.id.cmp(&b.id));
        cells
    }

    /// Runs `f` on the group under its lock, then makes sure its timer task sees the
    /// new deadlines, and drops the group if it is left with nothing (no members, no
    /// offsets), as Kafka's periodic cleanup would.
    pub fn with_group<R>(
        &self,
        cell: &Arc<GroupCell>,
        f: impl FnOnce(&mut Group, Instant, &GroupConfig) -> R,
    ) -> R {
        let config = self.config();
        let (result, idle) = {
            let mut group = cell.lock();
            let result = f(&mut group, Instant::now(), &config);
            self.arm_timer(cell, &mut group);
            (result, group.is_idle())
        };
        if idle {
            self.remove_if_idle(cell);
        }
        result
    }

    fn arm_timer(&self, cell: &Arc<GroupCell>, group: &mut Group) {
        if group.next_deadline().is_none() {
            return;
        }
        if group.timer_running {
            cell.wake.notify_one();
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            group.timer_running = true;
            runtime.spawn(run_timer(Arc::downgrade(&self.shared), cell.clone()));
        }
    }

    /// Drops an Empty group without members or offsets from the registry.
    pub fn remove_if_idle(&self, cell: &Arc<GroupCell>) {
        remove_if_idle(&self.shared, cell);
    }

    /// Makes sure a group exists (after offsets were committed for it). Not
    /// limited by `max_groups`: a group with durable offsets exists, as one
    /// replayed at start-up does (a commit to a new group was refused before).
    pub fn ensure_group(&self, id: &str) {
        let config = self.config();
        self.registry()
            .entry(id.to_string())
            .or_insert_with(|| new_cell(id, &config));
    }

    /// DeleteGroups for one group: only an Empty group may go. Its offsets are the
    /// caller's to tombstone.
    pub fn delete(&self, id: &str) -> Result<(), ResponseError> {
        let mut registry = self.registry();
        let Some(cell) = registry.get(id).cloned() else {
            return Err(ResponseError::GroupIdNotFound);
        };
        let mut group = cell.lock();
        match group.state {
            GroupState::Dead => Err(ResponseError::GroupIdNotFound),
            GroupState::Empty if group.members.is_empty() => {
                group.state = GroupState::Dead;
                group.pending_members.clear();
                registry.remove(id);
                drop(group);
                cell.wake.notify_one();
                Ok(())
            }
            _ => Err(ResponseError::NonEmptyGroup),
        }
    }
}

fn new_cell(id: &str, config: &GroupConfig) -> Arc<GroupCell> {
    let mut group = Group::new(id);
    group.initial_delay_ms = config.initial_rebalance_delay_ms;
    Arc::new(GroupCell {
        id: id.to_string(),
        state: Mutex::new(group),
        wake: Notify::new(),
    })
}

fn remove_if_idle(shared: &Shared, cell: &Arc<GroupCell>) {
    let mut registry = shared.groups.lock().unwrap_or_else(|p| p.into_inner());
    if !registry.get(&cell.id).is_some_and(|c| Arc::ptr_eq(c, cell)) {
        return;
    }
    let mut group = cell.lock();
    if group.is_idle() && !shared.offsets.has_offsets(&cell.id) {
        group.state = GroupState::Dead;
        registry.remove(&cell.id);
    }
}

/// A group's timer: sleeps until the group's earliest deadline, handles what is
/// due, and ends when the group has no deadline left (or is gone).
async fn run_timer(shared: Weak<Shared>, cell: Arc<GroupCell>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let config = strong
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (deadline, idle) = {
            let mut group = cell.lock();
            group.on_deadlines(Instant::now(), &config);
            let next = group.next_deadline();
            if next.is_none() || group.state == GroupState::Dead {
                group.timer_running = false;
            }
            (
                next.filter(|_| group.state != GroupState::Dead),
                group.is_idle(),
            )
        };
        if idle {
            remove_if_idle(&strong, &cell);
        }
        drop(strong);
        let Some(deadline) = deadline else { return };
        tokio::select! {
            _ = cell.wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}
