"""The HTTP gateway (issue 5) through plain HTTP (Python stdlib), with confluent-kafka
judging what reached the topic: REST Proxy v2 produce/consume in both embedded
formats, /ingest (JSON and form) with Idempotency-Key, JSON Schemas (422 with every
violation, nothing written, shared by every gateway of a cluster), SSE live streams
(latency, resume, 1,000 subscribers on one reader), limits and bad input, health /
ready / metrics / OpenAPI, and `freshet produce --spool`.

The module broker runs the embedded gateway with topic auto-creation off, so an
unknown topic is the cluster's "unknown topic" answer, and a short initial rebalance
delay so a REST consumer's first poll does not wait 3 s.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import resource
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from confluent_kafka import Consumer, Producer, TopicPartition

from conftest import freshet_bin
from gateway_fixtures import (SseStream, assert_error, finish_request, gateway_factory, get, health,  # noqa: F401
                              hold_request, ingest, metric, metrics, post, request, sse_async, wait_spool_empty)
from helpers import consume, create_topic, topic_name, wait_until, watermarks

BROKER_ENV = {
    "FRESHET_HTTP_LISTEN": "127.0.0.1:0",
    "FRESHET_AUTO_CREATE_TOPICS": "false",
    "FRESHET_GROUP_INITIAL_REBALANCE_DELAY_MS": "100",
}
BINARY = "application/vnd.kafka.binary.v2+json"
JSONV2 = "application/vnd.kafka.json.v2+json"
V2 = "application/vnd.kafka.v2+json"


def b64(data: bytes | None):
    return None if data is None else base64.b64encode(data).decode()


def unb64(text: str | None):
    return None if text is None else base64.b64decode(text)


def end_offsets(bootstrap: str, topic: str, partitions: int = 1) -> list[int]:
    return [watermarks(bootstrap, topic, p)[1] for p in range(partitions)]


def by_place(recs):
    return {(r.partition, r.offset): r for r in recs}


def rest_produce(base: str, topic: str, records: list[dict], fmt: str = BINARY, partition: int | None = None):
    path = f"/topics/{topic}" + (f"/partitions/{partition}" if partition is not None else "")
    return post(base + path, body=json.dumps({"records": records}), headers={"Content-Type": fmt})


class RestConsumer:
    """A REST Proxy v2 consumer instance."""

    def __init__(self, base: str, group: str, fmt: str, reset: str = "earliest"):
        self.base, self.group, self.fmt = base, group, fmt
        r = post(f"{base}/consumers/{group}", body=json.dumps({"format": fmt, "auto.offset.reset": reset}),
                 headers={"Content-Type": V2})
        assert r.status == 200, r
        assert r.headers["content-type"] == V2, r
        body = r.json()
        self.name = body["instance_id"]
        assert body["base_uri"].endswith(f"/consumers/{group}/instances/{self.name}"), body
        self.url = f"{base}/consumers/{group}/instances/{self.name}"
        self.accept = BINARY if fmt == "binary" else JSONV2

    def subscribe(self, topics: list[str]):
        r = post(f"{self.url}/subscription", body=json.dumps({"topics": topics}), headers={"Content-Type": V2})
        assert r.status == 204, r

    def records(self, timeout_ms: int = 500, accept: str | None = None):
        return get(f"{self.url}/records?timeout={timeout_ms}", headers={"Accept": accept or self.accept})

    def read(self, n: int, timeout: float = 30.0) -> list[dict]:
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            assert time.monotonic() < deadline, f"REST consumer got {len(out)} of {n} records in {timeout}s"
            r = self.records()
            assert r.status == 200, r
            assert r.headers["content-type"] == self.accept, r
            out.extend(r.json())
        return out

    def commit(self, offsets: list[dict] | None):
        body = b"" if offsets is None else json.dumps({"offsets": offsets})
        r = post(f"{self.url}/offsets", body=body, headers={"Content-Type": V2})
        assert r.status == 200, r

    def committed(self, partitions: list[dict]) -> dict:
        r = request("GET", f"{self.url}/offsets", body=json.dumps({"partitions": partitions}),
                    headers={"Content-Type": V2})
        assert r.status == 200, r
        return {(o["topic"], o["partition"]): o["offset"] for o in r.json()["offsets"]}

    def delete(self):
        r = request("DELETE", self.url, headers={"Content-Type": V2})
        assert r.status == 204, r


def kafka_committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return {tp.partition: tp.offset
                for tp in c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)}
    finally:
        c.close()


def kafka_partitions_of(bootstrap: str, keys: list[bytes], partitions: int) -> dict:
    """Where librdkafka's murmur2_random partitioner (the Java client's) puts each key."""
    topic = create_topic(bootstrap, topic_name("gw-murmur"), partitions=partitions)
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "acks": "all"})
    where = {}
    for k in keys:
        p.produce(topic, value=b"x", key=k, on_delivery=lambda err, m, k=k: where.__setitem__(k, m.partition()))
    assert p.flush(20) == 0
    return where


# ---- 1. REST Proxy v2 produce / consume ----------------------------------------------


def test_rest_binary_round_trip_exact_bytes(broker):
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-bin"), partitions=3)
    sent = [(bytes([i]) + b"\x00\xff key", bytes(range(256)) * (i + 1)) for i in range(12)]
    sent += [(b"tomb", None), (None, b""), (None, b"\x80\x81 not utf-8 \xfe")]
    t_before = int(time.time() * 1000)
    r = rest_produce(base, topic, [{"key": b64(k), "value": b64(v)} for k, v in sent])
    t_after = int(time.time() * 1000)
    assert r.status == 200, r
    assert r.headers["content-type"] == V2, r
    offsets = r.json()["offsets"]
    assert len(offsets) == len(sent), r
    assert all(o["error_code"] is None and o["error"] is None for o in offsets), r
    got = by_place(consume(bs, topic, partitions=(0, 1, 2)))
    assert len(got) == len(sent)
    request_ids = set()
    for (k, v), o in zip(sent, offsets):
        rec = got[(o["partition"], o["offset"])]
        assert (rec.key, rec.value) == (k, v), f"record at {o} differs"
        hdrs = dict(rec.headers)
        assert t_before <= int(hdrs["freshet-received-at"]) <= t_after, hdrs
        request_ids.add(hdrs["freshet-request-id"])
    assert len(request_ids) == 1, "one request, one request id"
    # Keys are partitioned as the Java client (and librdkafka's murmur2_random) does.
    keyed = [k for k, _ in sent if k is not None]
    want = kafka_partitions_of(bs, keyed, 3)
    for (k, _), o in zip(sent, offsets):
        if k is not None:
            assert o["partition"] == want[k], f"key {k!r}: gateway partition {o['partition']}, Kafka's {want[k]}"

    # A pinned partition, by path and per record.
    r = rest_produce(base, topic, [{"value": b64(b"p2-%d" % i)} for i in range(3)], partition=2)
    assert r.status == 200 and [o["partition"] for o in r.json()["offsets"]] == [2, 2, 2], r
    r = rest_produce(base, topic, [{"value": b64(b"p1"), "partition": 1}])
    assert r.status == 200 and r.json()["offsets"][0]["partition"] == 1, r
    total = len(sent) + 4

    # Read back through a REST consumer in the binary format.
    group = f"g-{topic}"
    c = RestConsumer(base, group, "binary")
    try:
        c.subscribe([topic])
        assert_error(c.records(accept=JSONV2), 406)
        recs = c.read(total)
        assert len(recs) == total, "no record twice"
        kafka = by_place(consume(bs, topic, partitions=(0, 1, 2)))
        for rec in recs:
            assert rec["topic"] == topic
            k = kafka[(rec["partition"], rec["offset"])]
            assert (unb64(rec["key"]), unb64(rec["value"])) == (k.key, k.value), rec
        # Explicit commit: REST Proxy semantics, the committed offset is the next one to read.
        last = {}
        for rec in recs:
            last[rec["partition"]] = max(last.get(rec["partition"], -1), rec["offset"])
        c.commit([{"topic": topic, "partition": 0, "offset": last[0]}])
        assert kafka_committed(bs, group, topic, 3)[0] == last[0] + 1
        parts = [{"topic": topic, "partition": p} for p in range(3)]
        assert c.committed(parts)[(topic, 0)] == last[0] + 1
        # An empty body commits everything returned so far.
        c.commit(None)
        ends = end_offsets(bs, topic, 3)
        assert kafka_committed(bs, group, topic, 3) == {p: ends[p] for p in range(3)}
        assert c.committed(parts) == {(topic, p): ends[p] for p in range(3)}
    finally:
        c.delete()
    assert_error(c.records(), 404, 40403)
    assert_error(request("DELETE", c.url), 404, 40403)


def test_rest_json_round_trip(broker):
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-json"), partitions=2)
    values = [{"poll": "p1", "choice": "a", "n": 1}, [1, 2, {"x": None}], "text \u00e9\u6f22", 42, 1.5,
              True, {"nested": {"deep": [{"a": "b"}]}}, None]
    keys = ["voter-1", {"id": 7}, None, "voter-1", 3, None, "voter-2", "voter-3"]
    r = rest_produce(base, topic, [{"key": k, "value": v} for k, v in zip(keys, values)], fmt=JSONV2)
    assert r.status == 200, r
    offsets = r.json()["offsets"]
    assert all(o["error_code"] is None for o in offsets), r
    got = by_place(consume(bs, topic, partitions=(0, 1)))
    for k, v, o in zip(keys, values, offsets):
        rec = got[(o["partition"], o["offset"])]
        assert (None if rec.key is None else json.loads(rec.key)) == k
        assert (None if rec.value is None else json.loads(rec.value)) == v
    # The two "voter-1" records share a partition.
    assert offsets[0]["partition"] == offsets[3]["partition"]

    c = RestConsumer(base, f"g-{topic}", "json")
    try:
        c.subscribe([topic])
        assert_error(c.records(accept=BINARY), 406)
        recs = c.read(len(values))
        assert len(recs) == len(values)
        want = {(o["partition"], o["offset"]): (k, v) for k, v, o in zip(keys, values, offsets)}
        assert {(x["partition"], x["offset"]): (x["key"], x["value"]) for x in recs} == want
    finally:
        c.delete()


def test_rest_topic_listing_and_unknown_targets(broker):
    base, bs = broker.http, broker.bootstrap
    t1 = create_topic(bs, topic_name("gw-list"), partitions=3)
    t2 = create_topic(bs, topic_name("gw-list"))
    # A schema makes the gateway's own schema topic exist; it is not listed.
    assert request("PUT", f"{base}/topics/{t2}/schema", json_body={"type": "object"}).status == 204
    r = get(f"{base}/topics")
    assert r.status == 200 and r.headers["content-type"] == V2, r
    names = r.json()
    assert t1 in names and t2 in names, names
    assert "_freshet_schemas" not in names and not any(n.startswith("__") for n in names), names
    r = get(f"{base}/topics/{t1}")
    assert r.status == 200, r
    d = r.json()
    assert d["name"] == t1 and sorted(p["partition"] for p in d["partitions"]) == [0, 1, 2], d
    for p in d["partitions"]:
        assert [x["leader"] for x in p["replicas"] if x["broker"] == p["leader"]] == [True], p
        assert all(x["in_sync"] for x in p["replicas"]), p
    r = get(f"{base}/topics/{t1}/partitions")
    assert r.status == 200 and sorted(p["partition"] for p in r.json()) == [0, 1, 2], r

    missing = topic_name("gw-missing")
    assert_error(get(f"{base}/topics/{missing}"), 404, 40401)
    assert_error(get(f"{base}/topics/{missing}/partitions"), 404, 40401)
    assert_error(rest_produce(base, missing, [{"value": b64(b"x")}]), 404, 40401)
    assert_error(rest_produce(base, t1, [{"value": b64(b"x")}], partition=7), 404, 40402)
    assert_error(rest_produce(base, t1, [{"value": b64(b"x"), "partition": 3}]), 404, 40402)
    assert end_offsets(bs, t1, 3) == [0, 0, 0]
    assert missing not in get(f"{base}/topics").json(), "a refused produce must not create the topic"
    assert request("DELETE", f"{base}/topics/{t2}/schema").status == 204


def test_rest_consumer_assign_seek_and_lifecycle(broker):
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-seek"), partitions=2)
    r = rest_produce(base, topic, [{"value": i} for i in range(6)], fmt=JSONV2, partition=0)
    assert r.status == 200, r
    group = f"g-{topic}"
    body = json.dumps({"name": "c1", "format": "json"})
    r = post(f"{base}/consumers/{group}", body=body, headers={"Content-Type": V2})
    assert r.status == 200 and r.json()["instance_id"] == "c1", r
    assert_error(post(f"{base}/consumers/{group}", body=body, headers={"Content-Type": V2}), 409, 40902)
    assert_error(post(f"{base}/consumers/{group}", body=json.dumps({"format": "avro"}), headers={"Content-Type": V2}),
                 422)
    url = f"{base}/consumers/{group}/instances/c1"
    parts = {"partitions": [{"topic": topic, "partition": 0}, {"topic": topic, "partition": 1}]}
    try:
        r = post(f"{url}/assignments", body=json.dumps(parts), headers={"Content-Type": V2})
        assert r.status == 204, r
        r = get(f"{url}/assignments")
        assert r.status == 200, r
        assert sorted((p["topic"], p["partition"]) for p in r.json()["partitions"]) == [(topic, 0), (topic, 1)]

        def read_values(want: int):
            out = []
            deadline = time.monotonic() + 20
            while len(out) < want:
                assert time.monotonic() < deadline, f"got {out}, wanted {want} records"
                r = get(f"{url}/records?timeout=500", headers={"Accept": JSONV2})
                assert r.status == 200, r
                out += [(x["partition"], x["offset"], x["value"]) for x in r.json()]
            return out

        # A seek right after the assignment is test_seek_right_after_assign's; here it
        # may be retried until librdkafka has started the partition.
        seek3 = json.dumps({"offsets": [{"topic": topic, "partition": 0, "offset": 3}]})
        wait_until(lambda: post(f"{url}/positions", body=seek3, headers={"Content-Type": V2}).status == 204,
                   timeout=10, what="a seek to be accepted")
        assert read_values(3) == [(0, 3, 3), (0, 4, 4), (0, 5, 5)]
        one = {"partitions": [{"topic": topic, "partition": 0}]}
        r = post(f"{url}/positions/beginning", body=json.dumps(one), headers={"Content-Type": V2})
        assert r.status == 204, r
        assert read_values(6) == [(0, i, i) for i in range(6)]
        r = post(f"{url}/positions/end", body=json.dumps(one), headers={"Content-Type": V2})
        assert r.status == 204, r
        assert rest_produce(base, topic, [{"value": "after-end"}], fmt=JSONV2, partition=0).status == 200
        assert read_values(1) == [(0, 6, "after-end")], "after seeking to the end only new records come"
    finally:
        assert request("DELETE", url).status == 204
    assert_error(get(f"{url}/assignments"), 404, 40403)
    assert_error(post(f"{url}/subscription", body=json.dumps({"topics": [topic]}), headers={"Content-Type": V2}),
                 404, 40403)


def test_seek_right_after_assign(broker):
    """A REST client assigns partitions and seeks at once (the Java consumer behind the
    Confluent REST Proxy allows a seek as soon as the partition is assigned)."""
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-seek0"))
    assert rest_produce(base, topic, [{"value": i} for i in range(4)], fmt=JSONV2).status == 200
    c = RestConsumer(base, f"g-{topic}", "json")
    try:
        r = post(f"{c.url}/assignments", body=json.dumps({"partitions": [{"topic": topic, "partition": 0}]}),
                 headers={"Content-Type": V2})
        assert r.status == 204, r
        r = post(f"{c.url}/positions", body=json.dumps({"offsets": [{"topic": topic, "partition": 0, "offset": 2}]}),
                 headers={"Content-Type": V2})
        assert r.status == 204, f"seek right after the assignment: {r}"
        assert [x["value"] for x in c.read(2)] == [2, 3]
    finally:
        c.delete()


def test_subscription_endpoint_and_latest_reset(broker):
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-sub"))
    assert rest_produce(base, topic, [{"value": "old"}], fmt=JSONV2).status == 200
    c = RestConsumer(base, f"g-{topic}", "json", reset="latest")
    try:
        c.subscribe([topic])
        r = get(f"{c.url}/subscription")
        assert r.status == 200 and r.json() == {"topics": [topic]}, r
        # The group assigns partitions while the instance polls (as with the REST Proxy):
        # poll (empty answers) until it has the partition, then produce.
        def assigned():
            r = c.records(timeout_ms=200)
            assert r.status == 200 and r.json() == [], r
            return get(f"{c.url}/assignments").json()["partitions"]
        wait_until(assigned, timeout=20, what="the group to assign the partition")
        # Where "latest" lands is settled asynchronously after the assignment: produce
        # until something arrives; "old" must never be among it.
        got, i = [], 0
        deadline = time.monotonic() + 20
        while not got:
            assert time.monotonic() < deadline, "nothing new arrived in 20 s"
            assert rest_produce(base, topic, [{"value": f"new-{i}"}], fmt=JSONV2).status == 200
            i += 1
            r = c.records(timeout_ms=300)
            assert r.status == 200, r
            got += [x["value"] for x in r.json()]
        assert "old" not in got and all(v.startswith("new-") for v in got), got
        r = request("DELETE", f"{c.url}/subscription")
        assert r.status == 204, r
        assert get(f"{c.url}/subscription").json() == {"topics": []}
    finally:
        c.delete()


# ---- 2. /ingest -------------------------------------------------------------------------


def test_ingest_json_and_form(broker):
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-ingest"), partitions=3)
    raw = b'{"poll": "p1",   "choice": "a", "note": "caf\xc3\xa9"}'
    sent = []  # (answer, expected key, expected value bytes)
    t0 = int(time.time() * 1000)
    r = ingest(base, topic, body=raw, key="voter-1", headers={"Content-Type": "application/json"})
    assert r.status == 202, r
    sent.append((r, b"voter-1", raw))
    form = "name=Ann+Lee&vote=a%26b&vote=c&empty=&city=M%C3%BCnchen"
    r = ingest(base, topic, body=form, headers={"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"})
    assert r.status == 202, r
    form_doc = {"name": "Ann Lee", "vote": ["a&b", "c"], "empty": "", "city": "M\u00fcnchen"}
    sent.append((r, None, form_doc))
    r = ingest(base, topic, doc={"pinned": True}, partition=2)
    assert r.status == 202 and r.json()["partition"] == 2, r
    sent.append((r, None, b'{"pinned": true}'))
    t1 = int(time.time() * 1000)

    got = by_place(consume(bs, topic, partitions=(0, 1, 2)))
    assert len(got) == 3
    ids = set()
    for resp, key, value in sent:
        a = resp.json()
        assert a["topic"] == topic and a["spooled"] is False, a
        assert resp.headers["x-request-id"] == a["request_id"], resp
        rec = got[(a["partition"], a["offset"])]
        assert rec.key == key
        if isinstance(value, dict):
            assert json.loads(rec.value) == value, rec.value
        else:
            assert rec.value == value, "a JSON body is stored exactly as sent"
        hdrs = dict(rec.headers)
        assert hdrs["freshet-request-id"].decode() == a["request_id"]
        received = int(hdrs["freshet-received-at"])
        assert t0 <= received <= t1, (t0, received, t1)
        assert rec.timestamp == received, "the record's CreateTime is when the gateway received it"
        ids.add(a["request_id"])
    assert len(ids) == 3

    # Bytes that are not UTF-8 in a form value are refused, not replaced.
    assert_error(ingest(base, topic, body="name=%FF%FE", headers={"Content-Type": "application/x-www-form-urlencoded"}),
                 422)
    assert sum(end_offsets(bs, topic, 3)) == 3


def test_ingest_idempotency_key_stores_once(broker):
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-idem"))
    doc = {"form": "signup", "email": "a@example.com"}
    hdr = {"Idempotency-Key": "req-1"}
    replays_before = metric(metrics(base), "freshet_gateway_idempotent_replays_total")
    first = ingest(base, topic, doc=doc, headers=hdr)
    assert first.status == 202 and "idempotent-replayed" not in first.headers, first
    for _ in range(3):
        again = ingest(base, topic, doc=doc, headers=hdr)
        assert again.status == 202, again
        assert again.json() == first.json(), "a retry gets the first answer"
        assert again.headers.get("idempotent-replayed") == "true", again
    assert end_offsets(bs, topic) == [1]
    # Same key, different request: refused, nothing stored.
    assert_error(ingest(base, topic, doc={**doc, "email": "b@example.com"}, headers=hdr), 422)
    assert_error(ingest(base, topic, doc=doc, key="other-key", headers=hdr), 422)
    assert end_offsets(bs, topic) == [1]
    # Concurrent first attempts with one key: one record, one answer for all.
    hdr2 = {"Idempotency-Key": "req-2"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ingest(base, topic, doc={"n": 2}, headers=hdr2), range(8)))
    assert all(a.status == 202 for a in answers), answers
    assert len({json.dumps(a.json(), sort_keys=True) for a in answers}) == 1, answers
    assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == 7, answers
    assert metric(metrics(base), "freshet_gateway_idempotent_replays_total") - replays_before == 3 + 7
    # A first attempt that failed is not remembered: its retry runs again.
    hdr3 = {"Idempotency-Key": "req-3"}
    assert_error(ingest(base, topic, doc={"n": 3}, partition=5, headers=hdr3), 404, 40402)
    assert_error(ingest(base, topic, doc={"n": 3}, partition=5, headers=hdr3), 404, 40402)
    # The key is per topic: another topic stores its own record.
    other = create_topic(bs, topic_name("gw-idem"))
    assert ingest(base, other, doc=doc, headers=hdr).status == 202
    recs = consume(bs, topic)
    assert [json.loads(r.value) for r in recs] == [doc, {"n": 2}]
    assert end_offsets(bs, other) == [1]


def test_idempotency_key_retry_through_another_gateway_stores_once(broker, gateway_factory):
    """Gateways scale out behind a load balancer, so a client's retry may reach another
    gateway of the same cluster; it must still be stored once (issue 5: "a client
    retry is stored once")."""
    bs = broker.bootstrap
    gw_b = gateway_factory(brokers=bs)
    topic = create_topic(bs, topic_name("gw-idem-lb"))
    hdr = {"Idempotency-Key": "lb-retry-1"}
    first = ingest(broker.http, topic, doc={"order": 1}, headers=hdr)
    assert first.status == 202, first
    retry = ingest(gw_b.http, topic, doc={"order": 1}, headers=hdr)
    assert retry.status == 202, retry
    assert end_offsets(bs, topic) == [1], "a retry through another gateway stored the record again"
    assert retry.json() == first.json() and retry.headers.get("idempotent-replayed") == "true", retry


def test_ingest_unknown_topic_partition_and_bad_names(broker):
    base, bs = broker.http, broker.bootstrap
    missing = topic_name("gw-nope")
    assert_error(ingest(base, missing, doc={"a": 1}), 404, 40401)
    topic = create_topic(bs, topic_name("gw-parts"), partitions=2)
    assert_error(ingest(base, topic, doc={"a": 1}, partition=2), 404, 40402)
    assert_error(ingest(base, topic, doc={"a": 1}, partition=-1), 404, 40402)
    for bad in ["bad%20name", "a%2Fb", "..", "x" * 250]:
        assert_error(post(f"{base}/ingest/{bad}", json_body={"a": 1}), 400)
    assert end_offsets(bs, topic, 2) == [0, 0]
    assert missing not in get(f"{base}/topics").json(), "a refused ingest must not create the topic"


# ---- 3. JSON Schemas -----------------------------------------------------------------------

VOTE_SCHEMA = {
    "type": "object",
    "required": ["poll", "choice"],
    "properties": {
        "poll": {"type": "string", "minLength": 1},
        "choice": {"enum": ["a", "b", "c"]},
        "voters": {"type": "array", "items": {"type": "integer"}},
    },
    "additionalProperties": False,
}


def violations(resp) -> list[str]:
    body = assert_error(resp, 422)
    vs = body.get("violations")
    assert isinstance(vs, list) and vs, f"422 without violations: {resp}"
    assert all(isinstance(v["message"], str) and v["message"] for v in vs), vs
    return sorted(v["pointer"] for v in vs)


def test_schema_violations_leave_the_topic_untouched(broker):
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-schema"))
    url = f"{base}/topics/{topic}/schema"
    assert_error(get(url), 404)
    r = request("PUT", url, json_body=VOTE_SCHEMA)
    assert r.status == 204, r
    r = get(url)
    assert r.status == 200 and r.json() == VOTE_SCHEMA, r
    before = metric(metrics(base), "freshet_gateway_validation_failures_total")

    assert violations(ingest(base, topic, doc={"poll": "", "choice": "z", "voters": [1, "x"], "extra": 1})) \
        == ["", "/choice", "/poll", "/voters/1"]
    assert violations(ingest(base, topic, doc={})) == ["", ""], "both missing required properties"
    assert violations(ingest(base, topic, doc=[1, 2])) == [""]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert violations(ingest(base, topic, body="poll=p1&choice=z", headers=form)) == ["/choice"]
    # REST produce validates every record first: one bad record writes nothing.
    batch = [{"value": {"poll": "p1", "choice": "a"}}, {"value": {"poll": "p1", "choice": "q", "voters": ["x"]}},
             {"value": {"poll": "p2", "choice": "b"}}]
    r = rest_produce(base, topic, batch, fmt=JSONV2)
    assert violations(r) == ["/records/1/value/choice", "/records/1/value/voters/0"]
    assert r.json()["error_code"] == 42203, r
    r = rest_produce(base, topic, [{"value": b64(b'{"poll":"p","choice":"a"}')}, {"value": b64(b"\xffnot json")}])
    assert violations(r) == ["/records/1/value"]
    assert end_offsets(bs, topic) == [0], "a refused record must leave the topic untouched"
    after = metric(metrics(base), "freshet_gateway_validation_failures_total")
    assert after - before == 6, (before, after)

    ok = ingest(base, topic, doc={"poll": "p1", "choice": "a", "voters": [1, 2]})
    assert ok.status == 202, ok
    assert ingest(base, topic, body="poll=p1&choice=b", headers=form).status == 202
    r = rest_produce(base, topic, [batch[0], batch[2]], fmt=JSONV2)
    assert r.status == 200, r
    r = rest_produce(base, topic, [{"value": b64(b'{"poll":"p","choice":"c"}')}])
    assert r.status == 200, r
    assert end_offsets(bs, topic) == [5]

    # A schema that is not one is refused; so is a body that is not JSON.
    assert_error(request("PUT", url, json_body={"type": "no-such-type"}), 422)
    assert_error(request("PUT", url, body=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert get(url).json() == VOTE_SCHEMA, "a refused schema must not replace the topic's"
    # Deleted: anything goes again.
    assert request("DELETE", url).status == 204
    assert_error(get(url), 404)
    assert_error(request("DELETE", url), 404)
    assert ingest(base, topic, doc={"anything": "goes"}).status == 202
    assert end_offsets(bs, topic) == [6]


def test_schema_set_on_one_gateway_applies_on_another(broker, gateway_factory, report):
    base_a, bs = broker.http, broker.bootstrap
    gw_b = gateway_factory(brokers=bs)
    topic = create_topic(bs, topic_name("gw-xschema"))
    bad = {"poll": "p", "choice": "nope"}
    t0 = time.monotonic()
    assert request("PUT", f"{base_a}/topics/{topic}/schema", json_body=VOTE_SCHEMA).status == 204
    wait_until(lambda: get(f"{gw_b.http}/topics/{topic}/schema").status == 200, timeout=10,
               what="gateway B to see the schema set on gateway A")
    seen_s = time.monotonic() - t0
    assert get(f"{gw_b.http}/topics/{topic}/schema").json() == VOTE_SCHEMA
    assert violations(ingest(gw_b.http, topic, doc=bad)) == ["/choice"]
    assert end_offsets(bs, topic) == [0]
    assert ingest(gw_b.http, topic, doc={"poll": "p", "choice": "a"}).status == 202
    # A deletion on A reaches B too.
    assert request("DELETE", f"{base_a}/topics/{topic}/schema").status == 204
    wait_until(lambda: get(f"{gw_b.http}/topics/{topic}/schema").status == 404, timeout=10,
               what="gateway B to see the deletion")
    assert ingest(gw_b.http, topic, doc=bad).status == 202
    # A gateway started later reads the schema topic from the start.
    assert request("PUT", f"{base_a}/topics/{topic}/schema", json_body=VOTE_SCHEMA).status == 204
    gw_c = gateway_factory(brokers=bs)
    wait_until(lambda: get(f"{gw_c.http}/topics/{topic}/schema").status == 200, timeout=10,
               what="a new gateway to load the schema")
    assert violations(ingest(gw_c.http, topic, doc=bad)) == ["/choice"]
    assert end_offsets(bs, topic) == [2]
    report("gateway", f"schema propagation A -> B: {seen_s * 1000:.0f} ms")


def test_schema_from_config_file(broker, gateway_factory, tmp_path):
    bs = broker.bootstrap
    topic = create_topic(bs, topic_name("gw-cfgschema"))
    schema_file = tmp_path / "votes.schema.json"
    schema_file.write_text(json.dumps(VOTE_SCHEMA))
    gw = gateway_factory(brokers=bs, config=f'[http.schemas]\n"{topic}" = "{schema_file}"\n')
    assert get(f"{gw.http}/topics/{topic}/schema").json() == VOTE_SCHEMA
    assert violations(ingest(gw.http, topic, doc={"poll": 1, "choice": "a"})) == ["/poll"]
    assert end_offsets(bs, topic) == [0]
    assert ingest(gw.http, topic, doc={"poll": "p", "choice": "c"}).status == 202
    assert end_offsets(bs, topic) == [1]


# ---- 4. Server-Sent Events -----------------------------------------------------------------


def stream_path(topic: str, **q) -> str:
    return f"/topics/{topic}/stream" + (f"?{urllib.parse.urlencode(q)}" if q else "")


def check_ids(first, events):
    """Each event's id is the previous positions with its own partition moved past it."""
    pos = first.positions()
    for e in events:
        d = e.json()
        assert d["offset"] == pos[d["partition"]], f"event {d['partition']}:{d['offset']} after positions {pos}"
        pos = {**pos, d["partition"]: d["offset"] + 1}
        assert e.positions() == pos, (e.id, pos)
    return pos


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def test_stream_latency_under_100_ms(broker, report):
    base = broker.http
    topic = create_topic(broker.bootstrap, topic_name("gw-sse-lat"))
    ingest(base, topic, doc={"warm": "up"})  # the gateway knows the topic; the partition is not empty
    n = 50
    with SseStream(base, stream_path(topic, **{"from": "latest"})) as s:
        assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream"), s.headers
        first = s.next()
        assert first.data is None and first.positions() == {0: 1}, first
        after_202, after_post, events = [], [], []
        for i in range(n):
            doc = {"vote": i, "poll": "lat"}
            t_post = time.monotonic()
            r = ingest(base, topic, doc=doc)
            t_202 = time.monotonic()
            assert r.status == 202, r
            e = s.next(timeout=5)
            d = e.json()
            assert (d["offset"], d["value"]) == (r.json()["offset"], doc), d
            assert d["headers"]["freshet-request-id"] == r.json()["request_id"]
            after_202.append(e.t - t_202)
            after_post.append(e.t - t_post)
            events.append(e)
        check_ids(first, events)
    ms = lambda x: f"{x * 1000:.1f}"  # noqa: E731
    report("gateway", f"SSE latency over {n} records, 202 -> event: p50 {ms(pct(after_202, 50))} ms, "
                      f"p99 {ms(pct(after_202, 99))} ms, max {ms(max(after_202))} ms; "
                      f"POST sent -> event: p50 {ms(pct(after_post, 50))} ms, max {ms(max(after_post))} ms")
    assert max(after_202) < 0.100, f"slowest event {ms(max(after_202))} ms after its 202 (all: {sorted(after_202)[-5:]})"


def test_stream_resume_with_last_event_id(broker):
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-sse-resume"), partitions=3)

    def produce_n(n, tag):
        r = rest_produce(base, topic, [{"key": f"k{i % 7}", "value": {"tag": tag, "i": i}} for i in range(n)],
                         fmt=JSONV2)
        assert r.status == 200, r
        return [(o["partition"], o["offset"]) for o in r.json()["offsets"]]

    with SseStream(base, stream_path(topic)) as s:
        first = s.next()
        assert first.positions() == {0: 0, 1: 0, 2: 0} and first.data is None, first
        placed = produce_n(12, "a")
        got = s.take(5)
        resume_id = got[-1].id
        check_ids(first, got)
    placed += produce_n(9, "b")  # while disconnected
    resume_at = got[-1].positions()
    want = sorted(p for p in placed if p[1] >= resume_at[p[0]])
    assert len(want) == 21 - 5
    with SseStream(base, stream_path(topic), headers={"Last-Event-ID": resume_id}) as s:
        again = s.next()
        assert again.id == resume_id and again.data is None, "a resumed stream first repeats where it is"
        missed = s.take(len(want))
        check_ids(again, missed)
        assert sorted((e.json()["partition"], e.json()["offset"]) for e in missed) == want, "exactly the missed ones"
        # Nothing else was pending: the next event is the next record produced.
        sentinel = produce_n(1, "sentinel")[0]
        e = s.next()
        assert (e.json()["partition"], e.json()["offset"]) == sentinel and e.json()["value"]["tag"] == "sentinel"
    # A malformed Last-Event-ID is refused.
    r = get(f"{base}{stream_path(topic)}", headers={"Last-Event-ID": "zero:five"})
    assert_error(r, 400)


def test_stream_from_earliest_offset_and_partition(broker):
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-sse-from"), partitions=2)
    for p, n in [(0, 10), (1, 6)]:
        r = rest_produce(base, topic, [{"key": b64(b"k%d" % i), "value": b64(json.dumps(f"p{p}-{i}").encode())}
                                       for i in range(n)], partition=p)
        assert r.status == 200, r

    def values(events):
        return {(e.json()["partition"], e.json()["offset"]): e.json()["value"] for e in events}

    with SseStream(base, stream_path(topic, **{"from": "earliest"})) as s:
        first = s.next()
        assert first.positions() == {0: 0, 1: 0}, first
        evs = s.take(16)
        check_ids(first, evs)
        assert values(evs) == {(p, i): f"p{p}-{i}" for p, n in [(0, 10), (1, 6)] for i in range(n)}
    with SseStream(base, stream_path(topic, **{"from": "earliest", "format": "binary"})) as s:
        s.next()
        evs = s.take(16)
        assert {k: unb64(v) for k, v in values(evs).items()} == \
            {(p, i): json.dumps(f"p{p}-{i}").encode() for p, n in [(0, 10), (1, 6)] for i in range(n)}
        assert unb64(evs[0].json()["key"]).startswith(b"k")
    with SseStream(base, stream_path(topic, **{"from": "3"})) as s:
        first = s.next()
        assert first.positions() == {0: 3, 1: 3}, first
        evs = s.take(7 + 3)
        check_ids(first, evs)
        assert sorted(values(evs)) == [(0, i) for i in range(3, 10)] + [(1, i) for i in range(3, 6)]
    with SseStream(base, stream_path(topic, **{"from": "4", "partition": "1"})) as s:
        first = s.next()
        assert first.positions() == {1: 4}, first
        evs = s.take(2)
        assert sorted(values(evs)) == [(1, 4), (1, 5)]
        # A record in another partition is not for this stream; the next one in 1 is.
        assert rest_produce(base, topic, [{"value": b64(b"other")}], partition=0).status == 200
        assert rest_produce(base, topic, [{"value": b64(b"mine")}], partition=1).status == 200
        e = s.next()
        assert (e.json()["partition"], e.json()["offset"]) == (1, 6), e
    assert_error(get(f"{base}{stream_path(topic, **{'from': 'yesterday'})}"), 400)
    assert_error(get(f"{base}{stream_path(topic, format='avro')}"), 400)
    assert_error(get(f"{base}{stream_path(topic, partition='5')}"), 404, 40402)
    assert_error(get(f"{base}{stream_path(topic_name('gw-nope'))}"), 404)


def test_stream_catch_up_joins_the_shared_reader_without_gaps(broker, gateway_factory):
    """A subscriber that starts before what the shared reader holds reads privately,
    then joins it: with a 5-record buffer and records arriving meanwhile, it gets
    every record once, in order, and then the live ones."""
    bs = broker.bootstrap
    gw = gateway_factory(brokers=bs, env={"FRESHET_HTTP_STREAM_BUFFER_RECORDS": "5"})
    topic = create_topic(bs, topic_name("gw-sse-catchup"), partitions=2)

    def produce_n(n, tag):
        r = rest_produce(gw.http, topic, [{"key": f"k{i}", "value": {"tag": tag, "i": i}} for i in range(n)],
                         fmt=JSONV2)
        assert r.status == 200, r
        return [(o["partition"], o["offset"]) for o in r.json()["offsets"]]

    placed = produce_n(40, "before")
    with SseStream(gw.http, stream_path(topic)) as live:
        live.next()  # the shared reader is now at the end
        stop = threading.Event()

        def trickle():
            i = 0
            while not stop.is_set() and i < 60:
                placed.extend(produce_n(1, f"during-{i}"))
                i += 1

        t = threading.Thread(target=trickle)
        t.start()
        try:
            with SseStream(gw.http, stream_path(topic, **{"from": "earliest"})) as s:
                first = s.next()
                assert first.positions() == {0: 0, 1: 0}, first
                t.join(timeout=60)
                evs = s.take(len(placed), timeout=30)
                check_ids(first, evs)
                assert sorted((e.json()["partition"], e.json()["offset"]) for e in evs) == sorted(placed)
                sentinel = produce_n(1, "sentinel")[0]
                e = s.next()
                assert (e.json()["partition"], e.json()["offset"]) == sentinel, e
        finally:
            stop.set()
            t.join(timeout=60)
        # The live subscriber, served from the buffer all along, saw everything after its start.
        evs = live.take(61, timeout=30)
        assert [e.json()["value"]["tag"] for e in evs if e.json()["value"]["tag"] == "sentinel"] == ["sentinel"]


def test_stream_of_a_topic_created_after_a_404(broker):
    base, bs = broker.http, broker.bootstrap
    name = topic_name("gw-sse-late")
    assert_error(get(f"{base}{stream_path(name)}"), 404)
    create_topic(bs, name)
    # The gateway may still remember the answer for a moment; it must not for long.
    def opens():
        s = SseStream(base, stream_path(name))
        if s.status != 200:
            return None
        return s
    s = wait_until(opens, timeout=10, what="a stream of the new topic")
    with s:
        assert s.next().positions() == {0: 0}
        assert ingest(base, name, doc={"late": True}).status == 202
        assert s.next().json()["value"] == {"late": True}


def test_stream_thousand_subscribers_share_one_reader(broker_factory, report):
    n_subs, n_records = 1000, 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * n_subs:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * n_subs), hard))
    b = broker_factory(env={"FRESHET_HTTP_LISTEN": "127.0.0.1:0"})
    base = b.http
    topic = create_topic(b.bootstrap, topic_name("gw-sse-1000"), partitions=2)
    placed: list[tuple[int, int]] = []
    timings = {}

    async def subscriber(i, ready, start_gate, out):
        status, hdrs, events, writer = await sse_async(base, stream_path(topic))
        assert status == 200, (i, status, hdrs)
        got = []
        try:
            async for e in events:
                if e.data is None:
                    ready.append(e.positions())
                    if len(ready) == n_subs:
                        start_gate.set()
                    continue
                d = json.loads(e.data)
                got.append((d["partition"], d["offset"]))
                if len(got) == n_records:
                    timings[i] = e.t
                    break
        finally:
            writer.close()
        out[i] = got

    async def main():
        ready, out = [], {}
        start_gate = asyncio.Event()
        connect_gate = asyncio.Semaphore(100)

        async def one(i):
            async with connect_gate:
                pass
            await subscriber(i, ready, start_gate, out)

        tasks = [asyncio.create_task(one(i)) for i in range(n_subs)]
        await asyncio.wait_for(start_gate.wait(), timeout=60)
        assert all(p == {0: 0, 1: 0} for p in ready), "every subscriber starts at the end"
        loop = asyncio.get_running_loop()
        m = await loop.run_in_executor(None, metrics, base)
        assert metric(m, "freshet_gateway_stream_subscribers") == n_subs
        assert metric(m, "freshet_gateway_stream_readers") == 1
        h = await loop.run_in_executor(None, health, base)
        assert h["streams"] == {"subscribers": n_subs, "readers": 1}, h
        t_burst = time.monotonic()

        def burst():
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(lambda i: ingest(base, topic, doc={"i": i}, key=f"k{i}"), range(n_records)))
            assert all(a.status == 202 for a in answers), [a for a in answers if a.status != 202][:3]
            placed.extend((a.json()["partition"], a.json()["offset"]) for a in answers)
            return time.monotonic()

        t_last_202 = await loop.run_in_executor(None, burst)
        done, pending = await asyncio.wait(tasks, timeout=60)
        for t in pending:
            t.cancel()
        for t in done:
            t.result()
        assert not pending, f"{len(pending)} subscribers did not get all {n_records} records in 60 s"
        m = await loop.run_in_executor(None, metrics, base)
        assert metric(m, "freshet_gateway_stream_readers") == 1
        return out, t_burst, t_last_202

    out, t_burst, t_last_202 = asyncio.run(main())
    want = sorted(placed)
    for i, got in out.items():
        assert sorted(got) == want and len(set(got)) == n_records, f"subscriber {i}"
        for p in (0, 1):
            offs = [o for q, o in got if q == p]
            assert offs == sorted(offs), f"subscriber {i} partition {p} out of order"
    report("gateway", f"{n_subs} SSE subscribers x {n_records} records: burst posted in "
                      f"{(t_last_202 - t_burst) * 1000:.0f} ms, last subscriber complete "
                      f"{(max(timings.values()) - t_last_202) * 1000:.0f} ms after the last 202; one reader")
    wait_until(lambda: metric(metrics(base), "freshet_gateway_stream_subscribers") == 0, timeout=20,
               what="subscribers to be counted off after disconnecting")


