//! Consumer groups as the Kafka protocol shows them, for `freshet group` and the web
//! console: ListGroups and DescribeGroups (with each member's assignment decoded from
//! its ConsumerProtocol bytes), and each partition's committed offset and log end
//! (OffsetFetch, ListOffsets). Generic over the consumer's context; what the caller
//! prints on an error is its own (see [`LookupError`]).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::groups::GroupInfo;
use rdkafka::{Offset, TopicPartitionList};

/// A lookup the cluster refused: the error as `NAME: description`, and what was
/// looked up (empty, or ` (log end offset of t partition 0)`), for the caller to word.
#[derive(Debug)]
pub struct LookupError {
    pub error: String,
    pub what: String,
}

impl LookupError {
    fn new(error: KafkaError, what: String) -> LookupError {
        LookupError {
            error: crate::admin::describe_error(&error),
            what,
        }
    }
}

/// Group states in which a group has no members, so its offsets may be reset.
pub const INACTIVE_STATES: [&str; 2] = ["Empty", "Dead"];

/// ListGroups on every broker, then DescribeGroups for the groups found (librdkafka's
/// `rd_kafka_list_groups`). `Some(group)`: only that one, if the cluster knows it.
/// Call it after a metadata request: `rd_kafka_list_groups` first waits until the
/// client has any metadata, and wakes up only on a broker connection state change.
pub fn fetch_groups<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    group: Option<&str>,
    timeout: Duration,
) -> Result<Vec<GroupSummary>, LookupError> {
    let list = client
        .fetch_group_list(group, timeout)
        .map_err(|error| LookupError::new(error, String::new()))?;
    let mut groups: Vec<GroupSummary> = list.groups().iter().map(GroupSummary::from).collect();
    groups.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(groups)
}

/// What DescribeGroups told about a group, copied out of librdkafka's list.
pub struct GroupSummary {
    pub name: String,
    /// Empty when the coordinator answered DescribeGroups with an error.
    pub state: String,
    pub protocol_type: String,
    pub protocol: String,
    pub members: Vec<MemberSummary>,
}

pub struct MemberSummary {
    pub id: String,
    pub client_id: String,
    pub host: String,
    /// `None` when the member has no assignment (yet); `Some(Err)` when its bytes are
    /// not a ConsumerProtocol assignment.
    pub assignment: Option<Result<Assignment, AssignmentError>>,
}

impl From<&GroupInfo> for GroupSummary {
    fn from(info: &GroupInfo) -> Self {
        let mut members: Vec<MemberSummary> = info
            .members()
            .iter()
            .map(|member| MemberSummary {
                id: member.id().to_owned(),
                client_id: member.client_id().to_owned(),
                host: member.client_host().to_owned(),
                assignment: member
                    .assignment()
                    .filter(|bytes| !bytes.is_empty())
                    .map(decode_assignment),
            })
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        GroupSummary {
            name: info.name().to_owned(),
            state: info.state().to_owned(),
            protocol_type: info.protocol_type().to_owned(),
            protocol: info.protocol().to_owned(),
            members,
        }
    }
}

/// One partition the group has committed or is assigned, with how far behind the
/// log end it is.
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// `None`: assigned, nothing committed yet.
    pub committed: Option<i64>,
    pub log_end: i64,
    pub metadata: String,
}

/// Every partition the group has committed an offset for (OffsetFetch naming no
/// topic: the coordinator's list, whatever the size of the cluster) and every
/// partition a member is assigned, each with its log end.
pub fn committed_lags<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    summary: &GroupSummary,
    timeout: Duration,
) -> Result<Vec<PartitionLag>, LookupError> {
    let committed =
        crate::admin::list_group_offsets(client.client(), &summary.name).map_err(|error| {
            LookupError {
                error,
                what: " (committed offsets)".to_owned(),
            }
        })?;
    let mut partitions: BTreeMap<(String, i32), (Option<i64>, String)> = committed
        .into_iter()
        .map(|c| {
            let offset = (c.offset >= 0).then_some(c.offset);
            ((c.topic, c.partition), (offset, c.metadata))
        })
        .collect();
    for member in &summary.members {
        if let Some(Ok(assignment)) = &member.assignment {
            for (topic, assigned) in assignment {
                for &partition in assigned {
                    partitions
                        .entry((topic.clone(), partition))
                        .or_insert((None, String::new()));
                }
            }
        }
    }
    let mut lags = Vec::with_capacity(partitions.len());
    for ((topic, partition), (committed, metadata)) in partitions {
        let (_, log_end) = client
            .fetch_watermarks(&topic, partition, timeout)
            .map_err(|error| {
                LookupError::new(
                    error,
                    format!(" (log end offset of {topic} partition {partition})"),
                )
            })?;
        lags.push(PartitionLag {
            topic,
            partition,
            committed,
            log_end,
            metadata,
        });
    }
    Ok(lags)
}

