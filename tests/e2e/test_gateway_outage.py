"""The gateway's zero-loss promise (issue 5, items 5 and 7): a 2xx answer means the
record is durable, through broker outages and through a SIGKILL of the gateway itself.

- The outage test: a standalone gateway in front of one broker; records are posted at
  a steady rate for a minute (several keys, each value carrying its key and a per-key
  sequence, each key's records posted one after the other) while the broker is
  SIGKILLed for 20 s and restarted on the same port, twice. Once the spool has
  drained, every record answered 2xx is in the topic exactly once, and each key's
  records are in sequence order.
- A gateway SIGKILLed with records in its spool loses none of them: a new gateway on
  the same spool directory delivers them once the broker is back.

Counts go to the "freshet e2e report" section of the pytest summary.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict

from gateway_fixtures import (SseStream, Tally, finish_request, gateway_factory, health, hold_request,  # noqa: F401
                              ingest, metric, metrics, post, wait_spool_empty)
from helpers import consume, create_topic, topic_name, wait_until

PARTITIONS = 3
# 10 keys x 5 records/s = 50 records/s; FRESHET_E2E_OUTAGE_KEYS / _RATE_PER_KEY load it harder.
KEYS = int(os.environ.get("FRESHET_E2E_OUTAGE_KEYS", "10"))
RATE_PER_KEY = float(os.environ.get("FRESHET_E2E_OUTAGE_RATE_PER_KEY", "5"))
OUTAGE_S = 20
# (seconds from the start, action): up 8 s, down 20 s, up 12 s, down 20 s, up 10 s.
TIMELINE = [(8, "kill"), (8 + OUTAGE_S, "start"), (40, "kill"), (40 + OUTAGE_S, "start"), (70, "end")]


class KeySender(threading.Thread):
    """Posts key `key`'s records one after the other at RATE_PER_KEY a second; a
    record's answer comes before the next record is posted, so the order of a key's
    2xx answers is the order the gateway accepted them in."""

    def __init__(self, base: str, topic: str, key: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.base, self.topic, self.key, self.stop = base, topic, key, stop
        self.answers: list[tuple[int, object]] = []  # (seq, HTTP status or exception name)
        self.spooled = 0

    def run(self):
        start = time.monotonic()
        seq = 0
        while not self.stop.is_set():
            due = start + seq / RATE_PER_KEY
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)  # pacing only
            try:
                r = ingest(self.base, self.topic, doc={"key": self.key, "seq": seq}, key=self.key, timeout=30)
                self.answers.append((seq, r.status))
                if r.status == 202 and r.json().get("spooled"):
                    self.spooled += 1
            except Exception as e:  # noqa: BLE001 - no answer: the record's fate is unknown
                self.answers.append((seq, type(e).__name__))
            seq += 1


def check_stored(senders: list[KeySender], stored) -> dict:
    """Every 2xx record exactly once and in order per key; nothing answered with an
    HTTP error stored. Returns the counts for the report."""
    ok = {(s.key, seq) for s in senders for seq, st in s.answers if isinstance(st, int) and 200 <= st < 300}
    refused = {(s.key, seq) for s in senders for seq, st in s.answers if isinstance(st, int) and not 200 <= st < 300}
    unknown = {(s.key, seq) for s in senders for seq, st in s.answers if not isinstance(st, int)}
    seen = Counter()
    per_key_partition = defaultdict(set)
    per_key_seqs = defaultdict(list)
    for rec in stored:  # in offset order per partition
        doc = json.loads(rec.value)
        assert rec.key.decode() == doc["key"], rec
        seen[(doc["key"], doc["seq"])] += 1
        per_key_partition[doc["key"]].add(rec.partition)
        per_key_seqs[doc["key"]].append(doc["seq"])
    dupes = {k: n for k, n in seen.items() if n > 1}
    missing = sorted(ok - set(seen))
    refused_stored = sorted(refused & set(seen))
    out_of_order = {k: seqs for k, seqs in per_key_seqs.items() if seqs != sorted(seqs)}
    counts = {"2xx": len(ok), "non-2xx": len(refused), "no answer": len(unknown), "stored": sum(seen.values()),
              "duplicates": sum(n - 1 for n in dupes.values()), "missing": len(missing),
              "refused but stored": len(refused_stored), "keys out of order": len(out_of_order)}
    problems = []
    if missing:
        problems.append(f"{len(missing)} records answered 2xx are not in the topic, e.g. {missing[:10]}")
    if dupes:
        problems.append(f"{len(dupes)} records stored more than once, e.g. {sorted(dupes.items())[:10]}")
    if refused_stored:
        problems.append(f"{len(refused_stored)} records answered with an HTTP error are stored, e.g. {refused_stored[:10]}")
    for k, seqs in sorted(out_of_order.items())[:3]:
        bad = next(i for i in range(1, len(seqs)) if seqs[i] < seqs[i - 1])
        problems.append(f"key {k} out of order at position {bad}: ... {seqs[max(0, bad - 5):bad + 5]} ...")
    multi = {k: sorted(ps) for k, ps in per_key_partition.items() if len(ps) > 1}
    if multi:
        problems.append(f"keys stored in more than one partition: {multi}")
    extra = set(seen) - ok - refused - unknown
    if extra:
        problems.append(f"{len(extra)} stored records were never posted, e.g. {sorted(extra)[:5]}")
    counts["problems"] = problems
    return counts


def test_outage_every_2xx_record_once_in_order_per_key(broker_factory, gateway_factory, report):
    b = broker_factory(name="outage-broker")
    topic = create_topic(b.bootstrap, topic_name("gw-outage"), partitions=PARTITIONS)
    gw = gateway_factory(brokers=b.bootstrap)
    port = b.port
    stop = threading.Event()
    senders = [KeySender(gw.http, topic, f"key-{k}", stop) for k in range(KEYS)]
    t0 = time.monotonic()
    for s in senders:
        s.start()
    max_spool = 0
    try:
        for at, action in TIMELINE:
            # The scenario's clock: the outage lengths are what is tested, not a wait for a condition.
            while (left := t0 + at - time.monotonic()) > 0:
                time.sleep(min(left, 1.0))
                max_spool = max(max_spool, health(gw.http)["spool"]["records"])
            if action == "kill":
                b.kill()
            elif action == "start":
                b.start(port=port)
    finally:
        stop.set()
        for s in senders:
            s.join(timeout=40)
        if not b.running:
            b.start(port=port)
    assert not any(s.is_alive() for s in senders), "a sender hung"
    drained_at = time.monotonic()
    h = wait_spool_empty(gw.http, timeout=60)
    drain_s = time.monotonic() - drained_at
    stored = consume(b.bootstrap, topic, partitions=range(PARTITIONS), timeout=60)
    c = check_stored(senders, stored)
    m = metrics(gw.http)
    tally = Tally(posted=sum(len(s.answers) for s in senders), ok=c["2xx"], spooled=sum(s.spooled for s in senders),
                  failed=c["non-2xx"] + c["no answer"],
                  statuses=dict(Counter(str(st) for s in senders for _, st in s.answers)))
    report("gateway outage", f"{tally.line()}; stored {c['stored']}, duplicates {c['duplicates']}, "
                             f"missing {c['missing']}, keys out of order {c['keys out of order']}; "
                             f"spool peak {max_spool} records, drained {drain_s:.1f} s after the run; "
                             f"records_total delivered {metric(m, 'freshet_gateway_records_total', outcome='delivered'):.0f}, "
                             f"spooled {metric(m, 'freshet_gateway_records_total', outcome='spooled'):.0f}")
    assert h["spool"]["records"] == 0
    assert tally.spooled > 0, "the outages must have made the gateway spool records"
    assert not c["problems"], "\n".join(c["problems"])
    assert c["non-2xx"] == 0 and c["no answer"] == 0, \
        f"only a full spool may refuse a record, and it was far from full: {tally.line()}"


def test_gateway_sigkill_with_a_full_spool_loses_nothing(broker_factory, gateway_factory, report):
    b = broker_factory(name="kill-broker")
    topic = create_topic(b.bootstrap, topic_name("gw-gwkill"), partitions=2)
    gw = gateway_factory(brokers=b.bootstrap, env={"FRESHET_HTTP_SPOOL_AFTER_MS": "300"})
    port = b.port
    ok = []
    for i in range(5):
        r = ingest(gw.http, topic, doc={"i": i}, key=f"k{i % 3}")
        assert r.status == 202 and r.json()["spooled"] is False, r
        ok.append(i)
    b.kill()
    n_spooled = 40
    for i in range(5, 5 + n_spooled):
        r = ingest(gw.http, topic, doc={"i": i}, key=f"k{i % 3}")
        assert r.status == 202 and r.json()["spooled"] is True, r
        ok.append(i)
    h = health(gw.http)
    assert h["spool"]["records"] == n_spooled, h
    gw.kill()  # SIGKILL: no chance to flush or to mark anything
    # A new process on the same spool directory, while the broker is still away: what
    # it accepts now must come after what the dead one spooled, per key.
    gw.start()
    for i in range(5 + n_spooled, 15 + n_spooled):
        r = ingest(gw.http, topic, doc={"i": i}, key=f"k{i % 3}")
        assert r.status == 202 and r.json()["spooled"] is True, r
        ok.append(i)
    b.start(port=port)
    h = wait_spool_empty(gw.http, timeout=60)
    replayed = metric(metrics(gw.http), "freshet_gateway_records_total", outcome="replayed")
    stored = consume(b.bootstrap, topic, partitions=(0, 1))
    seen = Counter(json.loads(r.value)["i"] for r in stored)
    missing = sorted(set(ok) - set(seen))
    dupes = {i: n for i, n in seen.items() if n > 1}
    report("gateway SIGKILL", f"2xx {len(ok)} ({n_spooled} spooled before the SIGKILL, 10 after), replayed by the new gateway {replayed:.0f}, "
                              f"stored {sum(seen.values())}, duplicates {sum(n - 1 for n in dupes.values())}, "
                              f"missing {len(missing)}")
    assert not missing, f"records answered 2xx lost with the gateway: {missing}"
    assert replayed == n_spooled, f"the new gateway replayed {replayed} spool entries, {n_spooled} were spooled"
    by_key = defaultdict(list)
    for r in stored:
        by_key[r.key].append(json.loads(r.value)["i"])
    for k, xs in by_key.items():
        first = [x for i, x in enumerate(xs) if x not in xs[:i]]
        assert first == sorted(first), f"key {k}: records out of order {xs}"


def test_gateway_sigkill_under_load_loses_no_2xx_record(broker_factory, gateway_factory, report):
    """Records posted steadily while the broker goes away and, with records spooled and
    in flight, the gateway is SIGKILLed and restarted on its port: every 2xx record is
    stored (duplicates are possible, the dead process could not mark what was
    delivered, and are reported), each key's first copies in order."""
    b = broker_factory(name="load-kill-broker")
    topic = create_topic(b.bootstrap, topic_name("gw-loadkill"), partitions=PARTITIONS)
    gw = gateway_factory(brokers=b.bootstrap, env={"FRESHET_HTTP_SPOOL_AFTER_MS": "300"})
    port = b.port
    stop = threading.Event()
    senders = [KeySender(gw.http, topic, f"key-{k}", stop) for k in range(KEYS)]
    t0 = time.monotonic()
    for s in senders:
        s.start()
    try:
        for at, action in [(3, "kill broker"), (6, "kill gateway"), (10, "start broker"), (13, "kill gateway"),
                           (16, "end")]:
            while (left := t0 + at - time.monotonic()) > 0:
                time.sleep(left)  # the scenario's clock
            if action == "kill broker":
                b.kill()
            elif action == "start broker":
                b.start(port=port)
            elif action == "kill gateway":
                gw.kill()
                gw.start(port=gw.port)
    finally:
        stop.set()
        for s in senders:
            s.join(timeout=40)
        if not b.running:
            b.start(port=port)
    wait_spool_empty(gw.http, timeout=60)
    stored = consume(b.bootstrap, topic, partitions=range(PARTITIONS), timeout=60)
    c = check_stored(senders, stored)
    report("gateway SIGKILL under load", f"posted {sum(len(s.answers) for s in senders)}, 2xx {c['2xx']}, "
                                         f"no answer {c['no answer']}, non-2xx {c['non-2xx']}, stored {c['stored']}, "
                                         f"duplicates {c['duplicates']}, missing {c['missing']}")
    lost = [p for p in c["problems"] if "not in the topic" in p or "HTTP error are stored" in p
            or "never posted" in p or "more than one partition" in p]
    assert not lost, "\n".join(lost)
    firsts = defaultdict(list)
    for rec in stored:
        doc = json.loads(rec.value)
        if doc["seq"] not in firsts[doc["key"]]:
            firsts[doc["key"]].append(doc["seq"])
    for k, seqs in firsts.items():
        assert seqs == sorted(seqs), f"key {k}: first copies out of order {seqs}"


