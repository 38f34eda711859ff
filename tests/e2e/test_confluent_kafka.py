"""confluent-kafka (librdkafka) against the broker: exact round trips with every codec,
offsets, and the admin API."""

from __future__ import annotations

import random
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (AlterConfigOpType, ConfigEntry, ConfigResource, ConfigSource, NewPartitions,
                                   NewTopic, OffsetSpec)

from helpers import (CODECS, Rec, admin, consume, consumer, content, create_topic, produce, producer,
                     topic_name, wait_futures, wait_until, watermarks)

NOW_MS = 1_750_000_000_000


def sample_records(seed: int, n: int = 120, partitions: int = 2) -> list[Rec]:
    """Binary keys/values/headers including the edge cases a codec or the broker may mangle."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        kind = i % 8
        if kind == 0:
            value = bytes(range(256))                       # every byte value
        elif kind == 1:
            value = b""                                      # empty, not null
        elif kind == 2:
            value = None                                     # null (tombstone)
        elif kind == 3:
            value = rng.randbytes(100_000)                   # larger than a typical batch
        elif kind == 4:
            value = b"\x00" * 5000                           # compresses very well
        else:
            value = rng.randbytes(rng.randrange(1, 2000))
        key = None if i % 5 == 0 else rng.randbytes(rng.randrange(0, 40))
        headers = ()
        if i % 3 == 0:
            headers = (("h1", b"\x00\x01\xff"), ("h1", b"dup"), ("empty", b""), ("n\u00e9", rng.randbytes(8)))
        elif i % 3 == 1:
            headers = (("null-value", None),)
        recs.append(Rec(value, key, headers, NOW_MS + i, i % partitions))
    return recs


def check_round_trip(sent: list[Rec], delivered: list[Rec], got: list[Rec], partitions: int):
    for p in range(partitions):
        want = [r for r in sent if r.partition == p]
        acked = [r for r in delivered if r.partition == p]
        have = [r for r in got if r.partition == p]
        assert [r.offset for r in have] == list(range(len(want))), f"partition {p} offsets"
        assert [r.offset for r in acked] == list(range(len(want))), f"partition {p} delivery offsets"
        for w, h in zip(want, have):
            assert h.content() == w.content(), f"partition {p} offset {h.offset} differs"


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip(broker, codec):
    topic = create_topic(broker.bootstrap, topic_name(f"ck-{codec}"), partitions=2)
    sent = sample_records(seed=CODECS.index(codec))
    delivered = produce(broker.bootstrap, topic, sent, compression=codec, **{"linger.ms": 20})
    got = consume(broker.bootstrap, topic, partitions=(0, 1))
    check_round_trip(sent, delivered, got, 2)
    assert watermarks(broker.bootstrap, topic, 0) == (0, 60)
    assert watermarks(broker.bootstrap, topic, 1) == (0, 60)


@pytest.mark.parametrize("acks", ["0", "1", "all"])
def test_acks(broker, acks):
    topic = create_topic(broker.bootstrap, topic_name(f"ck-acks{acks}"))
    sent = [Rec(f"v{i}".encode(), None, (), NOW_MS + i, 0) for i in range(50)]
    produce(broker.bootstrap, topic, sent, acks=acks)
    # acks=0 gives no offsets back: the log end tells when everything landed.
    wait_until(lambda: watermarks(broker.bootstrap, topic)[1] == 50, what="50 records stored")
    got = consume(broker.bootstrap, topic)
    assert [(r.offset, r.value) for r in got] == [(i, f"v{i}".encode()) for i in range(50)]


def test_consume_from_offset_and_end(broker):
    topic = create_topic(broker.bootstrap, topic_name("ck-positions"))
    produce(broker.bootstrap, topic, [Rec(f"old{i}".encode(), partition=0) for i in range(10)])
    got = consume(broker.bootstrap, topic, start=7)
    assert [(r.offset, r.value) for r in got] == [(7, b"old7"), (8, b"old8"), (9, b"old9")]

    # From the end: only records produced after the consumer reached the end.
    c = consumer(broker.bootstrap)
    c.assign([TopicPartition(topic, 0, OFFSET_END)])
    try:
        def at_end():
            for m in c.consume(10, timeout=0.2):
                assert m.error() is not None, f"record {m.offset()} before anything was produced"
                if m.error().code() == KafkaError._PARTITION_EOF:
                    assert m.offset() == 10
                    return True
                raise AssertionError(m.error())
        wait_until(at_end, what="end of partition at offset 10")
        produce(broker.bootstrap, topic, [Rec(f"new{i}".encode(), partition=0) for i in range(3)])
        got = []

        def three_new():
            for m in c.consume(10, timeout=0.2):
                if m.error() is None:
                    got.append((m.offset(), m.value()))
                elif m.error().code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(m.error())
            return len(got) >= 3
        wait_until(three_new, what="3 new records")
        assert got == [(10, b"new0"), (11, b"new1"), (12, b"new2")]
    finally:
        c.close()


def test_long_poll_fetch_returns_when_data_arrives(broker):
    """A consumer waiting at the end gets a record produced later without polling delay
    of the broker's max wait (fetch.wait.max.ms=5000 here)."""
    topic = create_topic(broker.bootstrap, topic_name("ck-longpoll"))
    c = consumer(broker.bootstrap, **{"fetch.wait.max.ms": 5000, "enable.partition.eof": False})
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        assert c.poll(1.0) is None
        produce(broker.bootstrap, topic, [Rec(b"wake", partition=0)])
        t0 = time.monotonic()  # acked: a woken fetch answers now, a sleeping one after 5 s
        m = None
        while m is None and time.monotonic() - t0 < 10:
            m = c.poll(0.1)
        elapsed = time.monotonic() - t0
        assert m is not None and m.error() is None and m.value() == b"wake"
        assert elapsed < 2.5, f"record arrived {elapsed:.1f}s after its ack: long poll did not wake on produce"
    finally:
        c.close()


