"""kafkajs consumption through its consumer-group API (kafkajs has no group-less
consumer): FindCoordinator/JoinGroup/SyncGroup/Heartbeat/OffsetFetch/OffsetCommit. Every
codec; exact bytes of null, empty and binary keys, values and headers; from the end.
(kafkajs group membership through kills and leaves is in test_groups.py.)
Marked `groups` (`-m "not groups"` leaves these out on a broker without groups)."""

from __future__ import annotations

import random

import pytest

from group_workers import Worker, member_conf
from helpers import CODECS, Rec, create_topic, produce, topic_name, wait_until
from kafkajs_driver import ok, unb64

NOW_MS = 1_780_000_000_000


@pytest.mark.groups
@pytest.mark.parametrize("codec", CODECS)
def test_consume_with_group(broker, codec):
    topic = create_topic(broker.bootstrap, topic_name(f"kjs-group-{codec}"), partitions=2)
    sent = [Rec(f"v{i}".encode() * (i + 1), f"k{i}".encode(), (("h", bytes([i])),), NOW_MS + i, i % 2)
            for i in range(40)]
    produce(broker.bootstrap, topic, sent, compression=codec)
    got = ok(broker, "consumeGroup", topic=topic, groupId=f"g-{topic}", count=len(sent), timeoutMs=30000)
    have = sorted((r["partition"], r["offset"], unb64(r["key"]), unb64(r["value"]),
                   tuple((k, unb64(v)) for k, vs in r["headers"].items() for v in vs), r["timestamp"])
                  for r in got)
    want = sorted((r.partition, i // 2, r.key, r.value, r.headers, r.timestamp) for i, r in enumerate(sent))
    assert have == want


def grouped(headers) -> dict:
    """kafkajs hands headers over as an object: values grouped by name, in order."""
    out: dict = {}
    for name, value in headers:
        out.setdefault(name, []).append(value)
    return out


@pytest.mark.groups
def test_consume_binary_null_and_empty_exactly(broker):
    """Keys and values null, empty, every byte value, large and random; headers with
    binary, empty, null and repeated values: kafkajs must hand over exactly the bytes."""
    topic = create_topic(broker.bootstrap, topic_name("kjs-bytes"), partitions=2)
    rng = random.Random(7)
    keys = [None, b"", bytes(range(256)), b"\x00", rng.randbytes(1000)]
    values = [None, b"", bytes(range(256))[::-1], b"\x00" * 5000, rng.randbytes(100_000), "é€😀".encode()]
    headers = [(), (("h", b"\x00\xff\x80"),), (("e", b""), ("n", None)),
               (("r", b"1"), ("s", b"x"), ("r", b"2"), ("r", b"")), (("bin", rng.randbytes(300)),)]
    sent = [Rec(values[i % len(values)], keys[i % len(keys)], headers[i % len(headers)], NOW_MS + i, i % 2)
            for i in range(60)]
    produced = produce(broker.bootstrap, topic, sent)
    got = ok(broker, "consumeGroup", topic=topic, groupId=f"g-{topic}", count=len(sent), timeoutMs=30000)
    have = sorted(((r["partition"], r["offset"]), unb64(r["key"]), unb64(r["value"]),
                   {k: [unb64(v) for v in vs] for k, vs in r["headers"].items()}, r["timestamp"]) for r in got)
    want = sorted(((r.partition, r.offset), r.key, r.value, grouped(r.headers), r.timestamp) for r in produced)
    assert len(have) == len(want)
    for h, w in zip(have, want):
        assert h == w, f"at {w[0]}: kafkajs gave {h!r}"


@pytest.mark.groups
def test_consume_from_the_end_gets_only_records_produced_after_joining(broker):
    """fromBeginning=false in a new group: kafkajs resets to the log end offset, so only
    what is produced once it has a position arrives."""
    topic = create_topic(broker.bootstrap, topic_name("kjs-latest"), partitions=2)
    produce(broker.bootstrap, topic, [Rec(f"old-{i}".encode(), partition=i % 2) for i in range(40)])
    member = Worker("kafkajs", member_conf("kafkajs", broker.bootstrap, f"g-{topic}", 10_000, from_beginning=False),
                    topic, "roundrobin")
    try:
        wait_until(lambda: member.assigned == [0, 1] and member.positioned, timeout=60,
                   what=lambda: f"kafkajs member owning both partitions with positions: {member.describe()}")
        new = produce(broker.bootstrap, topic, [Rec(f"new-{i}".encode(), partition=i % 2) for i in range(20)])
        wait_until(lambda: len(member.deliveries()) >= len(new), timeout=30,
                   what=lambda: f"the records produced after joining: {member.describe()}")
        got = sorted((d.partition, d.offset, d.value) for d in member.deliveries())
        assert got == sorted((r.partition, r.offset, r.value) for r in new), \
            "only records produced after the consumer had its position may arrive"
        member.close()
        assert not member.errors, member.describe()
    finally:
        member.kill()
