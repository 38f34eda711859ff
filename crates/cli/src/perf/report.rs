//! What the perf tools print: a progress display while they run (a bar on a terminal,
//! one plain line a second otherwise, both on stderr), then the result on stdout, as
//! text or as one JSON object with `--json`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Largest latency a histogram holds exactly enough (one hour, in microseconds);
/// anything slower is recorded as this.
const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits the histograms keep (0.1% relative error).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// A latency histogram in microseconds.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS)
        .expect("constant bounds are valid")
}

/// Records `latency` (rounded down to microseconds, at least 1 µs) in `histogram`.
pub fn record_latency(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = (latency.as_micros() as u64).clamp(1, LATENCY_US_MAX);
    histogram.saturating_record(micros);
}

/// avg, p50, p95, p99, p99.9 and max of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p99_9_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> LatencySummary {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if histogram.is_empty() {
            return LatencySummary {
                count: 0,
                avg_ms: 0.0,
                p50_ms: 0.0,
                p95_ms: 0.0,
                p99_ms: 0.0,
                p99_9_ms: 0.0,
                max_ms: 0.0,
            };
        }
        LatencySummary {
            count: histogram.len(),
            avg_ms: histogram.mean() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p95_ms: ms(histogram.value_at_quantile(0.95)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p99_9_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }

    pub fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "avg": round3(self.avg_ms),
            "p50": round3(self.p50_ms),
            "p95": round3(self.p95_ms),
            "p99": round3(self.p99_ms),
            "p99_9": round3(self.p99_9_ms),
            "max": round3(self.max_ms),
        })
    }

    /// `avg 1.234 p50 … max 9.876 ms`
    pub fn line(self) -> String {
        format!(
            "avg {:.3} p50 {:.3} p95 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} ms",
            self.avg_ms, self.p50_ms, self.p95_ms, self.p99_ms, self.p99_9_ms, self.max_ms
        )
    }
}

/// Rounds to 3 decimals (microseconds when the unit is milliseconds) for the JSON.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// Throughput over `elapsed`: (records/s, MB/s with MB = 10^6 bytes).
pub fn rates(records: u64, bytes: u64, elapsed: Duration) -> (f64, f64) {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return (0.0, 0.0);
    }
    (records as f64 / seconds, bytes as f64 / seconds / 1e6)
}

/// Prints the result: the JSON object on one line with `json`, else the text lines.
pub fn print_result(json_output: bool, value: &Value, text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = if json_output {
        writeln!(stdout, "{value}")
    } else {
        write!(stdout, "{text}")
    };
    let _ = stdout.flush();
}

/// 1234567 -> "1,234,567"
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// How often the bar is redrawn on a terminal.
const BAR_REDRAW: Duration = Duration::from_millis(200);
/// How often a plain progress line is printed when stderr is not a terminal.
const LINE_INTERVAL: Duration = Duration::from_secs(1);
/// Width of the bar in characters.
const BAR_WIDTH: usize = 30;

/// The progress display of a running tool. It reads a counter the tool bumps, on a
/// thread of its own, so the hot loop pays only for a relaxed atomic add.
pub struct Progress {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Shows `done` out of `total` (if known) `what` (e.g. "records delivered").
    /// `quiet` shows nothing (the JSON mode uses it off a terminal, where the output
    /// is probably read by a program).
    pub fn start(
        what: &'static str,
        total: Option<u64>,
        done: Arc<AtomicU64>,
        quiet: bool,
    ) -> Progress {
        if quiet {
            return Progress {
                stop: None,
                thread: None,
            };
        }
        let terminal = std::io::stderr().is_terminal();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut last = (start, 0u64);
            let interval = if terminal { BAR_REDRAW } else { LINE_INTERVAL };
            // The tick is the display's own clock; the channel only says "finished".
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                let now = Instant::now();
                let count = done.load(Ordering::Relaxed);
                let rate = (count - last.1.min(count)) as f64
                    / now.duration_since(last.0).as_secs_f64().max(1e-9);
                last = (now, count);
                let elapsed = now.duration_since(start).as_secs_f64();
                let line = if terminal {
                    format!(
                        "\r{} {}",
                        bar(count, total),
                        status(count, total, what, rate)
                    )
                } else {
                    format!("{elapsed:.0}s {}\n", status(count, total, what, rate))
                };
                let mut stderr = std::io::stderr().lock();
                let _ = stderr.write_all(line.as_bytes());
                let _ = stderr.flush();
            }
            if terminal {
                // Clear the bar so the result starts on a clean line.
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            }
        });
        Progress {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn bar(count: u64, total: Option<u64>) -> String {
    let Some(total) = total.filter(|total| *total > 0) else {
        return String::new();
    };
    let filled = ((count.min(total) as f64 / total as f64) * BAR_WIDTH as f64) as usize;
    format!(
        "[{}{}] {:3.0}%",
        "#".repeat(filled),
        " ".repeat(BAR_WIDTH - filled),
        count.min(total) as f64 * 100.0 / total as f64
    )
}

fn status(count: u64, total: Option<u64>, what: &str, rate: f64) -> String {
    let of_total = match total {
        Some(total) => format!("/{}", thousands(total)),
        None => String::new(),
    };
    format!(
        "{}{of_total} {what}, {} records/s",
        thousands(count),
        thousands(rate as u64)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_the_percentiles_in_milliseconds() {
        let mut histogram = latency_histogram();
        for micros in 1..=1000u64 {
            record_latency(&mut histogram, Duration::from_micros(micros));
        }
        let summary = LatencySummary::of(&histogram);
        assert_eq!(summary.count, 1000);
        assert!((summary.p50_ms - 0.5).abs() < 0.001, "{summary:?}");
        assert!((summary.p99_ms - 0.99).abs() < 0.001, "{summary:?}");
        assert!((summary.max_ms - 1.0).abs() < 0.001, "{summary:?}");
        assert!((summary.avg_ms - 0.5005).abs() < 0.001, "{summary:?}");
        assert_eq!(LatencySummary::of(&latency_histogram()).count, 0);
    }

    #[test]
    fn sub_microsecond_and_huge_latencies_are_clamped() {
        let mut histogram = latency_histogram();
        record_latency(&mut histogram, Duration::ZERO);
        record_latency(&mut histogram, Duration::from_secs(10 * 3600));
        assert_eq!(histogram.min(), 1);
        assert!(histogram.max() >= LATENCY_US_MAX);
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn bar_is_full_at_the_total() {
        assert_eq!(
            bar(10, Some(10)),
            format!("[{}] 100%", "#".repeat(BAR_WIDTH))
        );
        assert_eq!(
            bar(0, Some(10)),
            format!("[{}]   0%", " ".repeat(BAR_WIDTH))
        );
        assert_eq!(bar(5, None), "");
    }
}
