"""Does a produce pay for fetches that wait on other partitions?

A fresh broker; `freshet perf produce` (100 B records, acks=1, one partition) is run
alone, then with 1,000 idle long-polling consumers (one connection each, Fetch v4 with
max_wait 500 ms and min_bytes 1 on their own partition of other topics, where nothing
is produced), then alone again, and so on for `--rounds` rounds, so that the machine's
drift shows in the alone-alone spread. The pollers are `freshet perf pollers`, a child
process on one thread (Rust, raw Kafka frames), whose own CPU seconds are reported next
to the broker's; before each producer run with them, they run alone for a few seconds
to measure what an expiring long poll costs the broker when nothing is produced. Kafka keys its delayed fetches by partition
(the fetch purgatory); an append should wake only the fetches on its partition.

Prints the figures and appends them, dated, to bench/results/DATE-HOST-longpoll.json.
Target (issue 9): with the pollers, produce throughput within 10% of without.
"""

import argparse
import datetime
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Broker, append_result, freshet_produce, process_cpu_seconds  # noqa: E402

POLLERS = 1_000
IDLE_TOPICS = 10            # x 100 partitions: one partition per poller
MAX_WAIT_MS = 500
RECORDS = 3_000_000
READY_TIMEOUT_S = 60        # every poller connected and answered once
SNAPSHOT_TIMEOUT_S = 10
IDLE_WINDOW_S = 3           # pollers alone: the broker's CPU per expired poll


