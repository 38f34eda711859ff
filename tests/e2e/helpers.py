"""Shared helpers: polling with deadlines, confluent-kafka produce/consume/admin, the batch
headers stored in segment files, and a minimal raw Kafka wire codec for the bad-input tests."""

from __future__ import annotations

import socket
import struct
import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]


def wait_until(cond, timeout: float = 15.0, interval: float = 0.05, what="condition"):
    """Poll `cond()` until it returns a truthy value; fail with `what` after `timeout` s.
    `what` may be a callable, called on failure to describe the state at that moment."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - remembered and reported on timeout
            last_exc = e
        if time.monotonic() >= deadline:
            if callable(what):
                what = what()
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def topic_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class Rec:
    value: bytes | None
    key: bytes | None = None
    headers: tuple = ()          # ((name: str, value: bytes | None), ...)
    timestamp: int | None = None  # CreateTime ms
    partition: int | None = None
    offset: int | None = None

    def content(self):
        """What a round trip must preserve exactly."""
        return (self.key, self.value, tuple(self.headers), self.timestamp)


# ---- confluent-kafka ------------------------------------------------------------

def producer(bootstrap: str, **conf) -> Producer:
    base = {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
            "enable.idempotence": False, "message.timeout.ms": 20000}
    base.update(conf)
    return Producer(base)


def produce(bootstrap: str, topic: str, records: list[Rec], compression: str = "none",
            timeout: float = 30.0, **conf) -> list[Rec]:
    """Produce all records, wait for every delivery report, fail on any error.
    Returns the records with partition and offset from the delivery reports, in order."""
    p = producer(bootstrap, **{"compression.type": compression, **conf})
    results: list[Rec | None] = [None] * len(records)
    errors = []

    def on_delivery(i, rec):
        def cb(err, msg):
            if err is not None:
                errors.append((i, err))
            else:
                results[i] = Rec(rec.value, rec.key, rec.headers, rec.timestamp, msg.partition(), msg.offset())
        return cb

    for i, rec in enumerate(records):
        kwargs = {"value": rec.value, "key": rec.key, "on_delivery": on_delivery(i, rec)}
        if rec.headers:
            kwargs["headers"] = list(rec.headers)
        if rec.timestamp is not None:
            kwargs["timestamp"] = rec.timestamp
        if rec.partition is not None:
            kwargs["partition"] = rec.partition
        while True:
            try:
                p.produce(topic, **kwargs)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    remaining = p.flush(timeout)
    assert remaining == 0, f"{remaining} records not delivered within {timeout}s"
    assert not errors, f"delivery errors: {errors[:5]}"
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def consumer(bootstrap: str, **conf) -> Consumer:
    # Manual assignment, no commits: what these tests check must not depend on the
    # group coordinator. librdkafka still insists on a group.id.
    base = {"bootstrap.servers": bootstrap, "group.id": "e2e-unused",
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "enable.partition.eof": True, "check.crcs": True,
            "fetch.wait.max.ms": 100, "topic.metadata.refresh.interval.ms": 60000}
    base.update(conf)
    return Consumer(base)


def consume(bootstrap: str, topic: str, partitions=(0,), start: int = OFFSET_BEGINNING,
            timeout: float = 30.0, allow_errors: bool = False, **conf) -> list[Rec]:
    """Read the given partitions from `start` until every one of them reported end of
    partition. Any consumer error fails unless allow_errors (then errors are returned in
    `consume.errors`)."""
    c = consumer(bootstrap, **conf)
    parts = list(partitions)
    c.assign([TopicPartition(topic, p, start) for p in parts])
    pending_eof = set(parts)
    out: list[Rec] = []
    errors = []
    deadline = time.monotonic() + timeout
    try:
        while pending_eof:
            if time.monotonic() > deadline:
                raise AssertionError(f"consume {topic} {parts}: no end of partition for {sorted(pending_eof)} "
                                     f"within {timeout}s; got {len(out)} records, errors {errors[:5]}")
            msgs = c.consume(num_messages=10000, timeout=0.2)
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending_eof.discard(m.partition())
                        continue
                    errors.append(err)
                    continue
                ts_type, ts = m.timestamp()
                out.append(Rec(m.value(), m.key(), tuple(m.headers() or ()), ts, m.partition(), m.offset()))
                # A record after EOF means the partition grew: wait for the next EOF.
                pending_eof.add(m.partition())
    finally:
        c.close()
    if errors and not allow_errors:
        raise AssertionError(f"consumer errors on {topic}: {errors[:10]}")
    consume.errors = errors
    return out


def admin(bootstrap: str, **conf) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, **conf})


def wait_futures(futures: dict, timeout: float = 30.0) -> dict:
    """Resolve a dict of admin futures; raise the first exception."""
    return {k: f.result(timeout=timeout) for k, f in futures.items()}


def create_topic(bootstrap: str, name: str, partitions: int = 1, config: dict | None = None) -> str:
    a = admin(bootstrap)
    wait_futures(a.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1,
                                           config=config or {})], operation_timeout=20))
    wait_until(lambda: name in a.list_topics(timeout=5).topics
               and len(a.list_topics(timeout=5).topics[name].partitions) == partitions,
               what=f"topic {name} with {partitions} partitions in metadata")
    return name


def watermarks(bootstrap: str, topic: str, partition: int = 0) -> tuple[int, int]:
    c = consumer(bootstrap)
    try:
        return c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)
    finally:
        c.close()


def content(recs):
    return [r.content() for r in recs]


@dataclass(frozen=True)
class StoredBatch:
    """A v2 record batch header as it lies in a segment file (stored as the producer sent it)."""
    base_offset: int
    records: int
    producer_id: int
    producer_epoch: int
    base_sequence: int


def stored_batches(broker, topic: str, partition: int) -> list[StoredBatch]:
    """Every batch header in the partition's segment files, in offset order."""
    out = []
    for seg in sorted(broker.partition_dir(topic, partition).glob("*.log")):
        data = seg.read_bytes()
        pos = 0
        while pos + 61 <= len(data):
            base_offset, length = struct.unpack_from(">qi", data, pos)
            if length == 0:  # zeroed space past the end
                break
            magic = data[pos + 16]
            assert magic == 2, f"{seg}: magic {magic} at byte {pos}"
            pid, epoch, seq, count = struct.unpack_from(">qhii", data, pos + 43)
            out.append(StoredBatch(base_offset, count, pid, epoch, seq))
            pos += 12 + length
    return out


