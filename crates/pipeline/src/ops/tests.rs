//! Operator tests. Queries are built by hand (plan types), and every computed result
//! is compared with a naive recomputation in the test.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sql::expr::{Expr, Input};
use sql::plan::*;
use sql::Value;

use super::*;
use sql::time::{civil_from_days, parse_iso8601};

fn field(name: &str) -> Expr {
    Expr::Field(vec![name.to_string()])
}

/// `SELECT k, window_start, window_end, COUNT(*), COUNT(v), COUNT(DISTINCT v), SUM(v),
/// MIN(v), MAX(v), AVG(v), APPROX_COUNT_DISTINCT(v) FROM <window>(src, ts) GROUP BY k, ...`
fn windowed_query(window: Option<Window>, emit: Emit) -> Query {
    let funcs = [
        (AggFunc::Count, false),
        (AggFunc::Count, true),
        (AggFunc::CountDistinct, true),
        (AggFunc::Sum, true),
        (AggFunc::Min, true),
        (AggFunc::Max, true),
        (AggFunc::Avg, true),
        (AggFunc::ApproxCountDistinct, true),
    ];
    let aggregates: Vec<AggCall> = funcs
        .iter()
        .map(|(func, arg)| AggCall {
            func: *func,
            arg: arg.then(|| field("v")),
            filter: None,
        })
        .collect();
    let mut columns = vec![("k".to_string(), Expr::Slot(0))];
    for (i, _) in funcs.iter().enumerate() {
        columns.push((format!("a{i}"), Expr::Slot(1 + i)));
    }
    if window.is_some() {
        columns.push(("window_start".into(), Expr::Slot(1 + funcs.len())));
        columns.push(("window_end".into(), Expr::Slot(2 + funcs.len())));
    }
    Query {
        output: "out".into(),
        source: Source {
            topic: "src".into(),
            json: true,
            event_time: EventTime::Column(field("ts")),
        },
        filter: None,
        sink: None,
        body: Body::Aggregate(Aggregate {
            window,
            keys: vec![field("k")],
            aggregates,
            having: None,
            columns,
            emit,
        }),
    }
}

fn settings(lateness: i64) -> Settings {
    Settings {
        allowed_lateness_ms: lateness,
        idle_timeout_ms: 1_000_000,
        emit_interval_ms: 100,
        ..Settings::default()
    }
}

#[derive(Debug, Clone)]
struct Rec {
    partition: i32,
    k: i64,
    v: Option<i64>,
    ts: i64,
}

fn feed(op: &mut QueryOperator, recs: &[Rec], out: &mut Vec<Row>) -> Vec<Fate> {
    recs.iter()
        .map(|r| {
            let json = serde_json::json!({"k": r.k, "v": r.v, "ts": r.ts});
            let input = Input {
                json: sql::expr::Json::Value(&json),
                raw: b"",
                key: None,
                timestamp: 0,
                partition: r.partition,
                offset: 0,
                headers: &[],
            };
            op.process(&input, out).expect("valid record")
        })
        .collect()
}

/// start, end, records of an open session.
type Session<'a> = (i64, i64, Vec<&'a Rec>);

type Expected = BTreeMap<(i64, i64, i64), Vec<Option<i64>>>;

