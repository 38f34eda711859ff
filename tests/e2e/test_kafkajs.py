"""kafkajs against the broker: producing with every codec it can use (pure-JS snappy,
LZ4 and zstd codecs registered by kafkajs/codecs.js) and the admin API. Records are read
back with librdkafka. Group-based consumption is in test_kafkajs_consume_groups.py."""

from __future__ import annotations

import random

import pytest

from helpers import (CODECS, Rec, check_idempotent_batches, consume, content, create_topic, topic_name, wait_until,
                     watermarks)
from kafkajs_driver import b64, kafkajs, ok

NOW_MS = 1_770_000_000_000


def js_messages(seed: int, n: int = 60, partitions: int = 2):
    """(messages for run.js, the Rec each must become)"""
    rng = random.Random(seed)
    msgs, want = [], []
    for i in range(n):
        value = [bytes(range(256)), b"", None, rng.randbytes(30_000), b"\x00" * 4000,
                 rng.randbytes(rng.randrange(1, 700))][i % 6]
        key = None if i % 4 == 0 else rng.randbytes(rng.randrange(1, 30))
        headers = {"h": [b"\x00\xff", b"second"], "e": [b""]} if i % 3 == 0 else {}
        msgs.append({"key": b64(key), "value": b64(value), "partition": i % partitions,
                     "timestamp": NOW_MS + i, "headers": {k: [b64(v) for v in vs] for k, vs in headers.items()}})
        want.append(Rec(value, key, tuple((k, v) for k, vs in headers.items() for v in vs), NOW_MS + i,
                        i % partitions))
    return msgs, want


@pytest.mark.parametrize("codec", CODECS)
def test_produce(broker, codec):
    topic = create_topic(broker.bootstrap, topic_name(f"kjs-{codec}"), partitions=2)
    msgs, want = js_messages(CODECS.index(codec))
    meta = ok(broker, "produce", topic=topic, messages=msgs, compression=codec)
    assert sorted((m["topicName"], m["partition"], m["errorCode"], m["baseOffset"]) for m in meta) == \
        [(topic, 0, 0, "0"), (topic, 1, 0, "0")]
    # A second send continues the offsets.
    meta = ok(broker, "produce", topic=topic, messages=msgs[:2], compression=codec)
    assert sorted((m["partition"], m["baseOffset"]) for m in meta) == [(0, "30"), (1, "30")]
    want = want + want[:2]
    got = consume(broker.bootstrap, topic, partitions=(0, 1))
    for p in (0, 1):
        w = [r for r in want if r.partition == p]
        h = sorted((r for r in got if r.partition == p), key=lambda r: r.offset)
        assert [r.offset for r in h] == list(range(len(w)))
        assert content(h) == content(w), f"codec {codec} partition {p}"


def test_idempotent_produce(broker):
    """idempotent: true: InitProducerId, then sequenced batches; 10 sends of one producer,
    so the sequences must carry on across requests. Every record lands once, in order."""
    topic = create_topic(broker.bootstrap, topic_name("kjs-idem"), partitions=2)
    msgs, want = js_messages(11, n=100)
    meta = ok(broker, "produce", topic=topic, messages=msgs, idempotent=True, sendSize=10, compression="gzip")
    assert all(m["errorCode"] == 0 for m in meta)
    assert sorted(int(m["baseOffset"]) for m in meta if m["partition"] == 0) == list(range(0, 50, 5))
    got = consume(broker.bootstrap, topic, partitions=(0, 1))
    for p in (0, 1):
        w = [r for r in want if r.partition == p]
        h = sorted((r for r in got if r.partition == p), key=lambda r: r.offset)
        assert [r.offset for r in h] == list(range(len(w)))
        assert content(h) == content(w), f"partition {p}"
    check_idempotent_batches(broker, topic, 2, 50)


@pytest.mark.parametrize("acks", [0, 1])
def test_produce_acks(broker, acks):
    topic = create_topic(broker.bootstrap, topic_name(f"kjs-acks{acks}"))
    ok(broker, "produce", topic=topic, acks=acks,
       messages=[{"key": None, "value": b64(f"v{i}".encode()), "partition": 0} for i in range(5)])
    wait_until(lambda: watermarks(broker.bootstrap, topic) == (0, 5), what="5 records stored")
    assert [r.value for r in consume(broker.bootstrap, topic)] == [f"v{i}".encode() for i in range(5)]