/// Where a reset puts a partition's committed offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    Earliest,
    Latest,
    Offset(i64),
}

/// Where `target` puts a partition whose log spans `[low, high]`, and whether an
/// explicit offset had to be clamped into that range.
pub fn new_offset(target: Target, low: i64, high: i64) -> (i64, bool) {
    assert!(0 <= low && low <= high, "watermarks [{low}, {high}]");
    let (offset, clamped) = match target {
        Target::Earliest => (low, false),
        Target::Latest => (high, false),
        Target::Offset(wanted) => {
            let offset = wanted.clamp(low, high);
            (offset, offset != wanted)
        }
    };
    assert!((low..=high).contains(&offset));
    (offset, clamped)
}

/// Why committed offsets were not set.
#[derive(Debug)]
pub enum CommitError {
    /// The commit or the read back failed.
    Lookup(LookupError),
    /// The cluster acknowledged the commit and then reported something else.
    Mismatch(String),
}

/// Commits `offsets` (partition, offset) of `topic` for the client's group, as a
/// client that never joined it (the coordinator accepts that only while the group
/// has no members), then reads them back: an acknowledged commit must then be what
/// the cluster reports.
pub fn commit_offsets<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    topic: &str,
    offsets: &[(i32, i64)],
    timeout: Duration,
) -> Result<(), CommitError> {
    let lookup = |error| CommitError::Lookup(LookupError::new(error, String::new()));
    let mut commit = TopicPartitionList::with_capacity(offsets.len());
    for &(partition, offset) in offsets {
        commit
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(lookup)?;
    }
    client
        .commit(&commit, rdkafka::consumer::CommitMode::Sync)
        .map_err(lookup)?;
    let mut request = TopicPartitionList::with_capacity(offsets.len());
    for &(partition, _) in offsets {
        request.add_partition(topic, partition);
    }
    let committed = client.committed_offsets(request, timeout).map_err(lookup)?;
    for &(partition, offset) in offsets {
        let reported = committed
            .find_partition(topic, partition)
            .map(|element| element.offset());
        if reported != Some(Offset::Offset(offset)) {
            return Err(CommitError::Mismatch(format!(
                "the cluster accepted offset {offset} for {topic} partition {partition} \
                 but then reported {reported:?}"
            )));
        }
    }
    Ok(())
}

/// The partitions assigned to a member, by topic, as the assignor sent them.
pub type Assignment = Vec<(String, Vec<i32>)>;

/// Why assignment bytes are not a ConsumerProtocol assignment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AssignmentError {
    Truncated,
    NegativeVersion,
    NegativeLength,
    NotUtf8,
    TrailingBytes,
}

/// Decodes a ConsumerProtocolAssignment (versions 0-3 share one layout): version i16,
/// then an array of (topic string, array of i32 partitions), then user data bytes.
/// Later versions may append fields, so trailing bytes are accepted only for them.
pub fn decode_assignment(bytes: &[u8]) -> Result<Assignment, AssignmentError> {
    let mut reader = Reader { bytes };
    let version = reader.i16()?;
    if version < 0 {
        return Err(AssignmentError::NegativeVersion);
    }
    // Each topic takes at least 6 bytes (empty name, empty array) and each partition 4,
    // so a count larger than what is left is garbage; checked before allocating.
    let topic_count = reader.count(6)?;
    let mut topics = Vec::with_capacity(topic_count);
    for _ in 0..topic_count {
        let name = reader.string()?;
        let partition_count = reader.count(4)?;
        let mut partitions = Vec::with_capacity(partition_count);
        for _ in 0..partition_count {
            partitions.push(reader.i32()?);
        }
        topics.push((name, partitions));
    }
    let user_data = reader.i32()?;
    if user_data >= 0 {
        reader.take(user_data as usize)?;
    } else if user_data != -1 {
        return Err(AssignmentError::NegativeLength);
    }
    if version <= 3 && !reader.bytes.is_empty() {
        return Err(AssignmentError::TrailingBytes);
    }
    Ok(topics)
}