/// The naive model: replay with a running watermark over the partitions (all active),
/// decide lateness, then brute-force each closed window.
fn naive(recs: &[Rec], window: Window, lateness: i64, partitions: &[i32]) -> (Expected, Vec<bool>) {
    let mut highest: BTreeMap<i32, i64> = BTreeMap::new();
    let mut wm: Option<i64> = None;
    let mut late = Vec::new();
    let mut accepted: Vec<&Rec> = Vec::new();
    let mut sessions: BTreeMap<i64, Vec<Session>> = BTreeMap::new();
    let mut closed: Expected = BTreeMap::new();
    let mut closed_rows: Vec<(i64, i64, i64, Vec<&Rec>)> = Vec::new();
    for r in recs {
        let is_late = match (window, wm) {
            (_, None) => false,
            (Window::Tumble { size_ms }, Some(w)) => {
                r.ts.div_euclid(size_ms) * size_ms + size_ms <= w
            }
            (Window::Hop { slide_ms, size_ms }, Some(w)) => {
                (r.ts - size_ms).div_euclid(slide_ms) * slide_ms + slide_ms + size_ms <= w
            }
            (Window::Session { gap_ms }, Some(w)) => r.ts + gap_ms <= w,
        };
        late.push(is_late);
        if !is_late {
            if let Window::Session { gap_ms } = window {
                let list = sessions.entry(r.k).or_default();
                let mut merged = (r.ts, r.ts + gap_ms, vec![r]);
                list.retain(|s| {
                    if r.ts < s.1 && r.ts + gap_ms > s.0 {
                        merged.0 = merged.0.min(s.0);
                        merged.1 = merged.1.max(s.1);
                        merged.2.extend(s.2.iter().copied());
                        false
                    } else {
                        true
                    }
                });
                list.push(merged);
            } else {
                accepted.push(r);
            }
        }
        let h = highest.entry(r.partition).or_insert(r.ts);
        *h = (*h).max(r.ts);
        if partitions.iter().all(|p| highest.contains_key(p)) {
            let low = partitions.iter().map(|p| highest[p]).min().unwrap() - lateness;
            wm = Some(wm.map_or(low, |w| w.max(low)));
        }
        if let (Window::Session { .. }, Some(w)) = (window, wm) {
            for (k, list) in sessions.iter_mut() {
                list.retain(|s| {
                    if s.1 <= w {
                        closed_rows.push((*k, s.0, s.1, s.2.clone()));
                        false
                    } else {
                        true
                    }
                });
            }
        }
    }
    let w = wm.unwrap_or(i64::MIN);
    match window {
        Window::Session { .. } => {}
        Window::Tumble { size_ms } | Window::Hop { size_ms, .. } => {
            let slide = match window {
                Window::Hop { slide_ms, .. } => slide_ms,
                _ => size_ms,
            };
            let mut wins: BTreeMap<(i64, i64, i64), Vec<&Rec>> = BTreeMap::new();
            for r in &accepted {
                let mut s = (r.ts - size_ms).div_euclid(slide) * slide + slide;
                while s <= r.ts {
                    if s + size_ms <= w {
                        wins.entry((r.k, s, s + size_ms)).or_default().push(r);
                    }
                    s += slide;
                }
            }
            closed_rows.extend(wins.into_iter().map(|((k, s, e), rs)| (k, s, e, rs)));
        }
    }
    for (k, s, e, rs) in closed_rows {
        let vs: Vec<i64> = rs.iter().filter_map(|r| r.v).collect();
        let distinct = vs.iter().collect::<std::collections::BTreeSet<_>>().len() as i64;
        closed.insert(
            (k, s, e),
            vec![
                Some(rs.len() as i64),
                Some(vs.len() as i64),
                Some(distinct),
                (!vs.is_empty()).then(|| vs.iter().sum()),
                vs.iter().min().copied(),
                vs.iter().max().copied(),
            ],
        );
    }
    (closed, late)
}

type Averages = BTreeMap<(i64, i64, i64), Option<f64>>;

fn finals(rows: &[Row]) -> (Expected, Averages) {
    let mut out = BTreeMap::new();
    let mut avgs = BTreeMap::new();
    for row in rows.iter().filter(|r| r.is_final) {
        let v: serde_json::Value = serde_json::from_slice(&row.value).unwrap();
        let id = (
            v["k"].as_i64().unwrap(),
            v["window_start"].as_i64().unwrap(),
            v["window_end"].as_i64().unwrap(),
        );
        assert_eq!(row.window, Some((id.1, id.2)));
        let cols: Vec<Option<i64>> = (0..6).map(|i| v[format!("a{i}")].as_i64()).collect();
        assert!(out.insert(id, cols).is_none(), "one final row per window");
        avgs.insert(id, v["a6"].as_f64());
        // APPROX_COUNT_DISTINCT is exact while a group is small.
        assert_eq!(v["a7"].as_i64(), v["a2"].as_i64());
    }
    (out, avgs)
}

fn windows() -> impl Strategy<Value = Window> {
    prop_oneof![
        (1i64..5).prop_map(|n| Window::Tumble { size_ms: n * 100 }),
        (1i64..4, 1i64..4).prop_map(|(s, m)| Window::Hop {
            slide_ms: s * 100,
            size_ms: s * m * 100
        }),
        (1i64..4).prop_map(|g| Window::Session { gap_ms: g * 100 }),
    ]
}