def check_idempotent_batches(broker, topic: str, partitions: int, records_per_partition: int):
    """Every stored batch carries the producer id InitProducerId handed out, and the
    sequences run on without gap or repeat across the producer's requests."""
    pids = set()
    for part in range(partitions):
        batches = stored_batches(broker, topic, part)
        assert len(batches) > 1, f"partition {part}: one batch cannot show sequences carrying on"
        assert sum(b.records for b in batches) == records_per_partition
        seq = 0
        for b in batches:
            assert b.producer_id >= 0 and b.producer_epoch >= 0, f"not an idempotent batch: {b}"
            assert b.base_sequence == seq, f"partition {part}: batch {b} after {seq} sequenced records"
            seq += b.records
            pids.add((b.producer_id, b.producer_epoch))
    assert len(pids) == 1, f"one producer, one producer id: {pids}"


# ---- raw Kafka wire -------------------------------------------------------------

API_PRODUCE, API_FETCH, API_LIST_OFFSETS, API_METADATA, API_VERSIONS = 0, 1, 2, 3, 18
UNSUPPORTED_VERSION = 35


def request_header(api_key: int, api_version: int, correlation_id: int, client_id: str | None = "e2e",
                   flexible: bool = False) -> bytes:
    h = struct.pack(">hhi", api_key, api_version, correlation_id)
    if client_id is None:
        h += struct.pack(">h", -1)
    else:
        cid = client_id.encode()
        h += struct.pack(">h", len(cid)) + cid
    if flexible:
        h += b"\x00"  # empty tagged fields
    return h


def frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def recv_frame(sock: socket.socket) -> bytes | None:
    """One response frame, or None if the peer closed (EOF or reset). Raises
    socket.timeout if nothing happens within the socket's timeout."""
    try:
        head = recv_exact(sock, 4)
        if head is None:
            return None
        (size,) = struct.unpack(">i", head)
        assert 0 <= size < 100 << 20, f"absurd response frame size {size}"
        body = recv_exact(sock, size)
        return body
    except (ConnectionResetError, BrokenPipeError):
        return None


@dataclass
class ApiVersions:
    error_code: int
    versions: dict = field(default_factory=dict)  # api_key -> (min, max)


def parse_api_versions_v0(body: bytes) -> ApiVersions:
    """Response header v0 (correlation id, stripped by caller) + ApiVersions v0 body."""
    (err, n) = struct.unpack_from(">hi", body, 0)
    pos = 6
    versions = {}
    assert 0 <= n < 1000, f"bad api count {n} in {body[:64]!r}"
    for _ in range(n):
        k, lo, hi = struct.unpack_from(">hhh", body, pos)
        pos += 6
        versions[k] = (lo, hi)
    return ApiVersions(err, versions)


def api_versions(sock: socket.socket, correlation_id: int = 1, version: int = 0) -> ApiVersions:
    """Send ApiVersions (v0, or any version for the unsupported-version check) and parse the
    answer as v0, which is what a broker must send back for a version it does not know."""
    body = b""
    if version >= 3:
        body = b"\x01\x01\x00"  # empty compact client software name/version, no tags
    sock.sendall(frame(request_header(API_VERSIONS, version, correlation_id, flexible=version >= 3) + body))
    resp = recv_frame(sock)
    assert resp is not None, "connection closed instead of an ApiVersions answer"
    (corr,) = struct.unpack_from(">i", resp, 0)
    assert corr == correlation_id, f"correlation id {corr}, sent {correlation_id}"
    return parse_api_versions_v0(resp[4:])


