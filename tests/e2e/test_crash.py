"""Durability under SIGKILL: a record acknowledged with acks=all survives `kill -9` of the
broker at any moment, exactly once, in order, and the recovered log reads back cleanly.

One seed drives the run (FRESHET_E2E_SEED to replay; FRESHET_E2E_CRASH_CYCLES to change
the number of cycles); it is in every failure message.
"""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict

from confluent_kafka import Producer, TopicPartition

from helpers import consume, consumer, create_topic

CYCLES = int(os.environ.get("FRESHET_E2E_CRASH_CYCLES", "20"))
SEED = int(os.environ.get("FRESHET_E2E_SEED", str(random.SystemRandom().randrange(1 << 32))))
PARTITIONS = 3
TOPIC = "crash-durability"
RECORDS_PER_S = 20_000  # pacing, so the final read-back stays quick
MAX_QUEUED = 5_000


def high_watermarks(bootstrap: str) -> dict[int, int]:
    c = consumer(bootstrap)
    try:
        return {p: c.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10, cached=False)[1]
                for p in range(PARTITIONS)}
    finally:
        c.close()


def test_acked_records_survive_sigkill(broker_factory, report, tmp_path):
    rng = random.Random(SEED)
    tag = f"[seed={SEED}]"
    b = broker_factory(name="crash")
    create_topic(b.bootstrap, TOPIC, partitions=PARTITIONS)

    acked: dict[int, tuple[int, int]] = {}   # seq -> (partition, offset) from the delivery report
    failed = 0
    next_seq = 0
    cycle_lines = []

    for cycle in range(CYCLES):
        where = f"{tag} cycle {cycle}"
        if cycle > 0:
            try:
                b.start()
            except AssertionError as e:
                raise AssertionError(f"{where}: broker did not restart after SIGKILL: {e}") from None
        # Invariant at every step: nothing acked is above the recovered log end.
        hw = high_watermarks(b.bootstrap)
        for seq, (p, off) in acked.items():
            assert off < hw[p], f"{where}: acked seq {seq} at {p}/{off} but high watermark of {p} is {hw[p]}"

        kill_after = rng.uniform(0.2, 1.5)
        linger_ms = rng.choice([0, 1, 5])
        producer = Producer({
            "bootstrap.servers": b.bootstrap, "acks": "all", "enable.idempotence": False,
            "message.send.max.retries": 0, "linger.ms": linger_ms, "message.timeout.ms": 5000,
            "compression.type": "none",
        })
        cycle_acked = cycle_failed = 0

        def on_delivery(err, msg):
            nonlocal cycle_acked, cycle_failed
            seq = int(msg.value())
            if err is None:
                assert seq not in acked, f"{tag}: seq {seq} acked twice"
                acked[seq] = (msg.partition(), msg.offset())
                cycle_acked += 1
            else:
                cycle_failed += 1

        started = time.monotonic()
        first_seq = next_seq
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= kill_after:
                b.kill()
                break
            budget = int(elapsed * RECORDS_PER_S) - (next_seq - first_seq)
            if budget <= 0 or len(producer) >= MAX_QUEUED:
                producer.poll(0.002)
                continue
            for _ in range(min(budget, 500)):
                producer.produce(TOPIC, value=b"%d" % next_seq, partition=next_seq % PARTITIONS,
                                 on_delivery=on_delivery)
                next_seq += 1
            producer.poll(0)
        # The broker is gone: whatever was not acknowledged by now never will be.
        producer.poll(0.2)
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        assert producer.flush(10) == 0, f"{where}: producer did not drain after purge"
        failed += cycle_failed
        cycle_lines.append(f"cycle {cycle}: kill at {kill_after:.2f}s linger.ms={linger_ms} "
                           f"sent {next_seq - first_seq} acked {cycle_acked} not acked {cycle_failed}")

    b.start()
    got = consume(b.bootstrap, TOPIC, partitions=range(PARTITIONS), timeout=120, allow_errors=True,
                  **{"check.crcs": True})
    errors = consume.errors
    b.stop()

    seen: dict[int, list[tuple[int, int]]] = defaultdict(list)
    per_partition: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r in got:
        seq = int(r.value)
        seen[seq].append((r.partition, r.offset))
        per_partition[r.partition].append((r.offset, seq))

    lost = sorted(s for s in acked if s not in seen)
    duplicated = sorted(s for s, places in seen.items() if len(places) > 1)
    moved = sorted(s for s, place in acked.items() if s in seen and seen[s] != [place])
    wrong_partition = sorted(s for s, places in seen.items() if any(p != s % PARTITIONS for p, _ in places))
    problems = []
    for p, recs in per_partition.items():
        recs.sort()
        offsets = [o for o, _ in recs]
        if offsets != list(range(len(offsets))):
            problems.append(f"partition {p}: offsets not contiguous from 0 ({offsets[:5]}...)")
        seqs = [s for _, s in recs]
        out_of_order = [(a, b2) for a, b2 in zip(seqs, seqs[1:]) if b2 <= a]
        if out_of_order:
            problems.append(f"partition {p}: records out of production order, e.g. {out_of_order[:5]}")

    summary = (f"seed={SEED} cycles={CYCLES} sent={next_seq} acked={len(acked)} not_acked={failed} "
               f"stored={len(got)} stored_unacked={len(got) - len(acked) + len(lost)} lost={len(lost)} "
               f"duplicated={len(duplicated)} moved={len(moved)} read_errors={len(errors)}")
    (tmp_path / "crash-summary.txt").write_text(summary + "\n" + "\n".join(cycle_lines) + "\n")
    report("crash", summary)

    assert not errors, f"{tag}: errors reading the recovered log: {errors[:10]}"
    assert not lost, f"{tag}: {len(lost)} acked records lost, e.g. {[(s, acked[s]) for s in lost[:10]]}"
    assert not duplicated, f"{tag}: records stored twice: {[(s, seen[s]) for s in duplicated[:10]]}"
    assert not moved, f"{tag}: acked records read at another offset: {[(s, acked[s], seen[s]) for s in moved[:10]]}"
    assert not wrong_partition, f"{tag}: records in the wrong partition: {wrong_partition[:10]}"
    assert not problems, f"{tag}: " + "; ".join(problems)
    assert len(acked) > 0, f"{tag}: no record was ever acknowledged in {CYCLES} cycles"
