//! Command-line tools that speak the Kafka protocol through librdkafka.
//!
//! Architecture invariant: nothing in here touches broker internals. Every tool is a
//! plain Kafka client, so it works against Apache Kafka, Redpanda and Freshet alike.
//!
//! This module holds what all tools share: the connection flags (`--brokers`, `-X`),
//! the librdkafka client context, and the one-line error messages. Error names and the
//! admin requests the rdkafka crate does not wrap are the gateway's (`gateway::admin`),
//! shared with the web console.

pub mod consume;
pub mod group;
pub mod produce;
pub mod topic;

use std::sync::Mutex;

use anyhow::{anyhow, bail};
use rdkafka::client::Client;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

/// How long a tool waits for cluster metadata or an admin answer before giving up.
pub use gateway::admin::{describe_code, describe_error, error_name, REQUEST_TIMEOUT};

/// Connection flags shared by every Kafka tool.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Bootstrap brokers, comma separated.
    #[arg(
        long,
        global = true,
        env = "FRESHET_BROKERS",
        default_value = "127.0.0.1:9092",
        value_name = "HOST:PORT[,..]"
    )]
    pub brokers: String,
    /// Any librdkafka property (repeatable), e.g. `-X message.timeout.ms=5000`.
    #[arg(short = 'X', global = true, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub properties: Vec<(String, String)>,
}

impl ConnectArgs {
    /// The librdkafka configuration for these flags; `-X` properties are applied last so
    /// they override anything a tool sets by default.
    pub fn client_config(&self, tool_defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in tool_defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// librdkafka's own log lines go to stderr only when the user asked for them with
    /// `-X debug=...`; otherwise they would drown the one-line error a tool prints.
    pub fn context(&self) -> ToolContext {
        ToolContext {
            print_logs: self.properties.iter().any(|(key, _)| key == "debug"),
            last_error: Mutex::new(None),
        }
    }
}

/// Parses `key=value` (the value may itself contain `=`).
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got '{text}'")),
    }
}

/// The client context of every tool: it remembers the last client-wide error (e.g.
/// "all brokers down") so a failure message can say why, and keeps librdkafka quiet
/// unless debugging was asked for.
pub struct ToolContext {
    print_logs: bool,
    last_error: Mutex<Option<String>>,
}

impl ToolContext {
    /// The last client-wide error librdkafka reported, if any, as one line.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .map(|guard| guard.clone())
            .unwrap_or(None)
    }

    /// `context` appended with the last client-wide error, if there is one.
    pub fn explain(&self, message: String) -> anyhow::Error {
        match self.last_error() {
            Some(last) => anyhow!("{message} (last client error: {last})"),
            None => anyhow!("{message}"),
        }
    }
}

impl ClientContext for ToolContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if self.print_logs {
            eprintln!("rdkafka {level:?} {fac}: {log_message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let line = match error.rdkafka_error_code() {
            Some(code) => format!("{}: {reason}", error_name(code)),
            None => format!("{error}: {reason}"),
        };
        if self.print_logs {
            eprintln!("rdkafka error: {line}");
        }
        if let Ok(mut guard) = self.last_error.lock() {
            *guard = Some(line);
        }
    }
}

/// Admin clients and metadata-only clients need a producer context; they never produce.
impl ProducerContext for ToolContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl rdkafka::consumer::ConsumerContext for ToolContext {}

/// Runs an rdkafka admin future to completion on this thread. The futures are
/// runtime-agnostic (they wait on a oneshot fed by rdkafka's own polling thread), so a
/// current-thread runtime is enough.
pub fn block_on<F: std::future::Future>(future: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    Ok(runtime.block_on(future))
}

/// The partitions of `topic`: all of them, or the one asked for if it exists.
pub fn topic_partitions(
    client: &Client<ToolContext>,
    topic: &str,
    only: Option<i32>,
) -> anyhow::Result<Vec<i32>> {
    let metadata = client
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|err| client.context().explain(describe_error(&err)))?;
    let topic_metadata = metadata
        .topics()
        .iter()
        .find(|candidate| candidate.name() == topic)
        .ok_or_else(|| anyhow!("the cluster's metadata answer does not mention topic '{topic}'"))?;
    if let Some(err) = topic_metadata.error() {
        bail!("{} (topic '{topic}')", describe_code(err.into()));
    }
    let mut partitions: Vec<i32> = topic_metadata
        .partitions()
        .iter()
        .map(|partition| partition.id())
        .collect();
    partitions.sort_unstable();
    if partitions.is_empty() {
        bail!("topic '{topic}' has no partitions");
    }
    match only {
        None => Ok(partitions),
        Some(partition) if partitions.contains(&partition) => Ok(vec![partition]),
        Some(partition) => bail!(
            "{} (topic '{topic}' has partitions {} to {}, not {partition})",
            describe_code(RDKafkaErrorCode::UnknownPartition),
            partitions[0],
            partitions[partitions.len() - 1]
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_are_kafka_upper_snake() {
        assert_eq!(
            error_name(RDKafkaErrorCode::TopicAlreadyExists),
            "TOPIC_ALREADY_EXISTS"
        );
        assert_eq!(
            error_name(RDKafkaErrorCode::UnknownTopicOrPartition),
            "UNKNOWN_TOPIC_OR_PARTITION"
        );
        assert_eq!(
            error_name(RDKafkaErrorCode::NotLeaderForPartition),
            "NOT_LEADER_OR_FOLLOWER"
        );
        assert_eq!(
            error_name(RDKafkaErrorCode::InvalidPartitions),
            "INVALID_PARTITIONS"
        );
        assert_eq!(
            error_name(RDKafkaErrorCode::MessageTimedOut),
            "_MSG_TIMED_OUT"
        );
        assert_eq!(
            describe_code(RDKafkaErrorCode::TopicAlreadyExists),
            "TOPIC_ALREADY_EXISTS: Topic already exists"
        );
    }

    #[test]
    fn key_value_splits_at_the_first_equals() {
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_key_value("a="), Ok(("a".into(), String::new())));
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
    }
}
