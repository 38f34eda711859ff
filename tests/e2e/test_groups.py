"""Consumer groups with real clients: librdkafka (confluent-kafka) and kafka-python
consumers subscribe, split a topic's partitions, survive a member killed with SIGKILL
(its partitions move to the others once its session expires, no record is lost), and
resume at their committed offsets; two groups each see every record; the range,
roundrobin and cooperative-sticky assignors of librdkafka all converge.

Consumers that must die abruptly run as subprocesses (a small worker, below) that
print what they are assigned and what they consume as JSON lines, and commit
synchronously after reporting (so a kill can cause a re-delivery, never a gap)."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from helpers import Rec, create_topic, produce, topic_name, wait_until

SESSION_TIMEOUT_MS = 6000  # the broker's group.min.session.timeout.ms, as Kafka's
PARTITIONS = 6

WORKER = r'''
import json, select, sys
conf = json.loads(sys.argv[2])
topic = sys.argv[3]
owned = set()

def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def stop_requested():
    if select.select([sys.stdin], [], [], 0)[0]:
        line = sys.stdin.readline()
        return not line or line.strip() == "close"
    return False

if sys.argv[1] == "confluent":
    from confluent_kafka import Consumer, KafkaError
    def on_assign(c, parts):
        owned.update(p.partition for p in parts)
        out({"assigned": sorted(owned)})
    def on_revoke(c, parts):
        owned.difference_update(p.partition for p in parts)
        out({"assigned": sorted(owned)})
    c = Consumer(conf)
    c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)
    while not stop_requested():
        recs = []
        for m in c.consume(500, 0.2):
            if m.error() is None:
                recs.append([m.partition(), m.offset(), m.value().decode()])
            elif m.error().code() != KafkaError._PARTITION_EOF:
                out({"error": str(m.error())})
        if recs:
            out({"recs": recs})
            c.commit(asynchronous=False)
    c.close()
else:
    from kafka import KafkaConsumer, ConsumerRebalanceListener
    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked):
            owned.difference_update(tp.partition for tp in revoked)
            out({"assigned": sorted(owned)})
        def on_partitions_assigned(self, assigned):
            owned.update(tp.partition for tp in assigned)
            out({"assigned": sorted(owned)})
    c = KafkaConsumer(**conf)
    c.subscribe([topic], listener=Listener())
    while not stop_requested():
        recs = []
        for tp, msgs in c.poll(timeout_ms=200).items():
            recs.extend([tp.partition, m.offset, m.value.decode()] for m in msgs)
        if recs:
            out({"recs": recs})
            c.commit()
    c.close()
out({"closed": True})
'''


class Worker:
    """A consumer in a subprocess; its reports are collected by a thread."""

    def __init__(self, client: str, conf: dict, topic: str):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, client, json.dumps(conf), topic],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.assigned: list[int] = []
        self.records: list[tuple[int, int, str]] = []
        self.errors: list[str] = []
        self.closed = False
        self.lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                if "assigned" in msg:
                    self.assigned = msg["assigned"]
                elif "recs" in msg:
                    self.records.extend(tuple(r) for r in msg["recs"])
                elif "error" in msg:
                    self.errors.append(msg["error"])
                elif "closed" in msg:
                    self.closed = True

    def snapshot(self):
        with self.lock:
            return list(self.assigned), list(self.records)

    def close(self, timeout: float = 30.0):
        """A clean close: commits done, LeaveGroup sent."""
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=timeout)
        wait_until(lambda: self.closed, timeout=5, what="worker's closing report")

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.poll() is not None else "(running)"


def worker_conf(client: str, bootstrap: str, group: str, **extra) -> dict:
    if client == "confluent":
        conf = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                "auto.offset.reset": "earliest", "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 100}
    else:
        conf = dict(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                    auto_offset_reset="earliest", session_timeout_ms=SESSION_TIMEOUT_MS,
                    heartbeat_interval_ms=500, fetch_max_wait_ms=100)
    conf.update(extra)
    return conf


def split_evenly(workers: list[Worker], partitions: int) -> bool:
    """Every worker owns partitions/len(workers), and together they own all, once."""
    owned = [w.snapshot()[0] for w in workers]
    flat = sorted(p for ps in owned for p in ps)
    return flat == list(range(partitions)) and all(len(ps) == partitions // len(workers) for ps in owned)


def values_seen(workers: list[Worker]) -> set[str]:
    return {r[2] for w in workers for r in w.snapshot()[1]}


def batch(prefix: str, n: int) -> list[Rec]:
    return [Rec(f"{prefix}-{i}".encode(), partition=i % PARTITIONS) for i in range(n)]


def committed(bootstrap: str, group: str, topic: str, partitions: int = PARTITIONS, with_metadata: bool = False):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        if with_metadata:
            return {tp.partition: (tp.offset, tp.metadata) for tp in tps}
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_members_split_partitions_survive_a_kill_and_resume_at_committed_offsets(broker, client, report):
    topic = create_topic(broker.bootstrap, topic_name(f"grp-{client}"), partitions=PARTITIONS)
    group = f"g-{topic}"
    workers = [Worker(client, worker_conf(client, broker.bootstrap, group), topic) for _ in range(3)]
    try:
        wait_until(lambda: split_evenly(workers, PARTITIONS), timeout=60,
                   what=f"3 {client} consumers owning 2 partitions each: {[w.snapshot()[0] for w in workers]}")
        first = batch("first", 300)
        produce(broker.bootstrap, topic, first)
        wait_until(lambda: values_seen(workers) >= {r.value.decode() for r in first}, timeout=60,
                   what="the first batch consumed")
        # Each record went to the member that owns its partition.
        for w in workers:
            owned, records = w.snapshot()
            assert {p for p, _, _ in records} <= set(owned)

        # SIGKILL one member: no LeaveGroup; the broker must expire it.
        victim, survivors = workers[2], workers[:2]
        victim_partitions = set(victim.snapshot()[0])
        victim.kill()
        killed_at = time.monotonic()
        second = batch("second", 300)
        produce(broker.bootstrap, topic, second)
        wait_until(lambda: split_evenly(survivors, PARTITIONS), timeout=SESSION_TIMEOUT_MS / 1000 + 30,
                   what=f"survivors taking over {sorted(victim_partitions)}: {[w.snapshot()[0] for w in survivors]}")
        took_over_s = time.monotonic() - killed_at
        assert took_over_s >= SESSION_TIMEOUT_MS / 1000 - 1.0, f"took over after {took_over_s:.1f}s, before the session expired"
        # The session timeout, then one rebalance (the survivors hear of it on their
        # next heartbeat) and the join/sync round trips.
        assert took_over_s <= SESSION_TIMEOUT_MS / 1000 + 10, f"takeover took {took_over_s:.1f}s"
        report("groups", f"{client}: SIGKILLed member's partitions taken over after {took_over_s:.1f}s "
                         f"(session timeout {SESSION_TIMEOUT_MS / 1000:.0f}s)")
        everything = {r.value.decode() for r in first + second}
        wait_until(lambda: values_seen(workers) >= everything, timeout=60,
                   what="every record of both batches consumed by someone (none lost)")

        # Clean close commits; a new member then starts exactly at the committed offsets.
        for w in survivors:
            w.close()
        offsets = committed(broker.bootstrap, group, topic)
        assert sum(offsets.values()) == len(first) + len(second), f"committed {offsets}"
        third = batch("third", 60)
        produce(broker.bootstrap, topic, third)
        resumed = Worker(client, worker_conf(client, broker.bootstrap, group), topic)
        workers.append(resumed)
        wait_until(lambda: len(resumed.snapshot()[1]) >= len(third), timeout=60,
                   what="the restarted consumer reading the records produced while the group was down")
        _, records = resumed.snapshot()
        assert sorted(r[2] for r in records) == sorted(r.value.decode() for r in third), \
            "a restarted consumer must resume at its committed offsets, not re-read or skip"
        first_offset = {}
        for p, o, _ in records:
            first_offset.setdefault(p, o)
        assert first_offset == {p: offsets[p] for p in first_offset}
        resumed.close()
        for w in workers:
            assert not w.errors, f"consumer errors: {w.errors[:5]}"
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.kill()


def in_process_consumer(bootstrap: str, group: str, topic: str, **extra) -> Consumer:
    conf = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 100}
    conf.update(extra)
    c = Consumer(conf)
    c.subscribe([topic])
    return c


def drain(consumers: list[Consumer], want: int, timeout: float = 60.0) -> list[list[tuple[int, int, bytes]]]:
    """Polls every consumer in turn until `want` records arrived in total."""
    got: list[list] = [[] for _ in consumers]
    deadline = time.monotonic() + timeout
    while sum(map(len, got)) < want:
        assert time.monotonic() < deadline, f"only {sum(map(len, got))} of {want} records within {timeout}s"
        for i, c in enumerate(consumers):
            for m in c.consume(500, 0.05):
                if m.error() is None:
                    got[i].append((m.partition(), m.offset(), m.value()))
                else:
                    assert m.error().code() == KafkaError._PARTITION_EOF, m.error()
    return got


def test_two_groups_on_one_topic_each_see_every_record(broker):
    topic = create_topic(broker.bootstrap, topic_name("grp-two"), partitions=3)
    sent = [Rec(f"v{i}".encode(), partition=i % 3) for i in range(90)]
    produce(broker.bootstrap, topic, sent)
    a = in_process_consumer(broker.bootstrap, f"a-{topic}", topic)
    b = in_process_consumer(broker.bootstrap, f"b-{topic}", topic)
    try:
        got_a, got_b = drain([a, b], want=2 * len(sent))
        want = sorted(r.value for r in sent)
        assert sorted(v for _, _, v in got_a) == want
        assert sorted(v for _, _, v in got_b) == want
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("strategy", ["range", "roundrobin", "cooperative-sticky"])
def test_assignors_converge_and_cover_every_partition(broker, strategy):
    topic = create_topic(broker.bootstrap, topic_name(f"grp-{strategy}"), partitions=PARTITIONS)
    group = f"g-{topic}"
    consumers = [in_process_consumer(broker.bootstrap, group, topic, **{"partition.assignment.strategy": strategy})
                 for _ in range(3)]
    try:
        def converged():
            for c in consumers:
                c.consume(100, 0.05)  # serves rebalance callbacks
            owned = [sorted(tp.partition for tp in c.assignment()) for c in consumers]
            flat = sorted(p for ps in owned for p in ps)
            return flat == list(range(PARTITIONS)) and all(len(ps) == 2 for ps in owned)

        wait_until(converged, timeout=60, what=f"{strategy}: 3 consumers with 2 partitions each")
        if strategy == "roundrobin":
            # librdkafka's roundrobin deals partitions out in turn: no member gets two
            # neighbours.
            for c in consumers:
                a, b = sorted(tp.partition for tp in c.assignment())
                assert b - a == 3, f"roundrobin gave {a}, {b}"
        elif strategy == "range":
            for c in consumers:
                a, b = sorted(tp.partition for tp in c.assignment())
                assert b - a == 1, f"range gave {a}, {b}"
        sent = [Rec(f"{strategy}-{i}".encode(), partition=i % PARTITIONS) for i in range(120)]
        produce(broker.bootstrap, topic, sent)
        got = drain(consumers, want=len(sent))
        assert sorted(v for g in got for _, _, v in g) == sorted(r.value for r in sent)
        for c, records in zip(consumers, got):
            assert {p for p, _, _ in records} <= {tp.partition for tp in c.assignment()}
    finally:
        for c in consumers:
            c.close()


def test_committed_offsets_survive_sigkill_of_the_broker(broker_factory):
    b = broker_factory()
    topic = create_topic(b.bootstrap, topic_name("grp-kill"), partitions=3)
    group = f"g-{topic}"
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        # Many commits: the last one of each partition must win after replay.
        for i in range(1, 51):
            c.commit(offsets=[TopicPartition(topic, p, i * 10 + p, metadata=f"m{i}-{p}") for p in range(3)],
                     asynchronous=False)
    finally:
        c.close()
    want = {p: (500 + p, f"m50-{p}") for p in range(3)}
    assert committed(b.bootstrap, group, topic, 3, with_metadata=True) == want
    b.kill()  # acknowledged commits were fsync'd: nothing may be lost
    b.start()
    assert committed(b.bootstrap, group, topic, 3, with_metadata=True) == want
