//! Gateway settings: defaults, then the `[http]` table of the TOML file, then
//! `FRESHET_HTTP_<KEY>` environment variables, then command-line flags (applied by the
//! caller). Every limit the gateway enforces is here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address the HTTP server binds, `host:port` (port 0 picks one).
    pub listen: String,
    /// Bootstrap brokers of the cluster the gateway produces to and reads from.
    pub brokers: String,
    /// Where records are kept while the cluster cannot acknowledge them.
    pub spool_dir: PathBuf,
    /// Bytes of records accepted and not yet acknowledged by the cluster (in memory
    /// and in the spool); beyond it requests get `503` with `Retry-After`.
    pub spool_max_bytes: u64,
    /// Size of one spool file.
    pub spool_segment_bytes: u64,
    /// How long a request waits for the cluster's acks=all answer before its record
    /// is spooled instead (and answered `202` with `"spooled": true`).
    pub spool_after_ms: u64,
    /// In outage mode (the cluster unreachable: records are spooled and held), how
    /// often the cluster is probed; each probe waits this long for an answer.
    pub outage_probe_interval_ms: u64,
    /// When the cluster answers again, how long the gateway tries to read the
    /// idempotency topic to its end (to drop held records another gateway already
    /// stored) before it sends the held records without that check.
    pub outage_reconcile_timeout_ms: u64,
    /// Largest request body; larger gets `413`.
    pub max_body_bytes: usize,
    /// Largest single record value (after encoding); larger gets `413`.
    pub max_record_bytes: usize,
    /// Requests that produce or consume, served at once; more get `503` with
    /// `Retry-After`.
    pub max_concurrent_requests: usize,
    /// `Idempotency-Key`s remembered (with their answers) for retried requests.
    pub idempotency_keys: usize,
    /// The topic (in the cluster) where `Idempotency-Key` answers are kept, so a retry
    /// through another gateway, or after a restart, is answered and not stored again.
    pub idempotency_topic: String,
    /// How long the idempotency topic keeps answers.
    pub idempotency_retention_ms: i64,
    /// Topic name to JSON Schema file; records for the topic must validate. Schemas
    /// set through `PUT /topics/{topic}/schema` are kept in `schema_topic` and
    /// override these.
    pub schemas: BTreeMap<String, PathBuf>,
    /// The topic (in the cluster) where schemas set over HTTP are kept, so every
    /// gateway in front of the cluster sees them.
    pub schema_topic: String,
    /// The topic (in the cluster) where pipeline definitions (`PUT /pipelines/{name}`)
    /// are kept: every gateway in front of the cluster runs them, and a restart
    /// resumes them.
    pub pipeline_topic: String,
    /// Whether this gateway runs the pipelines defined in `pipeline_topic` (the HTTP
    /// API answers either way).
    pub run_pipelines: bool,
    /// Pipelines defined at once; more get `409`.
    pub max_pipelines: usize,
    /// Live-stream subscribers served at once; more get `503`.
    pub stream_max_subscribers: usize,
    /// Records per partition a topic's shared live reader keeps for subscribers that
    /// resume a little behind the tail.
    pub stream_buffer_records: usize,
    /// Interval of the SSE keep-alive comment.
    pub stream_keepalive_ms: u64,
    /// REST-proxy consumer instances at once; more get `503`.
    pub max_consumer_instances: usize,
    /// A consumer instance nobody used for this long is closed (as the REST Proxy's
    /// `consumer.instance.timeout.ms`).
    pub consumer_instance_timeout_ms: u64,
    /// Longest wait of `GET .../records` (its `timeout` parameter is capped by it).
    pub consumer_request_timeout_ms: u64,
    /// Largest answer of `GET .../records` (its `max_bytes` parameter is capped by it).
    pub consumer_request_max_bytes: usize,
    /// How long shutdown waits for in-flight requests and for the cluster to take
    /// what is queued (the rest stays in the spool).
    pub shutdown_timeout_ms: u64,
    /// Extra librdkafka properties for the gateway's clients (e.g. `linger.ms`).
    pub kafka: BTreeMap<String, String>,
    /// How often the metrics' recent past (`GET /metrics/history`) takes a sample.
    pub history_interval_ms: u64,
    /// Samples kept per series (3,600 at one a second: an hour).
    pub history_points: usize,
    /// Series kept at most; a new one past it is not recorded until one has been
    /// absent for a whole window.
    pub history_max_series: usize,
    /// The `GET /metrics` sample names whose recent past is kept.
    pub history_metrics: Vec<String>,
    /// A directory of static pages served under `/pages/` (a form that posts to
    /// `/ingest`, a live results page); none by default.
    pub pages_dir: Option<PathBuf>,
    /// Largest page file served; larger gets `413`.
    pub pages_max_file_bytes: u64,
}

