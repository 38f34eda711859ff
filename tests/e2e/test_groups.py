"""Consumer groups with real clients: librdkafka (confluent-kafka), kafka-python and
kafkajs consumers subscribe, split a topic's partitions, survive a member killed with
SIGKILL or leaving (its partitions move to the others; no record is lost, and none the
group had committed is delivered again), and resume at their committed offsets, with
every assignor each client ships; two groups each see every record; committed offsets
survive a SIGKILL of the broker.

Members that must die abruptly run as subprocesses (group_workers.py)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from group_workers import Worker, client_version, member_conf
from helpers import Rec, create_topic, produce, topic_name, wait_until

SESSION_TIMEOUT_MS = 6000  # the broker's group.min.session.timeout.ms, as Kafka's
PARTITIONS = 6


@dataclass(frozen=True)
class Flow:
    client: str
    assignor: str
    departure: str  # "kill": SIGKILL, the session must expire; "leave": a clean close (LeaveGroup)

    @property
    def id(self) -> str:
        return f"{self.client}-{self.assignor}-{self.departure}"

    @property
    def session_timeout_ms(self) -> int:
        # A leave must not wait for the session at all: a long session makes that visible.
        return SESSION_TIMEOUT_MS if self.departure == "kill" else 30_000


# Every assignor each client ships (kafka-python 3 has sticky and cooperative-sticky too;
# kafkajs ships only round-robin), each through a SIGKILL; the cooperative (incremental)
# ones also through a clean leave.
FLOWS = [Flow("confluent", a, "kill") for a in ("range", "roundrobin", "cooperative-sticky")] + \
        [Flow("kafka-python", a, "kill") for a in ("range", "roundrobin", "sticky", "cooperative-sticky")] + \
        [Flow("kafkajs", "roundrobin", "kill")] + \
        [Flow(c, "cooperative-sticky", "leave") for c in ("confluent", "kafka-python")] + \
        [Flow("kafkajs", "roundrobin", "leave")]


def split_evenly(workers: list[Worker], partitions: int = PARTITIONS) -> bool:
    """Every worker owns partitions/len(workers), and together they own all, once."""
    owned = [w.assigned for w in workers]
    flat = sorted(p for ps in owned for p in ps)
    return flat == list(range(partitions)) and all(len(ps) == partitions // len(workers) for ps in owned)


def check_layout(assignor: str, owned: list[list[int]]):
    """What each assignor's algorithm gives 6 partitions over 2 or 3 members (members sorted
    by id): range hands out contiguous runs, round-robin deals in turn."""
    for ps in owned:
        if assignor == "range":
            assert ps == list(range(ps[0], ps[0] + len(ps))), f"range gave {owned}"
        elif assignor == "roundrobin":
            assert all(b - a == len(owned) for a, b in zip(ps, ps[1:])), f"roundrobin gave {owned}"


def states(workers: list[Worker]) -> str:
    return "; ".join(w.describe() for w in workers)


def seen_everything(workers: list[Worker], produced: dict) -> bool:
    got = {(d.partition, d.offset) for w in workers for d in w.deliveries()}
    return got >= produced.keys()


def batch(prefix: str, n: int) -> list[Rec]:
    return [Rec(f"{prefix}-{i}".encode(), partition=i % PARTITIONS) for i in range(n)]


def per_partition(recs: list[Rec]) -> dict[int, int]:
    n = defaultdict(int)
    for r in recs:
        n[r.partition] += 1
    return {p: n[p] for p in range(PARTITIONS)}


def committed(bootstrap: str, group: str, topic: str, partitions: int = PARTITIONS, with_metadata: bool = False):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        if with_metadata:
            return {tp.partition: (tp.offset, tp.metadata) for tp in tps}
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def check_deliveries(produced: dict, workers: list[Worker], victim: Worker, victim_partitions: set[int],
                     committed_at_departure: dict[int, int]) -> tuple[int, int]:
    """Every produced record was delivered, with its value, at least once; a record was
    delivered again only if the group had not committed it: the departed member read it
    after its last commit (those must ALL come again: at-least-once), or a survivor's
    commit covering it failed. Nothing below the group's committed offset at the departure
    came twice. Returns (redelivered after the departed member's last commit, redelivered
    after a failed commit)."""
    receivers = defaultdict(list)  # (partition, offset) -> the workers it went to
    for w in workers:
        for d in w.deliveries():
            key = (d.partition, d.offset)
            assert key in produced, f"{w.client} got a record at {key} that was never produced"
            assert d.value == produced[key], f"{key}: got {d.value!r}, produced {produced[key]!r}"
            receivers[key].append(w)
    missing = sorted(produced.keys() - receivers.keys())
    assert not missing, f"{len(missing)} records never delivered (lost), first {missing[:10]}"

    victim_read = defaultdict(lambda: -1)
    for d in victim.deliveries():
        victim_read[d.partition] = max(victim_read[d.partition], d.offset)
    uncommitted = {(p, o) for p in victim_partitions for o in range(committed_at_departure[p], victim_read[p] + 1)}
    for key in sorted(uncommitted):
        ws = receivers[key]
        assert len(ws) == 2 and victim in ws, \
            f"{key}: read but not committed by the departed member, so the group must get it again " \
            f"exactly once more; it went to {[w.client for w in ws]}"
    failed = defaultdict(int)  # partition -> highest offset a failed commit would have committed
    for w in workers:
        for offsets, _ in w.commit_failures:
            for p, o in offsets.items():
                failed[p] = max(failed[p], o)
    after_failed = 0
    for (p, o), ws in sorted(receivers.items()):
        if len(ws) < 2 or (p, o) in uncommitted:
            continue
        assert o >= committed_at_departure[p], \
            f"({p}, {o}) delivered {len(ws)} times although the group had committed offset " \
            f"{committed_at_departure[p]} of partition {p} when the member departed"
        assert o < failed[p], \
            f"({p}, {o}) delivered {len(ws)} times, but no commit covering it failed: once committed, " \
            f"a record must not come again"
        after_failed += 1
    return len(uncommitted), after_failed


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.id)
def test_members_split_partitions_survive_a_departure_and_resume_at_committed_offsets(broker, flow, report):
    client, assignor = flow.client, flow.assignor
    session_s = flow.session_timeout_ms / 1000
    topic = create_topic(broker.bootstrap, topic_name(f"grp-{flow.id}"), partitions=PARTITIONS)
    group = f"g-{topic}"
    conf = member_conf(client, broker.bootstrap, group, flow.session_timeout_ms)
    workers = [Worker(client, conf, topic, assignor) for _ in range(3)]
    victim, survivors = workers[2], workers[:2]
    try:
        wait_until(lambda: split_evenly(workers), timeout=60,
                   what=lambda: f"3 {client} consumers owning 2 partitions each: {[w.assigned for w in workers]}")
        before = [w.assigned for w in workers]
        check_layout(assignor, before)
        produced: dict[tuple[int, int], bytes] = {}

        def send(recs):
            for r in produce(broker.bootstrap, topic, recs):
                produced[(r.partition, r.offset)] = r.value
            return recs

        first = send(batch("first", 300))
        wait_until(lambda: seen_everything(workers, produced) and all(w.committed_all_it_read() for w in workers),
                   timeout=60, what=lambda: "the first batch consumed and committed: " + states(workers))
        for w in workers:  # each record went to the member that owns its partition
            assert {d.partition for d in w.deliveries()} <= set(w.assigned), w.describe()

        # The victim stops committing and reads a middle batch: at its departure it holds
        # records the group has not committed, which must all be delivered again.
        victim.hold()
        middle = send(batch("middle", 60))
        wait_until(lambda: seen_everything(workers, produced) and all(w.committed_all_it_read() for w in survivors),
                   timeout=60, what=lambda: "the middle batch consumed: " + states(workers))
        assert [w.assigned for w in workers] == before, "no rebalance was due yet"
        victim_partitions = set(victim.assigned)
        n_first, n_middle = per_partition(first), per_partition(middle)
        at_departure = committed(broker.bootstrap, group, topic)
        assert at_departure == {p: n_first[p] + (0 if p in victim_partitions else n_middle[p])
                                for p in range(PARTITIONS)}, at_departure

        if flow.departure == "kill":
            victim.kill()  # no LeaveGroup: the broker must expire the session
        else:
            victim.close()
        departed_at = time.monotonic()
        second = send(batch("second", 300))
        wait_until(lambda: split_evenly(survivors), timeout=session_s + 30,
                   what=lambda: f"survivors taking over {sorted(victim_partitions)}: {[w.assigned for w in survivors]}")
        took_over_s = time.monotonic() - departed_at
        if flow.departure == "kill":
            assert took_over_s >= session_s - 1.0, f"took over after {took_over_s:.1f}s, before the session expired"
            # The session timeout, then one rebalance (the survivors hear of it on their
            # next heartbeat) and the join/sync round trips.
            assert took_over_s <= session_s + 10, f"takeover took {took_over_s:.1f}s"
        else:
            assert took_over_s < session_s / 2, f"takeover after a LeaveGroup took {took_over_s:.1f}s"
        after = [w.assigned for w in survivors]
        check_layout(assignor, after)
        if "sticky" in assignor:
            for old, new in zip(before, after):
                assert set(old) <= set(new), f"{assignor} moved a survivor's partitions: {before} -> {after}"
        if assignor == "cooperative-sticky":
            # Incremental: a survivor never gave up a partition it owned, at any step.
            for old, w in zip(before, survivors):
                with w.lock:
                    history = w.assignments[w.assignments.index(old):]
                assert all(set(old) <= set(a) for a in history), f"cooperative rebalance revoked: {history}"

        wait_until(lambda: seen_everything(survivors, {k: v for k, v in produced.items()
                                                       if k[0] not in victim_partitions or k[1] >= at_departure[k[0]]})
                   and all(w.committed_all_it_read() for w in survivors),
                   timeout=60, what=lambda: "the survivors reading and committing everything after the committed "
                   "offsets: " + states(survivors))

        # Clean close commits nothing more (everything read is committed); the group's
        # offsets are then the end of every partition.
        for w in survivors:
            w.close()
        redelivered, after_failed = check_deliveries(produced, workers, victim, victim_partitions, at_departure)
        assert redelivered == sum(n_middle[p] for p in victim_partitions)
        offsets = committed(broker.bootstrap, group, topic)
        totals = per_partition(first + middle + second)
        assert offsets == totals, f"committed {offsets}, produced {totals}"

        # A new member starts exactly at the committed offsets.
        third = send(batch("third", 60))
        resumed = Worker(client, conf, topic, assignor)
        workers.append(resumed)
        wait_until(lambda: len(resumed.deliveries()) >= len(third), timeout=60,
                   what=lambda: "the restarted consumer reading the records produced while the group was down: "
                   + resumed.describe())
        records = resumed.deliveries()
        assert sorted(d.value for d in records) == sorted(r.value for r in third), \
            "a restarted consumer must resume at its committed offsets, not re-read or skip"
        first_offset = {}
        for d in records:
            first_offset.setdefault(d.partition, d.offset)
        assert first_offset == {p: offsets[p] for p in range(PARTITIONS)}
        resumed.close()
        for w in workers:
            assert not w.errors, f"consumer errors: {w.describe()}\n{w.stderr()[-3000:]}"
        report("groups", f"{client_version(client)} assignor={assignor}, member "
                         f"{'killed' if flow.departure == 'kill' else 'left'}: "
                         f"partitions {sorted(victim_partitions)} taken over after {took_over_s:.1f}s "
                         f"(session {session_s:.0f}s), {redelivered} records it read after its last commit "
                         f"delivered again, {after_failed} after failed commits, none committed delivered twice")
    finally:
        for w in workers:
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


def test_kafka_python_new_group_at_latest_reads_only_new_records(broker):
    """auto_offset_reset=latest in a group with no committed offsets: the reset goes to
    the log end offset, and only records produced after it arrive."""
    from kafka import KafkaConsumer
    from kafka import TopicPartition as KpTopicPartition

    topic = create_topic(broker.bootstrap, topic_name("grp-kp-latest"), partitions=2)
    produce(broker.bootstrap, topic, [Rec(f"old-{i}".encode(), partition=i % 2) for i in range(30)])
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=f"g-{topic}", enable_auto_commit=False,
                      auto_offset_reset="latest", session_timeout_ms=SESSION_TIMEOUT_MS,
                      heartbeat_interval_ms=500, fetch_max_wait_ms=100)
    try:
        c.subscribe([topic])
        tps = [KpTopicPartition(topic, 0), KpTopicPartition(topic, 1)]
        got = []  # everything any poll returned, from the first

        def poll():
            for records in c.poll(timeout_ms=100).values():
                got.extend((r.partition, r.offset, r.value) for r in records)

        def joined():
            poll()
            return c.assignment() == set(tps)
        wait_until(joined, timeout=60, what="kafka-python joined, owning both partitions")
        assert [c.position(tp) for tp in tps] == [15, 15]  # no committed offset: reset to the end
        new = produce(broker.bootstrap, topic, [Rec(f"new-{i}".encode(), partition=i % 2) for i in range(10)])
        wait_until(lambda: poll() or len(got) >= len(new), timeout=30,
                   what=lambda: f"the {len(new)} new records, got {got}")
        assert sorted(got) == sorted((r.partition, r.offset, r.value) for r in new)
    finally:
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