def closed_or_answered(sock: socket.socket, timeout: float = 10.0):
    """After bad input: the broker must either answer (returns the frame) or close the
    connection (returns None) within `timeout`; silence is a hang."""
    sock.settimeout(timeout)
    try:
        return recv_frame(sock)
    except socket.timeout:
        raise AssertionError(f"broker neither answered nor closed the connection within {timeout}s")


# ---- raw record batches, Produce and Fetch -------------------------------------------

def varint(n: int) -> bytes:
    """Kafka's zig-zag varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = z & 0x7F
        z >>= 7
        if z:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def record_batch(value: bytes, timestamp_ms: int | None = None) -> bytes:
    """A v2 record batch holding one uncompressed record (null key, no headers)."""
    import crc32c
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    record = b"\x00" + varint(0) + varint(0) + varint(-1) + varint(len(value)) + value + varint(0)
    record = varint(len(record)) + record
    # attributes .. records: covered by the CRC
    after_crc = struct.pack(">hiqqqhii", 0, 0, ts, ts, -1, -1, -1, 1) + record
    crc = crc32c.crc32c(after_crc)
    partition_leader_epoch = 0
    body = struct.pack(">ibI", partition_leader_epoch, 2, crc) + after_crc
    return struct.pack(">qi", 0, len(body)) + body


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def produce_request(topic: str, partition: int, batch: bytes, correlation_id: int, acks: int = 1,
                    timeout_ms: int = 10000) -> bytes:
    """A framed Produce v3 (non-flexible) request for one partition."""
    body = (struct.pack(">hhi", -1, acks, timeout_ms) + struct.pack(">i", 1) + _string(topic)
            + struct.pack(">ii", 1, partition) + struct.pack(">i", len(batch)) + batch)
    return frame(request_header(API_PRODUCE, 3, correlation_id) + body)


@dataclass
class ProducePartition:
    topic: str
    partition: int
    error_code: int
    base_offset: int


def parse_produce_response_v3(resp: bytes) -> tuple[int, ProducePartition]:
    """(correlation id, the one partition's result) of a Produce v3 answer."""
    (corr, ntopics) = struct.unpack_from(">ii", resp, 0)
    pos = 8
    assert ntopics == 1, f"{ntopics} topics in a one-partition Produce answer"
    (nlen,) = struct.unpack_from(">h", resp, pos)
    topic = resp[pos + 2:pos + 2 + nlen].decode()
    pos += 2 + nlen
    (nparts, part, err, base_offset) = struct.unpack_from(">iihq", resp, pos)
    assert nparts == 1, f"{nparts} partitions in a one-partition Produce answer"
    return corr, ProducePartition(topic, part, err, base_offset)


def fetch_request(topic: str, partition: int, offset: int, correlation_id: int, max_wait_ms: int,
                  min_bytes: int = 1, max_bytes: int = 1 << 20) -> bytes:
    """A framed Fetch v4 (non-flexible) request for one partition."""
    body = (struct.pack(">iiiib", -1, max_wait_ms, min_bytes, max_bytes, 0) + struct.pack(">i", 1)
            + _string(topic) + struct.pack(">iiqi", 1, partition, offset, max_bytes))
    return frame(request_header(API_FETCH, 4, correlation_id) + body)


@dataclass
class FetchPartition:
    topic: str
    partition: int
    error_code: int
    high_watermark: int
    records: bytes


def parse_fetch_response_v4(resp: bytes) -> tuple[int, list[FetchPartition]]:
    """(correlation id, every partition's result) of a Fetch v4 answer."""
    (corr, _throttle_ms, ntopics) = struct.unpack_from(">iii", resp, 0)
    pos = 12
    out = []
    for _ in range(ntopics):
        (nlen,) = struct.unpack_from(">h", resp, pos)
        topic = resp[pos + 2:pos + 2 + nlen].decode()
        pos += 2 + nlen
        (nparts,) = struct.unpack_from(">i", resp, pos)
        pos += 4
        for _ in range(nparts):
            (part, err, hw, _lso, naborted) = struct.unpack_from(">ihqqi", resp, pos)
            pos += 26 + max(naborted, 0) * 16
            (rlen,) = struct.unpack_from(">i", resp, pos)
            pos += 4
            records = resp[pos:pos + max(rlen, 0)]
            pos += max(rlen, 0)
            out.append(FetchPartition(topic, part, err, hw, records))
    assert pos == len(resp), f"Fetch answer has {len(resp) - pos} bytes after its last partition"
    return corr, out


def broker_has_read(sock: socket.socket, broker_port: int) -> bool:
    """True once the broker's end of this loopback connection has nothing left in its
    kernel receive queue: every byte sent on `sock` so far has been read by the broker
    process (Linux /proc/net/tcp; IPv4 loopback only)."""
    host, port = sock.getsockname()
    local = f"{socket.inet_aton('127.0.0.1')[::-1].hex().upper()}:{broker_port:04X}"
    remote = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)  # header
        for line in f:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                rx_queue = int(fields[4].split(":")[1], 16)
                return rx_queue == 0
    raise AssertionError(f"no broker-side socket {local} <- {remote} in /proc/net/tcp")
