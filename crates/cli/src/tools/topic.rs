//! `freshet topic`: create, list, describe, delete topics and alter their configs,
//! through the Kafka admin API (CreateTopics, Metadata, ListOffsets, DescribeConfigs,
//! DeleteTopics, IncrementalAlterConfigs).

use std::fmt::Write as _;

use anyhow::{anyhow, bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, ConfigSource, ResourceSpecifier};
use rdkafka::config::FromClientConfigAndContext;

use super::{block_on, describe_code, describe_error, ConnectArgs, ToolContext, REQUEST_TIMEOUT};
use gateway::admin::{self, ConfigChange, NewTopicSpec};

#[derive(clap::Args)]
pub struct TopicArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(subcommand)]
    command: TopicCommand,
}

#[derive(clap::Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions (default: the cluster's `num.partitions`).
        #[arg(long)]
        partitions: Option<i32>,
        /// Replicas per partition (default: the cluster's `default.replication.factor`).
        #[arg(long)]
        replication_factor: Option<i32>,
        /// Topic config (repeatable), e.g. `--config retention.ms=60000`.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = super::parse_key_value)]
        configs: Vec<(String, String)>,
        /// Ask the cluster to validate the request without creating the topic.
        #[arg(long)]
        validate_only: bool,
    },
    /// List topics, one per line.
    List {
        /// Also print the partition count, tab separated.
        #[arg(long)]
        long: bool,
    },
    /// Show a topic's partitions (leader, replicas, ISR, log start and end offsets)
    /// and its configs.
    Describe { name: String },
    /// Delete topics.
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Change topic configs with IncrementalAlterConfigs: only the named keys change.
    AlterConfig {
        name: String,
        /// Set a config (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = super::parse_key_value)]
        sets: Vec<(String, String)>,
        /// Remove a config override so the cluster default applies again (repeatable).
        #[arg(long = "delete", value_name = "KEY")]
        deletes: Vec<String>,
    },
}

pub fn run(args: TopicArgs) -> anyhow::Result<()> {
    let connect = &args.connect;
    let admin: AdminClient<ToolContext> = AdminClient::from_config_and_context(
        // Describing a topic must not create it as a side effect of the metadata
        // request (librdkafka allows that by default for producer-type clients).
        &connect.client_config(&[("allow.auto.create.topics", "false")]),
        connect.context(),
    )
    .context("cannot create Kafka client")?;
    let mut out = String::new();
    match args.command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
            validate_only,
        } => create(
            &admin,
            &name,
            partitions,
            replication_factor,
            &configs,
            validate_only,
            &mut out,
        )
        .context("topic create failed")?,
        TopicCommand::List { long } => list(&admin, long, &mut out).context("topic list failed")?,
        TopicCommand::Describe { name } => {
            describe(&admin, &name, &mut out).context("topic describe failed")?
        }
        TopicCommand::Delete { names } => {
            delete(&admin, &names, &mut out).context("topic delete failed")?
        }
        TopicCommand::AlterConfig {
            name,
            sets,
            deletes,
        } => alter_config(&admin, &name, &sets, &deletes, &mut out)
            .context("topic alter-config failed")?,
    }
    print!("{out}");
    Ok(())
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT))
}

fn create(
    admin: &AdminClient<ToolContext>,
    name: &str,
    partitions: Option<i32>,
    replication_factor: Option<i32>,
    configs: &[(String, String)],
    validate_only: bool,
    out: &mut String,
) -> anyhow::Result<()> {
    if let Some(n) = partitions.filter(|n| *n < 1) {
        bail!("--partitions must be at least 1, got {n}");
    }
    if let Some(n) = replication_factor.filter(|n| *n < 1) {
        bail!("--replication-factor must be at least 1, got {n}");
    }
    // -1 asks the cluster for its defaults (CreateTopics v4+), as kafka-topics.sh does.
    let partitions = partitions.unwrap_or(-1);
    let replication_factor = replication_factor.unwrap_or(-1);
    let spec = NewTopicSpec {
        name,
        partitions,
        replication_factor,
        configs,
    };
    let outcomes = admin::create_topics(admin.inner(), &[spec], validate_only)
        .map_err(|err| admin.inner().context().explain(err))?;
    if outcomes.is_empty() {
        bail!("the cluster's answer does not mention topic '{name}'");
    }
    for outcome in outcomes {
        match outcome {
            Ok(created) if validate_only => {
                writeln!(out, "topic '{created}' is valid (not created)")?
            }
            Ok(created) => writeln!(out, "created topic '{created}'")?,
            Err(line) => bail!("{line}"),
        }
    }
    Ok(())
}

