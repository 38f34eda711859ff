//! `freshet topic`: create, list, describe, delete topics and alter their configs,
//! through the Kafka admin API (CreateTopics, Metadata, ListOffsets, DescribeConfigs,
//! DeleteTopics, IncrementalAlterConfigs).

use std::ffi::{CStr, CString};
use std::fmt::Write as _;
use std::os::raw::{c_char, c_int};

use anyhow::{anyhow, bail, Context as _};
use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigSource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::bindings as rdsys;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::RDKafkaErrorCode;

use super::{block_on, describe_code, describe_error, ConnectArgs, ToolContext, REQUEST_TIMEOUT};

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
    let admin: AdminClient<ToolContext> =
        AdminClient::from_config_and_context(&connect.client_config(&[]), connect.context())
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
    AdminOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .operation_timeout(Some(REQUEST_TIMEOUT))
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
    // -1 asks the cluster for its defaults (CreateTopics v4+), as kafka-topics.sh does.
    let partitions = partitions.unwrap_or(-1);
    let replication_factor = replication_factor.unwrap_or(-1);
    if partitions == 0 || partitions < -1 {
        bail!("--partitions must be at least 1, got {partitions}");
    }
    if replication_factor == 0 || replication_factor < -1 {
        bail!("--replication-factor must be at least 1, got {replication_factor}");
    }
    let mut topic = NewTopic::new(
        name,
        partitions,
        TopicReplication::Fixed(replication_factor),
    );
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let options = admin_options().validate_only(validate_only);
    let results = block_on(admin.create_topics([&topic], &options))?
        .map_err(|err| admin.inner().context().explain(describe_error(&err)))?;
    for result in results {
        match result {
            Ok(created) if validate_only => {
                writeln!(out, "topic '{created}' is valid (not created)")?
            }
            Ok(created) => writeln!(out, "created topic '{created}'")?,
            Err((topic, code)) => bail!("{} (topic '{topic}')", describe_code(code)),
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
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let results = block_on(admin.delete_topics(&names, &admin_options()))?
        .map_err(|err| admin.inner().context().explain(describe_error(&err)))?;
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(deleted) => writeln!(out, "deleted topic '{deleted}'")?,
            Err((topic, code)) => {
                failures.push(format!("{} (topic '{topic}')", describe_code(code)))
            }
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

/// IncrementalAlterConfigs through librdkafka's C API: the rdkafka crate's AdminClient
/// only wraps the older AlterConfigs, which replaces a topic's whole config set (every
/// key not named is reset), so it cannot express "change only these keys".
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
    let mut ops = Vec::new();
    for (key, value) in sets {
        ops.push((
            rdsys::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_SET,
            key,
            Some(value),
        ));
    }
    for key in deletes {
        ops.push((
            rdsys::rd_kafka_AlterConfigOpType_t::RD_KAFKA_ALTER_CONFIG_OP_TYPE_DELETE,
            key,
            None,
        ));
    }
    incremental_alter_configs(admin, name, &ops)
        .map_err(|err| admin.inner().context().explain(err))?;
    writeln!(out, "altered configs of topic '{name}'")?;
    Ok(())
}

type AlterOp<'a> = (
    rdsys::rd_kafka_AlterConfigOpType_t,
    &'a String,
    Option<&'a String>,
);

/// Owns a librdkafka object and destroys it on every exit path.
struct Native<T> {
    ptr: *mut T,
    destroy: unsafe extern "C" fn(*mut T),
}

impl<T> Drop for Native<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: ptr came from the matching librdkafka constructor and is destroyed once.
            unsafe { (self.destroy)(self.ptr) }
        }
    }
}

fn native<T>(
    ptr: *mut T,
    destroy: unsafe extern "C" fn(*mut T),
    what: &str,
) -> Result<Native<T>, String> {
    if ptr.is_null() {
        return Err(format!("librdkafka could not allocate {what}"));
    }
    Ok(Native { ptr, destroy })
}

