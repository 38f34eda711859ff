//! DescribeConfigs, AlterConfigs and IncrementalAlterConfigs for topics (and
//! DescribeConfigs for this broker, whose settings are static).

use protocol::kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse as AlterResult;
use protocol::kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use protocol::kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse as IncrementalResult;
use protocol::kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
};
use protocol::ResponseError;

use super::{code, text};
use crate::topic_config::{
    self, ConfigDef, ConfigType, TopicConfig, DEFS, SOURCE_DEFAULT, SOURCE_DYNAMIC_TOPIC,
};
use crate::topics::Topic;
use crate::{Broker, BrokerConfig};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_STATIC_BROKER: i8 = 4;

const OP_SET: i8 = 0;
const OP_DELETE: i8 = 1;
const OP_APPEND: i8 = 2;
const OP_SUBTRACT: i8 = 3;

/// Every topic config with its effective value and whether the topic sets it.
pub(crate) fn effective_configs(
    broker: &Broker,
    config: &TopicConfig,
) -> Vec<(&'static ConfigDef, String, bool)> {
    DEFS.iter()
        .map(|def| {
            let (value, explicit) = config.value(def, &broker.config);
            (def, value, explicit)
        })
        .collect()
}

/// The broker settings shown under Kafka's names, read-only.
fn broker_entries(c: &BrokerConfig) -> Vec<(&'static str, String, ConfigType)> {
    vec![
        ("broker.id", c.node_id.to_string(), ConfigType::Int),
        (
            "num.partitions",
            c.num_partitions.to_string(),
            ConfigType::Int,
        ),
        (
            "auto.create.topics.enable",
            c.auto_create_topics.to_string(),
            ConfigType::Boolean,
        ),
        (
            "log.dirs",
            c.data_dir.display().to_string(),
            ConfigType::String,
        ),
        (
            "log.segment.bytes",
            c.segment_bytes.to_string(),
            ConfigType::Int,
        ),
        ("log.roll.ms", c.segment_ms.to_string(), ConfigType::Long),
        (
            "log.retention.ms",
            c.retention_ms.to_string(),
            ConfigType::Long,
        ),
        (
            "log.retention.bytes",
            c.retention_bytes.to_string(),
            ConfigType::Long,
        ),
        (
            "log.retention.check.interval.ms",
            c.retention_check_interval_ms.to_string(),
            ConfigType::Long,
        ),
        (
            "log.flush.interval.ms",
            c.flush_interval_ms.to_string(),
            ConfigType::Long,
        ),
        (
            "message.max.bytes",
            c.max_message_bytes.to_string(),
            ConfigType::Int,
        ),
        (
            "socket.request.max.bytes",
            c.max_request_bytes.to_string(),
            ConfigType::Int,
        ),
        (
            "max.connections",
            c.max_connections.to_string(),
            ConfigType::Int,
        ),
        (
            "fetch.max.bytes",
            c.fetch_max_bytes.to_string(),
            ConfigType::Int,
        ),
    ]
}

pub fn describe(
    broker: &Broker,
    request: DescribeConfigsRequest,
    version: i16,
) -> DescribeConfigsResponse {
    let mut response = DescribeConfigsResponse::default();
    for resource in request.resources {
        let mut result = DescribeConfigsResult::default()
            .with_resource_type(resource.resource_type)
            .with_resource_name(resource.resource_name.clone());
        let wanted = |name: &str| {
            resource
                .configuration_keys
                .as_ref()
                .is_none_or(|keys| keys.iter().any(|k| &**k == name))
        };
        let entry = |name: &str,
                     value: String,
                     source: i8,
                     kind: ConfigType,
                     read_only: bool,
                     doc: &str| {
            let mut e = DescribeConfigsResourceResult::default()
                .with_name(text(name))
                .with_value(Some(text(value.clone())))
                .with_read_only(read_only)
                .with_config_source(source)
                .with_config_type(if version >= 3 { kind as i8 } else { 0 });
            if request.include_synonyms {
                e.synonyms = vec![DescribeConfigsSynonym::default()
                    .with_name(text(name))
                    .with_value(Some(text(value)))
                    .with_source(source)];
            }
            if request.include_documentation {
                e.documentation = Some(text(doc));
            }
            e
        };
        match resource.resource_type {
            RESOURCE_TOPIC => match broker.topics.get(&resource.resource_name) {
                None => {
                    result.error_code = code(ResponseError::UnknownTopicOrPartition);
                    result.error_message = Some(text(format!(
                        "Topic {} does not exist",
                        &*resource.resource_name
                    )));
                }
                Some(topic) => {
                    for (def, value, explicit) in effective_configs(broker, &topic.config()) {
                        if wanted(def.name) {
                            let source = if explicit {
                                SOURCE_DYNAMIC_TOPIC
                            } else {
                                SOURCE_DEFAULT
                            };
                            result
                                .configs
                                .push(entry(def.name, value, source, def.kind, false, def.doc));
                        }
                    }
                }
            },
            RESOURCE_BROKER
                if resource.resource_name.is_empty()
                    || *resource.resource_name == *broker.config.node_id.to_string() =>
            {
                for (name, value, kind) in broker_entries(&broker.config) {
                    if wanted(name) {
                        result.configs.push(entry(
                            name,
                            value,
                            SOURCE_STATIC_BROKER,
                            kind,
                            true,
                            "Set in the broker's configuration.",
                        ));
                    }
                }
            }
            RESOURCE_BROKER => {
                result.error_code = code(ResponseError::InvalidRequest);
                result.error_message = Some(text(format!(
                    "Unexpected broker id, expected {}",
                    broker.config.node_id
                )));
            }
            other => {
                result.error_code = code(ResponseError::InvalidRequest);
                result.error_message = Some(text(format!("Unsupported resource type {other}")));
            }
        }
        response.results.push(result);
    }
    response
}

