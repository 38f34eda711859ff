"""Broker CPU per record, two binaries A/B in the same run (issue 9 part 8).

For each round and each of the two binaries: a fresh broker on a free port with a fresh
data directory; a 1-partition topic; librdkafka's rdkafka_performance produces
`--records` records of 100 B with acks=1, then consumes the whole topic from the start;
then a second 1-partition topic gets the same produce with acks=-1. The broker's CPU
(user+sys from /proc/PID/stat, all threads) before and after each client run gives
CPU-s per million records; rdkafka_performance's own timing gives records/s.

The machine's speed drifts (bench/README.md's caveat), so both brokers of a round run
side by side and the binaries alternate per measurement: each produce or consume on
one broker is followed at once by the same on the other, before first in odd rounds
and after first in even ones. The comparison is of the medians over rounds.

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
import resource
import shutil
import statistics
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CLOCK_TICKS, Broker, append_result, fmt_rate, rdkafka_consume, rdkafka_produce  # noqa: E402

RECORD_BYTES = 100
RECORDS = 5_000_000
TARGET_CPU_S_PER_MILLION = 0.05
# (key, label, whether the target applies)
MEASUREMENTS = [
    ("produce_acks1", "produce acks=1", True),
    ("consume", "consume", True),
    ("produce_acks_all", "produce acks=-1", False),
]
# Before each client run the brokers must have been idle (at most one 10 ms clock tick of
# CPU each) for QUIET_S, so that the previous run's tail (the background flush of what
# was just produced, idle-connection reaping) is not billed to the next one; and the
# whole machine nearly idle (at most MACHINE_QUIET_CPUS of CPU in use over that window),
# since other people's builds on the 2 cores change the broker's CPU per record. After
# QUIET_DEADLINE_S it measures anyway; the CPU others used meanwhile is recorded with
# every figure (`others_cpu_s`), so a reader can tell a disturbed round.
QUIET_S = 0.5
MACHINE_QUIET_CPUS = 0.15
QUIET_DEADLINE_S = 30.0
POLL_INTERVAL_S = 0.05


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def machine_busy_s():
    """CPU seconds the whole machine has been busy since boot, all CPUs (/proc/stat:
    user, nice, system, irq, softirq and steal; guest time is already in user)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def settle(brokers):
    """Writes back the page cache (so no broker's next fsync has anything left to do from
    earlier runs), then waits until every broker and the machine are idle (see QUIET_S).
    Returns the seconds waited, or None when still busy at the deadline (recorded with
    the figures, not fatal: the noise then shows in the rounds and in others_cpu_s)."""
    os.sync()
    start = time.monotonic()

    def sample():
        return time.monotonic(), [b.cpu_seconds() for b in brokers], machine_busy_s()

    window = sample()
    while True:
        now, cpu, busy = sample()
        if any(c - w > 0.011 for c, w in zip(cpu, window[1])):
            window = (now, cpu, busy)
        elif now - window[0] >= QUIET_S:
            if busy - window[2] <= MACHINE_QUIET_CPUS * (now - window[0]):
                return round(now - start, 2)
            window = (now, cpu, busy)
        if now - start > QUIET_DEADLINE_S:
            log(f"warning: the brokers or the machine still busy after {QUIET_DEADLINE_S} s; measuring anyway")
            return None
        time.sleep(POLL_INTERVAL_S)


