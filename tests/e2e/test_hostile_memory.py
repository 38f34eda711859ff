"""Memory stays bounded whatever the peers send (issue 9, part 2).

800 connections announce a 100 MiB frame and send nothing more; 100 connections trickle
50 MiB frames in 64 KiB pieces. The broker's resident memory (VmRSS) must grow by less
than 256 MiB, and a normal client (confluent-kafka) must produce and consume meanwhile.
The broker runs with its default limits: the read budget (`queued_max_request_bytes`)
and the per-connection read buffer are what bound it.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import freshet_bin
from helpers import Rec, consume, create_topic, produce, topic_name, wait_until

ANNOUNCERS = 800
ANNOUNCED_BYTES = 100 << 20  # = the default max_request_bytes: a legal size
TRICKLERS = 100
TRICKLE_FRAME_BYTES = 50 << 20
PIECE_BYTES = 64 << 10
# One piece per trickler per round: 100 x 64 KiB every 50 ms offers 128 MiB/s, which
# a broker buffering whatever arrives turns into gigabytes within the test.
ROUND_S = 0.05
HOSTILE_S = 15.0
GROWTH_LIMIT_BYTES = 256 << 20
CLIENT_ROUND_TIMEOUT_S = 20.0
RECORDS_PER_ROUND = 200


def vm_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        assert hard == resource.RLIM_INFINITY or hard >= needed, \
            f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs"
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class Sampler(threading.Thread):
    """Samples the broker's VmRSS every few ms and keeps the peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = vm_rss_bytes(pid)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, vm_rss_bytes(self.pid))


class Trickler(threading.Thread):
    """Sends each trickling connection its 50 MiB frame, one 64 KiB piece per round,
    skipping a connection whose socket is full (the broker is not reading it)."""

    def __init__(self, socks: list[socket.socket]):
        super().__init__(daemon=True)
        self.socks = socks
        self.sent = [0] * len(socks)
        self.total = TRICKLE_FRAME_BYTES + 4
        # The frame: its size, then a body that is not a valid request (whatever the
        # broker does with it once whole, it must not have to hold it all first).
        self.head = struct.pack(">i", TRICKLE_FRAME_BYTES) + b"\x00\x00\x00\x00"
        self.piece = b"\xa5" * PIECE_BYTES
        self.stop = threading.Event()
        self.refused = 0
        self.attempted = 0

    def run(self):
        while not self.stop.wait(ROUND_S):
            for i, s in enumerate(self.socks):
                left = self.total - self.sent[i]
                if left <= 0:
                    continue
                data = self.head if self.sent[i] == 0 else self.piece[:left]
                self.attempted += len(data)
                try:
                    self.sent[i] += s.send(data)
                except BlockingIOError:
                    self.refused += 1
                except OSError:
                    self.sent[i] = self.total  # closed by the broker: nothing more to send