class Pollers:
    """`freshet perf pollers`: `POLLERS` connections, each long-polling its own idle
    partition (Fetch v4, max_wait 500 ms, min_bytes 1) in a loop, in a child process on
    one thread. A line on its stdin asks for a snapshot of its counters; closing stdin
    stops it and it prints its totals."""

    def __init__(self, freshet: str, brokers: str, topics: list):
        self.process = subprocess.Popen(
            [freshet, "perf", "pollers", "--brokers", brokers, "--topics", ",".join(topics),
             "--connections", str(POLLERS), "--max-wait-ms", str(MAX_WAIT_MS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._line(READY_TIMEOUT_S, "its ready line")
        if not ready.get("ready") or ready["polling"] != POLLERS:
            self.kill()
            raise SystemExit(f"the pollers are not all polling: {ready}")

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def _line(self, timeout_s: float, what: str) -> dict:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            line = None
        if line is None:
            self.kill()
            raise SystemExit(f"freshet perf pollers: no {what} within {timeout_s} s (exit {self.process.poll()})")
        return line

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def snapshot(self) -> dict:
        """The pollers' counters now, with their CPU seconds so far."""
        cpu = self.cpu_seconds()
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        line = self._line(SNAPSHOT_TIMEOUT_S, "snapshot")
        line["cpu_s"] = cpu
        return line

    def stop(self) -> dict:
        cpu = self.cpu_seconds()
        self.process.stdin.close()
        report = self._line(3 * MAX_WAIT_MS / 1000 + 10, "final report")
        self.process.wait(timeout=10)
        report["cpu_s"] = cpu
        return report

    def kill(self):
        self.process.kill()
        self.process.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--freshet", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=RECORDS)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, "data")
    subprocess.run(["rm", "-rf", data], check=True)
    # Room for the pollers and the producer's own connections.
    os.environ["FRESHET_MAX_CONNECTIONS"] = str(POLLERS + 100)
    broker = Broker(args.freshet, data, os.path.join(args.work, "broker.log"))
    try:
        for t in range(IDLE_TOPICS):
            subprocess.run([args.freshet, "topic", "create", f"idle-{t}", "--partitions", "100",
                            "--brokers", broker.address], check=True, capture_output=True)
        topics = [f"idle-{t}" for t in range(IDLE_TOPICS)]
        rows = []
        for r in range(args.rounds):
            alone = freshet_produce(args, broker, f"p-alone-{r}", 100, "1", 1, args.records)
            pollers = Pollers(args.freshet, broker.address, topics)
            # The pollers alone for a few seconds: what an expiring long poll costs the
            # broker when nothing is produced (a measurement window, not a wait).
            idle_broker_cpu = broker.cpu_seconds()
            idle_start = pollers.snapshot()
            time.sleep(IDLE_WINDOW_S)
            idle_end = pollers.snapshot()
            idle_broker_cpu = broker.cpu_seconds() - idle_broker_cpu
            polled = freshet_produce(args, broker, f"p-polled-{r}", 100, "1", 1, args.records)
            during = pollers.snapshot()
            final = pollers.stop()
            idle_answers = idle_end["answers"] - idle_start["answers"]
            answers = during["answers"] - idle_end["answers"]
            pollers_cpu = during["cpu_s"] - idle_end["cpu_s"]
            rows.append({"alone_records_per_s": alone["records_per_s"],
                         "with_pollers_records_per_s": polled["records_per_s"],
                         "ratio": round(polled["records_per_s"] / alone["records_per_s"], 3),
                         "alone_broker_cpu_s_per_million": alone["broker_cpu_s_per_million_records"],
                         "with_pollers_broker_cpu_s_per_million": polled["broker_cpu_s_per_million_records"],
                         "alone_broker_cpu_s": alone["broker_cpu_s"],
                         "with_pollers_broker_cpu_s": polled["broker_cpu_s"],
                         "poller_answers_during_run": answers,
                         "pollers_cpu_s_during_run": round(pollers_cpu, 3),
                         "idle_window_s": IDLE_WINDOW_S,
                         "idle_answers": idle_answers,
                         "idle_broker_cpu_s": round(idle_broker_cpu, 3),
                         "idle_pollers_cpu_s": round(idle_end["cpu_s"] - idle_start["cpu_s"], 3),
                         "broker_cpu_us_per_expired_poll": round(idle_broker_cpu / idle_answers * 1e6, 1)
                         if idle_answers else None,
                         "pollers_cpu_s_total": round(final["cpu_s"], 3),
                         "poller_answers_total": final["answers"], "poller_errors": final["errors"],
                         "poller_report": final})
            print(f"round {r + 1}: alone {alone['records_per_s']:,.0f} rec/s "
                  f"(broker {alone['broker_cpu_s_per_million_records']} CPU-s/M), with {POLLERS} pollers "
                  f"{polled['records_per_s']:,.0f} rec/s (broker {polled['broker_cpu_s_per_million_records']} "
                  f"CPU-s/M; {answers:,} fetch answers to them meanwhile, pollers' CPU {pollers_cpu:.2f} s); "
                  f"idle: {idle_answers / IDLE_WINDOW_S:,.0f} answers/s, broker "
                  f"{rows[-1]['broker_cpu_us_per_expired_poll']} CPU-us per expired poll; "
                  f"poller errors {final['errors']}",
                  flush=True)
    finally:
        broker.stop()
    alone = statistics.median(r["alone_records_per_s"] for r in rows)
    polled = statistics.median(r["with_pollers_records_per_s"] for r in rows)
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "host": platform.node(), "freshet": args.freshet, "records": args.records, "pollers": POLLERS,
               "median_alone_records_per_s": alone, "median_with_pollers_records_per_s": polled,
               "ratio": round(polled / alone, 3),
               "median_alone_broker_cpu_s_per_million": statistics.median(
                   r["alone_broker_cpu_s_per_million"] for r in rows),
               "median_with_pollers_broker_cpu_s_per_million": statistics.median(
                   r["with_pollers_broker_cpu_s_per_million"] for r in rows),
               "rounds": rows}
    print(f"median: alone {alone:,.0f} rec/s, with pollers {polled:,.0f} rec/s: ratio {polled / alone:.3f} "
          f"(target >= 0.90)")
    out = append_result(summary["date"][:10], summary["host"], "longpoll", summary)
    print(f"==> {out}")


if __name__ == "__main__":
    main()