def test_auto_create_on_produce(broker):
    topic = topic_name("ck-auto")
    produce(broker.bootstrap, topic, [Rec(b"x", partition=0)])
    md = admin(broker.bootstrap).list_topics(topic, timeout=10)
    assert len(md.topics[topic].partitions) == 1  # num_partitions default
    assert [r.value for r in consume(broker.bootstrap, topic)] == [b"x"]


def test_message_too_large_for_topic(broker):
    topic = create_topic(broker.bootstrap, topic_name("ck-maxmsg"), config={"max.message.bytes": "2000"})
    p = producer(broker.bootstrap)
    errs = []
    # Separate requests: the limit applies to a whole batch.
    p.produce(topic, value=b"y" * 4000, partition=0, on_delivery=lambda e, m: errs.append(e))
    assert p.flush(20) == 0
    p.produce(topic, value=b"ok", partition=0, on_delivery=lambda e, m: errs.append(e))
    assert p.flush(20) == 0
    assert errs[0] is not None and errs[0].code() == KafkaError.MSG_SIZE_TOO_LARGE, errs
    assert errs[1] is None, errs
    assert [(r.offset, r.value) for r in consume(broker.bootstrap, topic)] == [(0, b"ok")]


# ---- admin -----------------------------------------------------------------------

def describe(a, topic: str) -> dict:
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    return wait_futures(a.describe_configs([res]))[res]


