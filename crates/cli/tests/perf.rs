//! Smoke tests of `freshet perf produce|consume|e2e` against a real broker: a second or
//! two each, asserting the counts of their JSON reports (the speed is not tested).

mod common;

use common::{run_tool, Broker};
use serde_json::Value;

/// `freshet perf ARGS --brokers ADDR --json`, which must succeed; its JSON report.
fn perf(broker: &Broker, args: &[&str]) -> Value {
    let output = perf_output(broker, args);
    output.assert_success(&format!("perf {args:?}"));
    parse_report(&output)
}

fn perf_output(broker: &Broker, args: &[&str]) -> common::ToolOutput {
    let mut full = vec!["perf"];
    full.extend(args);
    full.extend(["--brokers", broker.address.as_str(), "--json"]);
    run_tool(&full, b"")
}

fn parse_report(output: &common::ToolOutput) -> Value {
    let text = output.stdout_text();
    let mut lines = text.lines();
    let line = lines.next().unwrap_or_default();
    assert_eq!(lines.next(), None, "one JSON line expected, got:\n{text}");
    serde_json::from_str(line)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {line}\nstderr:\n{}", output.stderr))
}

fn count(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no count '{key}' in {report}"))
}

fn latency_ms(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no latency '{key}' in {report}"))
}

#[test]
fn produce_then_consume_everything_from_the_beginning() {
    let broker = Broker::start();
    let produced = perf(
        &broker,
        &[
            "produce",
            "--topic",
            "smoke",
            "--records",
            "20000",
            "--record-size",
            "100",
            "--partitions",
            "3",
            "--producers",
            "2",
            "--acks",
            "all",
        ],
    );
    assert_eq!(count(&produced, "records"), 20_000, "{produced}");
    assert_eq!(count(&produced, "failed"), 0, "{produced}");
    assert_eq!(count(&produced, "bytes"), 2_000_000, "{produced}");
    assert_eq!(count(&produced, "partitions"), 3, "{produced}");
    let latency = &produced["latency_ms"];
    assert_eq!(count(latency, "count"), 20_000, "{produced}");
    let p50 = latency_ms(latency, "p50");
    let p99 = latency_ms(latency, "p99");
    let max = latency_ms(latency, "max");
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{produced}");

    // Compressed and paced: 2000 records at 2000/s take about a second.
    let paced = perf(
        &broker,
        &[
            "produce",
            "--topic",
            "smoke",
            "--records",
            "2000",
            "--record-size",
            "50",
            "--rate",
            "2000",
            "--compression",
            "lz4",
            "--partitions",
            "3",
        ],
    );
    assert_eq!(count(&paced, "records"), 2_000, "{paced}");
    let elapsed_s = paced["elapsed_s"].as_f64().expect("elapsed_s");
    assert!(
        elapsed_s >= 0.9,
        "2000 records at 2000/s took {elapsed_s} s"
    );

    let consumed = perf(
        &broker,
        &[
            "consume",
            "--topic",
            "smoke",
            "--from-beginning",
            "--records",
            "22000",
        ],
    );
    assert_eq!(count(&consumed, "records"), 22_000, "{consumed}");
    assert_eq!(count(&consumed, "bytes"), 2_100_000, "{consumed}");
    assert!(
        consumed["time_to_first_record_ms"].as_f64().is_some(),
        "{consumed}"
    );

    // Asking for more than there is: the report still comes, then exit code 1.
    let short = perf_output(
        &broker,
        &[
            "consume",
            "--topic",
            "smoke",
            "--from-beginning",
            "--records",
            "22001",
            "--timeout-ms",
            "1000",
        ],
    );
    assert!(
        !short.status.success(),
        "consume of a missing record succeeded"
    );
    assert_eq!(count(&parse_report(&short), "records"), 22_000);
    assert!(
        short.stderr.contains("got 22000 of 22001 records"),
        "{}",
        short.stderr
    );
}

#[test]
fn produce_refuses_an_existing_topic_with_another_partition_count() {
    let broker = Broker::start();
    perf(
        &broker,
        &[
            "produce",
            "--topic",
            "two",
            "--records",
            "10",
            "--partitions",
            "2",
        ],
    );
    let output = perf_output(
        &broker,
        &[
            "produce",
            "--topic",
            "two",
            "--records",
            "10",
            "--partitions",
            "3",
        ],
    );
    assert!(!output.status.success());
    assert!(
        output.stderr.contains("has 2 partitions, not 3"),
        "{}",
        output.stderr
    );
}