/// Big-endian reads over untrusted bytes; every read checks the length first.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AssignmentError> {
        if self.bytes.len() < n {
            return Err(AssignmentError::Truncated);
        }
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    fn i16(&mut self) -> Result<i16, AssignmentError> {
        let taken = self.take(2)?;
        Ok(i16::from_be_bytes([taken[0], taken[1]]))
    }

    fn i32(&mut self) -> Result<i32, AssignmentError> {
        let taken = self.take(4)?;
        Ok(i32::from_be_bytes([taken[0], taken[1], taken[2], taken[3]]))
    }

    /// An array length whose elements take at least `element_bytes` each.
    fn count(&mut self, element_bytes: usize) -> Result<usize, AssignmentError> {
        let count = self.i32()?;
        let count = usize::try_from(count).map_err(|_| AssignmentError::NegativeLength)?;
        if count.saturating_mul(element_bytes) > self.bytes.len() {
            return Err(AssignmentError::Truncated);
        }
        Ok(count)
    }

    fn string(&mut self) -> Result<String, AssignmentError> {
        let length = self.i16()?;
        let length = usize::try_from(length).map_err(|_| AssignmentError::NegativeLength)?;
        let taken = self.take(length)?;
        String::from_utf8(taken.to_vec()).map_err(|_| AssignmentError::NotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn encode(
        version: i16,
        topics: &[(&str, &[i32])],
        user_data: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut bytes = version.to_be_bytes().to_vec();
        bytes.extend((topics.len() as i32).to_be_bytes());
        for (name, partitions) in topics {
            bytes.extend((name.len() as i16).to_be_bytes());
            bytes.extend(name.as_bytes());
            bytes.extend((partitions.len() as i32).to_be_bytes());
            for partition in *partitions {
                bytes.extend(partition.to_be_bytes());
            }
        }
        match user_data {
            Some(data) => {
                bytes.extend((data.len() as i32).to_be_bytes());
                bytes.extend(data);
            }
            None => bytes.extend((-1i32).to_be_bytes()),
        }
        bytes
    }

    #[test]
    fn assignment_round_trips_every_version() {
        for version in 0..=3 {
            let bytes = encode(version, &[("b", &[2, 0]), ("a", &[1])], Some(b"ud"));
            let decoded = decode_assignment(&bytes).expect("valid assignment");
            assert_eq!(
                decoded,
                vec![("b".to_owned(), vec![2, 0]), ("a".to_owned(), vec![1])]
            );
        }
        assert_eq!(decode_assignment(&encode(0, &[], None)), Ok(vec![]));
    }

    #[test]
    fn garbage_assignment_is_an_error_never_a_panic() {
        let valid = encode(1, &[("topic", &[0, 1, 2])], Some(b"x"));
        // Every truncation of a valid assignment is refused.
        for end in 0..valid.len() {
            assert!(decode_assignment(&valid[..end]).is_err(), "prefix {end}");
        }
        let mut trailing = valid.clone();
        trailing.push(0);
        assert_eq!(
            decode_assignment(&trailing),
            Err(AssignmentError::TrailingBytes)
        );
        // A future version may append fields.
        let mut future = encode(4, &[("t", &[7])], None);
        future.extend([1, 2, 3]);
        assert_eq!(
            decode_assignment(&future),
            Ok(vec![("t".to_owned(), vec![7])])
        );
        assert_eq!(
            decode_assignment(&encode(-1, &[], None)),
            Err(AssignmentError::NegativeVersion)
        );
        // A huge count is refused before anything is allocated for it.
        let mut huge = 0i16.to_be_bytes().to_vec();
        huge.extend(i32::MAX.to_be_bytes());
        assert_eq!(decode_assignment(&huge), Err(AssignmentError::Truncated));
        let mut bad_utf8 = encode(0, &[("ab", &[])], None);
        bad_utf8[8] = 0xff;
        assert_eq!(decode_assignment(&bad_utf8), Err(AssignmentError::NotUtf8));
    }

    #[test]
    fn new_offsets_stay_within_the_log() {
        assert_eq!(new_offset(Target::Earliest, 3, 10), (3, false));
        assert_eq!(new_offset(Target::Latest, 3, 10), (10, false));
        assert_eq!(new_offset(Target::Offset(5), 3, 10), (5, false));
        assert_eq!(new_offset(Target::Offset(10), 3, 10), (10, false));
        assert_eq!(new_offset(Target::Offset(11), 3, 10), (10, true));
        assert_eq!(new_offset(Target::Offset(0), 3, 10), (3, true));
        assert_eq!(new_offset(Target::Offset(-5), 0, 0), (0, true));
    }

    proptest::proptest! {
        /// Arbitrary bytes decode or are refused, never panic.
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode_assignment(&bytes);
        }
    }
}
