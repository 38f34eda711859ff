//! The broker's metrics, as `GET /metrics` shows them (Prometheus text, through the
//! embedded gateway of `freshet serve`): per Kafka API the requests, the error codes
//! answered and the time to answer; connections; fsyncs and their latency; per topic
//! the records and bytes produced and fetched. What the state holds (per partition
//! the log's size and offsets, per group and partition the lag of its committed
//! offset) is read at scrape time by [`BrokerMetrics::register`], at most
//! `metrics_max_partition_series` partitions of each kind (label cardinality stays
//! bounded however many partitions there are; `freshet_metrics_series_omitted` says
//! how many were left out).
//!
//! Counters are updated where the thing happens (the server, the produce handler,
//! the flusher); nothing here takes a partition's lock except the scrape.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use protocol::{ApiKey, ResponseKind};

use crate::Broker;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    api: String,
    code: i16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(common::LATENCY_BUCKETS_S.iter().copied())
}

/// The counters the broker updates as it works (cheap clones of shared handles).
#[derive(Debug)]
pub struct BrokerMetrics {
    requests: Family<ApiLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: Family<ApiLabels, Histogram, fn() -> Histogram>,
    pub connections_accepted: Counter,
    pub connections_refused: Counter,
    pub connections_open: Gauge,
    pub fsyncs: Counter,
    pub fsync_failures: Counter,
    pub fsync_seconds: Histogram,
    records_in: Family<TopicLabels, Counter>,
    bytes_in: Family<TopicLabels, Counter>,
    records_out: Family<TopicLabels, Counter>,
    bytes_out: Family<TopicLabels, Counter>,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        BrokerMetrics {
            requests: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            connections_open: Gauge::default(),
            fsyncs: Counter::default(),
            fsync_failures: Counter::default(),
            fsync_seconds: latency_histogram(),
            records_in: Family::default(),
            bytes_in: Family::default(),
            records_out: Family::default(),
            bytes_out: Family::default(),
        }
    }
}

impl BrokerMetrics {
    /// A request of `api` answered with `body`, `started` when it was decoded: its
    /// count, its time, the error codes in it, and for a fetch the records it carries.
    pub fn answered(&self, api: ApiKey, started: Instant, body: &ResponseKind) {
        let labels = ApiLabels {
            api: format!("{api:?}"),
        };
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        error_codes(body, &mut |code| {
            if code != 0 {
                let labels = ErrorLabels {
                    api: labels.api.clone(),
                    code,
                };
                self.errors.get_or_create(&labels).inc();
            }
        });
        if let ResponseKind::Fetch(fetch) = body {
            for topic in &fetch.responses {
                let (mut records, mut bytes) = (0u64, 0u64);
                for p in &topic.partitions {
                    if let Some(data) = &p.records {
                        bytes += data.len() as u64;
                        records += count_records(data);
                    }
                }
                if bytes > 0 {
                    let labels = TopicLabels {
                        topic: topic.topic.to_string(),
                    };
                    self.records_out.get_or_create(&labels).inc_by(records);
                    self.bytes_out.get_or_create(&labels).inc_by(bytes);
                }
            }
        }
    }

    /// A batch of `records` records, `bytes` long, appended to `topic`.
    pub fn produced(&self, topic: &str, records: u64, bytes: u64) {
        let labels = TopicLabels {
            topic: topic.to_string(),
        };
        self.records_in.get_or_create(&labels).inc_by(records);
        self.bytes_in.get_or_create(&labels).inc_by(bytes);
    }

    /// Drops a deleted topic's series, so topics that come and go do not add series
    /// for ever.
    pub fn forget_topic(&self, topic: &str) {
        let labels = TopicLabels {
            topic: topic.to_string(),
        };
        for family in [
            &self.records_in,
            &self.bytes_in,
            &self.records_out,
            &self.bytes_out,
        ] {
            family.remove(&labels);
        }
    }

