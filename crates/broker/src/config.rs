//! Broker settings: defaults, overlaid by a TOML file, overlaid by `FRESHET_*`
//! environment variables, overlaid by command-line flags (the CLI applies those).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Every limit and default the broker has. Field names are the TOML keys; the
/// environment variable is `FRESHET_` + the key in upper case.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub node_id: i32,
    /// Address to bind, `host:port`; port 0 picks a free port.
    pub listen: String,
    /// `host:port` clients are told to connect to; defaults to the bound address.
    pub advertised_listener: Option<String>,
    pub data_dir: PathBuf,
    /// Partitions of a topic created without a count (auto-created or `-1`).
    pub num_partitions: i32,
    /// Create a topic when Metadata names one that does not exist.
    pub auto_create_topics: bool,
    /// Defaults of the topic configs `segment.bytes`, `segment.ms`, `retention.ms`,
    /// `retention.bytes`, `max.message.bytes`.
    pub segment_bytes: u64,
    pub segment_ms: i64,
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub max_message_bytes: i32,
    /// How often retention runs over all partitions.
    pub retention_check_interval_ms: u64,
    /// Background fsync of partitions with unflushed data, in addition to the fsync
    /// every acks=all produce waits for; 0 leaves acks=0/1 data to the OS.
    pub flush_interval_ms: u64,
    /// Largest request frame accepted; a larger one closes the connection.
    pub max_request_bytes: usize,
    /// Bytes of request frames larger than the 64 KiB read buffer that all
    /// connections may be reading or have awaiting an answer, together (Kafka's
    /// `queued.max.request.bytes`). Such a frame reserves its whole size from this
    /// budget before more than 64 KiB of it is read, and keeps it until it is
    /// answered; a connection waiting for its reservation is not read. At least
    /// `max_request_bytes`, so that any one frame fits.
    pub queued_max_request_bytes: usize,
    /// Connections served at once; further ones are closed on accept.
    pub max_connections: usize,
    /// Requests read from one connection before earlier ones are answered.
    pub max_in_flight_per_connection: usize,
    /// Bytes of record data that all pending fetch responses may hold together.
    pub fetch_memory_bytes: usize,
    /// Upper bound on one fetch response, whatever the client asks for.
    pub fetch_max_bytes: usize,
    /// Partitions one CreateTopics or CreatePartitions request may create (Kafka's
    /// controller refuses more than 10,000 with `POLICY_VIOLATION`).
    pub max_partitions_per_request: usize,
    /// Partitions this broker hosts at most, counting every topic; creations past
    /// it (explicit or automatic) get `POLICY_VIOLATION`. Each partition holds a
    /// few open files and its indexes in memory.
    pub max_partitions: usize,
    /// A connection that completes no request for this long while nothing is in
    /// flight on it (silent, or stopped mid-frame), or whose peer stops reading an
    /// answer for this long, is closed (Kafka's `connections.max.idle.ms`).
    pub connections_max_idle_ms: u64,
    /// On shutdown, how long connections get to answer what is in flight; those
    /// still open then (say, a peer that stopped reading) are closed unanswered.
    pub shutdown_timeout_ms: u64,
    /// Decompressed bytes a by-timestamp ListOffsets may walk inside one
    /// compressed batch; past it the answer is the batch's first offset (a
    /// decompression bomb costs at most this much CPU).
    pub timestamp_lookup_max_bytes: u64,
    /// Consumer groups (Kafka's `group.min/max.session.timeout.ms`,
    /// `group.initial.rebalance.delay.ms`, `group.max.size`,
    /// `offset.metadata.max.bytes`).
    pub group_min_session_timeout_ms: i32,
    pub group_max_session_timeout_ms: i32,
    pub group_initial_rebalance_delay_ms: u64,
    pub group_max_size: usize,
    pub offset_metadata_max_bytes: usize,
    /// Consumer groups this broker coordinates at most; a JoinGroup or a simple
    /// OffsetCommit that would create one more gets `COORDINATOR_NOT_AVAILABLE`
    /// (retriable: the client retries, and gets in once a group is deleted or has
    /// emptied out).
    pub max_groups: usize,
    /// Kafka's `producer.id.expiration.ms`: an idempotent producer whose last batch
    /// on a partition is this old is forgotten there (its state and snapshot entry).
    pub producer_id_expiration_ms: i64,
    /// Kafka's `producer.id.expiration.check.interval.ms`: how often expiry runs.
    pub producer_id_expiration_check_interval_ms: u64,
    /// Idempotent producer ids whose state one partition keeps at most; a batch
    /// from a new producer id past it gets `THROTTLING_QUOTA_EXCEEDED` (retriable, as
    /// KIP-936 proposes for unseen producer ids beyond a quota) until idle producers
    /// expire (`producer_id_expiration_ms`). Known producers are never refused.
    pub max_producer_ids_per_partition: usize,
    /// Kafka's `transaction.max.timeout.ms`: the longest `transaction.timeout.ms`
    /// a transactional producer may ask for (a longer one gets
    /// `INVALID_TRANSACTION_TIMEOUT`). A transaction open longer than its producer's
    /// timeout is aborted by the coordinator, its producer fenced.
    pub transaction_max_timeout_ms: i32,
    /// Kafka's `transaction.abort.timed.out.transaction.cleanup.interval.ms`: how
    /// often the coordinator looks for transactions past their timeout.
    pub transaction_abort_check_interval_ms: u64,
    /// Transactional ids the coordinator keeps state for at most; `InitProducerId`
    /// for a new one past it gets `THROTTLING_QUOTA_EXCEEDED` until idle ones
    /// expire (`transactional_id_expiration_ms`). Known ids are never refused.
    pub max_transactional_ids: usize,
    /// Kafka's `transactional.id.expiration.ms`: a transactional id with no open
    /// transaction and no request for this long is forgotten (its producer id too).
    pub transactional_id_expiration_ms: i64,
    /// The committed-offsets log is compacted (the live offsets rewritten, the rest
    /// dropped) once it is twice the size it had after the last compaction and at
    /// least this big.
    pub offsets_compaction_min_bytes: u64,
    /// Per-partition series `GET /metrics` shows at most of each kind (a partition's
    /// log size and offsets; a group's lag on a partition): the label cardinality
    /// stays bounded on a broker with many partitions. The rest are counted in
    /// `freshet_metrics_series_omitted`.
    pub metrics_max_partition_series: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            node_id: 0,
            listen: "127.0.0.1:9092".into(),
            advertised_listener: None,
            data_dir: PathBuf::from("./freshet-data"),
            num_partitions: 1,
            auto_create_topics: true,
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            max_message_bytes: 1_048_588,
            retention_check_interval_ms: 300_000,
            flush_interval_ms: 1_000,
            max_request_bytes: 100 * 1024 * 1024,
            // Kafka's default is 500 MB; 128 MiB still fits one largest frame, and
            // keeps what hostile peers can make the broker hold in the same range
            // as the other budgets.
            queued_max_request_bytes: 128 * 1024 * 1024,
            max_connections: 1_000,
            max_in_flight_per_connection: 16,
            fetch_memory_bytes: 512 * 1024 * 1024,
            fetch_max_bytes: 55 * 1024 * 1024,
            max_partitions_per_request: 10_000,
            max_partitions: 100_000,
            connections_max_idle_ms: 600_000,
            shutdown_timeout_ms: 30_000,
            timestamp_lookup_max_bytes: 256 * 1024 * 1024,
            group_min_session_timeout_ms: 6_000,
            group_max_session_timeout_ms: 1_800_000,
            // Kafka's code default is 3 s; the server.properties Kafka ships sets 0
            // "for a better out-of-the-box experience", and a new pipeline's first
            // row waits for it (issue 26: under 1 s). Members starting together
            // cost a rebalance more, which is cheap at the scale Freshet serves.
            group_initial_rebalance_delay_ms: 0,
            group_max_size: 10_000,
            offset_metadata_max_bytes: 4_096,
            max_groups: 100_000,
            producer_id_expiration_ms: 86_400_000,
            producer_id_expiration_check_interval_ms: 600_000,
            max_producer_ids_per_partition: 10_000,
            transaction_max_timeout_ms: 900_000,
            transaction_abort_check_interval_ms: 10_000,
            max_transactional_ids: 100_000,
            transactional_id_expiration_ms: 604_800_000,
            offsets_compaction_min_bytes: 16 * 1024 * 1024,
            metrics_max_partition_series: 10_000,
        }
    }
}

