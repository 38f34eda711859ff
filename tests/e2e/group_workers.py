"""Consumer-group members in subprocesses, one per member, so a test can SIGKILL one
(no LeaveGroup, no last commit) as a crashed service instance would die.

Three clients behind one interface: librdkafka (confluent-kafka) and kafka-python run the
WORKER script below; kafkajs runs kafkajs/run.js's `member` op. Each prints JSON lines,
collected here in order:
  {"assigned": [partitions]}     what it owns now (after every rebalance callback)
  {"recs": [record, ...]}        a batch, reported BEFORE it is committed
  {"committed": {p: offset}}     a successful commit of exactly those offsets
  {"commit_failed": {p: offset}, "error": ...}
  {"held": true}                 answer to "hold": no commit is started from now on
  {"positioned": true}           (kafkajs) every assigned partition has a fetch position
  {"error": ...}                 any other consumer error
A member reports a batch, then commits its offsets synchronously, so a kill can cause a
re-delivery (of records after the last commit), never a gap.

stdin commands: "hold" (stop committing: the records it reads from then on stay
uncommitted, so a kill or leave must get them re-delivered to the group) and "close"
(a clean close: LeaveGroup)."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from helpers import wait_until

KAFKAJS_DIR = Path(__file__).resolve().parent / "kafkajs"
CLIENTS = ("confluent", "kafka-python", "kafkajs")

WORKER = r'''
import base64, json, select, sys
client, conf, topic, assignor = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
owned = set()
holding = False

def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def b64(data):
    return None if data is None else base64.b64encode(data).decode()

def record(partition, offset, key, value, headers, timestamp):
    hs = {}
    for name, v in headers or ():
        hs.setdefault(name, []).append(b64(v))
    return {"partition": partition, "offset": offset, "key": b64(key), "value": b64(value),
            "headers": hs, "timestamp": timestamp}

def close_requested():
    """Serves stdin commands; True once "close" (or EOF) arrived."""
    global holding
    while select.select([sys.stdin], [], [], 0)[0]:
        line = sys.stdin.readline()
        if not line or line.strip() == "close":
            return True
        if line.strip() == "hold":
            holding = True
            out({"held": True})
    return False

def next_offsets(recs):
    nxt = {}
    for r in recs:
        nxt[r["partition"]] = max(nxt.get(r["partition"], 0), r["offset"] + 1)
    return nxt

if client == "confluent":
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
    conf["partition.assignment.strategy"] = assignor
    def on_assign(c, parts):
        owned.update(p.partition for p in parts)
        out({"assigned": sorted(owned)})
    def on_revoke(c, parts):
        owned.difference_update(p.partition for p in parts)
        out({"assigned": sorted(owned)})
    c = Consumer(conf)
    c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_revoke)
    while not close_requested():
        recs = []
        for m in c.consume(500, 0.2):
            if m.error() is None:
                ts_type, ts = m.timestamp()
                recs.append(record(m.partition(), m.offset(), m.key(), m.value(), m.headers(), ts))
            elif m.error().code() != KafkaError._PARTITION_EOF:
                out({"error": str(m.error())})
        if recs:
            out({"recs": recs})
            if not holding:
                nxt = next_offsets(recs)
                try:
                    res = c.commit(offsets=[TopicPartition(topic, p, o) for p, o in nxt.items()],
                                   asynchronous=False)
                    bad = [str(tp.error) for tp in res if tp.error is not None]
                    out({"commit_failed": nxt, "error": bad} if bad else {"committed": nxt})
                except KafkaException as e:
                    out({"commit_failed": nxt, "error": str(e)})
    c.close()
else:
    from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
    from kafka.coordinator.assignors.range import RangePartitionAssignor
    from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
    from kafka.structs import OffsetAndMetadata
    assignors = {a.name: a for a in (RangePartitionAssignor, RoundRobinPartitionAssignor,
                                     StickyPartitionAssignor, CooperativeStickyAssignor)}
    conf["partition_assignment_strategy"] = [assignors[assignor]]
    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked):
            owned.difference_update(tp.partition for tp in revoked)
            out({"assigned": sorted(owned)})
        def on_partitions_assigned(self, assigned):
            owned.update(tp.partition for tp in assigned)
            out({"assigned": sorted(owned)})
    c = KafkaConsumer(**conf)
    c.subscribe([topic], listener=Listener())
    while not close_requested():
        recs = []
        for tp, msgs in c.poll(timeout_ms=200).items():
            recs.extend(record(tp.partition, m.offset, m.key, m.value, m.headers, m.timestamp) for m in msgs)
        if recs:
            out({"recs": recs})
            if not holding:
                nxt = next_offsets(recs)
                try:
                    c.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in nxt.items()})
                    out({"committed": nxt})
                except Exception as e:  # CommitFailedError and friends: reported, judged by the test
                    out({"commit_failed": nxt, "error": repr(e)})
    c.close()
out({"closed": True})
'''


def unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


@dataclass(frozen=True)
class Delivery:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple   # ((name, (value, ...)), ...) in the order the client gave them
    timestamp: int


def delivery(r: dict) -> Delivery:
    return Delivery(r["partition"], r["offset"], unb64(r["key"]), unb64(r["value"]),
                    tuple((k, tuple(unb64(v) for v in vs)) for k, vs in r["headers"].items()), r["timestamp"])


def client_version(client: str) -> str:
    if client == "confluent":
        import confluent_kafka
        return f"confluent-kafka {confluent_kafka.__version__} (librdkafka {confluent_kafka.libversion()[0]})"
    if client == "kafka-python":
        import kafka
        return f"kafka-python {kafka.__version__}"
    version = json.loads((KAFKAJS_DIR / "node_modules" / "kafkajs" / "package.json").read_text())["version"]
    return f"kafkajs {version}"


def member_conf(client: str, bootstrap: str, group: str, session_timeout_ms: int,
                from_beginning: bool = True) -> dict:
    """Manual commits, short session, fast heartbeats and fetch waits: rebalances and
    takeovers happen in seconds."""
    if client == "confluent":
        return {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
                "auto.offset.reset": "earliest" if from_beginning else "latest",
                "session.timeout.ms": session_timeout_ms, "heartbeat.interval.ms": 500,
                "fetch.wait.max.ms": 100}
    if client == "kafka-python":
        return dict(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                    auto_offset_reset="earliest" if from_beginning else "latest",
                    session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=500, fetch_max_wait_ms=100)
    return {"brokers": [bootstrap], "groupId": group, "sessionTimeoutMs": session_timeout_ms,
            "heartbeatIntervalMs": 500, "fromBeginning": from_beginning}


class Worker:
    """One group member in a subprocess; a thread collects its reports."""

    def __init__(self, client: str, conf: dict, topic: str, assignor: str):
        assert client in CLIENTS, client
        self.client = client
        if client == "kafkajs":
            req = {**conf, "op": "member", "topic": topic, "assignor": assignor}
            cmd, cwd = ["node", "run.js", json.dumps(req)], KAFKAJS_DIR
        else:
            cmd, cwd = [sys.executable, "-c", WORKER, client, json.dumps(conf), topic, assignor], None
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lock = threading.Lock()
        self.assignments: list[list[int]] = []    # every reported assignment, in order
        self.records: list[Delivery] = []
        self.commits: dict[int, int] = {}         # partition -> last successfully committed offset
        self.commit_failures: list[tuple[dict, str]] = []
        self.errors: list[str] = []
        self.held = False
        self.positioned = 0
        self.closed = False
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                if "assigned" in msg:
                    self.assignments.append(msg["assigned"])
                elif "recs" in msg:
                    self.records.extend(delivery(r) for r in msg["recs"])
                elif "committed" in msg:
                    for p, o in msg["committed"].items():
                        self.commits[int(p)] = max(self.commits.get(int(p), 0), o)
                elif "commit_failed" in msg:
                    self.commit_failures.append(({int(p): o for p, o in msg["commit_failed"].items()},
                                                 json.dumps(msg.get("error"))))
                elif "held" in msg:
                    self.held = True
                elif "positioned" in msg:
                    self.positioned += 1
                elif "error" in msg:
                    self.errors.append(json.dumps(msg["error"]))
                elif "closed" in msg or ("ok" in msg and msg["ok"]):
                    self.closed = True
                elif "ok" in msg:
                    self.errors.append(json.dumps(msg.get("error")))

    def _pump_stderr(self):
        for line in self.proc.stderr:
            with self.lock:
                self._stderr.append(line)
                del self._stderr[:-200]

    # ---- what it reported ----------------------------------------------------------

    @property
    def assigned(self) -> list[int]:
        with self.lock:
            return list(self.assignments[-1]) if self.assignments else []

    def deliveries(self) -> list[Delivery]:
        with self.lock:
            return list(self.records)

    def committed_all_it_read(self) -> bool:
        """Every partition it owns and has read from has a successful commit just past the
        last record it read there. (A partition it lost in a rebalance may have a failed
        last commit; check_deliveries in test_groups.py judges what that re-delivers.)"""
        with self.lock:
            owned = set(self.assignments[-1]) if self.assignments else set()
            last: dict[int, int] = {}
            for d in self.records:
                if d.partition in owned:
                    last[d.partition] = max(last.get(d.partition, -1), d.offset)
            return all(self.commits.get(p) == o + 1 for p, o in last.items())

    def stderr(self) -> str:
        with self.lock:
            return "".join(self._stderr)

    def describe(self) -> str:
        with self.lock:
            return (f"{self.client} pid {self.proc.pid}: assigned {self.assignments[-1:] or '-'}, "
                    f"{len(self.records)} records, commits {self.commits}, errors {self.errors[:3]}, "
                    f"commit failures {self.commit_failures[:3]}")

    # ---- control ---------------------------------------------------------------------

    def _send(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def hold(self):
        """Stop committing; returns once the member confirmed."""
        self._send("hold")
        wait_until(lambda: self.held, timeout=10, what=f"{self.client} member confirming hold")

    def close(self, timeout: float = 30.0):
        """A clean close: LeaveGroup sent, process exited."""
        self._send("close")
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.client} member did not close in {timeout}s; stderr:\n{self.stderr()[-3000:]}")
        wait_until(lambda: self.closed, timeout=5, what=f"{self.client} member's closing report")

    def kill(self):
        """SIGKILL: no LeaveGroup, no last commit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