#[test]
fn consume_live_sees_only_what_is_produced_after_it_starts() {
    let broker = Broker::start();
    perf(
        &broker,
        &[
            "produce",
            "--topic",
            "live",
            "--records",
            "100",
            "--partitions",
            "1",
        ],
    );
    // Nothing is produced after the live consumer starts, so it sees nothing.
    let output = perf_output(
        &broker,
        &["consume", "--topic", "live", "--timeout-ms", "1000"],
    );
    assert!(!output.status.success(), "a live consumer got old records");
    assert!(
        output.stderr.contains("no record within 1000 ms"),
        "{}",
        output.stderr
    );
}

#[test]
fn e2e_loses_duplicates_and_reorders_nothing() {
    let broker = Broker::start();
    let report = perf(
        &broker,
        &[
            "e2e",
            "--topic",
            "e2e",
            "--rate",
            "2000",
            "--duration-s",
            "1",
            "--partitions",
            "2",
        ],
    );
    assert_eq!(count(&report, "records"), 2_000, "{report}");
    assert_eq!(count(&report, "produced"), 2_000, "{report}");
    assert_eq!(count(&report, "consumed"), 2_000, "{report}");
    assert_eq!(count(&report, "lost"), 0, "{report}");
    assert_eq!(count(&report, "duplicated"), 0, "{report}");
    assert_eq!(count(&report, "out_of_order"), 0, "{report}");
    assert_eq!(count(&report, "delivery_failed"), 0, "{report}");
    assert_eq!(count(&report["latency_ms"], "count"), 2_000, "{report}");

    // A second run on the same topic ignores the first run's records.
    let again = perf(
        &broker,
        &[
            "e2e",
            "--topic",
            "e2e",
            "--rate",
            "1000",
            "--records",
            "500",
            "--partitions",
            "2",
        ],
    );
    assert_eq!(count(&again, "consumed"), 500, "{again}");
    assert_eq!(count(&again, "lost"), 0, "{again}");
}

#[test]
fn e2e_fails_when_records_go_missing() {
    let broker = Broker::start();
    // The broker refuses every record of this topic (batches over max.message.bytes),
    // so all are lost: the command says so with exit code 1 after its report.
    run_tool(
        &[
            "topic",
            "create",
            "tiny",
            "--partitions",
            "1",
            "--config",
            "max.message.bytes=1000",
            "--brokers",
            broker.address.as_str(),
        ],
        b"",
    )
    .assert_success("topic create");
    let output = perf_output(
        &broker,
        &[
            "e2e",
            "--topic",
            "tiny",
            "--rate",
            "1000",
            "--records",
            "20",
            "--record-size",
            "2000",
            "--timeout-ms",
            "500",
            "-X",
            "message.timeout.ms=5000",
        ],
    );
    assert!(!output.status.success(), "e2e with lost records succeeded");
    let report = parse_report(&output);
    assert_eq!(count(&report, "lost"), 20, "{report}");
    assert_eq!(count(&report, "delivery_failed"), 20, "{report}");
    assert!(output.stderr.contains("20 lost"), "{}", output.stderr);
    assert!(
        output.stderr.contains("MESSAGE_TOO_LARGE"),
        "{}",
        output.stderr
    );
}

#[test]
fn consume_in_a_group_gets_every_partition() {
    let broker = Broker::start();
    perf(
        &broker,
        &[
            "produce",
            "--topic",
            "grouped",
            "--records",
            "3000",
            "--partitions",
            "3",
        ],
    );
    let consumed = perf(
        &broker,
        &[
            "consume",
            "--topic",
            "grouped",
            "--group",
            "perf-smoke",
            "--from-beginning",
            "--records",
            "3000",
            "--timeout-ms",
            "30000",
        ],
    );
    assert_eq!(count(&consumed, "records"), 3_000, "{consumed}");
    assert_eq!(consumed["group"], "perf-smoke", "{consumed}");
}