def test_admin_topics_and_configs(broker):
    a = admin(broker.bootstrap)
    t1, t2 = topic_name("ck-admin-a"), topic_name("ck-admin-b")
    wait_futures(a.create_topics([
        NewTopic(t1, num_partitions=3, replication_factor=1,
                 config={"retention.ms": "3600000", "segment.bytes": "1048576"}),
        NewTopic(t2, num_partitions=1, replication_factor=-1),
    ], operation_timeout=20))
    md = a.list_topics(timeout=10)
    assert len(md.topics[t1].partitions) == 3 and len(md.topics[t2].partitions) == 1
    assert md.topics[t1].error is None
    broker_ids = list(md.brokers)
    assert len(broker_ids) == 1 and md.brokers[broker_ids[0]].port == broker.port
    for p in md.topics[t1].partitions.values():
        assert p.leader == broker_ids[0] and p.replicas == broker_ids and p.isrs == broker_ids

    cfg = describe(a, t1)
    assert cfg["retention.ms"].value == "3600000"
    assert ConfigSource(cfg["retention.ms"].source) == ConfigSource.DYNAMIC_TOPIC_CONFIG
    assert cfg["segment.bytes"].value == "1048576"
    for name in ("retention.bytes", "segment.ms", "max.message.bytes"):
        assert name in cfg, f"{name} not described: {sorted(cfg)}"
    assert cfg["retention.bytes"].value == "-1"

    res = ConfigResource(ConfigResource.Type.TOPIC, t1, incremental_configs=[
        ConfigEntry("retention.ms", "7200000", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("segment.bytes", None, incremental_operation=AlterConfigOpType.DELETE),
        ConfigEntry("retention.bytes", "123456789", incremental_operation=AlterConfigOpType.SET),
    ])
    wait_futures(a.incremental_alter_configs([res]))
    cfg = describe(a, t1)
    assert cfg["retention.ms"].value == "7200000"
    assert cfg["retention.bytes"].value == "123456789"
    assert ConfigSource(cfg["segment.bytes"].source) != ConfigSource.DYNAMIC_TOPIC_CONFIG
    assert cfg["segment.bytes"].value != "1048576"

    wait_futures(a.delete_topics([t1, t2], operation_timeout=20))
    wait_until(lambda: not ({t1, t2} & set(a.list_topics(timeout=5).topics)), what="topics gone from metadata")


def kafka_error_code(fut) -> int:
    with pytest.raises(KafkaException) as e:
        fut.result(timeout=30)
    return e.value.args[0].code()


def test_admin_errors(broker):
    a = admin(broker.bootstrap)
    t = create_topic(broker.bootstrap, topic_name("ck-errors"))
    assert kafka_error_code(a.create_topics([NewTopic(t, 1, 1)])[t]) == KafkaError.TOPIC_ALREADY_EXISTS
    bad = topic_name("ck-bad-parts")
    assert kafka_error_code(a.create_topics([NewTopic(bad, 0, 1)])[bad]) == KafkaError.INVALID_PARTITIONS
    assert kafka_error_code(a.create_topics([NewTopic(bad, 1, 1, config={"retention.ms": "soon"})])[bad]) \
        == KafkaError.INVALID_CONFIG
    assert kafka_error_code(a.create_topics([NewTopic(bad, 1, 1, config={"no.such.config": "1"})])[bad]) \
        == KafkaError.INVALID_CONFIG
    assert kafka_error_code(a.create_topics([NewTopic("bad/name", 1, 1)])["bad/name"]) \
        == KafkaError.TOPIC_EXCEPTION
    missing = topic_name("ck-missing")
    assert kafka_error_code(a.delete_topics([missing])[missing]) == KafkaError.UNKNOWN_TOPIC_OR_PART
    assert kafka_error_code(a.create_partitions([NewPartitions(t, 1)])[t]) == KafkaError.INVALID_PARTITIONS

    # validate_only: accepted, nothing created
    v = topic_name("ck-validate")
    wait_futures(a.create_topics([NewTopic(v, 2, 1)], validate_only=True))
    assert v not in a.list_topics(timeout=5).topics
    assert kafka_error_code(a.create_topics([NewTopic(v, 1, 1, config={"segment.bytes": "-1"})],
                                            validate_only=True)[v]) == KafkaError.INVALID_CONFIG
    assert [r.value for r in consume(broker.bootstrap, t)] == []


def test_create_partitions(broker):
    a = admin(broker.bootstrap)
    t = create_topic(broker.bootstrap, topic_name("ck-grow"), partitions=1)
    produce(broker.bootstrap, t, [Rec(b"p0", partition=0)])
    wait_futures(a.create_partitions([NewPartitions(t, 4)]))
    wait_until(lambda: len(a.list_topics(t, timeout=5).topics[t].partitions) == 4, what="4 partitions")
    produce(broker.bootstrap, t, [Rec(f"p{p}".encode(), partition=p) for p in (1, 2, 3)])
    got = consume(broker.bootstrap, t, partitions=range(4))
    assert sorted((r.partition, r.offset, r.value) for r in got) == [(p, 0, f"p{p}".encode()) for p in range(4)]


def test_delete_records(broker):
    a = admin(broker.bootstrap)
    t = create_topic(broker.bootstrap, topic_name("ck-delrec"))
    produce(broker.bootstrap, t, [Rec(f"r{i}".encode(), partition=0) for i in range(10)])
    res = wait_futures(a.delete_records([TopicPartition(t, 0, 6)]))
    assert [r.low_watermark for r in res.values()] == [6]
    assert watermarks(broker.bootstrap, t) == (6, 10)
    off = wait_futures(a.list_offsets({TopicPartition(t, 0): OffsetSpec.earliest()}))
    assert [v.offset for v in off.values()] == [6]
    got = consume(broker.bootstrap, t)
    assert [(r.offset, r.value) for r in got] == [(i, f"r{i}".encode()) for i in range(6, 10)]
    # Deleting up to the end (-1 = high watermark) empties the partition.
    res = wait_futures(a.delete_records([TopicPartition(t, 0, -1)]))
    assert [r.low_watermark for r in res.values()] == [10]
    assert watermarks(broker.bootstrap, t) == (10, 10)
    # Beyond the high watermark is OFFSET_OUT_OF_RANGE.
    fut = a.delete_records([TopicPartition(t, 0, 50)])
    assert kafka_error_code(next(iter(fut.values()))) == KafkaError.OFFSET_OUT_OF_RANGE
    assert watermarks(broker.bootstrap, t) == (10, 10)


def test_offsets_for_times(broker):
    t = create_topic(broker.bootstrap, topic_name("ck-times"))
    base = NOW_MS
    # one batch (linger) of uncompressed records with distinct, spaced timestamps
    produce(broker.bootstrap, t, [Rec(f"t{i}".encode(), None, (), base + 1000 * i, 0) for i in range(10)],
            **{"linger.ms": 50})
    produce(broker.bootstrap, t, [Rec(f"t{i}".encode(), None, (), base + 1000 * i, 0) for i in range(10, 20)])
    c = consumer(broker.bootstrap)
    try:
        for ts, want in [(base - 1, 0), (base, 0), (base + 1, 1), (base + 4500, 5), (base + 9000, 9),
                         (base + 9001, 10), (base + 15000, 15), (base + 19000, 19), (base + 19001, -1)]:
            r = c.offsets_for_times([TopicPartition(t, 0, ts)], timeout=10)
            assert r[0].error is None and r[0].offset == want, f"timestamp {ts - base:+}: {r[0]}, want {want}"
    finally:
        c.close()
    a = admin(broker.bootstrap)
    tp = TopicPartition(t, 0)
    specs = {"earliest": (OffsetSpec.earliest(), 0), "latest": (OffsetSpec.latest(), 20),
             "ts": (OffsetSpec.for_timestamp(base + 2500), 3)}
    for name, (spec, want) in specs.items():
        got = wait_futures(a.list_offsets({tp: spec}))[tp]
        assert got.offset == want, f"list_offsets {name}: {got.offset}, want {want}"


def test_describe_cluster(broker):
    a = admin(broker.bootstrap)  # keep the client alive until the future resolves
    d = a.describe_cluster(request_timeout=10).result(timeout=20)
    assert len(d.nodes) == 1 and d.nodes[0].port == broker.port and d.nodes[0].host == "127.0.0.1"
    assert d.controller is not None and d.controller.id == d.nodes[0].id
    assert d.cluster_id


def test_thousand_partitions(broker):
    n = 1000
    t = create_topic(broker.bootstrap, topic_name("ck-1000"), partitions=n)
    produce(broker.bootstrap, t, [Rec(f"p{p}".encode(), f"k{p}".encode(), (), NOW_MS + p, p) for p in range(n)],
            **{"linger.ms": 50})
    got = consume(broker.bootstrap, t, partitions=range(n), timeout=60)
    assert sorted((r.partition, r.offset, r.key, r.value, r.timestamp) for r in got) == \
        [(p, 0, f"k{p}".encode(), f"p{p}".encode(), NOW_MS + p) for p in range(n)]


def test_fetch_limits_smaller_than_a_batch(broker):
    """KIP-74: a fetch returns at least one whole batch even when it exceeds the client's
    max.partition.fetch.bytes / fetch.max.bytes, so a consumer never gets stuck."""
    t = create_topic(broker.bootstrap, topic_name("ck-fetchlimit"))
    sent = [Rec(bytes([i]) * 200_000, partition=0) for i in range(6)]
    produce(broker.bootstrap, t, sent, **ONE_RECORD_PER_BATCH_CK)
    got = consume(broker.bootstrap, t, **{"max.partition.fetch.bytes": 1024, "fetch.max.bytes": 1024,
                                          "message.max.bytes": 1000})
    assert [(r.offset, r.value) for r in got] == [(i, r.value) for i, r in enumerate(sent)]


ONE_RECORD_PER_BATCH_CK = {"linger.ms": 0, "batch.num.messages": 1}


def test_concurrent_producers_one_partition(broker):
    """Four producers appending to one partition at once: every record stored once, offsets
    unique and contiguous, each producer's records in its own order."""
    import threading
    t = create_topic(broker.bootstrap, topic_name("ck-concurrent"))
    results = {}

    def run(n):
        results[n] = produce(broker.bootstrap, t, [Rec(f"{n}:{i}".encode(), partition=0) for i in range(500)],
                             compression=["none", "gzip", "lz4", "zstd"][n], **{"linger.ms": 1})
    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(results) == [0, 1, 2, 3]
    acked = sorted(r.offset for rs in results.values() for r in rs)
    assert acked == list(range(2000))
    got = consume(broker.bootstrap, t)
    assert [r.offset for r in got] == list(range(2000))
    by_offset = {r.offset: r.value for r in got}
    for n, rs in results.items():
        assert [by_offset[r.offset] for r in rs] == [f"{n}:{i}".encode() for i in range(500)]
        assert [r.offset for r in rs] == sorted(r.offset for r in rs)


def test_fetch_out_of_range(broker):
    t = create_topic(broker.bootstrap, topic_name("ck-range"))
    produce(broker.bootstrap, t, [Rec(f"r{i}".encode(), partition=0) for i in range(5)])
    a = admin(broker.bootstrap)
    wait_futures(a.delete_records([TopicPartition(t, 0, 2)]))
    for start in (1, 6):  # below the log start, above the log end
        c = consumer(broker.bootstrap, **{"auto.offset.reset": "error"})
        c.assign([TopicPartition(t, 0, start)])
        try:
            def out_of_range():
                for m in c.consume(10, timeout=0.2):
                    assert m.error() is not None, f"start {start}: got record {m.offset()}"
                    if m.error().code() == KafkaError._AUTO_OFFSET_RESET:
                        assert "out of range" in m.error().str().lower() or "OFFSET_OUT_OF_RANGE" in m.error().str()
                        return True
                    assert m.error().code() != KafkaError._PARTITION_EOF, f"start {start}: EOF instead of out of range"
            wait_until(out_of_range, what=f"offset out of range for start {start}")
        finally:
            c.close()
    # With auto.offset.reset=earliest the consumer lands on the log start.
    got = consume(broker.bootstrap, t, start=1, **{"auto.offset.reset": "earliest"})
    assert [(r.offset, r.value) for r in got] == [(i, f"r{i}".encode()) for i in range(2, 5)]


@pytest.mark.parametrize("codec", [c for c in CODECS if c != "none"])
def test_offsets_for_times_compressed_batch(broker, codec):
    """As Kafka does, the by-timestamp answer inside a COMPRESSED batch is the exact
    first record whose timestamp reaches the target (the broker decompresses the
    batch for the lookup), not the batch's first offset."""
    t = create_topic(broker.bootstrap, topic_name(f"ck-times-{codec}"))
    # Compressible values: librdkafka sends a batch uncompressed when it does not shrink.
    value = b"z" * 500
    produce(broker.bootstrap, t, [Rec(value, None, (), NOW_MS + 1000 * i, 0) for i in range(10)],
            compression=codec, **{"linger.ms": 100})
    produce(broker.bootstrap, t, [Rec(value, None, (), NOW_MS + 1000 * i, 0) for i in range(10, 20)],
            compression=codec, **{"linger.ms": 100})
    # The records really are in compressed batches: attributes (bytes 21..23 of a
    # stored batch) carry the codec.
    log = (broker.data_dir / f"{t}-0" / f"{0:020}.log").read_bytes()
    codec_id = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}[codec]
    assert int.from_bytes(log[21:23], "big") & 7 == codec_id
    assert int.from_bytes(log[57:61], "big") > 1, "several records in the first batch"
    c = consumer(broker.bootstrap)
    try:
        for ts, want in [(NOW_MS, 0), (NOW_MS + 4500, 5), (NOW_MS + 9000, 9), (NOW_MS + 9001, 10),
                         (NOW_MS + 15000, 15), (NOW_MS + 19000, 19), (NOW_MS + 19001, -1)]:
            r = c.offsets_for_times([TopicPartition(t, 0, ts)], timeout=10)
            assert r[0].error is None and r[0].offset == want, f"timestamp {ts - NOW_MS:+}: {r[0]}, want {want}"
        # Consuming from the answer starts at that record.
        r = c.offsets_for_times([TopicPartition(t, 0, NOW_MS + 4500)], timeout=10)
        got = consume(broker.bootstrap, t, start=r[0].offset)
        assert [m.offset for m in got] == list(range(5, 20))
    finally:
        c.close()


