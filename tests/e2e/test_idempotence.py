"""Idempotent producer (librdkafka, enable.idempotence=true) through a TCP proxy that
cuts every connection again and again, and across a SIGKILL of the broker: every
record ends up in the log exactly once, in production order per partition.

The broker advertises the proxy's address, so every connection the client makes goes
through it. One seed drives the cut times (FRESHET_E2E_SEED to replay); it is in
every failure message.
"""

from __future__ import annotations

import os
import random
import socket
import threading

from confluent_kafka import Producer

from helpers import consume, create_topic, topic_name, wait_until

SEED = int(os.environ.get("FRESHET_E2E_SEED", str(random.SystemRandom().randrange(1 << 32))))
PARTITIONS = 3
RECORDS = 30_000


class CuttingProxy:
    """Forwards connections on an ephemeral loopback port to `upstream_port()`;
    `cut()` closes every connection open at that moment."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.open: list[socket.socket] = []
        self.accepted = 0
        self.cuts = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port()), timeout=5)
            except OSError:
                client.close()  # broker down: the client retries
                continue
            upstream.settimeout(None)
            with self.lock:
                self.open += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        with self.lock:
            victims, self.open = self.open, []
            self.cuts += 1
        for s in victims:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.closed = True
        self.listener.close()
        self.cut()


def produce_through(proxy: CuttingProxy, topic: str, disruptions: dict[int, object],
                    tag: str) -> dict[int, list[int]]:
    """Produces RECORDS records (value = sequence number, partition = seq % PARTITIONS),
    calling `disruptions[seq]()` just before producing record `seq`: from the producing
    thread, with the records produced since the last poll not yet acknowledged, so each
    disruption hits a client with records in flight, by construction (a disruption run
    from another thread on a progress count can fire after the last delivery, or
    several at once against a client that has not reconnected yet). Returns sequences
    per partition in production order, after every delivery succeeded."""
    p = Producer({
        "bootstrap.servers": f"127.0.0.1:{proxy.port}",
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "batch.num.messages": 200,
        "message.timeout.ms": 120_000,
        "reconnect.backoff.ms": 10,
        "reconnect.backoff.max.ms": 200,
    })
    errors: list[str] = []

    def on_delivery(err, msg):
        if err is not None:
            errors.append(f"{err} (value {msg.value()!r})")

    expected: dict[int, list[int]] = {p_: [] for p_ in range(PARTITIONS)}
    for seq in range(RECORDS):
        if seq in disruptions:
            disruptions[seq]()
        part = seq % PARTITIONS
        while True:
            try:
                p.produce(topic, value=str(seq).encode(), partition=part, on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.05)
        expected[part].append(seq)
        if seq % 500 == 0:
            p.poll(0)
    remaining = p.flush(120)
    assert remaining == 0, f"{tag} {remaining} records never delivered"
    assert not errors, f"{tag} {len(errors)} delivery errors, first: {errors[0]}"
    return expected


def check_exactly_once(bootstrap: str, topic: str, expected: dict[int, list[int]], tag: str):
    for part, seqs in expected.items():
        got = consume(bootstrap, topic, partitions=(part,), timeout=60)
        values = [int(r.value) for r in got]
        dupes = len(values) - len(set(values))
        assert dupes == 0, f"{tag} partition {part}: {dupes} duplicated records"
        assert values == seqs, (f"{tag} partition {part}: {len(values)} records, expected {len(seqs)}; "
                                f"first difference at index "
                                f"{next((i for i, (a, b) in enumerate(zip(values, seqs)) if a != b), min(len(values), len(seqs)))}")


def test_connections_cut_repeatedly_store_every_record_once(broker_factory):
    rng = random.Random(SEED)
    tag = f"[seed={SEED}]"
    holder = {}
    proxy = CuttingProxy(lambda: holder["broker"].port)
    b = broker_factory(env={"FRESHET_ADVERTISED_LISTENER": f"127.0.0.1:{proxy.port}"})
    holder["broker"] = b
    topic = create_topic(b.bootstrap, topic_name("idem-cut"), partitions=PARTITIONS)
    cuts = 14
    reconnected_at_cut = [0]

    def cut():
        # Only once the client has come back since the previous cut (a cut of nothing
        # tests nothing), then at once, with the records produced since in flight.
        wait_until(lambda: proxy.accepted > reconnected_at_cut[0], timeout=60,
                   what=lambda: f"{tag} the client to reconnect after cut {proxy.cuts} "
                                f"({proxy.accepted} connections)")
        reconnected_at_cut[0] = proxy.accepted
        proxy.cut()

    # One cut at a random point of each of `cuts` stretches (none in the first and
    # last: the client has started, and records still follow the last cut).
    step = RECORDS // (cuts + 2)
    at = {i * step + rng.randrange(step): cut for i in range(1, cuts + 1)}
    try:
        expected = produce_through(proxy, topic, at, tag)
        assert proxy.cuts == cuts, f"{tag} {proxy.cuts} cuts, expected {cuts}"
        # Every cut found a connection the client made after the previous one.
        assert proxy.accepted > cuts, f"{tag} the client reconnected only {proxy.accepted} times"
        # The broker advertises the proxy, so reading back goes through it too.
        check_exactly_once(f"127.0.0.1:{proxy.port}", topic, expected, tag)
    finally:
        proxy.close()
    print(f"idempotence: seed={SEED} records={RECORDS} cuts={proxy.cuts} connections={proxy.accepted}")


def test_producer_state_survives_sigkill_of_the_broker(broker_factory):
    rng = random.Random(SEED + 1)
    tag = f"[seed={SEED}]"
    holder = {}
    proxy = CuttingProxy(lambda: holder["broker"].port)
    b = broker_factory(env={"FRESHET_ADVERTISED_LISTENER": f"127.0.0.1:{proxy.port}"})
    holder["broker"] = b
    topic = create_topic(b.bootstrap, topic_name("idem-kill"), partitions=PARTITIONS)
    kills = []

    def kill():
        b.restart(kill=True, same_port=True)
        kills.append(len(kills))

    # Two SIGKILLs while records are in flight; the broker comes back on its port.
    at = {seq: kill for seq in rng.sample(range(RECORDS // 10, RECORDS * 8 // 10), 2)}
    try:
        expected = produce_through(proxy, topic, at, tag)
        assert len(kills) == 2, f"{tag} the broker was killed {len(kills)} times, not twice"
        check_exactly_once(f"127.0.0.1:{proxy.port}", topic, expected, tag)
    finally:
        proxy.close()
    print(f"idempotence: seed={SEED} sigkill before records {sorted(at)}")
