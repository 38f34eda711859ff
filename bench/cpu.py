"""Broker CPU per record, two binaries A/B in the same run (issue 9 part 8).

For each round and each of the two binaries: a fresh broker on a free port with a fresh
data directory; a 1-partition topic; librdkafka's rdkafka_performance produces
`--records` records of 100 B with acks=1, then consumes the whole topic from the start;
then a second 1-partition topic gets the same produce with acks=-1. The broker's CPU
(user+sys from /proc/PID/stat, all threads) before and after each client run gives
CPU-s per million records; rdkafka_performance's own timing gives records/s.

The machine's speed drifts (bench/README.md's caveat), so the binaries alternate within
every round, before then after in odd rounds and after then before in even ones, and
the comparison is of the medians over rounds.

Prints the table and appends the figures, dated, to bench/results/DATE-HOST-cpu.json
(one JSON object per line). Target (issue 9): the broker uses at most 0.05 CPU-s per
million records produced (acks=1) and consumed.
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import RESULTS, Broker, fmt_rate, rdkafka_consume, rdkafka_produce  # noqa: E402

RECORD_BYTES = 100
RECORDS = 5_000_000
TARGET_CPU_S_PER_MILLION = 0.05
# (key, label, whether the target applies)
MEASUREMENTS = [
    ("produce_acks1", "produce acks=1", True),
    ("consume", "consume", True),
    ("produce_acks_all", "produce acks=-1", False),
]
# Before each client run the broker must have been idle (at most one 10 ms clock tick of
# CPU) for QUIET_S, so that the previous run's tail (the background flush of what was
# just produced, idle-connection reaping) is not billed to the next one.
QUIET_S = 0.5
QUIET_DEADLINE_S = 20.0
POLL_INTERVAL_S = 0.05


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def settle(broker):
    """Writes back the page cache (so the broker's next fsync has nothing left to do from
    earlier runs), then waits until the broker is idle. Returns the seconds waited, or
    None when it was still busy at the deadline (recorded with the figures, not fatal:
    the noise then shows in the rounds)."""
    os.sync()
    start = time.monotonic()
    window_start, window_cpu = start, broker.cpu_seconds()
    while True:
        now = time.monotonic()
        cpu = broker.cpu_seconds()
        if cpu - window_cpu > 0.011:
            window_start, window_cpu = now, cpu
        elif now - window_start >= QUIET_S:
            return round(now - start, 2)
        if now - start > QUIET_DEADLINE_S:
            log(f"warning: broker still busy after {QUIET_DEADLINE_S} s; measuring anyway")
            return None
        time.sleep(POLL_INTERVAL_S)


def figures(row, settled_s):
    return {
        "cpu_s": row["broker_cpu_s"],
        "cpu_s_per_million": row["broker_cpu_s_per_million_records"],
        "records_per_s": row["records_per_s"],
        "settled_s": settled_s,
        "load_1m": round(os.getloadavg()[0], 2),
    }


def one_binary(args, label, freshet, round_no):
    """A fresh broker of `freshet`; the three measurements; the broker stopped and its
    data removed. Raises on any client failure or short count."""
    client = types.SimpleNamespace(freshet=freshet, rdkafka_performance=args.rdkafka_performance)
    name = f"{label}-r{round_no}"
    data = os.path.join(args.work, f"{name}-data")
    shutil.rmtree(data, ignore_errors=True)
    broker = Broker(freshet, data, os.path.join(args.work, f"{name}.log"))
    result = {}
    try:
        settled = settle(broker)
        row = rdkafka_produce(client, broker, "cpu-acks1", RECORD_BYTES, "1", 1, args.records)
        if row["records"] != args.records:
            raise RuntimeError(f"{name}: {row['records']} of {args.records} records delivered (acks=1)")
        result["produce_acks1"] = figures(row, settled)

        settled = settle(broker)
        row = rdkafka_consume(client, broker, "cpu-acks1", 1, args.records)
        if row["records"] != args.records or row["bytes"] != args.records * RECORD_BYTES:
            raise RuntimeError(f"{name}: consumed {row['records']} records ({row['bytes']} B), "
                               f"expected {args.records} ({args.records * RECORD_BYTES} B)")
        result["consume"] = figures(row, settled)

        settled = settle(broker)
        row = rdkafka_produce(client, broker, "cpu-acksall", RECORD_BYTES, "-1", 1, args.records)
        if row["records"] != args.records:
            raise RuntimeError(f"{name}: {row['records']} of {args.records} records delivered (acks=-1)")
        result["produce_acks_all"] = figures(row, settled)
    finally:
        broker.stop()
        shutil.rmtree(data, ignore_errors=True)
    for key, text, _ in MEASUREMENTS:
        log(f"  {name:10} {text:16} {result[key]['cpu_s_per_million']:.4f} CPU-s/M  "
            f"{fmt_rate(result[key]['records_per_s']):>6} rec/s")
    return result


def summarise(rounds):
    summary = {}
    for key, _, _ in MEASUREMENTS:
        entry = {}
        for label in ("before", "after"):
            entry[f"{label}_cpu_s_per_million"] = [r[label][key]["cpu_s_per_million"] for r in rounds]
            entry[f"{label}_records_per_s"] = [r[label][key]["records_per_s"] for r in rounds]
            entry[f"{label}_median_cpu_s_per_million"] = round(
                statistics.median(entry[f"{label}_cpu_s_per_million"]), 4)
            entry[f"{label}_median_records_per_s"] = round(statistics.median(entry[f"{label}_records_per_s"]))
        before = entry["before_median_cpu_s_per_million"]
        # Zero only when a tiny --records run stays under one 10 ms tick.
        entry["ratio_after_before_cpu"] = (
            round(entry["after_median_cpu_s_per_million"] / before, 3) if before else None)
        summary[key] = entry
    return summary


def table(result):
    lines = [
        f"{result['date']} on `{result['host']}`, {result['rounds_run']} rounds of {result['records']:,} "
        f"records of {RECORD_BYTES} B, one partition; broker CPU-s per million records, median "
        f"[each round]; records/s median"
        + (" (A/A: the same binary twice)" if result["same_binary"] else "") + ".",
        "",
        "| measurement | before | after | after / before | before rec/s | after rec/s | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, text, has_target in MEASUREMENTS:
        s = result["summary"][key]
        each = {label: ", ".join(f"{v:.3f}" for v in s[f"{label}_cpu_s_per_million"])
                for label in ("before", "after")}
        if has_target:
            met = "met" if s["after_median_cpu_s_per_million"] <= TARGET_CPU_S_PER_MILLION else "not met"
            target = f"<= {TARGET_CPU_S_PER_MILLION}: {met}"
        else:
            target = ""
        ratio = "-" if s["ratio_after_before_cpu"] is None else f"{s['ratio_after_before_cpu']:.2f}"
        lines.append(
            f"| {text} | {s['before_median_cpu_s_per_million']:.3f} [{each['before']}] | "
            f"{s['after_median_cpu_s_per_million']:.3f} [{each['after']}] | {ratio} | "
            f"{fmt_rate(s['before_median_records_per_s'])} | {fmt_rate(s['after_median_records_per_s'])} | {target} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="freshet binary A")
    parser.add_argument("--after", required=True, help="freshet binary B")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=RECORDS)
    parser.add_argument("--rdkafka-performance", required=True)
    parser.add_argument("--work", required=True, help="scratch directory")
    args = parser.parse_args()
    if args.rounds < 1 or args.records < 1:
        parser.error("--rounds and --records must be at least 1")
    binaries = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    for label, path in binaries.items():
        if not os.access(path, os.X_OK):
            parser.error(f"--{label} {path} is not an executable file")
    os.makedirs(args.work, exist_ok=True)
    hashes = {label: sha256_of(path) for label, path in binaries.items()}
    version = subprocess.run([args.rdkafka_performance, "-h"], capture_output=True, text=True)
    librdkafka = re.search(r"librdkafka version (\S+)", version.stdout + version.stderr)
    started = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)

    rounds = []
    for r in range(1, args.rounds + 1):
        # Odd rounds run before first, even rounds after first: a steady drift of the
        # machine's speed then favours neither binary over a pair of rounds.
        order = ["before", "after"] if r % 2 else ["after", "before"]
        log(f"==> round {r}/{args.rounds}: {order[0]} then {order[1]}")
        rounds.append({"order": order, **{label: one_binary(args, label, binaries[label], r) for label in order}})

    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "librdkafka": librdkafka.group(1) if librdkafka else "unknown",
        "before": binaries["before"], "before_sha256": hashes["before"],
        "after": binaries["after"], "after_sha256": hashes["after"],
        "same_binary": hashes["before"] == hashes["after"],
        "records": args.records, "record_bytes": RECORD_BYTES, "partitions": 1,
        "rounds_run": args.rounds,
        "target_cpu_s_per_million": TARGET_CPU_S_PER_MILLION,
        "duration_s": round(time.monotonic() - started),
        "load_1m_start": load_start, "load_1m_end": round(os.getloadavg()[0], 2),
        "summary": summarise(rounds),
        "rounds": rounds,
    }
    print(table(result))
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, f"{now.strftime('%Y-%m-%d')}-{result['host']}-cpu.json")
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
    log(f"==> {result['duration_s']} s; appended to {out}")


if __name__ == "__main__":
    main()
