//! The metrics' recent past, kept in memory so that charts work without Prometheus
//! (`GET /metrics/history`): every `history_interval_ms` the gateway reads its own
//! `GET /metrics` text and keeps, for each sample whose name is in
//! `history_metrics`, its last `history_points` values (one hour at one second by
//! default), at most `history_max_series` series. The times of the samples are kept
//! once; each series holds one value per time (`None` where it was absent). A series
//! absent for the whole window is dropped, so deleted topics free their place.
//!
//! Memory: at most `history_max_series × history_points` values of 8 bytes (the
//! defaults: 1,000 × 3,600, about 29 MB); checked at start-up against a ceiling.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

/// A sample's name and labels, as `GET /metrics` writes them.
pub type SeriesKey = (String, Vec<(String, String)>);

pub struct History {
    points: usize,
    max_series: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Sample times, epoch ms, oldest first.
    times: VecDeque<i64>,
    /// Per series, one value per time (`NaN`: absent).
    series: HashMap<SeriesKey, VecDeque<f64>>,
}

/// What `GET /metrics/history` answers.
#[derive(Debug, Serialize, PartialEq)]
pub struct Answer {
    pub times: Vec<i64>,
    pub series: Vec<SeriesAnswer>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct SeriesAnswer {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// One per time; `None` where the series was absent. Left out when only the
    /// series were asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<Option<f64>>>,
}

impl History {
    pub fn new(points: usize, max_series: usize) -> History {
        History {
            points: points.max(1),
            max_series,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the samples of one scrape, taken at `now_ms`.
    pub fn record(&self, now_ms: i64, samples: impl IntoIterator<Item = (SeriesKey, f64)>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.times.push_back(now_ms);
        for values in inner.series.values_mut() {
            values.push_back(f64::NAN);
        }
        if inner.times.len() > self.points {
            inner.times.pop_front();
            for values in inner.series.values_mut() {
                values.pop_front();
            }
        }
        // Before the new samples: a series gone for the whole window frees its place.
        inner
            .series
            .retain(|_, values| values.iter().any(|v| !v.is_nan()));
        let len = inner.times.len();
        for (key, value) in samples {
            if let Some(values) = inner.series.get_mut(&key) {
                if let Some(last) = values.back_mut() {
                    *last = value;
                }
            } else if inner.series.len() < self.max_series {
                let mut values: VecDeque<f64> = std::iter::repeat_n(f64::NAN, len - 1).collect();
                values.push_back(value);
                inner.series.insert(key, values);
            }
        }
    }

    /// The series named `name` whose labels include `labels` (all of them when `name`
    /// is `None`, without their values: what can be asked for).
    pub fn query(&self, name: Option<&str>, labels: &[(String, String)]) -> Answer {
        let inner = self.lock();
        let mut series: Vec<SeriesAnswer> = inner
            .series
            .iter()
            .filter(|((n, ls), _)| {
                name.is_none_or(|want| want == n) && labels.iter().all(|l| ls.contains(l))
            })
            .map(|((n, ls), values)| SeriesAnswer {
                name: n.clone(),
                labels: ls.iter().cloned().collect(),
                values: name.map(|_| values.iter().map(|v| (!v.is_nan()).then_some(*v)).collect()),
            })
            .collect();
        series.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
        Answer {
            times: if name.is_some() {
                inner.times.iter().copied().collect()
            } else {
                Vec::new()
            },
            series,
        }
    }
}

/// The samples of Prometheus text (version 0.0.4) whose name is in `names`: name,
/// labels and value. Comments and lines that do not parse are skipped (the text is
/// our own `GET /metrics`).
pub fn samples<'a>(
    text: &'a str,
    names: &'a [String],
) -> impl Iterator<Item = (SeriesKey, f64)> + 'a {
    text.lines().filter_map(move |line| {
        if line.starts_with('#') {
            return None;
        }
        let name_end = line.find(['{', ' '])?;
        let name = &line[..name_end];
        if !names.iter().any(|n| n == name) {
            return None;
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end + 1..])?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let value: f64 = rest.trim().split(' ').next()?.parse().ok()?;
        Some(((name.to_string(), labels), value))
    })
}