/// # Safety contract
/// All pointers handed to librdkafka are owned by `Native` guards that outlive the call;
/// strings passed in are copied by librdkafka before it returns.
fn incremental_alter_configs(
    admin: &AdminClient<ToolContext>,
    name: &str,
    ops: &[AlterOp<'_>],
) -> Result<(), String> {
    let rk = admin.inner().native_ptr();
    let c_name = CString::new(name).map_err(|_| "topic name contains a NUL byte".to_owned())?;
    // SAFETY: see the contract above; every returned pointer is checked for null.
    unsafe {
        let resource = native(
            rdsys::rd_kafka_ConfigResource_new(
                rdsys::rd_kafka_ResourceType_t::RD_KAFKA_RESOURCE_TOPIC,
                c_name.as_ptr(),
            ),
            rdsys::rd_kafka_ConfigResource_destroy,
            "a config resource",
        )?;
        for (op, key, value) in ops {
            let c_key = CString::new(key.as_str())
                .map_err(|_| format!("config key '{key}' contains a NUL byte"))?;
            let c_value = value
                .map(|value| CString::new(value.as_str()))
                .transpose()
                .map_err(|_| format!("value of config '{key}' contains a NUL byte"))?;
            let value_ptr = c_value
                .as_ref()
                .map_or(std::ptr::null(), |value| value.as_ptr());
            let error = rdsys::rd_kafka_ConfigResource_add_incremental_config(
                resource.ptr,
                c_key.as_ptr(),
                *op,
                value_ptr,
            );
            if !error.is_null() {
                let error = Native {
                    ptr: error,
                    destroy: rdsys::rd_kafka_error_destroy,
                };
                let code = RDKafkaErrorCode::from(rdsys::rd_kafka_error_code(error.ptr));
                let text = CStr::from_ptr(rdsys::rd_kafka_error_string(error.ptr))
                    .to_string_lossy()
                    .into_owned();
                return Err(format!(
                    "{}: {text} (config '{key}')",
                    super::error_name(code)
                ));
            }
        }

        let options = native(
            rdsys::rd_kafka_AdminOptions_new(
                rk,
                rdsys::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_INCREMENTALALTERCONFIGS,
            ),
            rdsys::rd_kafka_AdminOptions_destroy,
            "admin options",
        )?;
        let timeout_ms = c_int::try_from(REQUEST_TIMEOUT.as_millis()).unwrap_or(c_int::MAX);
        let mut errstr = [0 as c_char; 512];
        let err = rdsys::rd_kafka_AdminOptions_set_request_timeout(
            options.ptr,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return Err(CStr::from_ptr(errstr.as_ptr())
                .to_string_lossy()
                .into_owned());
        }

        let queue = native(
            rdsys::rd_kafka_queue_new(rk),
            rdsys::rd_kafka_queue_destroy,
            "a queue",
        )?;
        let mut resources = [resource.ptr];
        rdsys::rd_kafka_IncrementalAlterConfigs(
            rk,
            resources.as_mut_ptr(),
            resources.len(),
            options.ptr,
            queue.ptr,
        );

        // librdkafka enforces the request timeout itself and always posts a result event;
        // the extra margin only guards against a lost event.
        let event = rdsys::rd_kafka_queue_poll(queue.ptr, timeout_ms.saturating_add(5_000));
        if event.is_null() {
            return Err("no answer to IncrementalAlterConfigs in time".to_owned());
        }
        let event = Native {
            ptr: event,
            destroy: rdsys::rd_kafka_event_destroy,
        };
        let err = rdsys::rd_kafka_event_error(event.ptr);
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let text = CStr::from_ptr(rdsys::rd_kafka_event_error_string(event.ptr))
                .to_string_lossy()
                .into_owned();
            return Err(format!("{}: {text}", super::error_name(err.into())));
        }
        let result = rdsys::rd_kafka_event_IncrementalAlterConfigs_result(event.ptr);
        if result.is_null() {
            return Err("unexpected event in answer to IncrementalAlterConfigs".to_owned());
        }
        let mut count = 0usize;
        let answered = rdsys::rd_kafka_IncrementalAlterConfigs_result_resources(result, &mut count);
        if answered.is_null() || count == 0 {
            return Err(
                "the cluster answered IncrementalAlterConfigs without any resource".to_owned(),
            );
        }
        for i in 0..count {
            let answered = *answered.add(i);
            let err = rdsys::rd_kafka_ConfigResource_error(answered);
            if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                let code = RDKafkaErrorCode::from(err);
                let text_ptr = rdsys::rd_kafka_ConfigResource_error_string(answered);
                let text = if text_ptr.is_null() {
                    super::error_description(code)
                } else {
                    CStr::from_ptr(text_ptr).to_string_lossy().into_owned()
                };
                return Err(format!(
                    "{}: {text} (topic '{name}')",
                    super::error_name(code)
                ));
            }
        }
    }
    Ok(())
}