    /// Adds the broker's metrics to `registry` (prefixed by it), with a collector that
    /// reads the partitions and groups of `broker` at each scrape.
    pub fn register(broker: &Arc<Broker>, registry: &mut Registry) {
        let m = &broker.metrics;
        registry.register(
            "kafka_requests",
            "Kafka requests answered, by API",
            m.requests.clone(),
        );
        registry.register(
            "kafka_request_errors",
            "Error codes in Kafka answers, by API and code (one count per partition, topic or group that carried it)",
            m.errors.clone(),
        );
        registry.register_with_unit(
            "kafka_request_duration",
            "Time from a request's decoding to its answer being ready",
            Unit::Seconds,
            m.latency.clone(),
        );
        registry.register(
            "connections_accepted",
            "Client connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections refused at the max_connections limit",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections",
            "Client connections open",
            m.connections_open.clone(),
        );
        registry.register(
            "log_fsyncs",
            "Partition fsyncs (one per partition per shared group-commit fsync)",
            m.fsyncs.clone(),
        );
        registry.register(
            "log_fsync_failures",
            "Partition fsyncs that failed (the partition went offline)",
            m.fsync_failures.clone(),
        );
        registry.register_with_unit(
            "log_fsync_duration",
            "Time of one partition's fsync",
            Unit::Seconds,
            m.fsync_seconds.clone(),
        );
        registry.register(
            "topic_records_in",
            "Records appended, by topic",
            m.records_in.clone(),
        );
        registry.register(
            "topic_bytes_in",
            "Bytes of record batches appended, by topic",
            m.bytes_in.clone(),
        );
        registry.register(
            "topic_records_out",
            "Records sent in fetch answers, by topic",
            m.records_out.clone(),
        );
        registry.register(
            "topic_bytes_out",
            "Bytes of record batches sent in fetch answers, by topic",
            m.bytes_out.clone(),
        );
        registry.register_collector(Box::new(StateCollector(broker.clone())));
    }
}

/// The records in a fetch answer's record data: the count of each whole v2 batch
/// (the last one may be cut by the size limit, and is not counted).
fn count_records(mut data: &[u8]) -> u64 {
    let mut n = 0;
    while let Ok(header) = protocol::record_batch::BatchHeader::parse(data) {
        if header.total_bytes() > data.len() {
            break;
        }
        n += header.records_count.max(0) as u64;
        data = &data[header.total_bytes()..];
    }
    n
}

/// Calls `f` with each error code an answer carries (0 too).
fn error_codes(body: &ResponseKind, f: &mut dyn FnMut(i16)) {
    match body {
        ResponseKind::Produce(r) => r
            .responses
            .iter()
            .flat_map(|t| &t.partition_responses)
            .for_each(|p| f(p.error_code)),
        ResponseKind::Fetch(r) => {
            f(r.error_code);
            r.responses
                .iter()
                .flat_map(|t| &t.partitions)
                .for_each(|p| f(p.error_code));
        }
        ResponseKind::ListOffsets(r) => r
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .for_each(|p| f(p.error_code)),
        ResponseKind::Metadata(r) => r.topics.iter().for_each(|t| f(t.error_code)),
        ResponseKind::CreateTopics(r) => r.topics.iter().for_each(|t| f(t.error_code)),
        ResponseKind::DeleteTopics(r) => r.responses.iter().for_each(|t| f(t.error_code)),
        ResponseKind::OffsetCommit(r) => r
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .for_each(|p| f(p.error_code)),
        ResponseKind::OffsetFetch(r) => {
            f(r.error_code);
            r.groups.iter().for_each(|g| f(g.error_code));
        }
        ResponseKind::FindCoordinator(r) => {
            f(r.error_code);
            r.coordinators.iter().for_each(|c| f(c.error_code));
        }
        ResponseKind::JoinGroup(r) => f(r.error_code),
        ResponseKind::SyncGroup(r) => f(r.error_code),
        ResponseKind::Heartbeat(r) => f(r.error_code),
        ResponseKind::LeaveGroup(r) => f(r.error_code),
        ResponseKind::DescribeGroups(r) => r.groups.iter().for_each(|g| f(g.error_code)),
        ResponseKind::InitProducerId(r) => f(r.error_code),
        ResponseKind::AddPartitionsToTxn(r) => r
            .results_by_topic_v3_and_below
            .iter()
            .flat_map(|t| &t.results_by_partition)
            .for_each(|p| f(p.partition_error_code)),
        ResponseKind::AddOffsetsToTxn(r) => f(r.error_code),
        ResponseKind::EndTxn(r) => f(r.error_code),
        ResponseKind::TxnOffsetCommit(r) => r
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .for_each(|p| f(p.error_code)),
        ResponseKind::ApiVersions(r) => f(r.error_code),
        _ => {}
    }
}

