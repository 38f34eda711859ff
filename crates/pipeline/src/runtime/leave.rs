//! Leaving a consumer group as a static member (KIP-345). A consumer with a
//! `group.instance.id` does not send LeaveGroup when it closes (librdkafka, as the
//! Java client), so that a restart takes its place without a rebalance; but then a
//! clean stop leaves its partitions unread until the session times out. After a
//! clean stop the run removes its instance from each of its groups itself: a
//! LeaveGroup v3 naming the instance, sent to the group's coordinator, as Kafka's
//! `AdminClient.removeMembersFromConsumerGroup` does.
//!
//! Plaintext listeners only (librdkafka holds the TLS and SASL settings); with any
//! other `security.protocol` the groups are left to the session timeout.

use std::net::TcpStream;
use std::time::Duration;

use protocol::client;
use protocol::kafka_protocol::messages::leave_group_request::MemberIdentity;
use protocol::kafka_protocol::messages::{FindCoordinatorRequest, GroupId, LeaveGroupRequest};
use protocol::kafka_protocol::protocol::{Request, StrBytes};
use rdkafka::config::ClientConfig;

const TIMEOUT: Duration = Duration::from_secs(5);
/// Answers to these two requests are small.
const MAX_ANSWER: usize = 1 << 20;

fn call<R: Request>(
    stream: &mut TcpStream,
    request: &R,
    version: i16,
    id: i32,
) -> Result<R::Response, String> {
    client::call(stream, request, version, id, "freshet-pipeline", MAX_ANSWER)
}

fn connect(address: &str) -> Result<TcpStream, String> {
    client::connect(address, TIMEOUT)
}

/// Removes static member `instance` from `group`.
fn leave_one(bootstrap: &str, group: &str, instance: &str) -> Result<(), String> {
    let mut stream = connect(bootstrap)?;
    let find = FindCoordinatorRequest::default()
        .with_key(StrBytes::from_string(group.to_string()))
        .with_key_type(0);
    let found = call(&mut stream, &find, 2, 1)?;
    if found.error_code != 0 {
        return Err(format!("FindCoordinator: error {}", found.error_code));
    }
    let coordinator = format!("{}:{}", found.host.as_str(), found.port);
    let mut stream = if coordinator == bootstrap {
        stream
    } else {
        connect(&coordinator)?
    };
    let leave = LeaveGroupRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_members(vec![MemberIdentity::default()
            .with_member_id(StrBytes::from_static_str(""))
            .with_group_instance_id(Some(StrBytes::from_string(
                instance.to_string(),
            )))]);
    let left = call(&mut stream, &leave, 3, 2)?;
    // UNKNOWN_MEMBER_ID (25): already gone. GROUP_ID_NOT_FOUND (69) likewise.
    let code = left.members.first().map_or(left.error_code, |m| {
        if left.error_code != 0 {
            left.error_code
        } else {
            m.error_code
        }
    });
    match code {
        0 | 25 | 69 => Ok(()),
        other => Err(format!("LeaveGroup: error {other}")),
    }
}

/// After a clean stop: takes this run's static instance (if `client` has one) out
/// of `groups`, so that their other members take its partitions at once.
pub(super) fn leave_static(client: &ClientConfig, groups: &[String]) {
    let Some(instance) = client.get("group.instance.id") else {
        return;
    };
    let plaintext = client
        .get("security.protocol")
        .is_none_or(|p| p.eq_ignore_ascii_case("plaintext"));
    if !plaintext {
        return;
    }
    let Some(bootstrap) = client
        .get("bootstrap.servers")
        .and_then(|b| b.split(',').next())
        .map(|b| b.trim().to_string())
    else {
        return;
    };
    for group in groups {
        if let Err(e) = leave_one(&bootstrap, group, instance) {
            tracing::warn!(%group, error = %e, "could not leave the group: its partitions wait for the session timeout");
        }
    }
}