/// The largest byte budget (`fetch_memory_bytes`, `queued_max_request_bytes`): they
/// are tokio semaphores, whose permits are taken in `u32` steps.
pub const MAX_BUDGET_BYTES: usize = u32::MAX as usize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl BrokerConfig {
    /// Defaults, then `file` if given (its `[http]` table is the gateway's), then
    /// every `FRESHET_<KEY>` variable in `env` whose key is a field here, through
    /// the one settings loader (`common::settings`).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                common::settings::read_toml(path).map_err(|e| ConfigError::Invalid(e.0))?
            }
            None => toml::Table::new(),
        };
        table.remove("http"); // the HTTP gateway's table (gateway::GatewayConfig)
        let config: BrokerConfig =
            common::settings::load(table, "FRESHET_", common::settings::UnknownEnv::Ignore, env)
                .map_err(|e| ConfigError::Invalid(e.0))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.into()));
        if self.num_partitions < 1 {
            return bad("num_partitions must be at least 1");
        }
        if self.max_connections < 1 || self.max_in_flight_per_connection < 1 {
            return bad("max_connections and max_in_flight_per_connection must be at least 1");
        }
        if self.max_request_bytes < 1024 {
            return bad("max_request_bytes must be at least 1024");
        }
        if self.max_partitions_per_request < 1 || self.max_partitions < 1 {
            return bad("max_partitions_per_request and max_partitions must be at least 1");
        }
        if self.connections_max_idle_ms < 1 {
            return bad("connections_max_idle_ms must be at least 1");
        }
        // The limits against each other: each of these pairs, the other way round,
        // describes a request or an answer that could never be served.
        let at_most = |small: (&str, u64), large: (&str, u64), why: &str| {
            if small.1 > large.1 {
                Err(ConfigError::Invalid(format!(
                    "{} ({}) must be at most {} ({}): {why}",
                    small.0, small.1, large.0, large.1
                )))
            } else {
                Ok(())
            }
        };
        at_most(
            ("max_message_bytes", self.max_message_bytes.max(0) as u64),
            ("max_request_bytes", self.max_request_bytes as u64),
            "a batch that large could never arrive in a request",
        )?;
        at_most(
            ("max_request_bytes", self.max_request_bytes as u64),
            (
                "queued_max_request_bytes",
                self.queued_max_request_bytes as u64,
            ),
            "a request that large could never be read",
        )?;
        at_most(
            (
                "queued_max_request_bytes",
                self.queued_max_request_bytes as u64,
            ),
            ("the largest budget", MAX_BUDGET_BYTES as u64),
            "budgets are counted in a semaphore of u32 permits",
        )?;
        at_most(
            ("fetch_max_bytes", self.fetch_max_bytes as u64),
            ("fetch_memory_bytes", self.fetch_memory_bytes as u64),
            "a fetch answer that large could never be held",
        )?;
        at_most(
            ("fetch_memory_bytes", self.fetch_memory_bytes as u64),
            ("the largest budget", MAX_BUDGET_BYTES as u64),
            "budgets are counted in a semaphore of u32 permits",
        )?;
        at_most(
            (
                "offset_metadata_max_bytes",
                self.offset_metadata_max_bytes as u64,
            ),
            ("max_request_bytes", self.max_request_bytes as u64),
            "commit metadata that large could never arrive in a request",
        )?;
        if self.fetch_max_bytes < 1 {
            return bad("fetch_max_bytes must be at least 1");
        }
        if self.group_max_size < 1 || self.max_groups < 1 || self.max_producer_ids_per_partition < 1
        {
            return bad(
                "group_max_size, max_groups and max_producer_ids_per_partition must be at least 1",
            );
        }
        if self.group_min_session_timeout_ms < 1
            || self.group_max_session_timeout_ms < self.group_min_session_timeout_ms
        {
            return bad(
                "group_min_session_timeout_ms must be >= 1 and <= group_max_session_timeout_ms",
            );
        }
        if self.segment_bytes < 14 || self.segment_ms < 1 || self.max_message_bytes < 0 {
            return bad(
                "segment_bytes >= 14, segment_ms >= 1 and max_message_bytes >= 0 are required",
            );
        }
        if self.producer_id_expiration_ms < 1 || self.producer_id_expiration_check_interval_ms < 1 {
            return bad(
                "producer_id_expiration_ms and producer_id_expiration_check_interval_ms must be at least 1",
            );
        }
        if self.transaction_max_timeout_ms < 1
            || self.transaction_abort_check_interval_ms < 1
            || self.max_transactional_ids < 1
            || self.transactional_id_expiration_ms < 1
        {
            return bad(
                "transaction_max_timeout_ms, transaction_abort_check_interval_ms, \
                 max_transactional_ids and transactional_id_expiration_ms must be at least 1",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("freshet.toml");
        std::fs::write(&path, "num_partitions = 3\nretention_ms = 1000\n").unwrap();
        let env = vec![
            ("FRESHET_RETENTION_MS".to_string(), "2000".to_string()),
            (
                "FRESHET_AUTO_CREATE_TOPICS".to_string(),
                "false".to_string(),
            ),
            ("FRESHET_BROKERS".to_string(), "ignored:9092".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
            // Read as the field's type: a path that looks like a number is a path.
            ("FRESHET_DATA_DIR".to_string(), "123".to_string()),
            ("FRESHET_ADVERTISED_LISTENER".to_string(), "h:1".to_string()),
        ];
        let config = BrokerConfig::load(Some(&path), env).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("123"));
        assert_eq!(config.advertised_listener.as_deref(), Some("h:1"));
        assert_eq!(config.num_partitions, 3);
        assert_eq!(config.retention_ms, 2000);
        assert!(!config.auto_create_topics);
        assert_eq!(config.listen, BrokerConfig::default().listen);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("freshet.toml");
        std::fs::write(&path, "num_partitons = 3\n").unwrap();
        assert!(BrokerConfig::load(Some(&path), vec![]).is_err());
        let env = vec![("FRESHET_NUM_PARTITIONS".to_string(), "0".to_string())];
        assert!(BrokerConfig::load(None, env).is_err());
        for key in [
            "FRESHET_CONNECTIONS_MAX_IDLE_MS",
            "FRESHET_MAX_PARTITIONS",
            "FRESHET_MAX_PARTITIONS_PER_REQUEST",
        ] {
            let env = vec![(key.to_string(), "0".to_string())];
            assert!(BrokerConfig::load(None, env).is_err(), "{key}=0 accepted");
        }
    }

    #[test]
    fn limits_are_keys_with_kafka_like_defaults() {
        let defaults = BrokerConfig::default();
        assert_eq!(defaults.max_partitions_per_request, 10_000);
        assert_eq!(defaults.connections_max_idle_ms, 600_000);
        let env = [
            ("FRESHET_SHUTDOWN_TIMEOUT_MS", "5"),
            ("FRESHET_TIMESTAMP_LOOKUP_MAX_BYTES", "1024"),
            ("FRESHET_MAX_PARTITIONS", "7"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let config = BrokerConfig::load(None, env).unwrap();
        assert_eq!(
            (
                config.shutdown_timeout_ms,
                config.timestamp_lookup_max_bytes,
                config.max_partitions
            ),
            (5, 1024, 7)
        );
    }

    #[test]
    fn limits_are_checked_against_each_other_with_a_clear_error() {
        assert_eq!(BrokerConfig::default().validate().ok(), Some(()));
        let error = |env: &[(&str, &str)]| {
            let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            match BrokerConfig::load(None, env) {
                Ok(_) => panic!("accepted"),
                Err(e) => e.to_string(),
            }
        };
        assert_eq!(
            error(&[("FRESHET_MAX_REQUEST_BYTES", "1048576")]),
            "invalid configuration: max_message_bytes (1048588) must be at most \
             max_request_bytes (1048576): a batch that large could never arrive in a request"
        );
        assert!(
            error(&[("FRESHET_QUEUED_MAX_REQUEST_BYTES", "1000000")]).contains(
                "max_request_bytes (104857600) must be at most queued_max_request_bytes (1000000)"
            )
        );
        assert!(error(&[("FRESHET_FETCH_MEMORY_BYTES", "1048576")])
            .contains("fetch_max_bytes (57671680) must be at most fetch_memory_bytes (1048576)"));
        assert!(error(&[("FRESHET_QUEUED_MAX_REQUEST_BYTES", "8589934592")])
            .contains("must be at most the largest budget"));
        for key in [
            "FRESHET_MAX_GROUPS",
            "FRESHET_MAX_PRODUCER_IDS_PER_PARTITION",
        ] {
            assert!(error(&[(key, "0")]).contains("must be at least 1"), "{key}");
        }
        // Equal is fine: exactly one largest frame fits the budget.
        let env = [
            ("FRESHET_MAX_REQUEST_BYTES", "2000000"),
            ("FRESHET_MAX_MESSAGE_BYTES", "2000000"),
            ("FRESHET_QUEUED_MAX_REQUEST_BYTES", "2000000"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let config = BrokerConfig::load(None, env).unwrap();
        assert_eq!(config.queued_max_request_bytes, 2_000_000);
    }
}