def test_no_auto_create_when_disabled(broker_factory):
    b = broker_factory(env={"FRESHET_AUTO_CREATE_TOPICS": "false", "FRESHET_NUM_PARTITIONS": "3"})
    missing = topic_name("ck-noauto")
    p = producer(b.bootstrap, **{"message.timeout.ms": 3000})
    errs = []
    p.produce(missing, value=b"x", on_delivery=lambda e, m: errs.append(e))
    assert p.flush(15) == 0
    assert errs and errs[0] is not None and errs[0].code() in (KafkaError.UNKNOWN_TOPIC_OR_PART,
                                                               KafkaError._UNKNOWN_TOPIC, KafkaError._MSG_TIMED_OUT), errs
    assert missing not in admin(b.bootstrap).list_topics(timeout=10).topics
    # ... and num_partitions applies to explicit creation with the broker default (-1).
    t = topic_name("ck-default-parts")
    a = admin(b.bootstrap)
    wait_futures(a.create_topics([NewTopic(t, num_partitions=-1, replication_factor=-1)]))
    assert len(a.list_topics(t, timeout=10).topics[t].partitions) == 3


def test_recreated_topic_starts_empty(broker):
    a = admin(broker.bootstrap)
    t = create_topic(broker.bootstrap, topic_name("ck-recreate"), partitions=2)
    produce(broker.bootstrap, t, [Rec(f"old{i}".encode(), partition=i % 2) for i in range(6)])
    wait_futures(a.delete_topics([t], operation_timeout=20))
    wait_until(lambda: t not in a.list_topics(timeout=5).topics, what=f"{t} deleted")
    create_topic(broker.bootstrap, t, partitions=1)
    assert watermarks(broker.bootstrap, t, 0) == (0, 0)
    delivered = produce(broker.bootstrap, t, [Rec(b"new", partition=0)])
    assert delivered[0].offset == 0
    assert [(r.offset, r.value) for r in consume(broker.bootstrap, t)] == [(0, b"new")]
