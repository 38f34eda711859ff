//! What `GET /metrics` reports, in the Prometheus text format (version 0.0.4), through
//! the `prometheus-client` crate: the gateway's requests and their latency per route,
//! validation failures, records by outcome, spool depth and age, stream subscribers,
//! consumer instances; the pipelines run here and their sinks; and whatever the
//! process adds through a [`Source`] (`freshet serve` adds its broker's metrics).
//!
//! Counters and histograms live as long as the gateway; gauges and the counters
//! other parts own are read at scrape time into a registry built for that scrape.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// More metrics of the process, added to each scrape's registry.
pub type Source = Arc<dyn Fn(&mut Registry) + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(common::LATENCY_BUCKETS_S.iter().copied())
}

pub struct Metrics {
    requests: Family<RouteStatus, Counter>,
    latency: Family<Route, Histogram, fn() -> Histogram>,
    pub validation_failures: Counter,
    pub idempotent_replays: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            validation_failures: Counter::default(),
            idempotent_replays: Counter::default(),
        }
    }
}

/// Gauges read at render time from the parts that own them.
pub struct Gauges {
    pub spool_records: u64,
    pub spool_bytes: u64,
    pub spool_oldest_age_s: f64,
    pub held_bytes: u64,
    pub stream_subscribers: u64,
    pub stream_readers: u64,
    pub consumer_instances: u64,
    pub records_delivered: u64,
    pub records_spooled: u64,
    pub records_rejected: u64,
    pub records_dropped: u64,
    pub records_replayed: u64,
    /// Held records dropped at reconciliation (another gateway stored the request).
    pub records_reconciled: u64,
    /// 1 while in outage mode (records spooled and held).
    pub outage: u64,
    pub outages: u64,
    pub producer_recoveries: u64,
}

impl Metrics {
    pub fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        let labels = RouteStatus {
            route: route.to_string(),
            status,
        };
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&Route {
                route: labels.route,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The text of one scrape: the gateway's metrics, `gauges`, then each of
    /// `sources`.
    pub fn render(&self, gauges: &Gauges, sources: &[Source]) -> String {
        let mut registry = Registry::with_prefix("freshet");
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status",
            self.requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time to answer an HTTP request (to the first byte of a stream)",
            Unit::Seconds,
            self.latency.clone(),
        );
        let gw = registry.sub_registry_with_prefix("gateway");
        gw.register(
            "validation_failures",
            "Records refused because they do not match their topic's schema",
            self.validation_failures.clone(),
        );
        gw.register(
            "idempotent_replays",
            "Requests answered from the Idempotency-Key cache",
            self.idempotent_replays.clone(),
        );
        let counters = [
            (
                "outages",
                "Times the gateway entered outage mode (the cluster unreachable)",
                gauges.outages,
            ),
            (
                "producer_recoveries",
                "Times a new producer took over after a fatal producer error (fencing, epoch exhaustion)",
                gauges.producer_recoveries,
            ),
        ];
        for (name, help, value) in counters {
            gw.register(name, help, ConstCounter::new(value));
        }
        let records: Family<Outcome, Counter> = Family::default();
        for (outcome, value) in [
            ("delivered", gauges.records_delivered),
            ("spooled", gauges.records_spooled),
            ("rejected", gauges.records_rejected),
            ("dropped", gauges.records_dropped),
            ("replayed", gauges.records_replayed),
            ("reconciled", gauges.records_reconciled),
        ] {
            records.get_or_create(&Outcome { outcome }).inc_by(value);
        }
        gw.register(
            "records",
            "Records by outcome: delivered (acknowledged by the cluster), spooled, rejected (refused by the cluster), dropped (spooled, then refused), replayed (spooled by an earlier run, sent again at start), reconciled (held during an outage, dropped because another gateway stored the request)",
            records,
        );
        let gauge_lines = [
            ("spool_records", "Records in the spool not yet acknowledged by the cluster", None, gauges.spool_records as f64),
            ("spool", "Bytes of the spool's undelivered records", Some(Unit::Bytes), gauges.spool_bytes as f64),
            ("spool_oldest_age", "Age of the oldest undelivered spooled record (0 when empty)", Some(Unit::Seconds), gauges.spool_oldest_age_s),
            ("outage", "1 while the gateway holds records because the cluster is unreachable (outage mode)", None, gauges.outage as f64),
            ("held", "Bytes of records accepted and not yet acknowledged (counted against spool_max_bytes)", Some(Unit::Bytes), gauges.held_bytes as f64),
            ("stream_subscribers", "Live-stream (SSE) subscribers connected", None, gauges.stream_subscribers as f64),
            ("stream_readers", "Shared per-topic readers serving the live streams", None, gauges.stream_readers as f64),
            ("consumer_instances", "REST-proxy consumer instances open", None, gauges.consumer_instances as f64),
        ];
        for (name, help, unit, value) in gauge_lines {
            match unit {
                Some(unit) => gw.register_with_unit(name, help, unit, ConstGauge::new(value)),
                None => gw.register(name, help, ConstGauge::new(value)),
            }
        }
        for source in sources {
            source(&mut registry);
        }
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_counts_add_up() {
        let m = Metrics::default();
        m.observe("/ingest/{topic}", 202, Duration::from_micros(300));
        m.observe("/ingest/{topic}", 202, Duration::from_millis(3));
        m.observe("/ingest/{topic}", 422, Duration::from_secs(20));
        let gauges = Gauges {
            spool_records: 2,
            spool_bytes: 10,
            spool_oldest_age_s: 1.5,
            held_bytes: 0,
            stream_subscribers: 0,
            stream_readers: 0,
            consumer_instances: 0,
            records_delivered: 1,
            records_spooled: 2,
            records_rejected: 0,
            records_dropped: 0,
            records_replayed: 0,
            records_reconciled: 0,
            outage: 0,
            outages: 0,
            producer_recoveries: 0,
        };
        let extra: Source = Arc::new(|r: &mut Registry| {
            r.register("extra", "From a source", ConstGauge::new(7i64))
        });
        let text = m.render(&gauges, &[extra]);
        assert!(
            text.contains(
                "freshet_http_requests_total{route=\"/ingest/{topic}\",status=\"202\"} 2"
            ),
            "{text}"
        );
        assert!(text
            .contains("freshet_http_requests_total{route=\"/ingest/{topic}\",status=\"422\"} 1"));
        let bucket = |le: &str, n: u64| {
            format!("freshet_http_request_duration_seconds_bucket{{route=\"/ingest/{{topic}}\",le=\"{le}\"}} {n}\n")
        };
        for (le, n) in [("0.0005", 1), ("0.005", 2), ("10", 2), ("+Inf", 3)] {
            assert!(text.contains(&bucket(le, n)), "{le} {n}: {text}");
        }
        assert!(
            text.contains("freshet_gateway_spool_records 2.0\n"),
            "{text}"
        );
        assert!(text.contains("freshet_gateway_records_total{outcome=\"spooled\"} 2\n"));
        assert!(text.contains("freshet_extra 7\n"), "{text}");
        assert!(
            !text.contains(".."),
            "a help text ends with its own period: {text}"
        );
    }
}