def test_admin(broker):
    t = topic_name("kjs-admin")
    assert ok(broker, "createTopics", args={
        "topics": [{"topic": t, "numPartitions": 2, "replicationFactor": 1,
                    "configEntries": [{"name": "retention.ms", "value": "5400000"},
                                      {"name": "max.message.bytes", "value": "500000"}]}],
        "waitForLeaders": True}) is True
    # Already exists: kafkajs resolves to false.
    assert ok(broker, "createTopics", args={"topics": [{"topic": t, "numPartitions": 2}]}) is False
    # validateOnly creates nothing (so there are no leaders to wait for).
    v = topic_name("kjs-validate")
    ok(broker, "createTopics", args={"topics": [{"topic": v, "numPartitions": 1}], "validateOnly": True,
                                     "waitForLeaders": False})
    topics = ok(broker, "listTopics")
    assert t in topics and v not in topics

    md = ok(broker, "fetchTopicMetadata", args={"topics": [t]})
    [tm] = md["topics"]
    assert tm["name"] == t
    assert sorted(p["partitionId"] for p in tm["partitions"]) == [0, 1]
    assert all(p["partitionErrorCode"] == 0 and p["replicas"] == [p["leader"]] and p["isr"] == [p["leader"]]
               for p in tm["partitions"])

    cfg = ok(broker, "describeConfigs", topics=[t])
    [res] = cfg["resources"]
    assert res["errorCode"] == 0 and res["resourceName"] == t
    entries = {e["configName"]: e["configValue"] for e in res["configEntries"]}
    assert entries["retention.ms"] == "5400000" and entries["max.message.bytes"] == "500000"

    msgs = [{"key": None, "value": b64(f"m{i}".encode()), "partition": 0, "timestamp": NOW_MS + 1000 * i}
            for i in range(10)]
    ok(broker, "produce", topic=t, messages=msgs)
    offsets = sorted(ok(broker, "fetchTopicOffsets", topic=t), key=lambda o: o["partition"])
    assert [(o["partition"], o["low"], o["high"], o["offset"]) for o in offsets] == \
        [(0, "0", "10", "10"), (1, "0", "0", "0")]

    by_ts = {o["partition"]: o["offset"]
             for o in ok(broker, "fetchTopicOffsetsByTimestamp", topic=t, timestamp=NOW_MS + 3500)}
    assert by_ts == {0: "4", 1: "0"}
    # After the last timestamp kafkajs substitutes the high watermark for -1.
    by_ts = {o["partition"]: o["offset"]
             for o in ok(broker, "fetchTopicOffsetsByTimestamp", topic=t, timestamp=NOW_MS + 99_000)}
    assert by_ts == {0: "10", 1: "0"}

    ok(broker, "deleteTopicRecords", args={"topic": t, "partitions": [{"partition": 0, "offset": "4"}]})
    offsets = sorted(ok(broker, "fetchTopicOffsets", topic=t), key=lambda o: o["partition"])
    assert [(o["low"], o["high"]) for o in offsets] == [("4", "10"), ("0", "0")]
    assert [(r.offset, r.value) for r in consume(broker.bootstrap, t)] == [(i, f"m{i}".encode()) for i in range(4, 10)]

    ok(broker, "createPartitions", args={"topicPartitions": [{"topic": t, "count": 5}]})
    md = ok(broker, "fetchTopicMetadata", args={"topics": [t]})
    assert sorted(p["partitionId"] for p in md["topics"][0]["partitions"]) == [0, 1, 2, 3, 4]

    cluster = ok(broker, "describeCluster")
    assert [(b["host"], b["port"]) for b in cluster["brokers"]] == [("127.0.0.1", broker.port)]
    assert cluster["controller"] == cluster["brokers"][0]["nodeId"]

    ok(broker, "deleteTopics", args={"topics": [t]})
    assert t not in ok(broker, "listTopics")
    answer = kafkajs(broker, "deleteTopics", args={"topics": [t]}, retries=0)
    assert not answer["ok"]
    assert "UNKNOWN_TOPIC_OR_PARTITION" in str(answer["error"]), answer["error"]