/// Checks the resource and applies `change` to its current configs.
fn alter_topic(
    broker: &Broker,
    resource_type: i8,
    name: &str,
    validate_only: bool,
    change: impl FnOnce(&Topic) -> Result<TopicConfig, String>,
) -> Result<(), (ResponseError, String)> {
    if resource_type == RESOURCE_BROKER {
        return Err((
            ResponseError::InvalidRequest,
            "Broker configs are static in Freshet: set them in the config file".into(),
        ));
    }
    if resource_type != RESOURCE_TOPIC {
        return Err((
            ResponseError::InvalidRequest,
            format!("Unsupported resource type {resource_type}"),
        ));
    }
    let topic = broker.topics.get(name).ok_or_else(|| {
        (
            ResponseError::UnknownTopicOrPartition,
            format!("Topic {name} does not exist"),
        )
    })?;
    let config = change(&topic).map_err(|m| (ResponseError::InvalidConfig, m))?;
    if validate_only {
        return Ok(());
    }
    broker
        .topics
        .set_config(&topic, config, &broker.config)
        .map_err(|e| (ResponseError::KafkaStorageError, e.to_string()))
}

/// AlterConfigs replaces a topic's whole set of explicit configs.
pub fn alter(broker: &Broker, request: AlterConfigsRequest) -> AlterConfigsResponse {
    let mut response = AlterConfigsResponse::default();
    for r in request.resources {
        let outcome = alter_topic(
            broker,
            r.resource_type,
            &r.resource_name,
            request.validate_only,
            |_| TopicConfig::from_pairs(r.configs.iter().map(|c| (&*c.name, c.value.as_deref()))),
        );
        let mut result = AlterResult::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name);
        if let Err((err, message)) = outcome {
            result.error_code = code(err);
            result.error_message = Some(text(message));
        }
        response.responses.push(result);
    }
    response
}

/// IncrementalAlterConfigs: SET, DELETE, APPEND and SUBTRACT per key.
pub fn incremental_alter(
    broker: &Broker,
    request: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut response = IncrementalAlterConfigsResponse::default();
    for r in request.resources {
        let outcome = alter_topic(
            broker,
            r.resource_type,
            &r.resource_name,
            request.validate_only,
            |topic| {
                let mut config = topic.config();
                for op in &r.configs {
                    let name = &*op.name;
                    let def = topic_config::def(name)
                        .ok_or_else(|| format!("Unknown topic config name: {name}"))?;
                    match op.config_operation {
                        OP_SET => {
                            let value = topic_config::validate(name, op.value.as_deref())?;
                            config.overrides.insert(name.to_string(), value);
                        }
                        OP_DELETE => {
                            config.overrides.remove(name);
                        }
                        OP_APPEND | OP_SUBTRACT => {
                            if def.kind != ConfigType::List {
                                return Err(format!(
                                    "Config value append is not allowed for config key: {name}"
                                ));
                            }
                            let (current, _) = config.value(def, &broker.config);
                            let mut items: Vec<String> = current
                                .split(',')
                                .filter(|s| !s.is_empty())
                                .map(str::to_string)
                                .collect();
                            for item in op
                                .value
                                .as_deref()
                                .unwrap_or("")
                                .split(',')
                                .map(str::trim)
                                .filter(|s| !s.is_empty())
                            {
                                if op.config_operation == OP_APPEND {
                                    if !items.iter().any(|i| i == item) {
                                        items.push(item.to_string());
                                    }
                                } else {
                                    items.retain(|i| i != item);
                                }
                            }
                            let value = topic_config::validate(name, Some(&items.join(",")))?;
                            config.overrides.insert(name.to_string(), value);
                        }
                        other => return Err(format!("Unknown config operation {other}")),
                    }
                }
                Ok(config)
            },
        );
        let mut result = IncrementalResult::default()
            .with_resource_type(r.resource_type)
            .with_resource_name(r.resource_name);
        if let Err((err, message)) = outcome {
            result.error_code = code(err);
            result.error_message = Some(text(message));
        }
        response.responses.push(result);
    }
    response
}
