"""Consumers that commit asynchronously after every record (librdkafka through
confluent-kafka, and kafka-python) pipeline many OffsetCommit requests on one
connection. Kafka applies a connection's requests in the order sent, so once the
last commit is acknowledged the committed offset is the last one: for the consumer
itself, for a new consumer of the group, and after a restart of the broker. Many
trials each: a reordering shows up by chance (6 failures in 14 trials before the fix).

COMMIT_ORDER_TRIALS=N runs N trials per client (default 15).
"""

from __future__ import annotations

import os
import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from helpers import Rec, create_topic, produce, topic_name, wait_until

RECORDS = 2000
TRIALS = int(os.environ.get("COMMIT_ORDER_TRIALS", "15"))

pytestmark = pytest.mark.groups


@pytest.fixture(scope="module")
def loaded(broker):
    topic = create_topic(broker.bootstrap, topic_name("commit-order"))
    produce(broker.bootstrap, topic, [Rec(f"v{i}".encode()) for i in range(RECORDS)])
    return topic


def committed_now(bootstrap: str, group: str, topic: str) -> int:
    """The group's committed offset of partition 0, as a new consumer sees it."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        [tp] = c.committed([TopicPartition(topic, 0)], timeout=10)
        return tp.offset
    finally:
        c.close()


def confluent_trial(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """Reads every record, commits each asynchronously (offset + 1), waits for the
    acknowledgement of the last; returns it and what the consumer then sees as
    committed."""
    acked: list[int] = []
    failures: list[str] = []

    def on_commit(err, partitions):
        if err is not None:
            failures.append(str(err))
            return
        for tp in partitions:
            if tp.error is not None:
                failures.append(str(tp.error))
            else:
                acked.append(tp.offset)

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False, "on_commit": on_commit,
                  "fetch.wait.max.ms": 50})
    try:
        # librdkafka holds a commit made before it has found the group coordinator
        # and sends the held ones after any made since (rdkafka_cgrp.c concatenates
        # its wait-for-coordinator queue behind the newer ops): a reordering in the
        # client, whatever the broker. Under load the first records arrive before the
        # coordinator is known, so find it first (an OffsetFetch goes through it);
        # then every commit goes out in order on the coordinator's connection.
        c.committed([TopicPartition(topic, 0)], timeout=10)
        c.assign([TopicPartition(topic, 0, 0)])
        read = 0
        deadline = time.monotonic() + 60
        while read < RECORDS:
            assert time.monotonic() < deadline, f"read {read} of {RECORDS} records"
            m = c.poll(0.5)
            if m is None:
                continue
            assert m.error() is None, m.error()
            c.commit(message=m, asynchronous=True)
            read += 1
        wait_until(lambda: (c.poll(0.05), RECORDS in acked)[1], timeout=30,
                   what=lambda: f"the commit of {RECORDS} acknowledged (last acked {acked[-3:]})")
        assert not failures, f"commit failures: {failures[:5]}"
        [tp] = c.committed([TopicPartition(topic, 0)], timeout=10)
        return RECORDS, tp.offset
    finally:
        c.close()


def kafka_python_trial(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    """As `confluent_trial`. kafka-python refuses a commit (NodeNotReadyError, never
    sent) while `max_in_flight_requests_per_connection` requests are in flight (5 by
    default): the limit is set above the number of commits, so every one is sent,
    pipelined, and the last acknowledged commit is the last one."""
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KTP
    from kafka.structs import OffsetAndMetadata

    from kafka.errors import NodeNotReadyError

    acked: list[int] = []
    refused = [0]
    failures: list[str] = []

    def on_commit(offsets, response):
        if isinstance(response, NodeNotReadyError):
            refused[0] += 1
        elif isinstance(response, Exception):
            failures.append(repr(response))
        else:
            acked.extend(o.offset for o in offsets.values())

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                      fetch_max_wait_ms=50, max_in_flight_requests_per_connection=RECORDS + 1)
    try:
        tp = KTP(topic, 0)
        # As in confluent_trial: a commit made before the coordinator is known
        # waits for its lookup in kafka-python too; find it first.
        c.committed(tp)
        c.assign([tp])
        c.seek(tp, 0)
        read = 0
        deadline = time.monotonic() + 60
        while read < RECORDS:
            assert time.monotonic() < deadline, f"read {read} of {RECORDS} records"
            for records in c.poll(timeout_ms=500).values():
                for r in records:
                    c.commit_async({tp: OffsetAndMetadata(r.offset + 1, "", -1)}, callback=on_commit)
                    read += 1
        # poll() runs the callbacks of answered commits.
        wait_until(lambda: (c.poll(timeout_ms=50), len(acked) + refused[0] + len(failures) == RECORDS)[1],
                   timeout=30, what=lambda: f"every commit's callback ({len(acked)} acked, "
                                            f"{refused[0]} refused, {len(failures)} failed)")
        assert not failures, f"commit failures: {failures[:5]}"
        assert refused[0] == 0, f"{refused[0]} commits refused by the client: none was meant to be"
        return max(acked), c.committed(tp)
    finally:
        c.close(autocommit=False)


TRIAL = {"confluent-kafka": confluent_trial, "kafka-python": kafka_python_trial}


@pytest.mark.parametrize("client", sorted(TRIAL))
def test_async_commits_after_every_record_leave_the_last_one(broker, loaded, client):
    last_acked = {}
    for trial in range(TRIALS):
        group = topic_name(f"commit-order-{client}-{trial}")
        expected, seen = TRIAL[client](broker.bootstrap, loaded, group)
        last_acked[group] = expected
        assert seen == expected, f"trial {trial}: the consumer sees {seen} committed, " \
                                 f"the last acknowledged commit was {expected}"
        fresh = committed_now(broker.bootstrap, group, loaded)
        assert fresh == expected, f"trial {trial}: a new consumer sees {fresh} committed, not {expected}"
    # What was acknowledged is what the broker replays from its offsets log after
    # a SIGKILL.
    broker.restart(kill=True)
    for group, expected in last_acked.items():
        after = committed_now(broker.bootstrap, group, loaded)
        assert after == expected, f"{group}: {after} committed after a restart, not {expected}"