def test_gateway_sigterm_keeps_the_spool_for_the_next_start(broker_factory, gateway_factory):
    b = broker_factory(name="term-broker")
    topic = create_topic(b.bootstrap, topic_name("gw-gwterm"))
    gw = gateway_factory(brokers=b.bootstrap, env={"FRESHET_HTTP_SPOOL_AFTER_MS": "300",
                                                   "FRESHET_HTTP_SHUTDOWN_TIMEOUT_MS": "1000"})
    port = b.port
    assert ingest(gw.http, topic, doc={"i": 0}).json()["spooled"] is False
    b.kill()
    for i in range(1, 11):
        r = ingest(gw.http, topic, doc={"i": i})
        assert r.status == 202 and r.json()["spooled"] is True, r
    assert gw.stop() == 0  # clean exit with the cluster away: the spool stays
    b.start(port=port)
    gw.start()
    wait_spool_empty(gw.http, timeout=60)
    assert [json.loads(r.value)["i"] for r in consume(b.bootstrap, topic)] == list(range(11)), \
        "every record once, in order"


def test_rest_produce_while_the_broker_is_down_is_spooled(broker_factory, gateway_factory):
    b = broker_factory(name="rest-down-broker")
    topic = create_topic(b.bootstrap, topic_name("gw-restdown"), partitions=2)
    gw = gateway_factory(brokers=b.bootstrap, env={"FRESHET_HTTP_SPOOL_AFTER_MS": "300"})
    ct = {"Content-Type": "application/vnd.kafka.json.v2+json"}
    assert post(f"{gw.http}/topics/{topic}", body=json.dumps({"records": [{"value": -1}]}), headers=ct).status == 200
    port = b.port
    b.kill()
    r = post(f"{gw.http}/topics/{topic}", body=json.dumps({"records": [{"key": f"k{i % 2}", "value": i}
                                                                       for i in range(6)]}), headers=ct)
    assert r.status == 200, r
    offsets = r.json()["offsets"]
    assert len(offsets) == 6 and all(o["error_code"] is None and o["offset"] is None and o.get("spooled")
                                     for o in offsets), r
    b.start(port=port)
    wait_spool_empty(gw.http)
    stored = consume(b.bootstrap, topic, partitions=(0, 1))
    assert sorted(json.loads(r.value) for r in stored) == list(range(-1, 6)), "each record once"
    for k in (b'"k0"', b'"k1"'):  # JSON-format keys are stored as JSON
        xs = [json.loads(r.value) for r in stored if r.key == k]
        assert xs == sorted(xs) and len(xs) == 3, (k, xs)


