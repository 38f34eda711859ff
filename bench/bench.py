"""Freshet's benchmark matrix; run through bench/run, which builds what it needs.

One run: the machine's limits (fdatasync'd sequential write, loopback TCP), a fresh
broker on a free port, then produce (100 B and 1 KiB records, acks=1 and acks=-1, 1 and
8 partitions) and consume of the same, each with `freshet perf` and with librdkafka's
rdkafka_performance, and `freshet perf e2e` at 1k, 10k and 100k records/s. For every
run the broker's own CPU time (user+sys from /proc/PID/stat) per million records and
per GB is recorded, since on 2 cores the client competes with the broker for CPU.

Writes bench/results/DATE-HOST.json and .png and the results section of
bench/README.md. MB is 10^6 bytes.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(BENCH, "results")
README = os.path.join(BENCH, "README.md")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SIZES = [100, 1024]
ACKS = ["1", "-1"]
PARTITIONS = [1, 8]
# Records per produce row: a few seconds each at the rates this machine reaches.
RECORDS = {100: 5_000_000, 1024: 1_000_000}
# e2e: (records/s, seconds)
E2E = [(1_000, 20), (10_000, 20), (100_000, 10)]
# Every client run is killed after this long.
RUN_TIMEOUT_S = 180


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


# ---- machine limits ------------------------------------------------------------------


def seq_write_limit(directory):
    """Sequential write in MB/s with every 1 MiB write made durable (dd oflag=dsync),
    i.e. what an fsync-per-batch log with 1 MB batches can reach on this disk; and the
    same 256 MiB written to the page cache with one fdatasync at the end."""
    path = os.path.join(directory, "dd-probe")
    result = {}
    for name, flags in (("dsync_1mib", ["oflag=dsync"]), ("fdatasync_end", ["conv=fdatasync"])):
        start = time.monotonic()
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=256", *flags],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        seconds = time.monotonic() - start
        result[f"seq_write_{name}_mb_per_s"] = round(256 * 1048576 / seconds / 1e6, 1)
        os.unlink(path)
    return result


def loopback_tcp_limit(seconds=3.0):
    """One TCP stream over loopback, 1 MiB sends, in MB/s (sender and receiver are two
    processes, as a client and the broker are)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    sender = subprocess.Popen([
        sys.executable, "-c",
        "import socket,sys,time\n"
        f"s=socket.create_connection(('127.0.0.1',{port}))\n"
        "b=bytes(1<<20); end=time.monotonic()+float(sys.argv[1])\n"
        "while time.monotonic()<end: s.sendall(b)\n"
        "s.close()\n",
        str(seconds),
    ])
    conn, _ = server.accept()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    received = 0
    start = None
    while True:
        n = conn.recv_into(view)
        if n == 0:
            break
        if start is None:
            start = time.monotonic()
        received += n
    elapsed = time.monotonic() - start
    sender.wait()
    conn.close()
    server.close()
    return {"loopback_tcp_mb_per_s": round(received / elapsed / 1e6, 1)}


# ---- the broker ------------------------------------------------------------------------


def first_read_at(log_path):
    """The wall-clock time of Freshet's "the first source record is read" log line
    (logged with RUST_LOG=warn,pipeline::runtime=info), or None."""
    import datetime
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if "the first source record is read" in line:
                    stamp = line.split()[0]
                    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except OSError:
        pass
    return None


