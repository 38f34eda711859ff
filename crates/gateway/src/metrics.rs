//! What `GET /metrics` reports, in the Prometheus text format (version 0.0.4):
//! requests and their latency per route, validation failures, records by outcome,
//! spool depth and age, stream subscribers, consumer instances. Counters are plain
//! atomics or a small map behind a mutex; nothing here allocates per request except
//! the first time a (route, status) pair is seen.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    /// Per bucket, not cumulative; the last slot is +Inf.
    counts: [u64; BUCKETS_S.len() + 1],
    sum_s: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let slot = BUCKETS_S
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BUCKETS_S.len());
        self.counts[slot] += 1;
        self.sum_s += seconds;
        self.count += 1;
    }
}

#[derive(Default)]
pub struct Metrics {
    /// (route, status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
    pub validation_failures: AtomicU64,
    pub idempotent_replays: AtomicU64,
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
        {
            let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            *requests.entry((route.to_string(), status)).or_default() += 1;
        }
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = latency.get_mut(route) {
            h.observe(elapsed.as_secs_f64());
        } else {
            let mut h = Histogram::default();
            h.observe(elapsed.as_secs_f64());
            latency.insert(route.to_string(), h);
        }
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str(
            "# HELP freshet_http_requests_total HTTP requests answered, by route and status.\n",
        );
        out.push_str("# TYPE freshet_http_requests_total counter\n");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "freshet_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        out.push_str("# HELP freshet_http_request_duration_seconds Time to answer an HTTP request (to the first byte of a stream).\n");
        out.push_str("# TYPE freshet_http_request_duration_seconds histogram\n");
        for (route, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let route = escape(route);
            let mut cumulative = 0;
            for (i, bound) in BUCKETS_S.iter().enumerate() {
                cumulative += h.counts[i];
                let _ = writeln!(
                    out,
                    "freshet_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += h.counts[BUCKETS_S.len()];
            let _ = writeln!(out, "freshet_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {cumulative}");
            let _ = writeln!(
                out,
                "freshet_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum_s
            );
            let _ = writeln!(
                out,
                "freshet_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        let counters = [
            (
                "freshet_gateway_validation_failures_total",
                "Records refused because they do not match their topic's schema.",
                self.validation_failures.load(Ordering::Relaxed),
            ),
            (
                "freshet_gateway_idempotent_replays_total",
                "Requests answered from the Idempotency-Key cache.",
                self.idempotent_replays.load(Ordering::Relaxed),
            ),
            (
                "freshet_gateway_outages_total",
                "Times the gateway entered outage mode (the cluster unreachable).",
                gauges.outages,
            ),
            (
                "freshet_gateway_producer_recoveries_total",
                "Times a new producer took over after a fatal producer error (fencing, epoch exhaustion).",
                gauges.producer_recoveries,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        out.push_str("# HELP freshet_gateway_records_total Records by outcome: delivered (acknowledged by the cluster), spooled, rejected (refused by the cluster), dropped (spooled, then refused), replayed (spooled by an earlier run, sent again at start), reconciled (held during an outage, dropped because another gateway stored the request).\n");
        out.push_str("# TYPE freshet_gateway_records_total counter\n");
        for (outcome, value) in [
            ("delivered", gauges.records_delivered),
            ("spooled", gauges.records_spooled),
            ("rejected", gauges.records_rejected),
            ("dropped", gauges.records_dropped),
            ("replayed", gauges.records_replayed),
            ("reconciled", gauges.records_reconciled),
        ] {
            let _ = writeln!(
                out,
                "freshet_gateway_records_total{{outcome=\"{outcome}\"}} {value}"
            );
        }
        let gauge_lines = [
            ("freshet_gateway_spool_records", "Records in the spool not yet acknowledged by the cluster.", gauges.spool_records as f64),
            ("freshet_gateway_spool_bytes", "Bytes of the spool's undelivered records.", gauges.spool_bytes as f64),
            ("freshet_gateway_spool_oldest_age_seconds", "Age of the oldest undelivered spooled record (0 when empty).", gauges.spool_oldest_age_s),
            ("freshet_gateway_outage", "1 while the gateway holds records because the cluster is unreachable (outage mode).", gauges.outage as f64),
            ("freshet_gateway_held_bytes", "Bytes of records accepted and not yet acknowledged (counted against spool_max_bytes).", gauges.held_bytes as f64),
            ("freshet_gateway_stream_subscribers", "Live-stream (SSE) subscribers connected.", gauges.stream_subscribers as f64),
            ("freshet_gateway_stream_readers", "Shared per-topic readers serving the live streams.", gauges.stream_readers as f64),
            ("freshet_gateway_consumer_instances", "REST-proxy consumer instances open.", gauges.consumer_instances as f64),
        ];
        for (name, help, value) in gauge_lines {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
        let text = m.render(&gauges);
        assert!(
            text.contains(
                "freshet_http_requests_total{route=\"/ingest/{topic}\",status=\"202\"} 2"
            ),
            "{text}"
        );
        assert!(text
            .contains("freshet_http_requests_total{route=\"/ingest/{topic}\",status=\"422\"} 1"));
        assert!(text.contains("le=\"0.0005\"} 1\n"));
        assert!(text.contains("le=\"0.005\"} 2\n"));
        assert!(text.contains("le=\"10\"} 2\n"));
        assert!(text.contains("le=\"+Inf\"} 3\n"));
        assert!(text.contains("freshet_gateway_spool_records 2\n"));
        assert!(text.contains("freshet_gateway_records_total{outcome=\"spooled\"} 2\n"));
    }
}