def test_stream_follows_across_a_broker_restart(broker_factory, gateway_factory):
    """A live subscriber keeps its stream while the broker is SIGKILLed and restarted:
    it gets every record produced before and after, once, in order."""
    b = broker_factory(name="sse-restart-broker")
    topic = create_topic(b.bootstrap, topic_name("gw-sse-restart"), partitions=2)
    gw = gateway_factory(brokers=b.bootstrap, env={"FRESHET_HTTP_SPOOL_AFTER_MS": "300"})
    port = b.port
    placed = []
    with SseStream(gw.http, "/topics/%s/stream" % topic) as s:
        first = s.next()
        assert first.positions() == {0: 0, 1: 0}, first
        for i in range(10):
            r = ingest(gw.http, topic, doc={"i": i}, key=f"k{i}")
            assert r.status == 202, r
            placed.append(i)
        got = [e.json()["value"]["i"] for e in s.take(10)]
        b.kill()
        for i in range(10, 20):  # spooled while the broker is away
            r = ingest(gw.http, topic, doc={"i": i}, key=f"k{i}")
            assert r.status == 202 and r.json()["spooled"] is True, r
        b.start(port=port)
        events = s.take(10, timeout=60)
        got += [e.json()["value"]["i"] for e in events]
        assert sorted(got) == list(range(20)), f"every record once: {got}"
        pos = events[-1].positions()
        assert sum(pos.values()) == 20, pos
        r = ingest(gw.http, topic, doc={"i": "sentinel"})
        e = s.next(timeout=20)
        assert e.json()["value"] == {"i": "sentinel"}, "nothing else was pending"