/// Reads the partitions and groups at scrape time.
struct StateCollector(Arc<Broker>);

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

/// A partition's labels, log size, log start offset and high watermark.
type LogSeries = (PartitionLabels, u64, i64, i64);

/// A per-partition gauge: name, help, unit, and its value in a [`LogSeries`].
type LogGauge = (
    &'static str,
    &'static str,
    Option<Unit>,
    fn(&LogSeries) -> i64,
);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LagLabels {
    group: String,
    topic: String,
    partition: i32,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let broker = &self.0;
        let max = broker.config.metrics_max_partition_series;
        let mut omitted = 0usize;
        // (labels, size, log start, log end), in topic and partition order.
        let mut topics = broker.topics.all();
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        let mut logs = Vec::new();
        let mut ends = std::collections::HashMap::new();
        for topic in &topics {
            for p in topic.partitions() {
                let log = p.lock();
                let (size, start, end) = (
                    log.size_bytes(),
                    log.log_start_offset(),
                    log.high_watermark(),
                );
                drop(log);
                ends.insert((topic.name.clone(), p.index), end);
                if logs.len() < max {
                    let labels = PartitionLabels {
                        topic: topic.name.clone(),
                        partition: p.index,
                    };
                    logs.push((labels, size, start, end));
                } else {
                    omitted += 1;
                }
            }
        }
        let gauges: [LogGauge; 3] = [
            (
                "log_size",
                "Bytes of a partition's log on disk",
                Some(Unit::Bytes),
                |l| l.1 as i64,
            ),
            (
                "log_start_offset",
                "A partition's log start offset",
                None,
                |l| l.2,
            ),
            (
                "log_end_offset",
                "A partition's high watermark (the next offset to be written)",
                None,
                |l| l.3,
            ),
        ];
        for (name, help, unit, value) in gauges {
            let mut metric =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            for log in &logs {
                ConstGauge::new(value(log)).encode(metric.encode_family(&log.0)?)?;
            }
        }
        // Lag of each committed offset: the partition's end minus the offset.
        let offsets = broker.groups.offsets();
        let mut groups = offsets.groups();
        groups.sort();
        let mut lags = Vec::new();
        for group in groups {
            let mut committed = offsets.group_offsets(&group);
            committed.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
            for (topic, partition, c) in committed {
                let Some(end) = ends.get(&(topic.clone(), partition)) else {
                    continue;
                };
                if lags.len() < max {
                    let labels = LagLabels {
                        group: group.clone(),
                        topic,
                        partition,
                    };
                    lags.push((labels, (end - c.offset).max(0)));
                } else {
                    omitted += 1;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "consumer_group_lag",
            "Records of a partition after the offset its group committed",
            None,
            MetricType::Gauge,
        )?;
        for (labels, lag) in &lags {
            ConstGauge::new(*lag).encode(metric.encode_family(labels)?)?;
        }
        let metric = encoder.encode_descriptor(
            "metrics_series_omitted",
            "Partition series (log or lag) left out of this scrape by metrics_max_partition_series",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(omitted as i64).encode(metric)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_whole_batches_are_counted() {
        let batch = |n: usize| {
            let values: Vec<&[u8]> = vec![b"v"; n];
            protocol::record_batch::build_simple_batch(0, &values)
        };
        let one = batch(3);
        let two = batch(5);
        let mut data = one.clone();
        data.extend_from_slice(&two);
        assert_eq!(count_records(&data), 8);
        // The last batch cut by the size limit is not counted.
        assert_eq!(count_records(&data[..data.len() - 1]), 3);
        assert_eq!(count_records(&[]), 0);
        assert_eq!(count_records(&[0xff; 11]), 0);
    }
}