/// The samples whose past is kept by default: rates and lags, not per-partition logs.
fn default_history_metrics() -> Vec<String> {
    [
        "freshet_topic_records_in_total",
        "freshet_topic_records_out_total",
        "freshet_topic_bytes_in_total",
        "freshet_topic_bytes_out_total",
        "freshet_consumer_group_lag",
        "freshet_kafka_requests_total",
        "freshet_connections",
        "freshet_pipeline_records_in_total",
        "freshet_pipeline_records_out_total",
        "freshet_pipeline_late_records_total",
        "freshet_pipeline_dead_lettered_records_total",
        "freshet_pipeline_source_lag",
        "freshet_pipeline_watermark_ms",
        "freshet_sink_rows_total",
        "freshet_sink_lag",
        "freshet_http_requests_total",
        "freshet_http_request_duration_seconds_sum",
        "freshet_http_request_duration_seconds_count",
        "freshet_gateway_records_total",
        "freshet_gateway_spool_records",
        "freshet_gateway_spool_oldest_age_seconds",
    ]
    .map(String::from)
    .to_vec()
}

/// Values the history may hold at most (`history_max_series × history_points`, 8
/// bytes each: 800 MB).
pub const MAX_HISTORY_VALUES: usize = 100_000_000;

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            brokers: "127.0.0.1:9092".into(),
            spool_dir: PathBuf::from("./freshet-spool"),
            spool_max_bytes: 256 << 20,
            spool_segment_bytes: 16 << 20,
            spool_after_ms: 1000,
            outage_probe_interval_ms: 200,
            outage_reconcile_timeout_ms: 10_000,
            max_body_bytes: 1 << 20,
            max_record_bytes: 1_000_000,
            max_concurrent_requests: 4096,
            idempotency_keys: 100_000,
            idempotency_topic: "_freshet_idempotency".into(),
            idempotency_retention_ms: 24 * 3600 * 1000,
            schemas: BTreeMap::new(),
            schema_topic: "_freshet_schemas".into(),
            pipeline_topic: "_freshet_pipelines".into(),
            run_pipelines: true,
            max_pipelines: 100,
            stream_max_subscribers: 10_000,
            stream_buffer_records: 10_000,
            stream_keepalive_ms: 15_000,
            max_consumer_instances: 1000,
            consumer_instance_timeout_ms: 300_000,
            consumer_request_timeout_ms: 30_000,
            consumer_request_max_bytes: 64 << 20,
            shutdown_timeout_ms: 10_000,
            kafka: BTreeMap::new(),
            history_interval_ms: 1_000,
            history_points: 3_600,
            history_max_series: 1_000,
            history_metrics: default_history_metrics(),
            pages_dir: None,
            pages_max_file_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid http configuration: {0}")]
    Invalid(String),
}