def own_and_children_cpu_s():
    """CPU seconds of this script and of the clients it has waited for."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def minor_faults(broker):
    """Minor page faults of the broker process so far (/proc/PID/stat field 10): memory
    the allocator got fresh from the kernel, zero-filled, which costs CPU."""
    with open(f"/proc/{broker.process.pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def figures(row, settled_s, faults, others_cpu_s):
    return {
        "cpu_s": row["broker_cpu_s"],
        "others_cpu_s": round(others_cpu_s, 2),
        "minor_faults": faults,
        "cpu_s_per_million": row["broker_cpu_s_per_million_records"],
        "records_per_s": row["records_per_s"],
        "settled_s": settled_s,
        "load_1m": round(os.getloadavg()[0], 2),
    }


def measure(args, key, client, broker, name):
    """One client run on `broker`; raises on a client failure or a short count."""
    if key == "consume":
        row = rdkafka_consume(client, broker, "cpu-acks1", 1, args.records)
        if row["records"] != args.records or row["bytes"] != args.records * RECORD_BYTES:
            raise RuntimeError(f"{name}: consumed {row['records']} records ({row['bytes']} B), "
                               f"expected {args.records} ({args.records * RECORD_BYTES} B)")
        return row
    topic, acks = ("cpu-acks1", "1") if key == "produce_acks1" else ("cpu-acksall", "-1")
    row = rdkafka_produce(client, broker, topic, RECORD_BYTES, acks, 1, args.records)
    if row["records"] != args.records:
        raise RuntimeError(f"{name}: {row['records']} of {args.records} records delivered (acks={acks})")
    return row


def one_round(args, binaries, order, round_no):
    """A fresh broker of each binary, each with a fresh data directory, both running for
    the round; every measurement is taken on one and then at once on the other (in
    `order`), so the pair is seconds apart and sees the same machine. The brokers are
    stopped and their data removed at the end."""
    brokers = {}
    data_dirs = []
    result = {"order": order}
    try:
        for label in order:
            data = os.path.join(args.work, f"{label}-r{round_no}-data")
            shutil.rmtree(data, ignore_errors=True)
            data_dirs.append(data)
            brokers[label] = Broker(binaries[label], data, os.path.join(args.work, f"{label}-r{round_no}.log"))
            result[label] = {}
        for key, text, _ in MEASUREMENTS:
            for label in order:
                client = types.SimpleNamespace(freshet=binaries[label],
                                               rdkafka_performance=args.rdkafka_performance)
                settled = settle(list(brokers.values()))
                faults = minor_faults(brokers[label])
                busy, ours = machine_busy_s(), own_and_children_cpu_s()
                row = measure(args, key, client, brokers[label], f"{label}-r{round_no}")
                # What neither the broker, the client nor this script used: other
                # processes on the machine, which make the broker's figure noisier.
                others = (machine_busy_s() - busy) - (own_and_children_cpu_s() - ours) - row["broker_cpu_s"]
                result[label][key] = figures(row, settled, minor_faults(brokers[label]) - faults, others)
                log(f"  {label + '-r' + str(round_no):10} {text:16} "
                    f"{row['broker_cpu_s_per_million_records']:.4f} CPU-s/M  "
                    f"{fmt_rate(row['records_per_s']):>6} rec/s  "
                    f"{result[label][key]['minor_faults']:>7} page faults  "
                    f"others {result[label][key]['others_cpu_s']:.2f} CPU-s")
    finally:
        for broker in brokers.values():
            broker.stop()
        for data in data_dirs:
            shutil.rmtree(data, ignore_errors=True)
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
        # A zero is only a tiny --records run staying under one 10 ms tick.
        before = entry["before_median_cpu_s_per_million"]
        entry["ratio_after_before_cpu"] = (
            round(entry["after_median_cpu_s_per_million"] / before, 3) if before else None)
        # The two runs of a pair are seconds apart: their ratio cancels the machine's
        # drift between rounds, which the ratio of the medians does not.
        paired = [a / b if b else None for a, b in
                  zip(entry["after_cpu_s_per_million"], entry["before_cpu_s_per_million"])]
        entry["paired_ratios"] = [None if x is None else round(x, 3) for x in paired]
        entry["median_paired_ratio"] = (
            None if None in paired else round(statistics.median(paired), 3))
        summary[key] = entry
    return summary


def table(result):
    lines = [
        f"{result['date']} on `{result['host']}`, {result['rounds_run']} rounds of {result['records']:,} "
        f"records of {RECORD_BYTES} B, one partition; broker CPU-s per million records, median "
        f"[each round]; records/s median"
        + (" (A/A: the same binary twice)" if result["same_binary"] else "") + ".",
        "",
        "| measurement | before | after | after / before | paired after / before, median [each round] "
        "| before rec/s | after rec/s | target |",
        "|---|---|---|---|---|---|---|---|",
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
        paired = "-" if s["median_paired_ratio"] is None else (
            f"{s['median_paired_ratio']:.2f} [" + ", ".join(f"{x:.2f}" for x in s["paired_ratios"]) + "]")
        lines.append(
            f"| {text} | {s['before_median_cpu_s_per_million']:.3f} [{each['before']}] | "
            f"{s['after_median_cpu_s_per_million']:.3f} [{each['after']}] | {ratio} | {paired} | "
            f"{fmt_rate(s['before_median_records_per_s'])} | {fmt_rate(s['after_median_records_per_s'])} | {target} |")
    runs = [r[label][key] for r in result["rounds"] for label in r["order"] for key, _, _ in MEASUREMENTS]
    others = sorted(run["others_cpu_s"] for run in runs)
    busy_starts = sum(run["settled_s"] is None for run in runs)
    lines += ["", f"Other processes used {statistics.median(others):.2f} CPU-s during a client run "
              f"(median; at most {others[-1]:.2f}); {busy_starts} of {len(runs)} runs started on a busy "
              "machine after the wait for quiet ran out."]
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
        # Odd rounds measure before first, even rounds after first: a steady drift of
        # the machine's speed then favours neither binary over a pair of rounds.
        order = ["before", "after"] if r % 2 else ["after", "before"]
        log(f"==> round {r}/{args.rounds}: {order[0]} then {order[1]}")
        rounds.append(one_round(args, binaries, order, r))

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
    out = append_result(now.strftime('%Y-%m-%d'), result["host"], "cpu", result)
    log(f"==> {result['duration_s']} s; appended to {out}")


if __name__ == "__main__":
    main()
