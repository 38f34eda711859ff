//! `freshet group`: list consumer groups, describe one (members, their assignments,
//! committed offsets and lag) and reset a group's committed offsets, through the
//! Kafka protocol (ListGroups, DescribeGroups, Metadata, ListOffsets, OffsetFetch,
//! OffsetCommit).
//!
//! Offsets are read and written by a consumer whose `group.id` is the group but which
//! never subscribes: it never joins the group, so it commits with generation -1 and no
//! member id, which a Kafka coordinator accepts only while the group is Empty. That is
//! why `reset-offsets` checks that the group has no members before committing, as
//! Kafka's `kafka-consumer-groups.sh` does; a member that joins between the check and
//! the commit makes the coordinator refuse the commit (UNKNOWN_MEMBER_ID), so the
//! check gives a clear message, and the coordinator is the safety net.

use std::fmt::Write as _;

use anyhow::{anyhow, bail, Context as _};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;

use gateway::groups::{
    new_offset, Assignment, AssignmentError, CommitError, GroupSummary, LookupError, Target,
    INACTIVE_STATES,
};

use super::{describe_error, ConnectArgs, ToolContext, REQUEST_TIMEOUT};

/// The groups the cluster lists (`gateway::groups::fetch_groups`), errors worded here.
fn fetch_groups(
    client: &BaseConsumer<ToolContext>,
    group: Option<&str>,
) -> anyhow::Result<Vec<GroupSummary>> {
    gateway::groups::fetch_groups(client, group, REQUEST_TIMEOUT).map_err(|e| explain(client, e))
}

/// A failed lookup, as this tool words it.
fn explain(client: &BaseConsumer<ToolContext>, e: LookupError) -> anyhow::Error {
    client.context().explain(format!("{}{}", e.error, e.what))
}

