"""kafka-python (pure Python protocol implementation) against the broker."""

from __future__ import annotations

import random
import time

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewPartitions
from kafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError

from helpers import (Rec, check_idempotent_batches, consume, content, create_topic, stored_batches, topic_name,
                     wait_until, watermarks)

NOW_MS = 1_760_000_000_000
CODECS = [None, "gzip", "snappy", "lz4", "zstd"]


def kp_producer(bootstrap: str, **conf) -> KafkaProducer:
    # kafka-python 3 turns idempotence on by default; these tests pin it off so that they
    # check one thing each (test_idempotent_round_trip turns it on).
    base = dict(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5,
                request_timeout_ms=20000)
    base.update(conf)
    return KafkaProducer(**base)


def kp_consumer(bootstrap: str, **conf) -> KafkaConsumer:
    base = dict(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest", fetch_max_wait_ms=100, check_crcs=True)
    base.update(conf)
    return KafkaConsumer(**base)


def kp_consume(bootstrap: str, topic: str, partitions=(0,), start="beginning", timeout: float = 30.0) -> list[Rec]:
    """Read from `start` ("beginning" or an offset) up to the end offsets seen at the start."""
    c = kp_consumer(bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        c.assign(tps)
        if start == "beginning":
            c.seek_to_beginning(*tps)
        else:
            for tp in tps:
                c.seek(tp, start)
        end = c.end_offsets(tps, timeout_ms=10000)
        out = []
        deadline = time.monotonic() + timeout
        while any(c.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, f"kafka-python consume timed out at {[c.position(tp) for tp in tps]}, end {end}"
            for tp, records in c.poll(timeout_ms=200).items():
                for r in records:
                    out.append(Rec(r.value, r.key, tuple(r.headers), r.timestamp, r.partition, r.offset))
        return out
    finally:
        c.close()


def sample(seed: int, n: int = 90) -> list[Rec]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        value = [bytes(range(256)), b"", None, rng.randbytes(50_000), b"\x00" * 3000,
                 rng.randbytes(rng.randrange(1, 500))][i % 6]
        # kafka-python refuses a record with neither key nor value
        key = None if i % 4 == 0 and value is not None else rng.randbytes(rng.randrange(0, 30))
        headers = (("h", b"\x00\xff"), ("h", b"second"), ("e", b"")) if i % 3 == 0 else ()
        recs.append(Rec(value, key, headers, NOW_MS + i, i % 2))
    return recs


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c or "none")
def test_round_trip(broker, codec):
    topic = create_topic(broker.bootstrap, topic_name(f"kp-{codec or 'none'}"), partitions=2)
    sent = sample(CODECS.index(codec))
    p = kp_producer(broker.bootstrap, compression_type=codec)
    futures = [p.send(topic, value=r.value, key=r.key, headers=list(r.headers), partition=r.partition,
                      timestamp_ms=r.timestamp) for r in sent]
    p.flush(timeout=30)
    meta = [f.get(timeout=30) for f in futures]
    p.close()
    for part in (0, 1):
        assert [m.offset for m in meta if m.partition == part] == list(range(45))
    for got in (kp_consume(broker.bootstrap, topic, (0, 1)), consume(broker.bootstrap, topic, (0, 1))):
        for part in (0, 1):
            want = [r for r in sent if r.partition == part]
            have = sorted((r for r in got if r.partition == part), key=lambda r: r.offset)
            assert [r.offset for r in have] == list(range(len(want)))
            assert content(have) == content(want), f"codec {codec} partition {part}"


def test_consume_from_offset(broker):
    topic = create_topic(broker.bootstrap, topic_name("kp-offset"))
    p = kp_producer(broker.bootstrap)
    for i in range(10):
        p.send(topic, value=f"v{i}".encode(), partition=0)
    p.flush(timeout=30)
    p.close()
    got = kp_consume(broker.bootstrap, topic, start=6)
    assert [(r.offset, r.value) for r in got] == [(i, f"v{i}".encode()) for i in range(6, 10)]


def poll_until(c: KafkaConsumer, n: int, timeout: float = 30.0) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} records within {timeout}s"
        for records in c.poll(timeout_ms=200).values():
            out.extend(records)
    return out


def test_consume_from_the_end(broker):
    """seek_to_end, then the position is the log end offset: only records produced after
    it arrive."""
    topic = create_topic(broker.bootstrap, topic_name("kp-end"), partitions=2)
    p = kp_producer(broker.bootstrap)
    for i in range(30):
        p.send(topic, value=f"old-{i}".encode(), partition=i % 2)
    p.flush(timeout=30)
    c = kp_consumer(broker.bootstrap)
    try:
        tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        c.assign(tps)
        c.seek_to_end(*tps)
        assert [c.position(tp) for tp in tps] == [15, 15]  # resolves the seek now
        futures = [p.send(topic, value=f"new-{i}".encode(), partition=i % 2) for i in range(10)]
        p.flush(timeout=30)
        assert sorted((f.get(timeout=10).partition, f.get(timeout=10).offset) for f in futures) == \
            sorted((i % 2, 15 + i // 2) for i in range(10))
        got = poll_until(c, 10)
        assert sorted((r.partition, r.offset, r.value) for r in got) == \
            sorted((i % 2, 15 + i // 2, f"new-{i}".encode()) for i in range(10))
        assert [c.position(tp) for tp in tps] == [20, 20]
    finally:
        c.close()
        p.close()


def test_admin_create_delete(broker):
    a = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=20000)
    try:
        t = topic_name("kp-admin")
        a.create_topics({t: {"num_partitions": 3, "replication_factor": 1,
                             "configs": {"retention.ms": "86400000"}}})
        wait_until(lambda: t in a.list_topics(), what=f"{t} listed")
        desc = {d["name"]: d for d in a.describe_topics([t])}
        assert len(desc[t]["partitions"]) == 3
        with pytest.raises(TopicAlreadyExistsError):
            a.create_topics({t: {"num_partitions": 1, "replication_factor": 1}})
        a.create_partitions({t: NewPartitions(total_count=5)})
        wait_until(lambda: len({d["name"]: d for d in a.describe_topics([t])}[t]["partitions"]) == 5,
                   what="5 partitions")
        a.delete_topics([t])
        wait_until(lambda: t not in a.list_topics(), what=f"{t} gone")
        with pytest.raises(UnknownTopicOrPartitionError):
            a.delete_topics([t])
    finally:
        a.close()


def test_describe_log_dirs_gives_the_size_on_disk(broker):
    """DescribeLogDirs (kafka-log-dirs.sh, the consoles): each partition's size is what
    its segment files hold; a topic asked for that does not exist is left out."""
    t = create_topic(broker.bootstrap, topic_name("kp-logdirs"), partitions=2)
    p = kp_producer(broker.bootstrap)
    for i in range(50):
        p.send(t, value=b"x" * (i + 1), partition=i % 2)
    p.flush(30)
    p.close()
    a = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=20000)
    try:
        answer = a.describe_log_dirs([t, "no-such-topic"])
    finally:
        a.close()
    found = {}
    assert [b["broker"] for b in answer] == [0]
    for per_broker in answer:
        for log_dir in per_broker["log_dirs"]:
            assert log_dir["error_code"] == 0, log_dir
            assert 0 < log_dir["usable_bytes"] <= log_dir["total_bytes"], log_dir  # v4's file system figures
            for topic in log_dir["topics"]:
                for part in topic["partitions"]:
                    found[(topic["name"], part["partition_index"])] = part["partition_size"]
    on_disk = {(t, pt): sum(f.stat().st_size for f in broker.partition_dir(t, pt).glob("*.log")) for pt in (0, 1)}
    assert found == on_disk, (found, on_disk)
    assert all(size > 0 for size in on_disk.values())


def test_offsets_for_times_and_watermarks(broker):
    topic = create_topic(broker.bootstrap, topic_name("kp-times"))
    p = kp_producer(broker.bootstrap, linger_ms=50)
    for i in range(12):
        p.send(topic, value=f"t{i}".encode(), partition=0, timestamp_ms=NOW_MS + 1000 * i)
    p.flush(timeout=30)
    p.close()
    c = kp_consumer(broker.bootstrap)
    try:
        tp = TopicPartition(topic, 0)
        assert c.beginning_offsets([tp], timeout_ms=10000) == {tp: 0}
        assert c.end_offsets([tp], timeout_ms=10000) == {tp: 12}
        for ts, want in [(NOW_MS - 5, 0), (NOW_MS, 0), (NOW_MS + 1, 1), (NOW_MS + 7000, 7),
                         (NOW_MS + 10999, 11), (NOW_MS + 11000, 11)]:
            r = c.offsets_for_times({tp: ts}, timeout_ms=10000)[tp]
            assert r is not None and (r.offset, r.timestamp) == (want, NOW_MS + 1000 * want), \
                f"timestamp {ts - NOW_MS:+}: {r}, want offset {want}"
        assert c.offsets_for_times({tp: NOW_MS + 11001}, timeout_ms=10000)[tp] is None
    finally:
        c.close()
    assert watermarks(broker.bootstrap, topic) == (0, 12)


def test_idempotent_round_trip(broker):
    """enable_idempotence=True (kafka-python 3's default): InitProducerId, then sequenced
    batches over several requests; every record lands once, in order."""
    topic = create_topic(broker.bootstrap, topic_name("kp-idem"), partitions=2)
    p = kp_producer(broker.bootstrap, enable_idempotence=True, compression_type="gzip")
    sent = []
    for round_ in range(5):  # one flush per round: at least one request per round
        futures = [p.send(topic, value=f"r{round_}-{i}".encode(), key=f"k{i}".encode(), partition=i % 2)
                   for i in range(40)]
        p.flush(timeout=30)
        sent += [(f.get(timeout=10).partition, f.get(timeout=10).offset) for f in futures]
    pid = p._transaction_manager.producer_id_and_epoch  # noqa: SLF001 - no public accessor
    p.close()
    assert pid.producer_id >= 0, f"kafka-python did not get a producer id: {pid}"
    for part in (0, 1):
        assert sorted(o for pp, o in sent if pp == part) == list(range(100))
    got = consume(broker.bootstrap, topic, (0, 1))
    for part in (0, 1):
        want = [f"r{r}-{i}".encode() for r in range(5) for i in range(40) if i % 2 == part]
        assert [r.value for r in sorted((r for r in got if r.partition == part), key=lambda r: r.offset)] == want
    check_idempotent_batches(broker, topic, 2, 100)
    assert {b.producer_id for b in stored_batches(broker, topic, 0)} == {pid.producer_id}
