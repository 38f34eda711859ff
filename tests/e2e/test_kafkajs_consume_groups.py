"""kafkajs consumption through its consumer-group API (kafkajs has no group-less
consumer): FindCoordinator/JoinGroup/SyncGroup/Heartbeat/OffsetFetch/OffsetCommit.
Marked `groups` (`-m "not groups"` leaves these out on a broker without groups)."""

from __future__ import annotations

import pytest

from helpers import CODECS, Rec, create_topic, produce, topic_name
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
