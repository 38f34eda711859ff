"""Durability under SIGKILL: a record acknowledged with acks=all survives `kill -9` of the
broker at any moment, exactly once, in order, and the recovered log reads back cleanly.
A torn or corrupt tail left in a segment file is cut at the last valid batch, the cut is
logged with its byte count, and appends continue after it.

One seed drives the run (FRESHET_E2E_SEED to replay; FRESHET_E2E_CRASH_CYCLES to change
the number of cycles); it is in every failure message.
"""

from __future__ import annotations

import os
import random
import re
import struct
import time
from collections import defaultdict

from confluent_kafka import Producer, TopicPartition

from helpers import Rec, consume, consumer, content, create_topic, produce, topic_name, watermarks

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
    cuts_logged: list[tuple[int, int]] = []   # (cycle, bytes) of every torn tail the broker cut

    def restart(where: str, cycle: int) -> str:
        """Start after a SIGKILL; returns the broker's recovery report: what it logged
        about cutting torn tails, checked for sense."""
        log_at = b.log_size()
        try:
            b.start()
        except AssertionError as e:
            raise AssertionError(f"{where}: broker did not restart after SIGKILL: {e}") from None
        cuts, recovered = recovery_lines(b.stderr_since(log_at, limit=10_000_000))
        assert all(n > 0 for _, n in cuts), f"{where}: a cut of 0 bytes logged: {cuts}"
        for topic, partition, n in recovered:
            assert topic == TOPIC and 0 <= partition < PARTITIONS, \
                f"{where}: unexpected recovery line {topic}/{partition} truncated_bytes={n}"
        assert sum(n for _, n in cuts) <= sum(n for _, _, n in recovered), \
            f"{where}: segment cuts {cuts} not all in the partitions' reports {recovered}"
        cuts_logged.extend((cycle, n) for _, n in cuts)
        return f" | recovery cut {[n for _, n in cuts]} bytes" if cuts else ""

    for cycle in range(CYCLES):
        where = f"{tag} cycle {cycle}"
        recovery = restart(where, cycle) if cycle > 0 else ""
        # Invariant at every step: nothing acked is above the recovered log end.
        hw = high_watermarks(b.bootstrap)
        for seq, (p, off) in acked.items():
            assert off < hw[p], f"{where}: acked seq {seq} at {p}/{off} but high watermark of {p} is {hw[p]}"

        kill_after = rng.uniform(0.2, 1.5)
        linger_ms = rng.choice([0, 1, 5])
        codec = rng.choice(["none", "none", "gzip", "lz4", "zstd", "snappy"])
        producer = Producer({
            "bootstrap.servers": b.bootstrap, "acks": "all", "enable.idempotence": False,
            "message.send.max.retries": 0, "linger.ms": linger_ms, "message.timeout.ms": 5000,
            "compression.type": codec,
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
        cycle_lines.append(f"cycle {cycle}: kill at {kill_after:.2f}s linger.ms={linger_ms} {codec} "
                           f"sent {next_seq - first_seq} acked {cycle_acked} not acked {cycle_failed}{recovery}")

    cycle_lines.append(f"final start{restart(f'{tag} final start', CYCLES)}")
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
               f"duplicated={len(duplicated)} moved={len(moved)} read_errors={len(errors)} "
               f"torn_tails_cut={len(cuts_logged)} cut_bytes={sum(n for _, n in cuts_logged)}")
    (tmp_path / "crash-summary.txt").write_text(summary + "\n" + "\n".join(cycle_lines) + "\n")
    report("crash", summary)

    assert not errors, f"{tag}: errors reading the recovered log: {errors[:10]}"
    assert not lost, f"{tag}: {len(lost)} acked records lost, e.g. {[(s, acked[s]) for s in lost[:10]]}"
    assert not duplicated, f"{tag}: records stored twice: {[(s, seen[s]) for s in duplicated[:10]]}"
    assert not moved, f"{tag}: acked records read at another offset: {[(s, acked[s], seen[s]) for s in moved[:10]]}"
    assert not wrong_partition, f"{tag}: records in the wrong partition: {wrong_partition[:10]}"
    assert not problems, f"{tag}: " + "; ".join(problems)
    assert len(acked) > 0, f"{tag}: no record was ever acknowledged in {CYCLES} cycles"


# ---- the broker's own recovery report ---------------------------------------------------

# storage::segment, one line per segment cut; broker::topics, one line per partition.
CUT_LINE = re.compile(r"truncating torn or corrupt log tail .*\bposition=(?P<position>\d+) "
                      r"cut_bytes=(?P<bytes>\d+)")
RECOVERED_LINE = re.compile(r'recovered partition log topic="?(?P<topic>[^" ]+)"? partition=(?P<partition>\d+) '
                            r"truncated_bytes=(?P<bytes>\d+)")
BATCH_HEADER = struct.Struct(">qiibIhi")  # base offset, length, leader epoch, magic, crc, attrs, last delta


def segment_batches(path) -> list[tuple[int, int, int, int]]:
    """(position, size, base offset, last offset) of each whole batch in a segment file."""
    data = path.read_bytes()
    out, pos = [], 0
    while pos + BATCH_HEADER.size <= len(data):
        base, length, _epoch, magic, _crc, _attrs, last_delta = BATCH_HEADER.unpack_from(data, pos)
        size = 12 + length
        assert magic == 2 and length > 0 and pos + size <= len(data), f"{path}: no whole batch at {pos}"
        out.append((pos, size, base, base + last_delta))
        pos += size
    assert pos == len(data), f"{path}: {len(data) - pos} bytes after the last whole batch"
    return out


def recovery_lines(stderr: str) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]]]:
    """(position, cut bytes) of every segment cut and (topic, partition, bytes) of every
    partition reported as truncated, in a stretch of broker stderr."""
    cuts = [(int(m["position"]), int(m["bytes"])) for m in CUT_LINE.finditer(stderr)]
    recovered = [(m["topic"], int(m["partition"]), int(m["bytes"])) for m in RECOVERED_LINE.finditer(stderr)]
    return cuts, recovered


