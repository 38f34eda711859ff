"""Does a produce pay for fetches that wait on other partitions?

A fresh broker; `freshet perf produce` (100 B records, acks=1, one partition) is run
alone, then with 1,000 idle long-polling consumers (one connection each, Fetch v4 with
max_wait 500 ms and min_bytes 1 on their own partition of other topics, where nothing
is produced), then alone again, and so on for `--rounds` rounds, so that the machine's
drift shows in the alone-alone spread. Kafka keys its delayed fetches by partition
(the fetch purgatory); an append should wake only the fetches on its partition.

Prints the figures and appends them, dated, to bench/results/DATE-HOST-longpoll.json.
Target (issue 9): with the pollers, produce throughput within 10% of without.
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import RESULTS, Broker, freshet_produce  # noqa: E402

POLLERS = 1_000
IDLE_TOPICS = 10            # x 100 partitions: one partition per poller
MAX_WAIT_MS = 500
RECORDS = 3_000_000


def fetch_v4(topic: bytes, partition: int, correlation_id: int) -> bytes:
    body = (struct.pack(">hhi", 1, 4, correlation_id) + struct.pack(">h", 2) + b"lp"
            + struct.pack(">iiiib", -1, MAX_WAIT_MS, 1, 1 << 20, 0) + struct.pack(">i", 1)
            + struct.pack(">h", len(topic)) + topic + struct.pack(">iiqi", 1, partition, 0, 1 << 20))
    return struct.pack(">i", len(body)) + body


class Pollers:
    """`POLLERS` connections, each long-polling its own idle partition in a loop, on
    an asyncio loop in a thread of this process."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.answers = 0
        self.errors = 0
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.stopping = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),), daemon=True)

    async def poll(self, i: int, started: list):
        topic = f"idle-{i // 100}".encode()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        started.append(1)
        if len(started) == POLLERS:
            self.ready.set()
        corr = 0
        try:
            while not self.stopping.is_set():
                corr += 1
                writer.write(fetch_v4(topic, i % 100, corr))
                await writer.drain()
                size = struct.unpack(">i", await reader.readexactly(4))[0]
                answer = await reader.readexactly(size)
                if struct.unpack(">i", answer[:4])[0] != corr:
                    self.errors += 1
                self.answers += 1
        except (OSError, asyncio.IncompleteReadError):
            self.errors += 1
        finally:
            writer.close()

    async def main(self):
        self.stopping = asyncio.Event()
        started: list = []
        tasks = [asyncio.create_task(self.poll(i, started)) for i in range(POLLERS)]
        await asyncio.gather(*tasks)

    def start(self):
        self.thread.start()
        if not self.ready.wait(60):
            raise SystemExit("the pollers did not all connect within 60 s")

    def stop(self):
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(3 * MAX_WAIT_MS / 1000 + 10)
        if self.thread.is_alive():
            raise SystemExit("the pollers did not stop")


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
        host, port = broker.address.rsplit(":", 1)
        rows = []
        for r in range(args.rounds):
            alone = freshet_produce(args, broker, f"p-alone-{r}", 100, "1", 1, args.records)
            pollers = Pollers(host, int(port))
            pollers.start()
            answers_before = pollers.answers
            polled = freshet_produce(args, broker, f"p-polled-{r}", 100, "1", 1, args.records)
            answers = pollers.answers - answers_before
            pollers.stop()
            rows.append({"alone_records_per_s": alone["records_per_s"],
                         "with_pollers_records_per_s": polled["records_per_s"],
                         "alone_broker_cpu_s_per_million": alone["broker_cpu_s_per_million_records"],
                         "with_pollers_broker_cpu_s_per_million": polled["broker_cpu_s_per_million_records"],
                         "poller_answers_during_run": answers, "poller_errors": pollers.errors})
            print(f"round {r + 1}: alone {alone['records_per_s']:,.0f} rec/s, with {POLLERS} pollers "
                  f"{polled['records_per_s']:,.0f} rec/s ({answers:,} fetch answers to them meanwhile)",
                  flush=True)
    finally:
        broker.stop()
    alone = statistics.median(r["alone_records_per_s"] for r in rows)
    polled = statistics.median(r["with_pollers_records_per_s"] for r in rows)
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "host": platform.node(), "freshet": args.freshet, "records": args.records, "pollers": POLLERS,
               "median_alone_records_per_s": alone, "median_with_pollers_records_per_s": polled,
               "ratio": round(polled / alone, 3), "rounds": rows}
    print(f"median: alone {alone:,.0f} rec/s, with pollers {polled:,.0f} rec/s: ratio {polled / alone:.3f} "
          f"(target >= 0.90)")
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, f"{summary['date'][:10]}-{summary['host']}-longpoll.json")
    with open(out, "a") as f:
        f.write(json.dumps(summary) + "\n")
    print(f"==> {out}")


if __name__ == "__main__":
    main()