def test_graceful_shutdown_answers_in_flight_requests(broker_factory, gateway_factory):
    b = broker_factory(name="drain-broker")
    topic = create_topic(b.bootstrap, topic_name("gw-drain"))
    gw = gateway_factory(brokers=b.bootstrap, env={"FRESHET_HTTP_MAX_CONCURRENT_REQUESTS": "1"})
    body = json.dumps({"in": "flight", "pad": "x" * 20}).encode()
    with SseStream(gw.http, f"/topics/{topic}/stream") as stream:
        stream.next()
        slow, _ = hold_request(gw, topic, body)  # being served: it holds the only slot
        gw.proc.send_signal(signal.SIGTERM)
        # Streams end at once, so they cannot hold the shutdown.
        wait_until(stream.closed.is_set, timeout=10, what="the stream to be closed by the shutdown")
        answer = finish_request(slow, body)
    assert answer.startswith(b"HTTP/1.1 202"), f"the in-flight request got {answer[:300]!r}"
    assert gw.proc.wait(timeout=20) == 0, gw.stderr_tail()
    assert [json.loads(r.value) for r in consume(b.bootstrap, topic)] == [json.loads(body)]


def test_a_gateway_started_during_an_outage_answers_within_spool_after_ms(broker_factory, gateway_factory, report):
    """A 202 comes "when the cluster did not ack within spool_after_ms": a gateway
    (re)started while the cluster is away, which has never seen the topic, must
    still answer about that fast rather than wait on metadata for every request."""
    b = broker_factory(name="cold-broker")
    topic = create_topic(b.bootstrap, topic_name("gw-cold"))
    addr, port = b.bootstrap, b.port
    b.kill()
    spool_after_s = 0.3
    gw = gateway_factory(brokers=addr, env={"FRESHET_HTTP_SPOOL_AFTER_MS": str(int(spool_after_s * 1000))})
    took = []
    for i in range(5):
        t = time.monotonic()
        r = ingest(gw.http, topic, doc={"i": i})
        took.append(time.monotonic() - t)
        assert r.status == 202 and r.json()["spooled"] is True, r
    report("gateway cold start", "answers while the cluster is away: " + ", ".join(f"{x * 1000:.0f} ms" for x in took))
    b.start(port=port)
    wait_spool_empty(gw.http)
    assert [json.loads(r.value)["i"] for r in consume(b.bootstrap, topic)] == list(range(5))
    assert max(took) < spool_after_s + 1.0, f"answers took {[round(x, 2) for x in took]} s with spool_after_ms=300"
