"""A clean restart (SIGTERM, start on the same data dir) keeps records, topics, partition
counts, topic configs and the log start offset set by DeleteRecords."""

from __future__ import annotations

from confluent_kafka import TopicPartition
from confluent_kafka.admin import ConfigResource, NewPartitions

from helpers import (Rec, admin, consume, content, create_topic, produce, topic_name, wait_futures, wait_until,
                     watermarks)


def test_state_survives_clean_restart(broker_factory):
    b = broker_factory()
    t1 = create_topic(b.bootstrap, topic_name("restart-a"), partitions=2,
                      config={"retention.ms": "4000000", "max.message.bytes": "300000"})
    t2 = create_topic(b.bootstrap, topic_name("restart-b"))
    recs = [Rec(f"v{i}".encode() * 50, f"k{i}".encode(), (("h", b"\x00"),), 1_700_000_000_000 + i, i % 2)
            for i in range(100)]
    produce(b.bootstrap, t1, recs, compression="zstd")
    produce(b.bootstrap, t2, [Rec(f"x{i}".encode(), partition=0) for i in range(10)])
    a = admin(b.bootstrap)
    wait_futures(a.delete_records([TopicPartition(t2, 0, 7)]))
    wait_futures(a.create_partitions([NewPartitions(t2, 3)]))
    del a

    b.restart(same_port=True)  # SIGTERM must exit 0; same address for the clients

    a = admin(b.bootstrap)
    md = a.list_topics(timeout=10)
    assert len(md.topics[t1].partitions) == 2 and len(md.topics[t2].partitions) == 3
    res = ConfigResource(ConfigResource.Type.TOPIC, t1)
    cfg = wait_futures(a.describe_configs([res]))[res]
    assert (cfg["retention.ms"].value, cfg["max.message.bytes"].value) == ("4000000", "300000")
    got = consume(b.bootstrap, t1, partitions=(0, 1))
    for p in (0, 1):
        have = sorted((r for r in got if r.partition == p), key=lambda r: r.offset)
        assert [r.offset for r in have] == list(range(50))
        assert content(have) == content([r for r in recs if r.partition == p])
    assert watermarks(b.bootstrap, t2, 0) == (7, 10)
    assert [(r.offset, r.value) for r in consume(b.bootstrap, t2)] == [(i, f"x{i}".encode()) for i in (7, 8, 9)]
    # Appends continue at the old log end.
    delivered = produce(b.bootstrap, t2, [Rec(b"after", partition=0)])
    assert delivered[0].offset == 10

    # Deleted topics stay deleted.
    wait_futures(a.delete_topics([t2], operation_timeout=20))
    wait_until(lambda: t2 not in a.list_topics(timeout=5).topics, what=f"{t2} deleted")
    del a
    b.restart()
    assert t2 not in admin(b.bootstrap).list_topics(timeout=10).topics
    # A topic recreated under a deleted name holds only its new records, across a restart.
    create_topic(b.bootstrap, t2, partitions=1)
    produce(b.bootstrap, t2, [Rec(b"reborn", partition=0)])
    b.restart()
    assert [(r.offset, r.value) for r in consume(b.bootstrap, t2)] == [(0, b"reborn")]
