"""Retention: old segments are deleted by time and by size, the earliest offset moves,
offsets never restart, and what remains reads back exactly."""

from __future__ import annotations

import random
import time

from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from helpers import Rec, admin, consume, content, create_topic, produce, topic_name, wait_futures, wait_until, \
    watermarks

BROKER_ENV = {"FRESHET_RETENTION_CHECK_INTERVAL_MS": "200"}
SEGMENT_BYTES = 16384
VALUE_BYTES = 2000
ONE_RECORD_PER_BATCH = {"linger.ms": 0, "batch.num.messages": 1}


def segments(broker, topic: str) -> dict[int, int]:
    """base offset -> size of each segment's .log file (Kafka layout: 20-digit base offset)."""
    d = broker.partition_dir(topic, 0)
    out = {}
    for f in d.glob("*.log"):
        if f.stem.isdigit():
            try:
                out[int(f.stem)] = f.stat().st_size
            except FileNotFoundError:  # deleted between glob and stat
                pass
    return out


def records(seed: int, n: int, first_ts: int, step_ms: int = 1) -> list[Rec]:
    rng = random.Random(seed)
    return [Rec(rng.randbytes(VALUE_BYTES), f"k{i}".encode(), (), first_ts + i * step_ms, 0) for i in range(n)]


def assert_suffix_readable(broker, topic: str, produced: list[Rec], earliest: int):
    got = consume(broker.bootstrap, topic)
    assert [r.offset for r in got] == list(range(earliest, len(produced)))
    assert content(got) == content(produced[earliest:])


def test_retention_ms_from_topic_creation(broker):
    topic = create_topic(broker.bootstrap, topic_name("ret-ms"),
                         config={"segment.bytes": str(SEGMENT_BYTES), "retention.ms": "1000"})
    produced = records(1, 40, int(time.time() * 1000))
    produce(broker.bootstrap, topic, produced, **ONE_RECORD_PER_BATCH)
    # (The first segments may already be gone: this is about what happens eventually.)
    first = wait_until(lambda: watermarks(broker.bootstrap, topic)[0] > 0 and 0 not in segments(broker, topic)
                       and watermarks(broker.bootstrap, topic)[0], timeout=30,
                       what="earliest offset > 0 and segment 0 deleted")
    low, high = watermarks(broker.bootstrap, topic)
    assert high == 40 and low >= first
    segs = segments(broker, topic)
    assert low == min(segs), f"earliest offset {low} is not the first remaining segment {sorted(segs)}"
    assert_suffix_readable(broker, topic, produced, low)
    # Offsets continue after deletion, even if every record expired.
    more = records(2, 3, int(time.time() * 1000))
    delivered = produce(broker.bootstrap, topic, more)
    assert [r.offset for r in delivered] == [40, 41, 42]
    got = consume(broker.bootstrap, topic, start=40)
    assert content(got) == content(more) and [r.offset for r in got] == [40, 41, 42]


def test_retention_ms_altered_exact_boundary(broker):
    """Old records (1 h ago) then new ones; retention.ms lowered to 10 min afterwards. Every
    segment holding only old records goes, the one holding the first new record stays."""
    topic = create_topic(broker.bootstrap, topic_name("ret-alter"), config={"segment.bytes": str(SEGMENT_BYTES)})
    now = int(time.time() * 1000)
    old = records(3, 30, now - 3_600_000)
    new = records(4, 6, now)
    produce(broker.bootstrap, topic, old, **ONE_RECORD_PER_BATCH)
    produce(broker.bootstrap, topic, new, **ONE_RECORD_PER_BATCH)
    before = segments(broker, topic)
    assert len(before) >= 4, f"expected several segments with segment.bytes={SEGMENT_BYTES}: {sorted(before)}"
    assert watermarks(broker.bootstrap, topic) == (0, 36)
    keep_from = max(b for b in before if b <= len(old))

    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", "600000", incremental_operation=AlterConfigOpType.SET)])
    wait_futures(admin(broker.bootstrap).incremental_alter_configs([res]))
    wait_until(lambda: watermarks(broker.bootstrap, topic)[0] == keep_from
               and min(segments(broker, topic)) == keep_from, timeout=30,
               what=f"earliest offset {keep_from} and segments below it deleted (segments were {sorted(before)})")
    after = segments(broker, topic)
    assert sorted(after) == [b for b in sorted(before) if b >= keep_from]
    assert watermarks(broker.bootstrap, topic) == (keep_from, 36)
    assert_suffix_readable(broker, topic, old + new, keep_from)


def test_retention_bytes(broker):
    retention_bytes = 3 * SEGMENT_BYTES
    topic = create_topic(broker.bootstrap, topic_name("ret-bytes"),
                         config={"segment.bytes": str(SEGMENT_BYTES), "retention.bytes": str(retention_bytes)})
    produced = records(5, 60, int(time.time() * 1000))
    produce(broker.bootstrap, topic, produced, **ONE_RECORD_PER_BATCH)

    def trimmed():
        segs = segments(broker, topic)
        total = sum(segs.values())
        return (watermarks(broker.bootstrap, topic)[0] > 0 and 0 not in segs
                and total - segs[min(segs)] < retention_bytes and segs)
    segs = wait_until(trimmed, timeout=30, what=f"log trimmed to retention.bytes={retention_bytes}")
    low, high = watermarks(broker.bootstrap, topic)
    assert high == 60
    assert low == min(segs), f"earliest offset {low} is not the first remaining segment {sorted(segs)}"
    assert_suffix_readable(broker, topic, produced, low)
