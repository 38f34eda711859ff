"""A failed fsync is final for the bytes it covered. With fsync/fdatasync made to fail
with EIO (an LD_PRELOAD shim, `shims/failing_fsync.c`) for 1.5 s and then to work
again, as Linux behaves after a write-back error, an idempotent acks=all producer gets
errors, never acknowledgements, for every record it sends after the failure began
(before this was fixed: 308,738 such records were acknowledged); the partition stays
offline (KAFKA_STORAGE_ERROR) until the broker restarts, and after the restart every
record that was acknowledged is there, once, and the partition takes records again.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

from confluent_kafka import Producer

from helpers import consume, create_topic, topic_name

SHIM_SOURCE = Path(__file__).parent / "shims" / "failing_fsync.c"
FAIL_FOR_S = 1.5
PARTITIONS = 2


def build_shim(tmp_path: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed for the fsync shim"
    out = tmp_path / "failing_fsync.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM_SOURCE), "-ldl"],
                   check=True, capture_output=True)
    return out


class Sender:
    """An idempotent acks=all producer sending numbered records as fast as they are
    acknowledged (at most 2,000 queued), remembering each one's fate."""

    def __init__(self, bootstrap: str, topic: str):
        self.topic = topic
        self.p = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                           "enable.idempotence": True, "linger.ms": 2,
                           "message.timeout.ms": 4000, "retry.backoff.ms": 50})
        self.sent = 0
        self.acked: dict[int, tuple[int, int]] = {}   # n -> (partition, offset)
        self.failed: dict[int, str] = {}
        self.marks: dict[str, int] = {}                # phase name -> first n sent in it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _report(self, n: int):
        def cb(err, msg):
            if err is None:
                self.acked[n] = (msg.partition(), msg.offset())
            else:
                self.failed[n] = err.name()
        return cb

    def _run(self):
        while not self._stop.is_set():
            if self.sent - len(self.acked) - len(self.failed) >= 2000:
                self.p.poll(0.01)
                continue
            n = self.sent
            self.p.produce(self.topic, value=str(n).encode(), key=str(n % 97).encode(),
                           on_delivery=self._report(n))
            self.sent += 1
            self.p.poll(0)

    def start(self):
        self._thread.start()

    def mark(self, phase: str):
        self.marks[phase] = self.sent

    def stop(self):
        self._stop.set()
        self._thread.join()
        left = self.p.flush(30)
        assert left == 0, f"{left} records neither acknowledged nor failed 30 s after the last send"


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_no_acknowledgement_covers_a_failed_fsync(broker_factory, report, tmp_path):
    shim = build_shim(tmp_path)
    flag = tmp_path / "fail-fsync"
    count = Path(f"{flag}.count")
    b = broker_factory(name="fsync", env={"LD_PRELOAD": str(shim), "FRESHET_FAIL_FSYNC_FLAG": str(flag)})
    topic = create_topic(b.bootstrap, topic_name("fsync"), partitions=PARTITIONS)
    s = Sender(b.bootstrap, topic)
    s.start()
    wait_for(lambda: len(s.acked) >= 5000, 30, "5,000 acknowledgements before the failure")
    assert not s.failed, f"errors before any fsync failed: {list(s.failed.items())[:5]}"

    s.mark("failing")
    flag.touch()
    wait_for(lambda: count.exists(), 10, "the broker's first failed fsync")
    time.sleep(FAIL_FOR_S)  # the failure lasts this long (not a synchronisation)
    flag.unlink()
    s.mark("working")
    # fsync works again now; keep sending (the queue frees as queued records time out).
    wait_for(lambda: s.sent >= s.marks["working"] + 1000, 30, "1,000 records sent after fsync works again")
    s.stop()

    after = range(s.marks["failing"], s.sent)
    acked_after = [n for n in after if n in s.acked]
    assert s.sent - s.marks["working"] > 0, "records were sent after fsync worked again"
    assert not acked_after, (
        f"{len(acked_after)} of {len(after)} records sent after fsync began failing were "
        f"acknowledged, e.g. {acked_after[:5]}")
    assert all(n in s.failed for n in after)
    log = b.stderr_since(0, limit=10_000_000)
    assert "fsync failed" in log and "offline" in log, "the broker says why the partition went offline"

    # Restart on the same data, with a working disk: every acknowledged record is there, once.
    b.kill()
    del b.env["LD_PRELOAD"]
    b.start()
    stored = consume(b.bootstrap, topic, partitions=range(PARTITIONS), timeout=60)
    by_place = {(r.partition, r.offset): int(r.value) for r in stored}
    values = [int(r.value) for r in stored]
    assert len(values) == len(set(values)), "no record is stored twice"
    missing = [n for n, place in s.acked.items() if by_place.get(place) != n]
    assert not missing, f"{len(missing)} acknowledged records lost or moved, e.g. {missing[:5]}"

    # The partitions take records again after the restart.
    again = Sender(b.bootstrap, topic)
    again.start()
    wait_for(lambda: len(again.acked) >= 100 or again.failed, 30, "acknowledgements after the restart")
    again.stop()
    assert not again.failed, list(again.failed.items())[:5]

    report("fsync failure", f"{len(s.acked)} acked before the failure, {len(after)} sent after it: "
           f"0 acknowledged, {len(after)} failed ({sorted(set(s.failed.values()))}); "
           f"{count.stat().st_size} fsyncs failed; after restart all {len(s.acked)} acked records present")