#[derive(clap::Args)]
pub struct GroupArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(clap::Subcommand)]
enum GroupCommand {
    /// List consumer groups, one per line: GROUP, STATE, PROTOCOL_TYPE (tab separated).
    List,
    /// Show a group's state, members with their assigned partitions, and the
    /// committed offset, log end offset and lag of every partition it has committed
    /// or a member is assigned ("-" where nothing is committed yet).
    Describe { group: String },
    /// Set a group's committed offsets for a topic. Refused while the group has
    /// members: stop its consumers first.
    ResetOffsets {
        group: String,
        /// Topic whose offsets are reset.
        #[arg(long)]
        topic: String,
        /// Only this partition (default: every partition of the topic).
        #[arg(long)]
        partition: Option<i32>,
        #[command(flatten)]
        target: ResetTarget,
        /// Print the new offsets without committing them.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct ResetTarget {
    /// To the first offset still in each partition (the log start offset).
    #[arg(long)]
    to_earliest: bool,
    /// To the end of each partition (the high watermark): nothing left to consume.
    #[arg(long)]
    to_latest: bool,
    /// To offset N, clamped to each partition's [log start, log end].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    to_offset: Option<i64>,
}

pub fn run(args: GroupArgs) -> anyhow::Result<()> {
    let connect = &args.connect;
    let mut out = String::new();
    match args.command {
        GroupCommand::List => {
            let client = consumer(connect, None).context("group list failed")?;
            list(&client, &mut out).context("group list failed")?
        }
        GroupCommand::Describe { group } => {
            let client = consumer(connect, Some(&group)).context("group describe failed")?;
            describe(&client, &group, &mut out).context("group describe failed")?
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            partition,
            target,
            dry_run,
        } => {
            let target = match (target.to_earliest, target.to_latest, target.to_offset) {
                (true, _, _) => Target::Earliest,
                (_, true, _) => Target::Latest,
                (_, _, Some(offset)) => Target::Offset(offset),
                (false, false, None) => unreachable!("clap requires one --to-* flag"),
            };
            let client = consumer(connect, Some(&group)).context("group reset-offsets failed")?;
            reset_offsets(
                &client, &group, &topic, partition, target, dry_run, &mut out,
            )
            .context("group reset-offsets failed")?
        }
    }
    print!("{out}");
    Ok(())
}

/// A consumer that never subscribes, so it never joins (or disturbs) any group.
/// `group` is the group whose offsets it reads and commits; `None` for a client that
/// only lists groups.
fn consumer(
    connect: &ConnectArgs,
    group: Option<&str>,
) -> anyhow::Result<BaseConsumer<ToolContext>> {
    let mut defaults = vec![
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        // Looking at a group must not create the topics it looks at.
        ("allow.auto.create.topics", "false"),
    ];
    if let Some(group) = group {
        defaults.push(("group.id", group));
    }
    BaseConsumer::from_config_and_context(&connect.client_config(&defaults), connect.context())
        .context("cannot create Kafka consumer")
}

/// Metadata of every topic. It is also what makes [`fetch_groups`] reliable:
/// `rd_kafka_list_groups` first waits until the client has any metadata, but it wakes
/// up only on a broker connection state change, and a response arriving after the
/// last such change (connections are made lazily) leaves it waiting out its timeout.
/// A metadata request answered before the listing starts avoids that wait.
fn cluster_metadata(client: &BaseConsumer<ToolContext>) -> anyhow::Result<Metadata> {
    client
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .map_err(|err| client.context().explain(describe_error(&err)))
}

fn list(client: &BaseConsumer<ToolContext>, out: &mut String) -> anyhow::Result<()> {
    cluster_metadata(client)?;
    for group in fetch_groups(client, None)? {
        writeln!(
            out,
            "{}\t{}\t{}",
            group.name,
            state_or_unknown(&group.state),
            group.protocol_type
        )?;
    }
    Ok(())
}

fn state_or_unknown(state: &str) -> &str {
    if state.is_empty() {
        "(unknown)"
    } else {
        state
    }
}

fn describe(
    client: &BaseConsumer<ToolContext>,
    group: &str,
    out: &mut String,
) -> anyhow::Result<()> {
    cluster_metadata(client)?;
    // A group the cluster does not know is described as Kafka's DescribeGroups
    // describes it: Dead, without members.
    let summary = fetch_groups(client, Some(group))?
        .into_iter()
        .find(|summary| summary.name == group)
        .unwrap_or_else(|| GroupSummary {
            name: group.to_owned(),
            state: "Dead".to_owned(),
            protocol_type: String::new(),
            protocol: String::new(),
            members: Vec::new(),
        });
    writeln!(
        out,
        "Group: {group}\tState: {}\tProtocolType: {}\tProtocol: {}\tMembers: {}",
        state_or_unknown(&summary.state),
        summary.protocol_type,
        summary.protocol,
        summary.members.len()
    )?;
    for member in &summary.members {
        writeln!(
            out,
            "\tMember: {}\tClientId: {}\tHost: {}\tAssignment: {}",
            member.id,
            member.client_id,
            member.host,
            format_assignment(member.assignment.as_ref())
        )?;
    }
    let lags = gateway::groups::committed_lags(client, &summary, REQUEST_TIMEOUT)
        .map_err(|e| explain(client, e))?;
    for lag in lags {
        // As kafka-consumer-groups shows a partition without a committed offset.
        let (committed, behind) = match lag.committed {
            Some(offset) => (offset.to_string(), (lag.log_end - offset).to_string()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        writeln!(
            out,
            "\tTopic: {}\tPartition: {}\tCommitted: {committed}\tLogEnd: {}\tLag: {behind}\tMetadata: {}",
            lag.topic,
            lag.partition,
            lag.log_end,
            printable(&lag.metadata)
        )?;
    }
    Ok(())
}

/// Commit metadata is free text from a client: control characters are escaped so one
/// partition stays one line.
fn printable(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

fn reset_offsets(
    client: &BaseConsumer<ToolContext>,
    group: &str,
    topic: &str,
    only: Option<i32>,
    target: Target,
    dry_run: bool,
    out: &mut String,
) -> anyhow::Result<()> {
    if let Some(partition) = only.filter(|partition| *partition < 0) {
        bail!("--partition must not be negative, got {partition}");
    }
    let partitions = super::topic_partitions(client.client(), topic, only)?;
    let mut offsets = Vec::with_capacity(partitions.len());
    let mut warnings = Vec::new();
    for partition in partitions {
        let (low, high) = client
            .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
            .map_err(|err| {
                client.context().explain(format!(
                    "{} (offsets of {topic} partition {partition})",
                    describe_error(&err)
                ))
            })?;
        if low < 0 || low > high {
            bail!("the cluster reports a log of [{low}, {high}] for {topic} partition {partition}");
        }
        let (offset, clamped) = new_offset(target, low, high);
        if clamped {
            if let Target::Offset(wanted) = target {
                warnings.push(format!(
                    "freshet: warning: offset {wanted} is outside {topic} partition \
                     {partition} [{low}, {high}]; using {offset}"
                ));
            }
        }
        offsets.push((partition, offset));
    }

    // Checked as late as possible, just before the commit; `topic_partitions` has
    // fetched metadata, as `fetch_groups` needs.
    if let Some(summary) = fetch_groups(client, Some(group))?
        .into_iter()
        .find(|summary| summary.name == group)
    {
        if !INACTIVE_STATES.contains(&summary.state.as_str()) {
            bail!(
                "group '{group}' is active (state {}, members: {}); offsets can only be reset \
                 while it has no members, so stop its consumers first",
                state_or_unknown(&summary.state),
                summary.members.len()
            );
        }
    }
    for warning in warnings {
        eprintln!("{warning}");
    }

    if !dry_run {
        gateway::groups::commit_offsets(client, topic, &offsets, REQUEST_TIMEOUT).map_err(|e| {
            match e {
                CommitError::Lookup(e) => explain(client, e),
                CommitError::Mismatch(message) => anyhow!("{message}"),
            }
        })?;
    }

    writeln!(out, "TOPIC\tPARTITION\tNEW-OFFSET")?;
    for (partition, offset) in offsets {
        writeln!(out, "{topic}\t{partition}\t{offset}")?;
    }
    if dry_run {
        eprintln!("freshet: dry run: nothing committed");
    }
    Ok(())
}

/// `topic:0,1,2 other:5` (topics and partitions sorted), `-` for no assignment, `?`
/// for bytes that are not a ConsumerProtocol assignment.
fn format_assignment(assignment: Option<&Result<Assignment, AssignmentError>>) -> String {
    let topics = match assignment {
        None => return "-".to_owned(),
        Some(Err(_)) => return "?".to_owned(),
        Some(Ok(topics)) => topics,
    };
    let mut topics: Vec<(&String, Vec<i32>)> = topics
        .iter()
        .filter(|(_, partitions)| !partitions.is_empty())
        .map(|(topic, partitions)| {
            let mut partitions = partitions.clone();
            partitions.sort_unstable();
            (topic, partitions)
        })
        .collect();
    if topics.is_empty() {
        return "-".to_owned();
    }
    topics.sort();
    topics
        .iter()
        .map(|(topic, partitions)| {
            let ids: Vec<String> = partitions.iter().map(i32::to_string).collect();
            format!("{topic}:{}", ids.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_are_shown_sorted() {
        // Decoding is gateway::groups' (tested there); this is the tool's wording.
        let assigned: Assignment = vec![("b".to_owned(), vec![2, 0]), ("a".to_owned(), vec![1])];
        assert_eq!(format_assignment(Some(&Ok(assigned))), "a:1 b:0,2");
        assert_eq!(format_assignment(Some(&Ok(Vec::new()))), "-");
        let nothing: Assignment = vec![("a".to_owned(), Vec::new())];
        assert_eq!(format_assignment(Some(&Ok(nothing))), "-");
        assert_eq!(format_assignment(None), "-");
        assert_eq!(
            format_assignment(Some(&Err(AssignmentError::Truncated))),
            "?"
        );
    }

    #[test]
    fn metadata_stays_on_one_line() {
        assert_eq!(printable("a\tb\nc é"), "a\\tb\\nc é");
    }
}