# ---- 7. limits and bad input ---------------------------------------------------------------


def test_body_over_max_body_bytes_gets_413_and_writes_nothing(broker, gateway_factory):
    bs = broker.bootstrap
    gw = gateway_factory(brokers=bs, env={"FRESHET_HTTP_MAX_BODY_BYTES": "4096"})
    topic = create_topic(bs, topic_name("gw-413"))
    big = json.dumps({"pad": "x" * 5000})
    r1 = ingest(gw.http, topic, body=big, headers={"Content-Type": "application/json"})
    r2 = rest_produce(gw.http, topic, [{"value": b64(b"x" * 4000)}])
    r3 = post(f"{gw.http}/ingest/{topic}", body=big, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert end_offsets(bs, topic) == [0], "nothing refused may be written"
    assert ingest(gw.http, topic, doc={"pad": "x" * 3000}).status == 202, "under the limit passes"
    for r in (r1, r2, r3):
        assert_error(r, 413)


def test_limits_and_bad_input_write_nothing(broker, gateway_factory):
    bs = broker.bootstrap
    gw = gateway_factory(brokers=bs, env={"FRESHET_HTTP_MAX_RECORD_BYTES": "2000"})
    base = gw.http
    topic = create_topic(bs, topic_name("gw-limits"))
    record_too_big = json.dumps({"pad": "x" * 3000})  # under the body limit, over the record limit
    assert_error(ingest(base, topic, body=record_too_big, headers={"Content-Type": "application/json"}), 413)
    assert_error(rest_produce(base, topic, [{"value": b64(b"y" * 2500)}]), 413)
    assert_error(ingest(base, topic, body="hello", headers={"Content-Type": "text/plain"}), 415)
    assert_error(ingest(base, topic, body='{"a": 1}'), 415)  # no content type
    assert_error(ingest(base, topic, body='{"a": 1}', headers={"Content-Type": "application/json; charset=latin-1"}),
                 415)
    assert_error(rest_produce(base, topic, [{"value": {"a": 1}}], fmt="application/vnd.kafka.avro.v2+json"), 415)
    for bad in ['{"a": ', "not json", '{"a": 1} trailing', b'{"a": "\xff"}']:
        assert_error(ingest(base, topic, body=bad, headers={"Content-Type": "application/json"}), 400)
    assert_error(post(f"{base}/topics/{topic}", body="{nope", headers={"Content-Type": BINARY}), 422)
    assert_error(rest_produce(base, topic, []), 422)
    assert_error(rest_produce(base, topic, [{"value": "***not base64***"}]), 422)
    assert end_offsets(bs, topic) == [0], "nothing refused may be written"
    assert ingest(base, topic, doc={"small": True}).status == 202
    assert end_offsets(bs, topic) == [1]


def test_every_error_answer_is_the_json_error_body(broker):
    """Malformed parameters, unknown routes and wrong methods get the same JSON error
    body as every other refusal (the REST Proxy's form), not a framework's text."""
    base, bs = broker.http, broker.bootstrap
    topic = create_topic(bs, topic_name("gw-errbody"), partitions=2)
    cases = [
        ("POST", f"/ingest/{topic}?partition=abc", '{"a": 1}', "application/json", 400),
        ("POST", f"/topics/{topic}/partitions/abc", '{"records": [{"value": 1}]}', JSONV2, 400),
        ("GET", f"/topics/{topic}/stream?partition=x", None, None, 400),
        ("GET", "/consumers/g/instances/none/records?timeout=soon", None, None, 400),
        ("GET", "/no/such/route", None, None, 404),
        ("DELETE", "/topics", None, None, 405),
    ]
    bad = []
    for method, path, body, ctype, status in cases:
        r = request(method, base + path, body=body, headers={"Content-Type": ctype} if ctype else None)
        try:
            assert_error(r, status)
        except AssertionError as e:
            bad.append(f"{method} {path}: {e}")
    assert end_offsets(bs, topic, 2) == [0, 0]
    assert not bad, "answers without the JSON error body:\n" + "\n".join(bad)


def test_stream_and_consumer_instance_limits(broker, gateway_factory):
    bs = broker.bootstrap
    gw = gateway_factory(brokers=bs, env={"FRESHET_HTTP_STREAM_MAX_SUBSCRIBERS": "2",
                                          "FRESHET_HTTP_MAX_CONSUMER_INSTANCES": "1"})
    topic = create_topic(bs, topic_name("gw-streamcap"))
    with SseStream(gw.http, stream_path(topic)) as s1, SseStream(gw.http, stream_path(topic)) as s2:
        s1.next(), s2.next()
        r = get(f"{gw.http}{stream_path(topic)}")
        assert_error(r, 503)
        assert r.headers.get("retry-after", "").isdigit(), r
    def slot_free():
        with SseStream(gw.http, stream_path(topic)) as s3:
            return s3.status == 200
    wait_until(slot_free, timeout=10, what="a stream slot to be free after the others closed")
    c = RestConsumer(gw.http, "g-cap", "binary")
    try:
        r = post(f"{gw.http}/consumers/g-cap", body=json.dumps({"format": "binary"}), headers={"Content-Type": V2})
        assert_error(r, 503)
    finally:
        c.delete()
    RestConsumer(gw.http, "g-cap", "binary").delete()


def test_too_many_concurrent_requests_get_503(broker, gateway_factory):
    bs = broker.bootstrap
    gw = gateway_factory(brokers=bs, env={"FRESHET_HTTP_MAX_CONCURRENT_REQUESTS": "1"})
    topic = create_topic(bs, topic_name("gw-busy"))
    body = json.dumps({"slow": "x" * 200}).encode()
    # A request whose body trickles in holds the only slot.
    slow, busy = hold_request(gw, topic, body)
    assert busy.headers.get("retry-after", "").isdigit(), busy
    assert_error(busy, 503)
    r = ingest(gw.http, topic, doc={"refused": True})
    assert_error(r, 503)
    assert r.headers.get("retry-after", "").isdigit(), r
    assert_error(rest_produce(gw.http, topic, [{"value": b64(b"refused")}]), 503)
    # Streams and operations endpoints are not counted against the limit.
    assert get(f"{gw.http}/health").status == 200
    answer = finish_request(slow, body)
    assert answer.startswith(b"HTTP/1.1 202"), answer
    wait_until(lambda: get(f"{gw.http}/topics").status == 200, timeout=10, what="the slot to be free again")
    recs = consume(bs, topic)
    assert [json.loads(r.value) for r in recs] == [json.loads(body)], "only the held request was stored"


def test_spool_full_gets_503_and_writes_nothing(broker_factory, gateway_factory):
    b = broker_factory()
    topic = create_topic(b.bootstrap, topic_name("gw-full"))
    gw = gateway_factory(brokers=b.bootstrap, env={
        "FRESHET_HTTP_SPOOL_MAX_BYTES": str(1 << 20), "FRESHET_HTTP_MAX_RECORD_BYTES": "300000",
        "FRESHET_HTTP_SPOOL_AFTER_MS": "200"})
    assert ingest(gw.http, topic, doc={"i": -1}).json()["spooled"] is False
    port = b.port
    b.kill()
    accepted, refused = [], []
    for i in range(12):
        r = ingest(gw.http, topic, doc={"i": i, "pad": "x" * 200_000})
        if r.status == 202:
            assert r.json()["spooled"] is True, r
            assert not refused, "once full, full until the cluster takes records"
            accepted.append(i)
        else:
            assert_error(r, 503)
            assert r.headers.get("retry-after", "").isdigit(), r
            refused.append(i)
    assert 3 <= len(accepted) <= 5 and refused, (accepted, refused)
    h = health(gw.http)
    assert h["spool"]["records"] == len(accepted) and h["spool"]["held_bytes"] <= 1 << 20, h
    b.start(port=port)
    wait_spool_empty(gw.http)
    got = [json.loads(r.value)["i"] for r in consume(b.bootstrap, topic)]
    assert got == [-1] + accepted, "every 2xx record once, in order; no 503 record"
    assert ingest(gw.http, topic, doc={"i": 99, "pad": "x" * 200_000}).status == 202, "room again"


# ---- 8. health, ready, metrics, OpenAPI -------------------------------------------------------


def test_health_ready_and_metrics_follow_the_cluster(broker_factory, gateway_factory):
    b = broker_factory()
    topic = create_topic(b.bootstrap, topic_name("gw-ops"))
    gw = gateway_factory(brokers=b.bootstrap, env={"FRESHET_HTTP_SPOOL_AFTER_MS": "200"})
    h = health(gw.http)
    assert h["status"] == "ok" and h["cluster"] == "reachable", h
    assert h["spool"]["records"] == 0 and h["spool"]["bytes"] == 0 and h["spool"]["oldest_age_ms"] is None, h
    r = get(f"{gw.http}/ready")
    assert r.status == 200 and r.json()["ready"] is True, r

    m0 = metrics(gw.http)
    assert ingest(gw.http, topic, doc={"n": 1}).status == 202
    assert ingest(gw.http, topic, body="{", headers={"Content-Type": "application/json"}).status == 400
    m1 = metrics(gw.http)
    route = "/ingest/{topic}"
    for status in (202, 400):
        assert metric(m1, "freshet_http_requests_total", route=route, status=status) \
            - metric(m0, "freshet_http_requests_total", route=route, status=status) == 1, status
    assert metric(m1, "freshet_http_request_duration_seconds_count", route=route) \
        - metric(m0, "freshet_http_request_duration_seconds_count", route=route) == 2
    assert metric(m1, "freshet_http_request_duration_seconds_bucket", route=route, le="+Inf") \
        == metric(m1, "freshet_http_request_duration_seconds_count", route=route)
    assert metric(m1, "freshet_gateway_records_total", outcome="delivered") \
        - metric(m0, "freshet_gateway_records_total", outcome="delivered") == 1

    port = b.port
    b.kill()
    wait_until(lambda: get(f"{gw.http}/ready").status == 503, timeout=15, what="/ready to answer 503")
    h = health(gw.http)
    assert h["cluster"] == "unreachable", h
    r = ingest(gw.http, topic, doc={"n": 2})
    assert r.status == 202 and r.json()["spooled"] is True, r
    h = health(gw.http)
    assert h["spool"]["records"] == 1 and h["spool"]["bytes"] > 0 and h["spool"]["oldest_age_ms"] >= 0, h
    m2 = metrics(gw.http)
    assert metric(m2, "freshet_gateway_spool_records") == 1
    assert metric(m2, "freshet_gateway_records_total", outcome="spooled") \
        - metric(m1, "freshet_gateway_records_total", outcome="spooled") == 1

    b.start(port=port)
    wait_until(lambda: get(f"{gw.http}/ready").status == 200, timeout=20, what="/ready to answer 200 again")
    wait_spool_empty(gw.http)
    assert metric(metrics(gw.http), "freshet_gateway_spool_records") == 0
    assert [json.loads(r.value) for r in consume(b.bootstrap, topic)] == [{"n": 1}, {"n": 2}]


ROUTES = ["/ingest/{}", "/topics", "/topics/{}", "/topics/{}/partitions", "/topics/{}/partitions/{}",
          "/topics/{}/stream", "/topics/{}/schema", "/consumers/{}", "/consumers/{}/instances/{}",
          "/consumers/{}/instances/{}/subscription", "/consumers/{}/instances/{}/assignments",
          "/consumers/{}/instances/{}/positions", "/consumers/{}/instances/{}/positions/beginning",
          "/consumers/{}/instances/{}/positions/end", "/consumers/{}/instances/{}/records",
          "/consumers/{}/instances/{}/offsets", "/pipelines", "/pipelines/{}", "/pipelines/{}/pause",
          "/pipelines/{}/resume", "/health", "/ready", "/metrics", "/metrics/history",
          "/openapi.json", "/pages/{}"]


def test_openapi_document_lists_the_routes(broker):
    r = get(f"{broker.http}/openapi.json")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json"), r
    doc = r.json()
    assert str(doc.get("openapi", "")).startswith("3."), f"not an OpenAPI 3 document: {r.body[:200]!r}"
    import re
    paths = {re.sub(r"\{[^}]+\}", "{}", p) for p in doc.get("paths", {})}
    missing = [p for p in ROUTES if p not in paths]
    assert not missing, f"routes missing from /openapi.json: {missing}"


def test_static_pages_are_served_from_pages_dir_and_nothing_outside_it(broker_factory, tmp_path):
    """`pages_dir`: a form page and its script come from the gateway's own origin (so
    they post to /ingest with no CORS); a directory answers its index.html; no path
    leaves the directory (`..` encoded or not, a hidden file, a link out); a file over
    `pages_max_file_bytes` is 413."""
    pages = tmp_path / "pages"
    (pages / "form").mkdir(parents=True)
    (pages / "form" / "index.html").write_text("<form id=f></form>")
    (pages / "form" / "app.js").write_text("console.log(1)")
    (pages / ".env").write_text("SECRET=1")
    (pages / "big.json").write_bytes(b"[" + b"0," * 3000 + b"0]")
    (tmp_path / "outside.txt").write_text("outside")
    (pages / "out.txt").symlink_to(tmp_path / "outside.txt")
    b = broker_factory(env={"FRESHET_HTTP_LISTEN": "127.0.0.1:0", "FRESHET_HTTP_PAGES_DIR": str(pages),
                            "FRESHET_HTTP_PAGES_MAX_FILE_BYTES": "4096"})
    r = get(f"{b.http}/pages/form/")
    assert r.status == 200 and r.body == b"<form id=f></form>", r
    assert r.headers["content-type"].startswith("text/html"), r
    r = get(f"{b.http}/pages/form/app.js")
    assert r.status == 200 and r.headers["content-type"].startswith("text/javascript"), r
    r = get(f"{b.http}/pages")
    assert r.status == 301 and r.headers["location"] == "/pages/", r
    for path in ["/pages/nothing.html", "/pages/.env", "/pages/out.txt", "/pages/%2e%2e/outside.txt",
                 "/pages/form/%2E%2E/%2E%2E/outside.txt", "/pages/..%2Foutside.txt", "/pages/form/..%5C.env"]:
        body = assert_error(get(f"{b.http}{path}"), 404)
        assert "outside" not in body["message"] or path in body["message"], body
    assert "pages_max_file_bytes" in assert_error(get(f"{b.http}/pages/big.json"), 413)["message"]
    # Without pages_dir, /pages/ says how to get them.
    other = broker_factory(env={"FRESHET_HTTP_LISTEN": "127.0.0.1:0"})
    assert "pages_dir" in assert_error(get(f"{other.http}/pages/form/"), 404)["message"]


# ---- 9. freshet produce --spool ------------------------------------------------------------


def run_produce(bootstrap: str, topic: str, spool: str, lines: list[str], spool_after_ms: int = 5000,
                timeout: float = 60.0):
    cmd = [str(freshet_bin()), "produce", topic, "--brokers", bootstrap, "--spool", spool,
           "--spool-after-ms", str(spool_after_ms)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    data = "".join(f"{line}\n" for line in lines).encode()
    return subprocess.run(cmd, input=data, capture_output=True, timeout=timeout, env=env)


def test_produce_spool_keeps_lines_while_the_broker_is_down(broker_factory, tmp_path):
    b = broker_factory()
    topic = create_topic(b.bootstrap, topic_name("gw-cli-spool"))
    quiet = create_topic(b.bootstrap, topic_name("gw-cli-spool2"))
    addr, port = b.bootstrap, b.port
    b.kill()
    spool, spool2 = str(tmp_path / "spool"), str(tmp_path / "spool2")
    first = [f"line-{i}" for i in range(40)]
    p = run_produce(addr, topic, spool, first, spool_after_ms=500)
    assert p.returncode == 0, p
    assert b"0 records acknowledged, 40 spooled; 40 still in" in p.stderr, p.stderr
    assert any(f.endswith(".spool") for f in os.listdir(spool)), os.listdir(spool)
    p = run_produce(addr, quiet, spool2, ["q-0", "q-1", "q-2"], spool_after_ms=500)
    assert p.returncode == 0, p

    b.start(port=port)
    more = [f"line-{i}" for i in range(40, 60)]
    p = run_produce(addr, topic, spool, more)
    assert p.returncode == 0, p
    assert [r.value.decode() for r in consume(addr, topic)] == first + more, "spooled lines first, once, in order"
    p = run_produce(addr, quiet, spool2, [])  # no input: only what the first run left
    assert p.returncode == 0, p
    assert b"still in" not in p.stderr, p.stderr
    assert [r.value.decode() for r in consume(addr, quiet)] == ["q-0", "q-1", "q-2"]
    p = run_produce(addr, topic, spool, [])
    assert p.returncode == 0 and end_offsets(addr, topic) == [60], "a drained spool sends nothing again"
