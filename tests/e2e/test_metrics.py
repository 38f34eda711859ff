"""`GET /metrics` of `freshet serve`: the broker's, the gateway's and the pipelines'
metrics, read with the Prometheus project's own Python parser, and checked against what
the test computes from Kafka clients (offsets, committed offsets, the records it sent)."""

from __future__ import annotations

import json

from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from gateway_fixtures import get
from helpers import create_topic, producer, topic_name, wait_until, watermarks
from test_pipeline import describe, name, put_pipeline

BROKER_ENV = {"FRESHET_HTTP_LISTEN": "127.0.0.1:0"}


def scrape(base: str) -> dict:
    """{(sample name, frozenset(labels)): value}, through prometheus_client's parser,
    which refuses what is not the Prometheus text format."""
    r = get(f"{base}/metrics")
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/plain; version=0.0.4"), r.headers
    out = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def series(samples: dict, name: str) -> list[dict]:
    return [dict(labels) for (n, labels) in samples if n == name]


def test_broker_metrics_match_what_clients_see(broker):
    topic = create_topic(broker.bootstrap, topic_name("metrics"), partitions=2)
    before = scrape(broker.http)
    sent = {0: 30, 1: 45}
    p = producer(broker.bootstrap, **{"acks": "all"})
    for partition, n in sent.items():
        for i in range(n):
            p.produce(topic, json.dumps({"i": i}).encode(), partition=partition)
    assert p.flush(30) == 0

    # A group reads partition 0 to its end and partition 1 part of the way, and
    # commits where it stopped; another commit names a partition that does not exist.
    group = name("metrics_group")
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group,
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        c.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
        got = []

        def read_all():
            got.extend(m for m in c.consume(100, 0.2) if m.error() is None)
            return len(got) >= sum(sent.values())
        wait_until(read_all, timeout=30, what="every record read")
        c.commit(offsets=[TopicPartition(topic, 0, 30), TopicPartition(topic, 1, 12)], asynchronous=False)
        try:
            c.commit(offsets=[TopicPartition(topic, 7, 1)], asynchronous=False)
            raise AssertionError("a commit to partition 7 of a 2-partition topic succeeded")
        except KafkaException:
            pass
        committed = {tp.partition: tp.offset for tp in c.committed(
            [TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)}
    finally:
        c.close()

    after = scrape(broker.http)
    assert value(after, "freshet_topic_records_in_total", topic=topic) == sum(sent.values())
    assert value(after, "freshet_topic_bytes_in_total", topic=topic) > 0
    assert value(after, "freshet_topic_records_out_total", topic=topic) >= sum(sent.values())
    for partition in sent:
        low, high = watermarks(broker.bootstrap, topic, partition)
        assert value(after, "freshet_log_end_offset", topic=topic, partition=partition) == high
        assert value(after, "freshet_log_start_offset", topic=topic, partition=partition) == low
        assert value(after, "freshet_log_size_bytes", topic=topic, partition=partition) > 0
        lag = value(after, "freshet_consumer_group_lag", group=group, topic=topic, partition=partition)
        assert lag == high - committed[partition], (partition, lag, high, committed)
    delta = lambda n, **l: (value(after, n, **l) or 0) - (value(before, n, **l) or 0)
    assert delta("freshet_kafka_requests_total", api="Produce") >= 1
    assert delta("freshet_kafka_requests_total", api="OffsetCommit") >= 2
    # UNKNOWN_TOPIC_OR_PARTITION (3) for the commit to partition 7.
    assert delta("freshet_kafka_request_errors_total", api="OffsetCommit", code=3) >= 1
    assert value(after, "freshet_kafka_request_duration_seconds_count", api="Produce") == \
        value(after, "freshet_kafka_request_duration_seconds_bucket", api="Produce", le="+Inf")
    assert delta("freshet_log_fsyncs_total") >= 1, "acks=all produces wait for fsyncs"
    assert value(after, "freshet_log_fsync_duration_seconds_count") >= value(after, "freshet_log_fsyncs_total")
    assert value(after, "freshet_connections") >= 1
    assert value(after, "freshet_connections_accepted_total") >= value(after, "freshet_connections")
    # The gateway's own, on the same page.
    assert value(after, "freshet_gateway_spool_records") == 0
    # A deleted topic's series go with it.
    from helpers import admin, wait_futures
    a = admin(broker.bootstrap)
    wait_futures(a.delete_topics([topic], operation_timeout=20))
    gone = scrape(broker.http)
    for series_name in ("freshet_topic_records_in_total", "freshet_topic_bytes_in_total",
                        "freshet_topic_records_out_total", "freshet_topic_bytes_out_total"):
        assert value(gone, series_name, topic=topic) is None, series_name
    assert value(gone, "freshet_log_end_offset", topic=topic, partition=0) is None


def test_per_partition_series_are_bounded(broker_factory):
    b = broker_factory(env={**BROKER_ENV, "FRESHET_METRICS_MAX_PARTITION_SERIES": "3"})
    topic = create_topic(b.bootstrap, topic_name("many"), partitions=5)
    samples = scrape(b.http)
    partitions = [s for s in series(samples, "freshet_log_end_offset")]
    assert len(partitions) == 3, partitions
    # Every partition of the broker is counted: the topic's five and its own topics'.
    omitted = value(samples, "freshet_metrics_series_omitted")
    total = len(partitions) + omitted
    assert total >= 5 and omitted == total - 3, (omitted, partitions)


def test_pipeline_metrics_equal_what_describe_shows(broker):
    src = create_topic(broker.bootstrap, name("msrc"))
    pipeline = name("mpipe")
    out = name("mout")
    sql = f"INSERT INTO {out} SELECT CAST(i AS BIGINT) AS i FROM {src} WHERE CAST(i AS BIGINT) % 2 = 0;"
    assert put_pipeline(broker, pipeline, sql).status == 201
    p = producer(broker.bootstrap)
    for i in range(40):
        p.produce(src, json.dumps({"i": i}).encode())
    assert p.flush(30) == 0
    wait_until(lambda: describe(broker, pipeline)["records_in"] == 40, timeout=60, what="40 records in")
    wait_until(lambda: describe(broker, pipeline)["records_out"] == 20, timeout=60, what="20 rows out")
    samples = scrape(broker.http)
    d = describe(broker, pipeline)
    assert value(samples, "freshet_pipeline_records_in_total", pipeline=pipeline) == d["records_in"] == 40
    assert value(samples, "freshet_pipeline_records_out_total", pipeline=pipeline) == d["records_out"] == 20
    assert value(samples, "freshet_pipeline_dead_lettered_records_total", pipeline=pipeline) == 0
    assert value(samples, "freshet_pipeline_running", pipeline=pipeline) == 1


def test_history_keeps_the_recent_past_of_the_metrics(broker_factory):
    b = broker_factory(env={**BROKER_ENV, "FRESHET_HTTP_HISTORY_INTERVAL_MS": "50",
                            "FRESHET_HTTP_HISTORY_POINTS": "20"})
    topic = create_topic(b.bootstrap, topic_name("hist"))
    p = producer(b.bootstrap)
    for i in range(25):
        p.produce(topic, json.dumps({"i": i}).encode())
    assert p.flush(30) == 0

    def history():
        r = get(f"{b.http}/metrics/history?name=freshet_topic_records_in_total&topic={topic}")
        assert r.status == 200, r
        return r.json()

    def has_all():
        h = history()
        return h["series"] and h["series"][0]["values"][-1] == 25 and len(h["times"]) == 20
    wait_until(has_all, timeout=30, what=lambda: f"25 records in the history's last point, 20 points: {history()}")
    h = history()
    assert h["interval_ms"] == 50
    [s] = h["series"]
    assert s["name"] == "freshet_topic_records_in_total" and s["labels"] == {"topic": topic}
    assert len(s["values"]) == len(h["times"]) == 20, "history_points bounds the window"
    assert all(b > a for a, b in zip(h["times"], h["times"][1:])), h["times"]
    known = [v for v in s["values"] if v is not None]
    assert known == sorted(known), "a counter's past never decreases"
    # The last point equals what /metrics shows now (nothing else is produced).
    assert value(scrape(b.http), "freshet_topic_records_in_total", topic=topic) == 25
    listing = get(f"{b.http}/metrics/history").json()
    assert {"name": "freshet_topic_records_in_total", "labels": {"topic": topic}} in listing["series"]
    assert listing["times"] == []
