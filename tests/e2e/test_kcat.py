"""Debian's kcat (librdkafka 2.0.2, the version users have) against the broker."""

from __future__ import annotations

import json
import random
import selectors
import shutil
import subprocess
import time

import pytest

from helpers import CODECS, consume, create_topic, topic_name

MSG_DELIM = b"\x1e"
KEY_DELIM = b"\x1f"
FORMAT = r"%o %p %T %K %S %h\n%k%s\n"
HEADERS = [("trace", "abc-123"), ("source", "kcat"), ("trace", "second")]


def kcat_bin() -> str:
    path = shutil.which("kcat")
    assert path, "kcat not installed (scripts/test installs Debian's package)"
    return path


def kcat(*args: str, input: bytes | None = None, timeout: float = 60.0) -> bytes:
    proc = subprocess.run([kcat_bin(), *args], input=input, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"kcat {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
    return proc.stdout


def parse(out: bytes) -> list[tuple]:
    """Records printed with FORMAT: (offset, partition, timestamp, key, value, headers)."""
    recs, pos = [], 0
    while pos < len(out):
        nl = out.index(b"\n", pos)
        fields = out[pos:nl].split(b" ", 5)
        offset, partition, ts, klen, vlen = (int(f) for f in fields[:5])
        headers = fields[5].decode() if len(fields) > 5 else ""
        pos = nl + 1
        key = None if klen < 0 else out[pos:pos + klen]
        pos += max(klen, 0)
        value = None if vlen < 0 else out[pos:pos + vlen]
        pos += max(vlen, 0)
        assert out[pos:pos + 1] == b"\n", f"unparsable kcat output near byte {pos}: {out[pos - 40:pos + 40]!r}"
        pos += 1
        recs.append((offset, partition, ts, key, value, headers))
    return recs


def binary_records(seed: int, n: int = 50) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs with every byte value except the two delimiters."""
    rng = random.Random(seed)
    allowed = bytes(b for b in range(256) if bytes([b]) not in (MSG_DELIM, KEY_DELIM))
    recs = []
    for i in range(n):
        key = f"key-{i}-".encode() + bytes(rng.choice(allowed) for _ in range(rng.randrange(0, 20)))
        size = [0, 1, 50, 3000, 40_000][i % 5]
        value = bytes(rng.choice(allowed) for _ in range(size)) if i % 5 != 4 else allowed * 160
        recs.append((key, value))
    return recs


def kcat_produce(broker, topic: str, records, codec: str = "none", headers=HEADERS, partition: int = 0):
    data = b"".join(k + KEY_DELIM + v + MSG_DELIM for k, v in records)
    args = ["-P", "-b", broker.bootstrap, "-t", topic, "-p", str(partition), "-D", r"\x1e", "-K", r"\x1f",
            "-X", f"compression.codec={codec}", "-X", "linger.ms=20", "-X", "request.required.acks=-1"]
    for name, value in headers:
        args += ["-H", f"{name}={value}"]
    kcat(*args, input=data)


def kcat_consume(broker, topic: str, offset: str = "beginning", partition: int = 0) -> list[tuple]:
    return parse(kcat("-C", "-b", broker.bootstrap, "-t", topic, "-p", str(partition), "-o", offset, "-e",
                      "-q", "-f", FORMAT, "-X", "check.crcs=true"))


@pytest.mark.parametrize("codec", CODECS)
def test_produce_consume_exact_bytes(broker, codec):
    topic = create_topic(broker.bootstrap, topic_name(f"kcat-{codec}"))
    records = binary_records(CODECS.index(codec))
    t0 = int(time.time() * 1000)
    kcat_produce(broker, topic, records, codec)
    t1 = int(time.time() * 1000)
    got = kcat_consume(broker, topic)
    hdr = ",".join(f"{k}={v}" for k, v in HEADERS)
    assert [(o, p, k, v, h) for o, p, _, k, v, h in got] == \
        [(i, 0, k, v, hdr) for i, (k, v) in enumerate(records)]
    assert all(t0 - 1000 <= r[2] <= t1 + 1000 for r in got), [r[2] for r in got]
    # librdkafka's own consumer (checks CRCs) sees the same bytes and the headers as a list.
    again = consume(broker.bootstrap, topic)
    assert [(r.key, r.value, r.headers) for r in again] == \
        [(k, v, tuple((n, val.encode()) for n, val in HEADERS)) for k, v in records]


def test_consume_offsets(broker):
    topic = create_topic(broker.bootstrap, topic_name("kcat-offsets"))
    kcat_produce(broker, topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(10)], headers=[])
    assert [(o, v) for o, _, _, _, v, _ in kcat_consume(broker, topic, "6")] == \
        [(i, f"v{i}".encode()) for i in range(6, 10)]
    assert [(o, v) for o, _, _, _, v, _ in kcat_consume(broker, topic, "-3")] == \
        [(i, f"v{i}".encode()) for i in range(7, 10)]
    assert kcat_consume(broker, topic, "end") == []
    # A timestamp offset (s@ms) is resolved by ListOffsets.
    all_recs = kcat_consume(broker, topic, "beginning")
    ts = all_recs[4][2]
    first = min(i for i, r in enumerate(all_recs) if r[2] >= ts)
    assert [o for o, *_ in kcat_consume(broker, topic, f"s@{ts}")] == list(range(first, 10))


def test_consume_from_end_sees_only_new_records(broker):
    topic = create_topic(broker.bootstrap, topic_name("kcat-end"))
    kcat_produce(broker, topic, [(b"old", b"old-value")], headers=[])
    proc = subprocess.Popen([kcat_bin(), "-C", "-b", broker.bootstrap, "-t", topic, "-p", "0", "-o", "end",
                             "-c", "2", "-u", "-f", r"%o:%k:%s\n"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # kcat says "Reached end of topic T [0] at offset 1" once it sits at the end.
        sel = selectors.DefaultSelector()
        sel.register(proc.stderr, selectors.EVENT_READ)
        seen = b""
        deadline = time.monotonic() + 30
        while b"Reached end of topic" not in seen:
            assert time.monotonic() < deadline, f"kcat never reached the end: {seen!r}"
            assert proc.poll() is None, f"kcat exited early: {seen!r}"
            if sel.select(timeout=0.5):
                chunk = proc.stderr.read1(4096)
                seen += chunk
        assert b"at offset 1" in seen, seen
        kcat_produce(broker, topic, [(b"n1", b"new-1"), (b"n2", b"new-2")], headers=[])
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out == b"1:n1:new-1\n2:n2:new-2\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_metadata(broker):
    topic = create_topic(broker.bootstrap, topic_name("kcat-meta"), partitions=3)
    md = json.loads(kcat("-L", "-J", "-b", broker.bootstrap))
    assert [(b["id"], b["name"]) for b in md["brokers"]] == [(md["brokers"][0]["id"], broker.bootstrap)]
    broker_id = md["brokers"][0]["id"]
    assert md["controllerid"] == broker_id
    topics = {t["topic"]: t for t in md["topics"]}
    assert topic in topics
    parts = sorted(topics[topic]["partitions"], key=lambda p: p["partition"])
    assert [p["partition"] for p in parts] == [0, 1, 2]
    for p in parts:
        assert p["leader"] == broker_id
        assert [r["id"] for r in p["replicas"]] == [broker_id]
        assert [r["id"] for r in p["isrs"]] == [broker_id]
        assert "error" not in p, p
    text = kcat("-L", "-b", broker.bootstrap, "-t", topic).decode()
    assert f'topic "{topic}" with 3 partitions:' in text, text
    assert f"broker {broker_id} at {broker.bootstrap}" in text, text
