"""Bad input over raw sockets: the broker answers with a Kafka error or closes that one
connection, never hangs or dies, and stored data is untouched."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from helpers import (API_METADATA, API_PRODUCE, API_VERSIONS, UNSUPPORTED_VERSION, Rec, api_versions,
                     closed_or_answered, connect, consume, content, create_topic, frame, parse_produce_response_v3,
                     produce, produce_request, record_batch, recv_frame, request_header, topic_name, wait_until)

MAX_REQUEST_BYTES = 65536
BROKER_ENV = {"FRESHET_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
              "FRESHET_MAX_MESSAGE_BYTES": str(MAX_REQUEST_BYTES)}


@pytest.fixture(scope="module")
def stored(broker):
    """Data written before any bad input; every test checks it still reads back intact."""
    topic = create_topic(broker.bootstrap, topic_name("bad-input-stored"), partitions=2)
    rng = random.Random(7)
    recs = [Rec(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))), f"k{i}".encode(),
                (("h", bytes([i % 256])),), 1_700_000_000_000 + i, i % 2)
            for i in range(200)]
    produce(broker.bootstrap, topic, recs, compression="lz4")
    return topic, recs


def assert_healthy(broker, stored):
    """A new connection gets answers and the stored records read back exactly."""
    with connect(broker.port) as s:
        av = api_versions(s, correlation_id=4242)
        assert av.error_code == 0
        assert API_VERSIONS in av.versions and API_PRODUCE in av.versions, av.versions
    topic, recs = stored
    got = consume(broker.bootstrap, topic, partitions=(0, 1))
    for p in (0, 1):
        want = [r for r in recs if r.partition == p]
        have = sorted((r for r in got if r.partition == p), key=lambda r: r.offset)
        assert [r.offset for r in have] == list(range(len(want)))
        assert content(have) == content(want)


def test_api_versions_baseline(broker, stored):
    with connect(broker.port) as s:
        av = api_versions(s, correlation_id=1)
        assert av.error_code == 0
        for key in (0, 1, 2, 3, 18, 19, 20, 21, 32, 37, 44, 60):
            assert key in av.versions, f"api key {key} not advertised: {sorted(av.versions)}"
            lo, hi = av.versions[key]
            assert 0 <= lo <= hi, (key, lo, hi)
        # Several requests pipelined on one connection are answered in order.
        s.sendall(b"".join(frame(request_header(API_VERSIONS, 0, c)) for c in (10, 11, 12)))
        for c in (10, 11, 12):
            resp = recv_frame(s)
            assert resp is not None and struct.unpack_from(">i", resp)[0] == c
    assert_healthy(broker, stored)


def test_api_versions_unsupported_version(broker, stored):
    with connect(broker.port) as s:
        av = api_versions(s, correlation_id=99, version=99)
        assert av.error_code == UNSUPPORTED_VERSION, av
        assert API_VERSIONS in av.versions, "UNSUPPORTED_VERSION answer must list the supported versions"
        lo, hi = av.versions[API_VERSIONS]
        assert lo == 0 and hi >= 3, (lo, hi)
        # Kafka clients retry with a version from the list on the same connection.
        av = api_versions(s, correlation_id=100, version=0)
        assert av.error_code == 0
    assert_healthy(broker, stored)


@pytest.mark.parametrize("payload", [
    pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="http-request"),
    pytest.param(b"\xff\xff\xff\xff" + b"\x00" * 64, id="negative-size"),
    pytest.param(b"\x00\x00\x00\x00", id="zero-size"),
    pytest.param(frame(bytes(random.Random(1).randrange(256) for _ in range(300))),
                 id="framed-random"),
    pytest.param(frame(b"\x00\x12"), id="header-cut-after-api-key"),
    pytest.param(frame(struct.pack(">hhi", API_VERSIONS, 0, 5) + struct.pack(">h", 3000) + b"abc"),
                 id="client-id-longer-than-frame"),
])
def test_garbage(broker, stored, payload):
    with connect(broker.port) as s:
        s.sendall(payload)
        resp = closed_or_answered(s)
        if resp is not None:
            # An answer to garbage must at least be a well-formed frame; then the broker
            # may close. It must not keep the connection in a state that hangs.
            assert len(resp) >= 4
    assert_healthy(broker, stored)


def test_frame_above_max_request_bytes(broker, stored):
    with connect(broker.port) as s:
        size = MAX_REQUEST_BYTES + 1
        header = request_header(API_PRODUCE, 9, 7, flexible=True)
        # Announce more than the limit, send only a little: the broker must refuse on the
        # size alone (no buffering of a frame it will never accept).
        s.sendall(struct.pack(">i", size) + header + b"\x00" * 1024)
        assert closed_or_answered(s) is None, "expected the connection to be closed"
    with connect(broker.port) as s:
        # A frame of hundreds of MiB announced: closed at once, memory untouched.
        s.sendall(struct.pack(">i", 800 << 20) + b"\x00" * 16)
        assert closed_or_answered(s) is None, "expected the connection to be closed"
    assert_healthy(broker, stored)


def test_frame_just_under_max_request_bytes_is_served(broker, stored):
    # ApiVersions v0 ignores its body, so padding to the limit must still be answered.
    with connect(broker.port) as s:
        header = request_header(API_VERSIONS, 0, 77)
        s.sendall(frame(header + b"\x00" * (MAX_REQUEST_BYTES - len(header))))
        resp = closed_or_answered(s)
        assert resp is not None, "request within max_request_bytes was not answered"
        assert struct.unpack_from(">i", resp)[0] == 77
    assert_healthy(broker, stored)


@pytest.mark.parametrize("api_key", [1000, 32767, -1])
def test_unknown_api_key(broker, stored, api_key):
    with connect(broker.port) as s:
        s.sendall(frame(request_header(api_key, 0, 31)))
        resp = closed_or_answered(s)
        if resp is not None:
            assert struct.unpack_from(">i", resp)[0] == 31
    assert_healthy(broker, stored)


def test_truncated_bodies(broker, stored):
    # A complete frame whose body ends in the middle of the request's fields.
    topic = stored[0]
    # Metadata v1: topics array says 5 entries but the frame ends after 1.
    name = topic.encode()
    metadata = request_header(API_METADATA, 1, 41) + struct.pack(">i", 5) + struct.pack(">h", len(name)) + name
    # Produce v3: transactional id, acks, timeout, then 1 topic announced and cut.
    produce_req = (request_header(API_PRODUCE, 3, 42) + struct.pack(">hhii", -1, -1, 5000, 1)
                   + struct.pack(">h", len(name)) + name + struct.pack(">i", 1) + struct.pack(">ii", 0, 500)
                   + b"\x00" * 20)
    for req in (metadata, produce_req):
        with connect(broker.port) as s:
            s.sendall(frame(req))
            resp = closed_or_answered(s)
            if resp is not None:
                assert struct.unpack_from(">i", resp)[0] in (41, 42)
    # A frame that stops short of its announced size, then the client goes away.
    with connect(broker.port) as s:
        s.sendall(struct.pack(">i", 100) + request_header(API_VERSIONS, 0, 43))
        s.shutdown(socket.SHUT_WR)
        assert closed_or_answered(s) is None
    assert_healthy(broker, stored)


def test_produce_with_corrupt_batch_crc_is_rejected(broker, stored):
    """A record batch with a wrong CRC gets CORRUPT_MESSAGE (2) and is not stored."""
    topic = topic_name("bad-crc")
    create_topic(broker.bootstrap, topic)
    batch = bytearray(record_batch(b"value-1"))
    batch[-2] ^= 0xFF  # flip the last byte of the value (covered by the CRC)
    with connect(broker.port) as s:
        err = _produce_raw(s, topic, bytes(batch), correlation_id=51)
        assert err == 2, f"expected CORRUPT_MESSAGE (2), got error {err}"
        err = _produce_raw(s, topic, record_batch(b"value-2"), correlation_id=52)
        assert err == 0, f"valid batch after a corrupt one: error {err}"
    got = consume(broker.bootstrap, topic)
    assert [(r.offset, r.value) for r in got] == [(0, b"value-2")]
    assert_healthy(broker, stored)


def test_produce_to_missing_partition_and_bad_magic(broker, stored):
    topic = topic_name("bad-partition")
    create_topic(broker.bootstrap, topic)
    with connect(broker.port) as s:
        err = _produce_raw(s, topic, record_batch(b"nowhere"), correlation_id=61, partition=7)
        assert err == 3, f"expected UNKNOWN_TOPIC_OR_PARTITION (3), got {err}"
        old_magic = bytearray(record_batch(b"magic"))
        old_magic[16] = 1  # magic byte: a v1 message set is not accepted by Produce v3+
        err = _produce_raw(s, topic, bytes(old_magic), correlation_id=62)
        assert err in (2, 87), f"expected CORRUPT_MESSAGE (2) or INVALID_RECORD (87), got {err}"
        # A batch whose length field runs past the end of the records data.
        short = bytearray(record_batch(b"short"))
        struct.pack_into(">i", short, 8, len(short) + 100)
        err = _produce_raw(s, topic, bytes(short), correlation_id=63)
        assert err in (2, 87), f"expected CORRUPT_MESSAGE (2) or INVALID_RECORD (87), got {err}"
    assert consume(broker.bootstrap, topic) == []
    assert_healthy(broker, stored)


def test_many_connections_opened_and_dropped(broker, stored):
    for i in range(200):
        s = connect(broker.port)
        if i % 2:
            s.sendall(frame(request_header(API_VERSIONS, 0, i))[:7])  # half a request
        s.close()
    assert_healthy(broker, stored)


def test_max_connections(broker_factory, report):
    limit = 5
    b = broker_factory(env={"FRESHET_MAX_CONNECTIONS": str(limit)})
    held = []
    for i in range(limit):
        s = connect(b.port)
        assert api_versions(s, correlation_id=i).error_code == 0
        held.append(s)
    # Connections beyond the limit are refused or closed without an answer.
    for i in range(3):
        try:
            s = connect(b.port)
        except OSError:
            continue
        try:
            s.sendall(frame(request_header(API_VERSIONS, 0, 900 + i)))
        except OSError:
            s.close()
            continue
        assert closed_or_answered(s) is None, f"connection {limit + i + 1} over max_connections={limit} was served"
        s.close()
    # The held connections are still served.
    for i, s in enumerate(held):
        assert api_versions(s, correlation_id=100 + i).error_code == 0
    # Freeing a slot lets a new connection in.
    held.pop().close()

    def new_connection_served():
        with connect(b.port) as s:
            s.sendall(frame(request_header(API_VERSIONS, 0, 555)))
            resp = closed_or_answered(s, timeout=5)
            return resp is not None and struct.unpack_from(">i", resp)[0] == 555
    wait_until(new_connection_served, timeout=10, what="a connection to be accepted after one closed")
    for s in held:
        s.close()


def _produce_raw(sock, topic: str, batch: bytes, correlation_id: int, partition: int = 0) -> int:
    """Produce v3 (non-flexible) with acks=1; returns the partition's error code."""
    sock.sendall(produce_request(topic, partition, batch, correlation_id, acks=1))
    resp = recv_frame(sock)
    assert resp is not None, "connection closed instead of a Produce answer"
    corr, result = parse_produce_response_v3(resp)
    assert corr == correlation_id
    assert (result.topic, result.partition) == (topic, partition)
    return result.error_code