fn records(partitions: i32) -> impl Strategy<Value = Vec<Rec>> {
    proptest::collection::vec(
        (
            0..partitions,
            0i64..4,
            proptest::option::of(-5i64..5),
            0i64..200,
            0i64..40,
        ),
        1..120,
    )
    .prop_map(|raw| {
        let mut clock = -1_000;
        raw.into_iter()
            .map(|(partition, k, v, step, behind)| {
                clock += step;
                Rec {
                    partition,
                    k,
                    v,
                    ts: clock - behind * 10,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn final_rows_match_the_naive_model(window in windows(), recs in records(2), lateness in (0i64..30).prop_map(|l| l * 10)) {
        let partitions = [0, 1];
        let mut op = QueryOperator::new(&windowed_query(Some(window), Emit::Final), &settings(lateness));
        op.assign(&partitions);
        let mut out = Vec::new();
        let fates = feed(&mut op, &recs, &mut out);
        let (want, late) = naive(&recs, window, lateness, &partitions);
        prop_assert_eq!(fates.iter().map(|f| *f == Fate::Late).collect::<Vec<_>>(), late);
        let (got, avgs) = finals(&out);
        prop_assert_eq!(&got, &want);
        for (id, avg) in avgs {
            let cols = &want[&id];
            match (avg, cols[3], cols[1]) {
                (None, None, _) => {}
                (Some(a), Some(sum), Some(n)) => prop_assert!((a - sum as f64 / n as f64).abs() < 1e-9),
                other => prop_assert!(false, "avg {:?}", other),
            }
        }
        prop_assert!(out.iter().all(|r| r.is_final));
    }

    /// Stage 2 of a run: records split by the hash of their group key among `tasks`
    /// operators, each record preceded by its partition's highest event time before
    /// it, and a marker of that partition's highest to every task after it, give the
    /// same fates and the same final rows as one operator that reads everything.
    #[test]
    fn tasks_split_by_key_match_one_operator(window in windows(), recs in records(2), tasks in 1u64..4) {
        let partitions = [0, 1];
        let query = windowed_query(Some(window), Emit::Final);
        let mut one = QueryOperator::new(&query, &settings(50));
        one.assign(&partitions);
        let mut split: Vec<QueryOperator> = (0..tasks).map(|_| {
            let mut op = QueryOperator::new(&query, &settings(50));
            op.assign(&partitions);
            op
        }).collect();
        let (mut out_one, mut out_split) = (Vec::new(), Vec::new());
        let mut high: BTreeMap<i32, i64> = BTreeMap::new();
        for r in &recs {
            let json = serde_json::json!({"k": r.k, "v": r.v, "ts": r.ts});
            let input = Input { json: sql::expr::Json::Value(&json), raw: b"", key: None, timestamp: 0,
                                partition: r.partition, offset: 0, headers: &[] };
            let want = one.process(&input, &mut out_one).unwrap();
            let routing = one.route(&input);
            prop_assert_eq!(routing.time, Some(r.ts));
            prop_assert!(routing.passes);
            let task = &mut split[(routing.key_hash.unwrap() % tasks) as usize];
            if let Some(&h) = high.get(&r.partition) {
                task.observe(r.partition, h, &mut out_split);
            }
            prop_assert_eq!(task.process(&input, &mut out_split).unwrap(), want);
            let h = high.entry(r.partition).or_insert(r.ts);
            *h = (*h).max(r.ts);
            for op in &mut split {
                op.observe(r.partition, *h, &mut out_split);
            }
        }
        prop_assert_eq!(finals(&out_split).0, finals(&out_one).0);
    }

    /// A run crashed at any point and replayed from its last snapshot, with source
    /// partitions declared idle and active again along the way, emits exactly the
    /// rows of the uninterrupted run: nothing in the operator depends on when it runs.
    #[test]
    fn a_replay_with_idle_partitions_gives_the_same_rows(
        window in windows(), recs in records(2),
        idles in proptest::collection::vec((0usize..120, 0i32..2), 0..8),
        snapshot_at in 0usize..130, crash_after in 0usize..60, silent_from in 0usize..120,
    ) {
        // Partition 1 falls silent part of the way (so that declaring it idle
        // matters), and an idle marker for a partition comes before some records.
        let recs: Vec<Rec> = recs.into_iter().enumerate()
            .map(|(i, r)| Rec { partition: if i >= silent_from { 0 } else { r.partition }, ..r })
            .collect();
        let mut events: Vec<Result<&Rec, i32>> = Vec::new();
        for (i, r) in recs.iter().enumerate() {
            events.extend(idles.iter().filter(|(at, _)| *at == i).map(|(_, p)| Err(*p)));
            events.push(Ok(r));
        }
        let run = |op: &mut QueryOperator, events: &[Result<&Rec, i32>], out: &mut Vec<Row>| {
            for e in events {
                match e {
                    Ok(r) => {
                        feed(op, std::slice::from_ref(*r), out);
                    }
                    Err(p) => op.idle(*p, out),
                }
                op.tick(0, out);
            }
        };
        let partitions = [0, 1];
        let query = windowed_query(Some(window), Emit::Final);
        let mut whole = QueryOperator::new(&query, &settings(20));
        whole.assign(&partitions);
        let mut want = Vec::new();
        run(&mut whole, &events, &mut want);

        // The crashed run: a snapshot after `snapshot_at` events, rows emitted after it
        // up to the crash (lost with the process, as their checkpoint was never
        // written: the replay emits them again), then a new process from the snapshot.
        let at = snapshot_at.min(events.len());
        let mut first = QueryOperator::new(&query, &settings(20));
        first.assign(&partitions);
        let mut got = Vec::new();
        run(&mut first, &events[..at], &mut got);
        let snapshot = first.snapshot();
        let before = got.len();
        let mut lost = Vec::new();
        run(&mut first, &events[at..(at + crash_after).min(events.len())], &mut lost);
        let mut second = QueryOperator::new(&query, &settings(20));
        second.restore(&snapshot).unwrap();
        second.assign(&partitions);
        run(&mut second, &events[at..], &mut got);
        prop_assert_eq!(&got, &want);
        prop_assert!(got[before..].starts_with(&lost), "the replay emits again what the crash lost");
        prop_assert_eq!(second.snapshot(), whole.snapshot());
    }

    #[test]
    fn a_restored_snapshot_continues_exactly(window in windows(), recs in records(2), cut in 0usize..120) {
        let partitions = [0, 1];
        let query = windowed_query(Some(window), Emit::Final);
        let cut = cut.min(recs.len());
        let mut a = QueryOperator::new(&query, &settings(50));
        a.assign(&partitions);
        let mut out_a = Vec::new();
        feed(&mut a, &recs[..cut], &mut out_a);
        let mut b = QueryOperator::new(&query, &settings(50));
        b.restore(&a.snapshot()).unwrap();
        b.assign(&partitions);
        prop_assert_eq!(b.snapshot(), a.snapshot());
        let mut rest_a = Vec::new();
        let mut rest_b = Vec::new();
        let fa = feed(&mut a, &recs[cut..], &mut rest_a);
        let fb = feed(&mut b, &recs[cut..], &mut rest_b);
        prop_assert_eq!(fa, fb);
        prop_assert_eq!(rest_a, rest_b);
        prop_assert_eq!(a.state_bytes(), b.state_bytes());
    }

    #[test]
    fn restore_refuses_garbage_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut op = QueryOperator::new(&windowed_query(Some(Window::Session { gap_ms: 10 }), Emit::Final), &settings(0));
        let _ = op.restore(&bytes);
        let mut valid = op.snapshot();
        valid.extend_from_slice(&bytes);
        prop_assert_eq!(op.restore(&valid).is_ok(), bytes.is_empty());
    }

    #[test]
    fn iso8601_matches_a_civil_calendar(days in -800_000i64..800_000, ms in 0i64..86_400_000, off in -14i64 * 60..14 * 60) {
        let t = days * 86_400_000 + ms;
        let (y, m, d) = civil_from_days(days);
        prop_assume!((0..=9999).contains(&y));
        let (hh, mm, ss, fff) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        let s = format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{fff:03}Z");
        prop_assert_eq!(parse_iso8601(&s), Some(t));
        prop_assert_eq!(sql::time::format_iso8601(t), s);
        let local = t + off * 60_000;
        let (ly, lm, ld) = civil_from_days(local.div_euclid(86_400_000));
        let lms = local.rem_euclid(86_400_000);
        let sign = if off < 0 { '-' } else { '+' };
        let s = format!("{ly:04}-{lm:02}-{ld:02}T{:02}:{:02}:{:02}.{:03}{sign}{:02}:{:02}",
            lms / 3_600_000, lms / 60_000 % 60, lms / 1000 % 60, lms % 1000, off.abs() / 60, off.abs() % 60);
        prop_assume!((0..=9999).contains(&ly));
        prop_assert_eq!(parse_iso8601(&s), Some(t));
    }
}

#[test]
fn iso8601_refuses_what_is_not_a_time() {
    for bad in [
        "",
        "2026",
        "2026-13-01",
        "2026-12-03T25:00",
        "2026-12-03T10:00:00Zjunk",
        "x026-12-03",
        "2026-12-03T10:00:00+5",
    ] {
        assert_eq!(parse_iso8601(bad), None, "{bad}");
    }
    assert_eq!(parse_iso8601("1970-01-01"), Some(0));
    assert_eq!(parse_iso8601("1970-01-01 00:00:01"), Some(1000));
}

fn one(
    op: &mut QueryOperator,
    json: serde_json::Value,
    partition: i32,
    out: &mut Vec<Row>,
) -> Result<Fate, Error> {
    let input = Input {
        json: sql::expr::Json::Value(&json),
        raw: b"",
        key: None,
        timestamp: 0,
        partition,
        offset: 0,
        headers: &[],
    };
    op.process(&input, out)
}

#[test]
fn a_rejected_record_changes_nothing() {
    let mut op = QueryOperator::new(
        &windowed_query(
            Some(Window::Hop {
                slide_ms: 10,
                size_ms: 30,
            }),
            Emit::Final,
        ),
        &settings(0),
    );
    op.assign(&[0]);
    let mut out = Vec::new();
    one(
        &mut op,
        serde_json::json!({"k": 1, "v": 5, "ts": 100}),
        0,
        &mut out,
    )
    .unwrap();
    let before = (op.snapshot(), op.state_bytes());
    for bad in [
        serde_json::json!({"k": 1, "v": "five", "ts": 101}),
        serde_json::json!({"k": 1, "v": 5, "ts": "yesterday"}),
        serde_json::json!({"k": 1, "v": 5}),
    ] {
        assert!(matches!(
            one(&mut op, bad, 0, &mut out),
            Err(Error::Rejected(_))
        ));
        assert_eq!((op.snapshot(), op.state_bytes()), before);
    }
    // An ISO-8601 event time is accepted.
    one(
        &mut op,
        serde_json::json!({"k": 1, "v": 5, "ts": "1970-01-01T00:00:00.102Z"}),
        0,
        &mut out,
    )
    .unwrap();
    assert_ne!(op.snapshot(), before.0);
}

#[test]
fn min_max_refuse_values_they_cannot_compare() {
    let query = Query {
        output: "o".into(),
        source: Source {
            topic: "s".into(),
            json: true,
            event_time: EventTime::RecordTimestamp,
        },
        filter: None,
        sink: None,
        body: Body::Aggregate(Aggregate {
            window: None,
            keys: vec![],
            aggregates: vec![AggCall {
                func: AggFunc::Max,
                arg: Some(field("v")),
                filter: None,
            }],
            having: None,
            columns: vec![("m".into(), Expr::Slot(0))],
            emit: Emit::Changes,
        }),
    };
    let mut op = QueryOperator::new(&query, &settings(0));
    op.assign(&[0]);
    let mut out = Vec::new();
    one(&mut op, serde_json::json!({"v": 3}), 0, &mut out).unwrap();
    let before = op.snapshot();
    assert!(matches!(
        one(&mut op, serde_json::json!({"v": "x"}), 0, &mut out),
        Err(Error::Rejected(_))
    ));
    assert_eq!(op.snapshot(), before);
    one(&mut op, serde_json::json!({"v": 4.5}), 0, &mut out).unwrap();
    op.tick(0, &mut out);
    assert_eq!(out.last().unwrap().value, br#"{"m":4.5}"#.to_vec());
}

#[test]
fn a_failing_having_or_column_marks_the_row_for_the_dead_letter_topic() {
    let div0 = |slot| {
        Expr::Binary(
            Box::new(Expr::Slot(slot)),
            sql::expr::BinOp::Div,
            Box::new(Expr::Literal(sql::Value::Int(0))),
        )
    };
    let query = |having: Option<Expr>, column: Expr| Query {
        output: "o".into(),
        source: Source {
            topic: "s".into(),
            json: true,
            event_time: EventTime::RecordTimestamp,
        },
        filter: None,
        sink: None,
        body: Body::Aggregate(Aggregate {
            window: None,
            keys: vec![],
            aggregates: vec![AggCall {
                func: AggFunc::Count,
                arg: None,
                filter: None,
            }],
            having,
            columns: vec![("n".into(), column)],
            emit: Emit::Changes,
        }),
    };
    let cases = [
        (
            query(Some(div0(0)), Expr::Slot(0)),
            "HAVING: division by zero",
        ),
        (query(None, div0(0)), "n: division by zero"),
    ];
    for (q, message) in cases {
        let mut op = QueryOperator::new(&q, &settings(0));
        op.assign(&[0]);
        let mut out = Vec::new();
        one(&mut op, serde_json::json!({"v": 3}), 0, &mut out).unwrap();
        op.tick(0, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].error.as_deref(), Some(message));
    }
    // A HAVING that is false still drops the row, without an error.
    let never = Expr::Literal(sql::Value::Bool(false));
    let mut op = QueryOperator::new(&query(Some(never), Expr::Slot(0)), &settings(0));
    op.assign(&[0]);
    let mut out = Vec::new();
    one(&mut op, serde_json::json!({"v": 3}), 0, &mut out).unwrap();
    op.tick(0, &mut out);
    assert!(out.is_empty());
}

#[test]
fn an_idle_partition_stops_holding_the_watermark_back() {
    let mut op = QueryOperator::new(
        &windowed_query(Some(Window::Tumble { size_ms: 100 }), Emit::Final),
        &settings(0),
    );
    op.assign(&[0, 1]);
    let mut out = Vec::new();
    for ts in [10, 120, 250] {
        one(
            &mut op,
            serde_json::json!({"k": 1, "v": 1, "ts": ts}),
            0,
            &mut out,
        )
        .unwrap();
    }
    // The wall clock decides nothing: however late it is, partition 1 holds the
    // watermark back until it is declared idle.
    op.tick(i64::MAX, &mut out);
    assert!(
        out.is_empty() && op.watermark().is_none(),
        "partition 1 holds it back until it is declared idle"
    );
    op.idle(1, &mut out);
    assert_eq!(op.watermark(), Some(250));
    let closed: Vec<_> = out.iter().map(|r| r.window.unwrap()).collect();
    assert_eq!(closed, vec![(0, 100), (100, 200)]);
    // Partition 1 speaks again: it counts again, and the watermark does not go back.
    one(
        &mut op,
        serde_json::json!({"k": 1, "v": 1, "ts": 5}),
        1,
        &mut out,
    )
    .unwrap_err_or_late();
    assert_eq!(op.watermark(), Some(250));
    // Active again, it holds the watermark at its own event time.
    one(
        &mut op,
        serde_json::json!({"k": 1, "v": 1, "ts": 400}),
        0,
        &mut out,
    )
    .unwrap();
    assert_eq!(op.watermark(), Some(250), "partition 1 is at 250 at most");
    // The idle flags survive a snapshot.
    op.idle(1, &mut out);
    assert_eq!(op.watermark(), Some(400));
    let mut back = QueryOperator::new(
        &windowed_query(Some(Window::Tumble { size_ms: 100 }), Emit::Final),
        &settings(0),
    );
    back.restore(&op.snapshot()).unwrap();
    back.assign(&[0, 1]);
    one(
        &mut back,
        serde_json::json!({"k": 1, "v": 1, "ts": 700}),
        0,
        &mut out,
    )
    .unwrap();
    assert_eq!(back.watermark(), Some(700), "partition 1 is still idle");
}

trait LateOrErr {
    fn unwrap_err_or_late(self);
}

impl LateOrErr for Result<Fate, Error> {
    fn unwrap_err_or_late(self) {
        assert_eq!(self, Ok(Fate::Late));
    }
}

#[test]
fn emit_changes_emits_changed_groups_at_most_once_per_interval() {
    let mut op = QueryOperator::new(&windowed_query(None, Emit::Changes), &settings(0));
    op.assign(&[0]);
    let mut out = Vec::new();
    one(
        &mut op,
        serde_json::json!({"k": 1, "v": 1, "ts": 1}),
        0,
        &mut out,
    )
    .unwrap();
    one(
        &mut op,
        serde_json::json!({"k": 2, "v": 1, "ts": 1}),
        0,
        &mut out,
    )
    .unwrap();
    op.tick(0, &mut out);
    assert_eq!(out.len(), 2);
    one(
        &mut op,
        serde_json::json!({"k": 1, "v": 1, "ts": 2}),
        0,
        &mut out,
    )
    .unwrap();
    op.tick(50, &mut out);
    assert_eq!(out.len(), 2, "not before the interval");
    op.tick(100, &mut out);
    assert_eq!(out.len(), 3, "only the changed group");
    let last: serde_json::Value = serde_json::from_slice(&out[2].value).unwrap();
    assert_eq!(
        (last["k"].as_i64(), last["a0"].as_i64()),
        (Some(1), Some(2))
    );
    assert!(out.iter().all(|r| !r.is_final && r.window.is_none()));
    assert_eq!(out[2].key.as_deref(), Some(&b"[1]"[..]));
    op.tick(300, &mut out);
    assert_eq!(out.len(), 3, "nothing changed");
}

proptest! {
    /// COUNT(DISTINCT) over strings on both sides of the inline limit of its items
    /// (Item::INLINE bytes of canonical form) counts as a set of the strings does,
    /// through a merge and a snapshot too.
    #[test]
    fn distinct_counts_values_short_and_long(a in proptest::collection::vec("[ab]{0,40}", 0..60), b in proptest::collection::vec("[ab]{0,40}", 0..60)) {
        let mut scratch = Vec::new();
        let fill = |values: &[String], scratch: &mut Vec<u8>| {
            let mut acc = accumulate::Acc::new(AggFunc::CountDistinct);
            for v in values {
                acc.add(Some(&Value::Str(v.clone())), scratch);
            }
            acc
        };
        let oracle = |values: &[&[String]]| -> i64 {
            values.iter().flat_map(|v| v.iter()).collect::<std::collections::BTreeSet<_>>().len() as i64
        };
        let mut acc = fill(&a, &mut scratch);
        prop_assert_eq!(acc.result(), Value::Int(oracle(&[&a])));
        let mut bytes = Vec::new();
        acc.encode(&mut bytes);
        let back = accumulate::Acc::decode(&mut encode::Reader::new(&bytes)).unwrap();
        prop_assert_eq!(&back, &acc);
        prop_assert_eq!(back.size(), acc.size());
        let size_before = acc.size();
        let grew = acc.merge(fill(&b, &mut scratch));
        prop_assert_eq!(acc.result(), Value::Int(oracle(&[&a, &b])));
        prop_assert_eq!(acc.size(), size_before + grew);
    }
}

#[test]
fn approx_count_distinct_is_close_and_merges() {
    let mut a = accumulate::Acc::new(AggFunc::ApproxCountDistinct);
    let mut b = accumulate::Acc::new(AggFunc::ApproxCountDistinct);
    let mut scratch = Vec::new();
    for i in 0..100_000i64 {
        a.add(Some(&Value::Int(i)), &mut scratch);
        b.add(Some(&Value::Int(i + 50_000)), &mut scratch);
    }
    let est = |acc: &accumulate::Acc| match acc.result() {
        Value::Int(n) => n as f64,
        other => panic!("{other:?}"),
    };
    assert!(
        (est(&a) - 100_000.0).abs() / 100_000.0 < 0.05,
        "{}",
        est(&a)
    );
    a.merge(b);
    assert!(
        (est(&a) - 150_000.0).abs() / 150_000.0 < 0.05,
        "{}",
        est(&a)
    );
    assert!(a.size() <= 4096, "bounded memory");
}

#[test]
fn the_state_limit_stops_the_query() {
    let mut s = settings(0);
    s.max_state_bytes = 10_000;
    let mut op = QueryOperator::new(&windowed_query(None, Emit::Changes), &s);
    op.assign(&[0]);
    let mut out = Vec::new();
    let mut hit = None;
    for i in 0..10_000 {
        if let Err(e) = one(
            &mut op,
            serde_json::json!({"k": i, "v": i, "ts": 1}),
            0,
            &mut out,
        ) {
            hit = Some((i, e));
            break;
        }
    }
    let (i, e) = hit.expect("limit reached");
    assert!(
        matches!(e, Error::StateLimit { used, limit: 10_000 } if used > 10_000),
        "{e:?}"
    );
    assert!(i > 10, "{i}");
}

#[test]
fn stateless_queries_filter_and_project_in_select_order() {
    let query = Query {
        output: "o".into(),
        source: Source {
            topic: "s".into(),
            json: true,
            event_time: EventTime::RecordTimestamp,
        },
        filter: Some(field("keep")),
        sink: None,
        body: Body::Map(Projection::Columns(vec![
            ("z".into(), field("b")),
            ("a".into(), Expr::Meta(sql::expr::Meta::Offset)),
        ])),
    };
    let mut op = QueryOperator::new(&query, &Settings::default());
    let mut out = Vec::new();
    for (keep, offset) in [(true, 7), (false, 8)] {
        let json = serde_json::json!({"keep": keep, "b": "x"});
        let input = Input {
            json: sql::expr::Json::Value(&json),
            raw: b"",
            key: Some(b"key"),
            timestamp: 0,
            partition: 0,
            offset,
            headers: &[],
        };
        assert_eq!(op.process(&input, &mut out), Ok(Fate::Done));
    }
    assert_eq!(
        out,
        vec![Row {
            key: Some(b"key".to_vec()),
            value: br#"{"z":"x","a":7}"#.to_vec(),
            window: None,
            is_final: false,
            error: None,
        }]
    );
}

/// A checkpoint written before idle flags (snapshot version 1) still restores: its
/// partitions come back active, everything else as it was.
#[test]
fn a_version_1_snapshot_restores() {
    let query = windowed_query(Some(Window::Tumble { size_ms: 100 }), Emit::Final);
    let mut op = QueryOperator::new(&query, &settings(0));
    op.assign(&[0, 1]);
    let mut out = Vec::new();
    for (p, ts) in [(0, 10), (1, 30), (0, 150)] {
        one(
            &mut op,
            serde_json::json!({"k": 1, "v": ts, "ts": ts}),
            p,
            &mut out,
        )
        .unwrap();
    }
    let v3 = op.snapshot();
    // Version 1: the same bytes without the idle flag after each partition, and
    // without version 3's (empty) section of whole hopping windows at the end.
    assert_eq!(v3[v3.len() - 4..], [0, 0, 0, 0]);
    let v2 = &v3[..v3.len() - 4];
    let mut r = encode::Reader::new(&v2[1..]);
    let current = r.opt_i64().unwrap();
    let n = r.count().unwrap();
    let (mut v1, mut v2_watermark) = (vec![1u8], Vec::new());
    for out in [&mut v1, &mut v2_watermark] {
        encode::opt_i64(out, current);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    for _ in 0..n {
        let p = r.u32().unwrap();
        let high = r.opt_i64().unwrap();
        assert_eq!(r.u8().unwrap(), 0, "active");
        for out in [&mut v1, &mut v2_watermark] {
            out.extend_from_slice(&p.to_be_bytes());
            encode::opt_i64(out, high);
        }
        v2_watermark.push(0);
    }
    assert_eq!(n, 2);
    v1.extend_from_slice(&v2[1 + v2_watermark.len()..]);
    let mut back = QueryOperator::new(&query, &settings(0));
    back.restore(&v1).unwrap();
    back.assign(&[0, 1]);
    assert_eq!(back.snapshot(), v3);
}

/// The records behind `testdata/hop-v2.snapshot`: HOP(100 ms, 300 ms), three keys, two
/// partitions, out of order.
fn hop_v2_records() -> Vec<Rec> {
    let mut recs = Vec::new();
    for i in 0..60i64 {
        recs.push(Rec {
            partition: (i % 2) as i32,
            k: i % 3,
            v: (i % 5 != 0).then_some(i % 7 - 3),
            ts: 1_000 + i * 23 - (i % 4) * 15,
        });
    }
    recs
}

/// Issue 26 §3: event times near the ends of i64 overflowed the window arithmetic (a
/// panic with overflow checks, replayed forever from the checkpoint; a wrapped window
/// without). They are rejected, for every kind of window, and change nothing.
#[test]
fn event_times_out_of_range_are_rejected_not_wrapped() {
    for window in [
        Window::Tumble { size_ms: 300 },
        Window::Hop {
            slide_ms: 100,
            size_ms: 300,
        },
        Window::Session { gap_ms: 100 },
    ] {
        let mut op = QueryOperator::new(&windowed_query(Some(window), Emit::Final), &settings(50));
        op.assign(&[0]);
        let mut out = Vec::new();
        one(
            &mut op,
            serde_json::json!({"k": 1, "v": 1, "ts": 1_000}),
            0,
            &mut out,
        )
        .unwrap();
        let before = op.snapshot();
        for ts in [
            i64::MAX,
            i64::MIN,
            i64::MAX - 100,
            MAX_EVENT_TIME_MS + 1,
            -MAX_EVENT_TIME_MS - 1,
        ] {
            let got = one(
                &mut op,
                serde_json::json!({"k": 1, "v": 1, "ts": ts}),
                0,
                &mut out,
            );
            match got {
                Err(Error::Rejected(m)) => assert!(m.contains("out of range"), "{m}"),
                other => panic!("{window:?} ts {ts}: {other:?}"),
            }
            assert_eq!(op.snapshot(), before);
        }
        // The ends of the range themselves are fine.
        for ts in [MAX_EVENT_TIME_MS, -MAX_EVENT_TIME_MS] {
            one(
                &mut op,
                serde_json::json!({"k": 1, "v": 1, "ts": ts}),
                0,
                &mut out,
            )
            .unwrap();
        }
        assert!(out.iter().all(|r| r.window.is_some_and(|(s, e)| s < e)));
    }
    // The record's own timestamp is checked the same way.
    let mut q = windowed_query(Some(Window::Tumble { size_ms: 300 }), Emit::Final);
    q.source.event_time = EventTime::RecordTimestamp;
    let mut op = QueryOperator::new(&q, &settings(0));
    op.assign(&[0]);
    let json = serde_json::json!({"k": 1, "v": 1});
    let input = Input {
        json: sql::expr::Json::Value(&json),
        raw: b"",
        key: None,
        timestamp: i64::MAX,
        partition: 0,
        offset: 0,
        headers: &[],
    };
    assert!(matches!(
        op.process(&input, &mut Vec::new()),
        Err(Error::Rejected(_))
    ));
    assert_eq!(op.route(&input).time, None);
}

/// A hopping query's checkpoint in snapshot version 2, where each open window held its
/// own accumulators, restores. `testdata/hop-v2.snapshot` is what the code of
/// 2026-12-07 (`894c613`) saved after the first 30 of `hop_v2_records()` with a
/// lateness of 20 ms; fed the other 30, the restored operator emits exactly the rows
/// one uninterrupted run emits after its 30th record.
#[test]
fn a_version_2_hop_snapshot_restores() {
    let query = windowed_query(
        Some(Window::Hop {
            slide_ms: 100,
            size_ms: 300,
        }),
        Emit::Final,
    );
    let recs = hop_v2_records();
    let mut whole = QueryOperator::new(&query, &settings(20));
    whole.assign(&[0, 1]);
    let mut out = Vec::new();
    feed(&mut whole, &recs[..30], &mut out);
    let mut want = Vec::new();
    feed(&mut whole, &recs[30..], &mut want);
    let mut back = QueryOperator::new(&query, &settings(20));
    back.restore(include_bytes!("testdata/hop-v2.snapshot"))
        .unwrap();
    back.assign(&[0, 1]);
    let mut got = Vec::new();
    feed(&mut back, &recs[30..], &mut got);
    assert!(
        want.len() >= 10,
        "windows close after the cut: {}",
        want.len()
    );
    assert_eq!(got, want);
    assert_eq!(back.snapshot(), whole.snapshot());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// EMIT CHANGES over tumbling and hopping windows (whose values are merged from
    /// slices): after each record, every changed window's row holds the aggregates of
    /// the records so far that were not late and fall in it.
    #[test]
    fn emit_changes_rows_of_windows_hold_what_the_window_has_seen(
        window in windows().prop_filter("sliced", |w| !matches!(w, Window::Session { .. })),
        recs in records(1),
        lateness in (0i64..30).prop_map(|l| l * 10),
    ) {
        let mut op = QueryOperator::new(&windowed_query(Some(window), Emit::Changes), &settings(lateness));
        op.assign(&[0]);
        let (size, slide) = match window {
            Window::Tumble { size_ms } => (size_ms, size_ms),
            Window::Hop { slide_ms, size_ms } => (size_ms, slide_ms),
            Window::Session { .. } => unreachable!(),
        };
        let mut seen: Vec<&Rec> = Vec::new();
        for (i, r) in recs.iter().enumerate() {
            let mut out = Vec::new();
            if feed(&mut op, std::slice::from_ref(r), &mut out)[0] == Fate::Done {
                seen.push(r);
            }
            op.tick(1_000 * (i as i64 + 1), &mut out);
            let changed: Vec<&Row> = out.iter().filter(|row| !row.is_final).collect();
            // The record's windows are the ones that changed (a late one changes none).
            let mine = if seen.last().is_some_and(|l| std::ptr::eq(*l, r)) {
                let first = (r.ts - size).div_euclid(slide) * slide + slide;
                (first..=r.ts).step_by(slide as usize).filter(|s| s.rem_euclid(slide) == 0).count()
            } else {
                0
            };
            prop_assert_eq!(changed.len(), mine);
            for row in changed {
                let v: serde_json::Value = serde_json::from_slice(&row.value).unwrap();
                let (k, s, e) = (v["k"].as_i64().unwrap(), v["window_start"].as_i64().unwrap(), v["window_end"].as_i64().unwrap());
                prop_assert_eq!(e - s, size);
                let rs: Vec<&&Rec> = seen.iter().filter(|x| x.k == k && x.ts >= s && x.ts < e).collect();
                let vs: Vec<i64> = rs.iter().filter_map(|x| x.v).collect();
                let want = vec![
                    Some(rs.len() as i64),
                    Some(vs.len() as i64),
                    Some(vs.iter().collect::<std::collections::BTreeSet<_>>().len() as i64),
                    (!vs.is_empty()).then(|| vs.iter().sum()),
                    vs.iter().min().copied(),
                    vs.iter().max().copied(),
                ];
                let got: Vec<Option<i64>> = (0..6).map(|i| v[format!("a{i}")].as_i64()).collect();
                prop_assert_eq!(got, want, "window {:?} of key {}", (s, e), k);
            }
        }
    }
}