def test_torn_tail_is_cut_logged_and_appended_after(broker_factory):
    # acks=1 and no background flush: nothing written after topic creation is fsync'd,
    # so start-up validates every batch of the crashed log.
    b = broker_factory(env={"FRESHET_FLUSH_INTERVAL_MS": "0"})
    topic = create_topic(b.bootstrap, topic_name("torn"))
    recs = []
    for n in range(5):  # one produce call each, so the segment holds several batches
        recs += produce(b.bootstrap, topic, [Rec(f"batch{n}-rec{i}".encode() * 20, f"k{n}".encode(), (("n", b"%d" % n),),
                                                 1_700_000_000_000 + 10 * n + i, 0) for i in range(3)],
                        acks="1", **{"linger.ms": 50})
    assert [r.offset for r in recs] == list(range(15))

    def crash_and_damage(damage) -> tuple[int, int]:
        """SIGKILL, let `damage(segment_path, batches)` change the segment file, restart;
        returns (cut position, cut bytes) from the restart's log, checking that the broker
        reports exactly one cut in this partition and no other damage."""
        b.kill()
        seg = b.partition_dir(topic, 0) / ("0" * 20 + ".log")
        expect_position, expect_bytes = damage(seg, segment_batches(seg))
        log_at = b.log_size()
        b.start()
        stderr = b.stderr_since(log_at)
        cuts, recovered = recovery_lines(stderr)
        assert cuts == [(expect_position, expect_bytes)], f"segment cuts logged: {cuts}\n{stderr}"
        assert recovered == [(topic, 0, expect_bytes)], f"partition recovery lines: {recovered}\n{stderr}"
        return expect_position, expect_bytes

    # 1. A torn write: the last batch only half on disk.
    def tear_last_batch(seg, batches):
        pos, size, _, _ = batches[-1]
        with open(seg, "r+b") as f:
            f.truncate(pos + size // 2)
        return pos, size // 2
    last_base = segment_batches(b.partition_dir(topic, 0) / ("0" * 20 + ".log"))[-1][2]
    crash_and_damage(tear_last_batch)
    kept = [r for r in recs if r.offset < last_base]
    assert kept and len(kept) < len(recs)
    assert watermarks(b.bootstrap, topic) == (0, last_base)
    assert content(consume(b.bootstrap, topic)) == content(kept), "every batch before the cut is served"
    after_tear = produce(b.bootstrap, topic, [Rec(b"after-tear", timestamp=1_800_000_000_000, partition=0)],
                         acks="1")
    assert after_tear[0].offset == last_base, "appends continue where the cut log ends"
    kept += after_tear

    # 2. Garbage after the last whole batch (a crash that extended the file with junk),
    # then a zero-filled tail (an extended file whose data never reached the disk).
    rng = random.Random(20240601)
    for name, junk in (("garbage", bytes(rng.randrange(256) for _ in range(1000))), ("zeros", bytes(4096))):
        def append_junk(seg, batches, junk=junk):
            end = batches[-1][0] + batches[-1][1]
            with open(seg, "ab") as f:
                f.write(junk)
            return end, len(junk)
        crash_and_damage(append_junk)
        assert content(consume(b.bootstrap, topic)) == content(kept), f"{name}: every batch before the cut"
        more = produce(b.bootstrap, topic, [Rec(name.encode(), timestamp=1_800_000_000_001, partition=0)],
                       acks="1")
        assert more[0].offset == kept[-1].offset + 1, f"{name}: appends continue after the cut"
        kept += more

    # 3. A whole batch that fails its CRC (a bit flipped in its last record): it and
    # everything after it is cut, nothing before it.
    def flip_a_bit(seg, batches):
        pos, size, base, _ = batches[-1]
        assert base == kept[-1].offset
        with open(seg, "r+b") as f:
            f.seek(pos + size - 2)
            byte = f.read(1)
            f.seek(pos + size - 2)
            f.write(bytes([byte[0] ^ 0x10]))
        return pos, size
    crash_and_damage(flip_a_bit)
    kept.pop()
    assert watermarks(b.bootstrap, topic) == (0, kept[-1].offset + 1)
    assert content(consume(b.bootstrap, topic)) == content(kept), "corrupt batch: every batch before it"
    kept += produce(b.bootstrap, topic, [Rec(b"after-corrupt", timestamp=1_800_000_000_002, partition=0)],
                    acks="1")
    assert kept[-1].offset == kept[-2].offset + 1

    # A clean restart afterwards has nothing to cut and serves everything.
    log_at = b.log_size()
    b.restart()
    assert recovery_lines(b.stderr_since(log_at)) == ([], [])
    got = consume(b.bootstrap, topic)
    assert [r.offset for r in got] == list(range(len(kept)))
    assert content(got) == content(kept)