def open_connection(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setblocking(False)
    return s


def still_open(socks: list[socket.socket]) -> int:
    """How many of `socks` the broker has not closed (no EOF or reset readable)."""
    poller = select.poll()
    by_fd = {}
    for s in socks:
        poller.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
        by_fd[s.fileno()] = s
    closed = 0
    for fd, _ in poller.poll(0):
        try:
            if by_fd[fd].recv(1, socket.MSG_PEEK) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return len(socks) - closed


def client_round(bootstrap: str, topic: str, n: int) -> float:
    """Produces `n` records (acks=all), reads the partition back, checks they are
    there; returns how long it took."""
    start = time.monotonic()
    recs = [Rec(f"r{n}-{i}".encode(), key=b"k") for i in range(RECORDS_PER_ROUND)]
    produced = produce(bootstrap, topic, recs, timeout=CLIENT_ROUND_TIMEOUT_S)
    got = consume(bootstrap, topic, timeout=CLIENT_ROUND_TIMEOUT_S)
    values = {r.value for r in got}
    assert all(r.value in values for r in produced), f"round {n}: produced records not read back"
    return time.monotonic() - start


def test_hostile_connections_keep_memory_bounded(broker_factory, report):
    raise_fd_limit(ANNOUNCERS + TRICKLERS + 500)  # inherited by the broker
    b = broker_factory()
    topic = create_topic(b.bootstrap, topic_name("hostile"))
    client_round(b.bootstrap, topic, 0)  # warm: the client's paths are allocated once
    pid = b.proc.pid
    baseline = vm_rss_bytes(pid)
    sampler = Sampler(pid)
    sampler.start()

    announcers = [open_connection(b.port) for _ in range(ANNOUNCERS)]
    for s in announcers:
        s.send(struct.pack(">i", ANNOUNCED_BYTES))
    tricklers = [open_connection(b.port) for _ in range(TRICKLERS)]
    trickle = Trickler(tricklers)
    trickle.start()
    rounds = []
    try:
        deadline = time.monotonic() + HOSTILE_S
        n = 1
        while time.monotonic() < deadline:
            rounds.append(client_round(b.bootstrap, topic, n))
            n += 1
        open_announcers = still_open(announcers)
        open_tricklers = still_open(tricklers)
    finally:
        trickle.stop.set()
        trickle.join()
        sampler.stop.set()
        sampler.join()
    growth = sampler.peak - baseline
    offered = sum(trickle.sent)
    attempted = trickle.attempted
    report("hostile memory",
           f"VmRSS {baseline >> 20} MiB before, peak {sampler.peak >> 20} MiB: +{growth >> 20} MiB "
           f"(limit {GROWTH_LIMIT_BYTES >> 20}); tricklers offered {attempted >> 20} MiB, "
           f"{offered >> 20} MiB of it went into their sockets, "
           f"{trickle.refused} pieces refused (socket full); client rounds "
           f"{', '.join(f'{r:.2f}' for r in rounds)} s; open after: {open_announcers}/{ANNOUNCERS} "
           f"announcers, {open_tricklers}/{TRICKLERS} tricklers")
    for s in announcers + tricklers:
        s.close()

    # The hostile load was real: the broker held every announcer, and the tricklers
    # offered it more bytes than the growth limit.
    assert open_announcers == ANNOUNCERS, f"only {open_announcers} announcers still open"
    assert attempted > GROWTH_LIMIT_BYTES, f"tricklers offered only {attempted} bytes"
    assert len(rounds) >= 2, f"the normal client completed only {len(rounds)} rounds"
    assert growth < GROWTH_LIMIT_BYTES, \
        f"broker VmRSS grew by {growth >> 20} MiB (from {baseline >> 20} to {sampler.peak >> 20})"

    # Once the hostile peers are gone the broker serves as before.
    wait_until(lambda: client_round(b.bootstrap, topic, 10_000) < CLIENT_ROUND_TIMEOUT_S,
               timeout=60, what="a normal client round after the hostile peers closed")


@pytest.mark.parametrize("env, message", [
    ({"FRESHET_MAX_REQUEST_BYTES": "1048576"},
     "max_message_bytes (1048588) must be at most max_request_bytes (1048576)"),
    ({"FRESHET_QUEUED_MAX_REQUEST_BYTES": "1048576"},
     "max_request_bytes (104857600) must be at most queued_max_request_bytes (1048576)"),
    ({"FRESHET_FETCH_MEMORY_BYTES": "1048576"},
     "fetch_max_bytes (57671680) must be at most fetch_memory_bytes (1048576)"),
])
def test_limits_that_contradict_each_other_stop_serve_with_a_clear_error(tmp_path, env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_")}
    proc = subprocess.run([str(freshet_bin()), "serve", "--data-dir", str(tmp_path / "data"),
                           "--listen", "127.0.0.1:0"],
                          env={**clean, "FRESHET_HTTP_LISTEN": "off", **env},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0, f"serve started with {env}: {proc.stdout}"
    assert message in proc.stderr, proc.stderr
    assert not proc.stdout, "nothing may listen"