fn list(admin: &AdminClient<ToolContext>, long: bool, out: &mut String) -> anyhow::Result<()> {
    let client = admin.inner();
    let metadata = client
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .map_err(|err| client.context().explain(describe_error(&err)))?;
    let mut topics: Vec<_> = metadata.topics().iter().collect();
    topics.sort_by(|a, b| a.name().cmp(b.name()));
    for topic in topics {
        if long {
            writeln!(out, "{}\t{}", topic.name(), topic.partitions().len())?;
        } else {
            writeln!(out, "{}", topic.name())?;
        }
    }
    Ok(())
}

fn describe(admin: &AdminClient<ToolContext>, name: &str, out: &mut String) -> anyhow::Result<()> {
    let client = admin.inner();
    let metadata = client
        .fetch_metadata(Some(name), REQUEST_TIMEOUT)
        .map_err(|err| client.context().explain(describe_error(&err)))?;
    let topic = metadata
        .topics()
        .iter()
        .find(|topic| topic.name() == name)
        .ok_or_else(|| anyhow!("the cluster's metadata answer does not mention topic '{name}'"))?;
    if let Some(err) = topic.error() {
        bail!("{} (topic '{name}')", describe_code(err.into()));
    }
    let mut partitions: Vec<_> = topic.partitions().iter().collect();
    partitions.sort_by_key(|partition| partition.id());
    let replication_factor = partitions
        .first()
        .map_or(0, |partition| partition.replicas().len());
    writeln!(
        out,
        "Topic: {name}\tPartitionCount: {}\tReplicationFactor: {replication_factor}",
        partitions.len()
    )?;
    for partition in partitions {
        let id = partition.id();
        write!(
            out,
            "\tPartition: {id}\tLeader: {}\tReplicas: {}\tIsr: {}",
            partition.leader(),
            join_ids(partition.replicas()),
            join_ids(partition.isr()),
        )?;
        if let Some(err) = partition.error() {
            write!(out, "\tError: {}", describe_code(err.into()))?;
        }
        let (low, high) = client
            .fetch_watermarks(name, id, REQUEST_TIMEOUT)
            .map_err(|err| {
                client.context().explain(format!(
                    "{} (offsets of partition {id})",
                    describe_error(&err)
                ))
            })?;
        writeln!(out, "\tLogStartOffset: {low}\tLogEndOffset: {high}")?;
    }

    let resources =
        block_on(admin.describe_configs([&ResourceSpecifier::Topic(name)], &admin_options()))?
            .map_err(|err| client.context().explain(describe_error(&err)))?;
    writeln!(out, "Configs:")?;
    for resource in resources {
        let resource = resource
            .map_err(|code| anyhow!("{} (configs of topic '{name}')", describe_code(code)))?;
        let mut entries = resource.entries;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for entry in entries {
            let value = match (&entry.value, entry.is_sensitive) {
                (_, true) => "(sensitive)",
                (Some(value), false) => value.as_str(),
                (None, false) => "(null)",
            };
            writeln!(
                out,
                "\t{}={value}\t({})",
                entry.name,
                source_name(entry.source)
            )?;
        }
    }
    Ok(())
}

fn join_ids(ids: &[i32]) -> String {
    ids.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

fn source_name(source: ConfigSource) -> &'static str {
    match source {
        ConfigSource::Unknown => "unknown",
        ConfigSource::DynamicTopic => "topic",
        ConfigSource::DynamicBroker => "dynamic broker",
        ConfigSource::DynamicDefaultBroker => "dynamic broker default",
        ConfigSource::StaticBroker => "static broker",
        ConfigSource::Default => "default",
    }
}

fn delete(
    admin: &AdminClient<ToolContext>,
    names: &[String],
    out: &mut String,
) -> anyhow::Result<()> {
    let outcomes = admin::delete_topics(admin.inner(), names)
        .map_err(|err| admin.inner().context().explain(err))?;
    if outcomes.len() != names.len() {
        bail!(
            "the cluster answered for {} of {} topics",
            outcomes.len(),
            names.len()
        );
    }
    let mut failures = Vec::new();
    for outcome in outcomes {
        match outcome {
            Ok(deleted) => writeln!(out, "deleted topic '{deleted}'")?,
            Err(line) => failures.push(line),
        }
    }
    if !failures.is_empty() {
        // What did get deleted is still worth saying before the error line.
        print!("{out}");
        out.clear();
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

fn alter_config(
    admin: &AdminClient<ToolContext>,
    name: &str,
    sets: &[(String, String)],
    deletes: &[String],
    out: &mut String,
) -> anyhow::Result<()> {
    if sets.is_empty() && deletes.is_empty() {
        bail!("nothing to change: give --set KEY=VALUE or --delete KEY");
    }
    let changes: Vec<ConfigChange<'_>> = sets
        .iter()
        .map(|(key, value)| ConfigChange::Set(key, value))
        .chain(deletes.iter().map(|key| ConfigChange::Delete(key)))
        .collect();
    admin::incremental_alter_topic_configs(admin.inner(), name, &changes)
        .map_err(|err| admin.inner().context().explain(err))?;
    writeln!(out, "altered configs of topic '{name}'")?;
    Ok(())
}
