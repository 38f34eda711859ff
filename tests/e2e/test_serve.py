"""`freshet serve` as a user runs it: what Metadata advertises, settings from a TOML file,
`FRESHET_*` environment variables and flags (in that order of precedence), and a clean
stop on SIGINT/SIGTERM that flushes every partition and answers what is in flight."""

from __future__ import annotations

import signal
import socket
import struct
import time

import pytest
from confluent_kafka.admin import ConfigResource

from conftest import STOP_TIMEOUT_S
from helpers import (Rec, admin, broker_has_read, connect, consume, content, create_topic, fetch_request,
                     parse_fetch_response_v4, parse_produce_response_v3, produce, produce_request, record_batch,
                     recv_frame, topic_name, wait_futures, wait_until, watermarks)


def free_port() -> int:
    """A loopback port nothing listens on right now, for a broker that must know its port
    before it starts (to advertise it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def advertised_brokers(bootstrap: str) -> dict[int, tuple[str, int]]:
    """Node id -> (host, port) as the Metadata answer gives them to librdkafka."""
    md = admin(bootstrap).list_topics(timeout=10)
    return {b.id: (b.host, b.port) for b in md.brokers.values()}


def read_checkpoint(path) -> int | None:
    """The offset in a storage checkpoint file (`recovery-point`, `log-start-offset`):
    magic FCP1, offset i64 BE, CRC-32C of the first 12 bytes; None if there is none."""
    import crc32c
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    assert len(data) == 16 and data[:4] == b"FCP1", f"{path} is not a checkpoint: {data!r}"
    (offset, crc) = struct.unpack(">qI", data[4:])
    assert crc == crc32c.crc32c(data[:12]), f"{path}: checkpoint CRC mismatch"
    return offset


def extra_stdout_lines(b) -> list[str]:
    """Lines the broker printed on stdout after its one listening line (the harness
    copies them into the stderr log)."""
    return [line for line in b.stderr_tail(10_000_000).splitlines() if line.startswith("[stdout] ")]


def test_advertised_listener_is_what_metadata_answers(broker_factory):
    port = free_port()
    b = broker_factory(args=["--advertised-listener", f"localhost:{port}"], start=False)
    b.start(port=port)
    # The listening line tells where the socket is bound, not what is advertised.
    assert (b.host, b.port) == ("127.0.0.1", port)
    assert advertised_brokers(b.bootstrap) == {0: ("localhost", port)}
    a = admin(b.bootstrap)
    cluster = a.describe_cluster(request_timeout=10).result(timeout=20)
    assert [(n.id, n.host, n.port) for n in cluster.nodes] == [(0, "localhost", port)]
    # Clients really go through the advertised address after bootstrap.
    topic = create_topic(b.bootstrap, topic_name("advertised"))
    recs = [Rec(f"v{i}".encode(), timestamp=1_700_000_000_000 + i, partition=0) for i in range(10)]
    produce(b.bootstrap, topic, recs)
    assert content(consume(b.bootstrap, topic)) == content(recs)


@pytest.mark.parametrize("how", ["--config", "FRESHET_CONFIG"])
def test_config_file_sets_auto_created_partitions(broker_factory, tmp_path, how):
    config = tmp_path / "freshet.toml"
    config.write_text("num_partitions = 3\nauto_create_topics = true\n")
    if how == "--config":
        b = broker_factory(args=["--config", str(config)])
    else:
        b = broker_factory(env={"FRESHET_CONFIG": str(config)})
    topic = topic_name("auto3")
    # No CreateTopics: the producer's Metadata request creates the topic.
    delivered = produce(b.bootstrap, topic, [Rec(b"first")])
    assert delivered[0].offset == 0
    md = admin(b.bootstrap).list_topics(topic=topic, timeout=10)
    assert sorted(md.topics[topic].partitions) == [0, 1, 2], md.topics[topic].partitions


def test_env_overrides_file_and_flags_override_env(broker_factory, tmp_path):
    port = free_port()
    file_dir, env_dir = tmp_path / "dir-from-file", tmp_path / "dir-from-env"
    b = broker_factory(
        config={"num_partitions": 3, "max_message_bytes": 200000, "advertised_listener": "file.invalid:1",
                "listen": "file.invalid:0", "data_dir": str(file_dir)},
        env={"FRESHET_NUM_PARTITIONS": "5", "FRESHET_ADVERTISED_LISTENER": "env.invalid:2",
             "FRESHET_LISTEN": "env.invalid:0", "FRESHET_DATA_DIR": str(env_dir)},
        start=False)
    # --listen and --data-dir come from the harness (a losing flag would fail the start:
    # neither name resolves, and the harness checks the data dir the broker reports).
    b.start(port=port)
    assert advertised_brokers(b.bootstrap) == {0: ("env.invalid", 2)}, "env must beat the file"
    b.stop()

    b.args = ["--advertised-listener", f"localhost:{port}"]
    b.start(port=port)
    assert advertised_brokers(b.bootstrap) == {0: ("localhost", port)}, "the flag must beat env"
    topic = topic_name("precedence")
    produce(b.bootstrap, topic, [Rec(b"x")])
    md = admin(b.bootstrap).list_topics(topic=topic, timeout=10)
    assert len(md.topics[topic].partitions) == 5, "FRESHET_NUM_PARTITIONS must beat the file"
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    a = admin(b.bootstrap)
    cfg = wait_futures(a.describe_configs([res]))[res]
    assert cfg["max.message.bytes"].value == "200000", "a file key nothing overrides must apply"
    assert not file_dir.exists() and not env_dir.exists(), "data went to the --data-dir directory only"


def test_sigint_stops_cleanly_and_flushes(broker_factory):
    # No background flush: only the shutdown can make acks=1 data durable.
    b = broker_factory(env={"FRESHET_FLUSH_INTERVAL_MS": "0"})
    topic = create_topic(b.bootstrap, topic_name("sigint"))
    recs = [Rec(f"value-{i}".encode(), f"k{i}".encode(), timestamp=1_700_000_000_000 + i, partition=0)
            for i in range(200)]
    produce(b.bootstrap, topic, recs, acks="1")
    recovery_point = b.partition_dir(topic, 0) / "recovery-point"
    before = read_checkpoint(recovery_point)
    assert before is None or before < len(recs), \
        f"recovery point {before} already covers the acks=1 records: the test would prove nothing"

    log_at = b.log_size()
    b.proc.send_signal(signal.SIGINT)
    code = b.proc.wait(timeout=STOP_TIMEOUT_S)
    stderr = b.stderr_since(log_at)
    assert code == 0, f"exit status {code} after SIGINT; stderr:\n{stderr}"
    assert "SIGINT received" in stderr and "stopped" in stderr, stderr
    # The shutdown fsync'd the partition and recorded it: the next start validates nothing.
    assert read_checkpoint(recovery_point) == len(recs)
    assert extra_stdout_lines(b) == [], "serve prints one line on stdout"

    b.start()
    got = consume(b.bootstrap, topic)
    assert [r.offset for r in got] == list(range(len(recs)))
    assert content(got) == content(recs)


def test_requests_in_flight_at_sigterm_are_answered(broker_factory):
    b = broker_factory()
    topic = create_topic(b.bootstrap, topic_name("in-flight"), partitions=2)
    produce(b.bootstrap, topic, [Rec(b"before", partition=1)])
    max_wait_ms = 2000
    with connect(b.port, timeout=STOP_TIMEOUT_S) as s:
        # A long-poll fetch at the end of partition 1 (nothing will arrive there), then,
        # pipelined on the same connection, an acks=all produce to partition 0: its answer
        # queues behind the fetch's, so both are in flight when SIGTERM arrives.
        s.sendall(fetch_request(topic, 1, 1, correlation_id=7, max_wait_ms=max_wait_ms)
                  + produce_request(topic, 0, record_batch(b"in-flight"), correlation_id=8, acks=-1))
        wait_until(lambda: broker_has_read(s, b.port), timeout=10, interval=0.005,
                   what="the broker to read both requests")
        sent_at = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)

        fetch = recv_frame(s)
        waited = time.monotonic() - sent_at
        assert fetch is not None, "connection closed instead of answering the waiting fetch"
        corr, parts = parse_fetch_response_v4(fetch)
        assert corr == 7
        assert [(p.topic, p.partition, p.error_code, p.high_watermark, p.records) for p in parts] \
            == [(topic, 1, 0, 1, b"")]
        assert waited < max_wait_ms / 1000 + 5, f"fetch answered {waited:.1f}s after SIGTERM"

        acked = recv_frame(s)
        assert acked is not None, "connection closed instead of acknowledging the produce"
        corr, result = parse_produce_response_v3(acked)
        assert (corr, result.partition, result.error_code, result.base_offset) == (8, 0, 0, 0)
        assert recv_frame(s) is None, "the broker closes the connection once it has answered"

    code = b.proc.wait(timeout=STOP_TIMEOUT_S)
    assert code == 0, f"exit status {code} after SIGTERM"
    b.start()
    assert watermarks(b.bootstrap, topic, 0) == (0, 1)
    assert [r.value for r in consume(b.bootstrap, topic)] == [b"in-flight"]