impl GatewayConfig {
    /// Defaults, then the `[http]` table of `file` if given, then every
    /// `FRESHET_HTTP_<KEY>` variable in `env` whose key is a field here (tables only
    /// in the file), through the one settings loader (`common::settings`).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let table = match file {
            Some(path) => {
                let mut whole =
                    common::settings::read_toml(path).map_err(|e| ConfigError::Invalid(e.0))?;
                match whole.remove("http") {
                    Some(toml::Value::Table(http)) => http,
                    Some(_) => return Err(ConfigError::Invalid("[http] must be a table".into())),
                    None => toml::Table::new(),
                }
            }
            None => toml::Table::new(),
        };
        let config: GatewayConfig = common::settings::load(
            table,
            "FRESHET_HTTP_",
            common::settings::UnknownEnv::Refuse,
            env,
        )
        .map_err(|e| ConfigError::Invalid(e.0))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.into()));
        if self.max_body_bytes < 1024 || self.max_record_bytes < 1 {
            return bad("max_body_bytes must be at least 1024 and max_record_bytes at least 1");
        }
        if self.max_concurrent_requests < 1
            || self.stream_max_subscribers < 1
            || self.max_consumer_instances < 1
        {
            return bad("max_concurrent_requests, stream_max_subscribers and max_consumer_instances must be at least 1");
        }
        if self.spool_after_ms < 10 {
            return bad("spool_after_ms must be at least 10");
        }
        if self.outage_probe_interval_ms < 100 || self.outage_reconcile_timeout_ms < 1000 {
            return bad("outage_probe_interval_ms must be at least 100 and outage_reconcile_timeout_ms at least 1000");
        }
        if self.spool_max_bytes < 1 << 20 || self.spool_segment_bytes < 4096 {
            return bad(
                "spool_max_bytes must be at least 1 MiB and spool_segment_bytes at least 4096",
            );
        }
        if (self.max_record_bytes as u64) * 2 > self.spool_max_bytes {
            return bad("spool_max_bytes must hold at least two records of max_record_bytes");
        }
        if self.stream_buffer_records < 1 || self.stream_keepalive_ms < 100 {
            return bad(
                "stream_buffer_records must be at least 1 and stream_keepalive_ms at least 100",
            );
        }
        if self.history_interval_ms < 10 || self.history_points < 2 {
            return bad("history_interval_ms must be at least 10 and history_points at least 2");
        }
        if self.history_max_series.saturating_mul(self.history_points) > MAX_HISTORY_VALUES {
            return Err(ConfigError::Invalid(format!(
                "history_max_series x history_points ({} x {}) must be at most {MAX_HISTORY_VALUES} values (8 bytes each)",
                self.history_max_series, self.history_points
            )));
        }
        if self.consumer_request_max_bytes < 1024 || self.consumer_instance_timeout_ms < 1000 {
            return bad("consumer_request_max_bytes must be at least 1024 and consumer_instance_timeout_ms at least 1000");
        }
        let shared = [
            &self.schema_topic,
            &self.idempotency_topic,
            &self.pipeline_topic,
        ];
        if shared.iter().any(|t| t.is_empty())
            || shared[0] == shared[1]
            || shared[0] == shared[2]
            || shared[1] == shared[2]
        {
            return bad(
                "schema_topic, idempotency_topic and pipeline_topic must be set and differ",
            );
        }
        if self.max_pipelines == 0 {
            return bad("max_pipelines must be at least 1");
        }
        if self.idempotency_retention_ms < 1000 {
            return bad("idempotency_retention_ms must be at least 1000");
        }
        if let Some(dir) = &self.pages_dir {
            if !dir.is_dir() {
                return Err(ConfigError::Invalid(format!(
                    "pages_dir {} is not a directory",
                    dir.display()
                )));
            }
        }
        Ok(())
    }

    /// librdkafka settings every client of the gateway starts from.
    pub fn client(&self) -> rdkafka::ClientConfig {
        let mut client = rdkafka::ClientConfig::new();
        client
            .set("bootstrap.servers", &self.brokers)
            // See the producer's: a returning cluster is noticed within 250 ms, not
            // after librdkafka's backoff of up to 10 s.
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "250");
        for (key, value) in &self.kafka {
            client.set(key, value);
        }
        client
    }

    /// The durable producer's settings.
    pub fn producer(&self) -> crate::producer::ProducerConfig {
        crate::producer::ProducerConfig {
            brokers: self.brokers.clone(),
            spool_dir: self.spool_dir.clone(),
            spool_max_bytes: self.spool_max_bytes,
            spool_segment_bytes: self.spool_segment_bytes,
            spool_after_ms: self.spool_after_ms,
            max_record_bytes: self.max_record_bytes,
            outage_probe_interval_ms: self.outage_probe_interval_ms,
            outage_reconcile_timeout_ms: self.outage_reconcile_timeout_ms,
            kafka: self
                .kafka
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(
            &path,
            "listen = \"ignored\"\n[http]\nmax_body_bytes = 4096\nlisten = \"127.0.0.1:1\"\n[http.schemas]\nvotes = \"v.json\"\n",
        )
        .unwrap();
        let env = [
            ("FRESHET_HTTP_LISTEN".to_string(), "127.0.0.1:0".to_string()),
            ("FRESHET_HTTP_SPOOL_AFTER_MS".to_string(), "500".to_string()),
            ("FRESHET_LISTEN".to_string(), "x".to_string()),
        ];
        let c = GatewayConfig::load(Some(&path), env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.max_body_bytes, 4096);
        assert_eq!(c.spool_after_ms, 500);
        assert_eq!(c.schemas["votes"], PathBuf::from("v.json"));
    }

    #[test]
    fn unknown_keys_and_bad_limits_are_refused() {
        let env = [("FRESHET_HTTP_NO_SUCH".to_string(), "1".to_string())];
        assert!(GatewayConfig::load(None, env).is_err());
        let env = [("FRESHET_HTTP_MAX_BODY_BYTES".to_string(), "10".to_string())];
        assert!(GatewayConfig::load(None, env).is_err());
        // The history's two limits against each other.
        let history = |series: &str, points: &str| {
            GatewayConfig::load(
                None,
                [
                    (
                        "FRESHET_HTTP_HISTORY_MAX_SERIES".to_string(),
                        series.to_string(),
                    ),
                    (
                        "FRESHET_HTTP_HISTORY_POINTS".to_string(),
                        points.to_string(),
                    ),
                ],
            )
        };
        assert!(history("1000", "3600").is_ok());
        let err = history("100000", "3600").unwrap_err().to_string();
        assert!(err.contains("history_max_series x history_points"), "{err}");
    }
}