def process_cpu_seconds(pid):
    """user + sys CPU seconds of process `pid` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may hold spaces: split after its ')'.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu_seconds(pid):
    """{thread name: user + sys CPU seconds so far} of process `pid` (threads of one
    name summed)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                text = stat.read()
        except OSError:
            continue  # the thread ended
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def command_cpu_seconds(command):
    """user + sys CPU seconds so far of every process whose name is `command`, with
    their children that ended (e.g. PostgreSQL's backends)."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        if text[text.index("(") + 1:text.rindex(")")] != command:
            continue
        fields = text.rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
    return total


def append_result(date, host, kind, result):
    """Appends `result` as one JSON line to results/DATE-HOST-KIND.json; returns the path."""
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, f"{date}-{host}-{kind}.json")
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
    return out


class Broker:
    """`freshet serve` on a free port (or `listen`); with `http`, its embedded HTTP
    gateway too."""

    def __init__(self, freshet, data_dir, log_path, http=False, start_timeout_s=60, env=None,
                 listen="127.0.0.1:0"):
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [freshet, "serve", "--listen", listen, "--data-dir", data_dir],
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": "warn", "NO_COLOR": "1",
                 "FRESHET_HTTP_LISTEN": "127.0.0.1:0" if http else "off", **(env or {})},
        )
        # The first line says where it listens; a broker that hangs before printing it is
        # killed at the deadline, so readline returns and the start fails loudly.
        watchdog = threading.Timer(start_timeout_s, self.process.kill)
        watchdog.start()
        line = self.process.stdout.readline().decode()
        watchdog.cancel()
        match = re.match(r"freshet listening on ([^\s,]+)(?:, http on ([^\s,]+))?, data in ", line)
        if not match:
            self.process.kill()
            raise SystemExit(f"broker did not start: {line!r}; see {log_path}")
        self.address = match.group(1)
        self.http = match.group(2)
        # Keep draining stdout so the broker never blocks on it.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def cpu_seconds(self):
        """user + sys CPU seconds of the broker process so far (all its threads)."""
        return process_cpu_seconds(self.process.pid)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# ---- runs ------------------------------------------------------------------------------


def run_client(broker, command, known_false_failure=None):
    """Runs one client command; returns (stdout, broker CPU seconds it cost). A non-zero
    exit fails the run unless `known_false_failure(returncode, stdout)` says the output
    proves it wrong."""
    before = broker.cpu_seconds()
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    after = broker.cpu_seconds()
    if done.returncode != 0 and not (known_false_failure and known_false_failure(done.returncode, done.stdout)):
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout, after - before


def with_cpu(row, cpu_s):
    records, data = row["records"], row["bytes"]
    row["broker_cpu_s"] = round(cpu_s, 3)
    row["broker_cpu_s_per_million_records"] = round(cpu_s / records * 1e6, 4) if records else None
    row["broker_cpu_s_per_gb"] = round(cpu_s / data * 1e9, 3) if data else None
    return row


PRODUCER_TUNING = ["linger.ms=5", "batch.size=1000000", "batch.num.messages=1000000",
                   "queue.buffering.max.messages=2000000"]
CONSUMER_TUNING = ["fetch.queue.backoff.ms=10"]


def freshet_produce(args, broker, topic, size, acks, partitions, records):
    out, cpu = run_client(broker, [
        args.freshet, "perf", "produce", "--brokers", broker.address, "--topic", topic,
        "--records", str(records), "--record-size", str(size), "--acks", acks,
        "--partitions", str(partitions), "--json",
    ])
    report = json.loads(out)
    return with_cpu({
        "records": report["records"], "bytes": report["bytes"],
        "records_per_s": report["records_per_s"], "mb_per_s": report["mb_per_s"],
        "latency_ms": report["latency_ms"],
    }, cpu)


def freshet_consume(args, broker, topic, records):
    out, cpu = run_client(broker, [
        args.freshet, "perf", "consume", "--brokers", broker.address, "--topic", topic,
        "--from-beginning", "--records", str(records), "--json",
    ])
    report = json.loads(out)
    return with_cpu({
        "records": report["records"], "bytes": report["bytes"],
        "records_per_s": report["records_per_s"], "mb_per_s": report["mb_per_s"],
        "time_to_first_record_ms": report["time_to_first_record_ms"],
    }, cpu)


def last_match(pattern, text):
    matches = list(re.finditer(pattern, text))
    return matches[-1] if matches else None


PRODUCE_REPORT = (r"(?P<produced>\d+) messages produced \((?P<bytes>\d+) bytes\), (?P<delivered>\d+) "
                  r"delivered \(offset -?\d+, (?P<failed>\d+) failed\) in (?P<ms>\d+)ms: .*?, "
                  r"(?P<produce_failures>\d+) produce failures, (?P<in_queue>\d+) in queue")


def all_delivered(out, records):
    """rdkafka_performance -P exits 1 unless its count of records produced equals the
    count delivered, and at the end it takes rd_kafka_outq_len() off the first, which
    also counts requests in flight that are not records: seen on 2026-12-03 as "4999999
    messages produced (500000000 bytes), 5000000 delivered (offset 4999999, 0 failed)".
    Its final report showing every record delivered, none failed and none queued means
    that false failure, not a lost record. ("produce failures" are its local queue being
    full, which it retries: "28 backpressures for 5000000 produce calls".)"""
    match = last_match(PRODUCE_REPORT, out)
    return bool(match) and int(match["delivered"]) == records and int(match["failed"]) == 0 \
        and int(match["in_queue"]) == 0


def rdkafka_produce(args, broker, topic, size, acks, partitions, records):
    subprocess.run([args.freshet, "topic", "create", topic, "--partitions", str(partitions),
                    "--brokers", broker.address], check=True, capture_output=True)
    command = [args.rdkafka_performance, "-P", "-t", topic, "-b", broker.address,
               "-s", str(size), "-c", str(records), "-a", acks]
    for prop in PRODUCER_TUNING:
        command += ["-X", prop]
    out, cpu = run_client(broker, command, lambda code, out: code == 1 and all_delivered(out, records))
    # The last report line is the final one (others are printed every second).
    match = last_match(PRODUCE_REPORT, out)
    if not match:
        raise RuntimeError(f"unexpected rdkafka_performance output:\n{out}")
    delivered, millis = int(match["delivered"]), int(match["ms"])
    data = delivered * size
    return with_cpu({
        "records": delivered, "bytes": data,
        "records_per_s": round(delivered / max(millis, 1) * 1000), "mb_per_s": round(data / max(millis, 1) / 1000, 1),
    }, cpu)


def rdkafka_consume(args, broker, topic, partitions, records):
    command = [args.rdkafka_performance, "-C", "-t", topic, "-b", broker.address,
               "-o", "beginning", "-c", str(records)]
    for partition in range(partitions):
        command += ["-p", str(partition)]
    for prop in CONSUMER_TUNING:
        command += ["-X", prop]
    out, cpu = run_client(broker, command)
    match = last_match(r"(\d+) messages \((\d+) bytes\) consumed in (\d+)ms", out)
    if not match:
        raise RuntimeError(f"unexpected rdkafka_performance output:\n{out}")
    count, data, millis = int(match.group(1)), int(match.group(2)), int(match.group(3))
    return with_cpu({
        "records": count, "bytes": data,
        "records_per_s": round(count / max(millis, 1) * 1000), "mb_per_s": round(data / max(millis, 1) / 1000, 1),
    }, cpu)


def freshet_e2e(args, broker, rate, seconds):
    out, cpu = run_client(broker, [
        args.freshet, "perf", "e2e", "--brokers", broker.address, "--topic", f"e2e-{rate}",
        "--rate", str(rate), "--duration-s", str(seconds), "--json",
    ])
    report = json.loads(out)
    row = {key: report[key] for key in (
        "records", "consumed", "lost", "duplicated", "out_of_order", "rate_achieved",
        "latency_ms", "ack_latency_ms")}
    row["bytes"] = report["records"] * report["record_bytes"]
    return with_cpu(row, cpu)


def limit_for(kind, acks, limits):
    """The machine limit a row is compared with, and its name."""
    tcp = limits["loopback_tcp_mb_per_s"]
    if kind == "produce" and acks == "-1":
        disk = limits["seq_write_dsync_1mib_mb_per_s"]
        return (disk, "seq_write_dsync_1mib") if disk < tcp else (tcp, "loopback_tcp")
    return tcp, "loopback_tcp"


# ---- output ----------------------------------------------------------------------------


def fmt_rate(value):
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}k"


def table(results):
    limits = results["limits"]
    lines = [
        f"Run {results['date']} on `{results['host']}` ({results['machine']['cpus']} CPUs, "
        f"{results['machine']['memory_gib']} GiB, Linux {results['machine']['kernel']}), "
        f"librdkafka {results['librdkafka']}. Machine limits: sequential write with "
        f"fdatasync every 1 MiB {limits['seq_write_dsync_1mib_mb_per_s']} MB/s "
        f"(one fdatasync at the end: {limits['seq_write_fdatasync_end_mb_per_s']} MB/s), "
        f"loopback TCP {limits['loopback_tcp_mb_per_s']} MB/s.",
        "",
        "| run | size | acks | parts | client | records/s | MB/s | of limit | broker CPU-s / M records | broker CPU-s / GB | latency p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["throughput"]:
        latency = row.get("latency_ms")
        lat = f"{latency['p50']:.1f} / {latency['p99']:.1f}" if latency else ""
        lines.append(
            f"| {row['kind']} | {row['record_bytes']} B | {row['acks'] or ''} | {row['partitions']} | "
            f"{row['client']} | {fmt_rate(row['records_per_s'])} | {row['mb_per_s']:.0f} | "
            f"{row['fraction_of_limit']:.0%} {row['limit']} | {row['broker_cpu_s_per_million_records']:.3f} | "
            f"{row['broker_cpu_s_per_gb']:.2f} | {lat} |")
    lines += [
        "",
        "| e2e rate | achieved | records | lost | dup | out of order | p50 ms | p95 | p99 | p99.9 | max |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["e2e"]:
        lat = row["latency_ms"]
        lines.append(
            f"| {fmt_rate(row['rate'])}/s | {fmt_rate(row['rate_achieved'])}/s | {row['records']} | "
            f"{row['lost']} | {row['duplicated']} | {row['out_of_order']} | {lat['p50']:.3f} | "
            f"{lat['p95']:.3f} | {lat['p99']:.3f} | {lat['p99_9']:.3f} | {lat['max']:.3f} |")
    if results.get("wall_s"):
        lines += ["", f"Whole run, build included: {results['wall_s']} s (matrix {results['duration_s']} s)."]
    return "\n".join(lines)


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["throughput"]
    fig, (bars, lat) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 1.3]})
    groups = []
    for row in rows:
        key = (row["kind"], row["record_bytes"], row["acks"], row["partitions"])
        if key not in groups:
            groups.append(key)
    clients = ["freshet perf", "rdkafka_performance"]
    width = 0.4
    for i, client in enumerate(clients):
        values = []
        for key in groups:
            match = [r for r in rows if (r["kind"], r["record_bytes"], r["acks"], r["partitions"]) == key
                     and r["client"] == client]
            values.append(match[0]["mb_per_s"] if match else 0)
        bars.bar([g + (i - 0.5) * width for g in range(len(groups))], values, width, label=client)
    bars.axhline(results["limits"]["loopback_tcp_mb_per_s"], color="grey", linestyle="--",
                 label="loopback TCP")
    bars.axhline(results["limits"]["seq_write_dsync_1mib_mb_per_s"], color="red", linestyle=":",
                 label="seq. write, dsync 1 MiB")
    bars.set_xticks(range(len(groups)))
    bars.set_xticklabels(
        [f"{k}\n{s} B\n" + (f"acks={a}\n" if a else "\n") + f"{p} part." for k, s, a, p in groups],
        fontsize=7)
    bars.set_ylabel("MB/s (record values)")
    bars.set_yscale("log")
    bars.set_title("Throughput")
    bars.legend(fontsize=8)

    labels = ["p50", "p95", "p99", "p99_9", "max"]
    for row in results["e2e"]:
        lat.plot(labels, [row["latency_ms"][k] for k in labels], marker="o",
                 label=f"{fmt_rate(row['rate'])} records/s")
    lat.set_yscale("log")
    lat.set_ylabel("end-to-end latency, ms")
    lat.set_title("freshet perf e2e latency percentiles")
    lat.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    lat.legend(fontsize=8)
    fig.suptitle(f"Freshet {results['date']} on {results['host']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def update_readme(results, json_name, png_name):
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    section = (f"{begin}\n\n{table(results)}\n\n![benchmark chart](results/{png_name})\n\n"
               f"Raw figures: [`results/{json_name}`](results/{json_name}).\n\n{end}")
    text = open(README).read() if os.path.exists(README) else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    open(README, "w").write(text)


# ---- main ------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--freshet", required=True)
    parser.add_argument("--rdkafka-performance", required=True)
    parser.add_argument("--work", required=True, help="scratch directory, emptied first")
    args = parser.parse_args()
    scale = 0.1 if os.environ.get("BENCH_QUICK") else 1.0
    started = time.monotonic()

    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    log("==> machine limits")
    limits = seq_write_limit(args.work)
    limits.update(loopback_tcp_limit())
    log(json.dumps(limits))

    version = subprocess.run([args.rdkafka_performance, "-h"], capture_output=True, text=True)
    librdkafka = re.search(r"librdkafka version (\S+)", version.stdout + version.stderr)
    now = datetime.datetime.now(datetime.timezone.utc)
    results = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "host": socket.gethostname(),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "kernel": platform.release(),
        },
        "librdkafka": librdkafka.group(1) if librdkafka else "unknown",
        "quick": scale != 1.0,
        "limits": limits,
        "throughput": [],
        "e2e": [],
    }

    broker = Broker(args.freshet, os.path.join(args.work, "data"), os.path.join(args.work, "broker.log"))
    log(f"==> broker at {broker.address}, pid {broker.process.pid}")
    try:
        produced = []
        for size in SIZES:
            for acks in ACKS:
                for partitions in PARTITIONS:
                    records = int(RECORDS[size] * scale)
                    for client, produce in (("freshet perf", freshet_produce),
                                            ("rdkafka_performance", rdkafka_produce)):
                        prefix = "f" if client == "freshet perf" else "rk"
                        topic = f"{prefix}-{size}-acks{'all' if acks == '-1' else acks}-p{partitions}"
                        row = produce(args, broker, topic, size, acks, partitions, records)
                        row.update(kind="produce", client=client, record_bytes=size, acks=acks,
                                   partitions=partitions, topic=topic)
                        results["throughput"].append(row)
                        produced.append((client, topic, size, acks, partitions, row["records"]))
                        log(f"produce {topic:24} {client:20} {fmt_rate(row['records_per_s']):>6} rec/s "
                            f"{row['mb_per_s']:7.1f} MB/s  broker {row['broker_cpu_s_per_million_records']:.3f} CPU-s/M")
        for client, topic, size, acks, partitions, records in produced:
            if acks != "1":
                continue  # the acks=-1 topics hold the same kind of data: read half the matrix
            if client == "freshet perf":
                row = freshet_consume(args, broker, topic, records)
            else:
                row = rdkafka_consume(args, broker, topic, partitions, records)
            row.update(kind="consume", client=client, record_bytes=size, acks=None,
                       partitions=partitions, topic=topic)
            results["throughput"].append(row)
            log(f"consume {topic:24} {client:20} {fmt_rate(row['records_per_s']):>6} rec/s "
                f"{row['mb_per_s']:7.1f} MB/s  broker {row['broker_cpu_s_per_million_records']:.3f} CPU-s/M")
        for rate, seconds in E2E:
            row = freshet_e2e(args, broker, rate, max(1, seconds * scale))
            row["rate"] = rate
            results["e2e"].append(row)
            lat = row["latency_ms"]
            log(f"e2e {fmt_rate(rate)}/s: p50 {lat['p50']} p99 {lat['p99']} p99.9 {lat['p99_9']} "
                f"max {lat['max']} ms, lost {row['lost']} dup {row['duplicated']} ooo {row['out_of_order']}")
    finally:
        broker.stop()
        shutil.rmtree(os.path.join(args.work, "data"), ignore_errors=True)

    for row in results["throughput"]:
        limit, name = limit_for(row["kind"], row["acks"], limits)
        row["limit"] = name
        row["fraction_of_limit"] = round(row["mb_per_s"] / limit, 3)
    results["duration_s"] = round(time.monotonic() - started)
    # bench/run passes its own start, so the build is counted too.
    if os.environ.get("BENCH_STARTED"):
        results["wall_s"] = round(time.time() - float(os.environ["BENCH_STARTED"]))

    os.makedirs(RESULTS, exist_ok=True)
    # A quick run checks the harness: its figures never replace the recorded ones.
    stem = f"{now.strftime('%Y-%m-%d')}-{results['host']}" + ("-quick" if results["quick"] else "")
    json_name, png_name = f"{stem}.json", f"{stem}.png"
    with open(os.path.join(RESULTS, json_name), "w") as out:
        json.dump(results, out, indent=1)
        out.write("\n")
    chart(results, os.path.join(RESULTS, png_name))
    if not results["quick"]:
        update_readme(results, json_name, png_name)
    print(table(results))
    log(f"==> {results['duration_s']} s; bench/results/{json_name}, bench/results/{png_name}, bench/README.md")


if __name__ == "__main__":
    main()