/// `a="x",b="y\"z"} rest` -> the labels, and what follows the `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.strip_prefix(',').unwrap_or(s);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find("=\"")?;
        let key = s[..eq].to_string();
        let mut value = String::new();
        let mut chars = s[eq + 2..].char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break eq + 2 + i + 1,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(name: &str, labels: &[(&str, &str)]) -> SeriesKey {
        (
            name.to_string(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn keeps_the_last_points_per_series_and_at_most_max_series() {
        let h = History::new(3, 2);
        let a = key("a", &[("topic", "x")]);
        let b = key("b", &[]);
        let c = key("c", &[]);
        for t in 0..5 {
            let mut samples = vec![(a.clone(), t as f64)];
            if t >= 2 {
                samples.push((b.clone(), 10.0 * t as f64));
                samples.push((c.clone(), 1.0)); // a third series: over the limit
            }
            h.record(1000 + t, samples);
        }
        let got = h.query(Some("a"), &[]);
        assert_eq!(got.times, vec![1002, 1003, 1004]);
        assert_eq!(got.series.len(), 1);
        assert_eq!(
            got.series[0].values,
            Some(vec![Some(2.0), Some(3.0), Some(4.0)])
        );
        assert_eq!(
            h.query(Some("b"), &[]).series[0].values,
            Some(vec![Some(20.0), Some(30.0), Some(40.0)])
        );
        assert!(h.query(Some("c"), &[]).series.is_empty());
        // Filter by label; list without values.
        assert_eq!(
            h.query(Some("a"), &[("topic".into(), "y".into())])
                .series
                .len(),
            0
        );
        let all = h.query(None, &[]);
        assert_eq!(all.series.len(), 2);
        assert!(all.series.iter().all(|s| s.values.is_none()));
        // A series absent for the whole window is dropped, and frees its place.
        for t in 5..10 {
            h.record(1000 + t, vec![(a.clone(), 0.0), (c.clone(), 5.0)]);
        }
        assert!(h.query(Some("b"), &[]).series.is_empty());
        assert_eq!(
            h.query(Some("c"), &[]).series[0].values,
            Some(vec![Some(5.0), Some(5.0), Some(5.0)])
        );
        // A new series is absent before its first point.
        let d = key("d", &[]);
        h.record(1010, vec![(a.clone(), 0.0), (d.clone(), 1.0)]);
        assert!(h.query(Some("d"), &[]).series.is_empty(), "over the limit");
    }

    #[test]
    fn samples_are_read_from_the_metrics_text() {
        let text = "# HELP x_total A.\n# TYPE x_total counter\nx_total{topic=\"a\\\"b\",partition=\"0\"} 12\ny 1.5\nx_totalz 3\nz{le=\"+Inf\"} 2\n";
        let names = vec!["x_total".to_string(), "y".to_string()];
        let got: Vec<_> = samples(text, &names).collect();
        assert_eq!(
            got,
            vec![
                (
                    key("x_total", &[("topic", "a\"b"), ("partition", "0")]),
                    12.0
                ),
                (key("y", &[]), 1.5),
            ]
        );
    }

    proptest! {
        /// Label values written as Prometheus escapes them read back as they were.
        #[test]
        fn escaped_label_values_read_back(values in proptest::collection::vec("[a-z\"\\\\\n{},= ]{0,8}", 1..4), v in -1e9f64..1e9) {
            let escape = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let labels: Vec<String> = values.iter().enumerate().map(|(i, s)| format!("l{i}=\"{}\"", escape(s))).collect();
            let text = format!("m{{{}}} {v}\n", labels.join(","));
            let names = vec!["m".to_string()];
            let got: Vec<_> = samples(&text, &names).collect();
            prop_assert_eq!(got.len(), 1);
            let want: Vec<(String, String)> = values.iter().enumerate().map(|(i, s)| (format!("l{i}"), s.clone())).collect();
            prop_assert_eq!(&got[0].0.1, &want);
            prop_assert_eq!(got[0].1, v);
        }

        /// Any text reads without a panic.
        #[test]
        fn any_text_reads_without_panic(text in "\\PC{0,80}") {
            let names = vec!["m".to_string()];
            let _ = samples(&text, &names).count();
        }
    }
}
