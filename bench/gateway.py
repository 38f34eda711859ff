"""The HTTP gateway's benchmark; run through bench/gateway, which builds what it needs.

Against `freshet serve` with its embedded gateway (acks=all: every 2xx is fsync'd by
the broker), on a topic of 8 partitions:

1. seed 001's load test: 1,000 concurrent users each POSTing 5 form submissions
   (JMeter there; a keep-alive connection per user here, Python asyncio), reporting
   avg / p50 / p99 / max latency and the fraction of 2xx. Seed 001 saw an average of
   1,858 ms on one container.
2. sustained load with wrk (2 threads, 64 and 256 connections, 20 s each) through
   `/ingest`: requests/s, latency percentiles, non-2xx.

Afterwards the topic must hold exactly as many records as were answered 2xx. The
process's CPU time (broker and gateway share it) per million records is recorded.
Writes bench/results/DATE-HOST-gateway.json and the gateway section of bench/README.md.
"""

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared Broker and helpers)

USERS, REQUESTS_PER_USER = 1000, 5
WRK_CONNECTIONS = [64, 256]
WRK_SECONDS = 20
FORM = b"name=Ann+Lee&email=ann%40example.org&course=physics&year=2&comments=looking+forward+to+it"


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


async def user(host, port, n, latencies, statuses):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for i in range(REQUESTS_PER_USER):
            request = (f"POST /ingest/forms?key=user-{n} HTTP/1.1\r\nHost: {host}\r\n"
                       f"Content-Type: application/x-www-form-urlencoded\r\n"
                       f"Content-Length: {len(FORM)}\r\n\r\n").encode() + FORM
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            statuses.append(int(status_line.split()[1]))
    finally:
        writer.close()


async def seed_load(address):
    host, port = address.rsplit(":", 1)
    latencies, statuses = [], []
    started = time.perf_counter()
    await asyncio.gather(*(user(host, int(port), n, latencies, statuses) for n in range(USERS)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    ok = sum(1 for s in statuses if 200 <= s < 300)
    return {
        "users": USERS, "requests_per_user": REQUESTS_PER_USER, "requests": len(statuses),
        "seconds": round(elapsed, 2), "requests_per_s": round(len(statuses) / elapsed),
        "latency_ms_avg": round(sum(latencies) / len(latencies), 2),
        "latency_ms_p50": round(percentile(latencies, 0.50), 2),
        "latency_ms_p99": round(percentile(latencies, 0.99), 2),
        "latency_ms_max": round(latencies[-1], 2),
        "fraction_2xx": round(ok / len(statuses), 4), "accepted": ok,
    }


def ms(text):
    """wrk's '1.23ms' / '850.00us' / '1.02s' -> milliseconds."""
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    value, unit = float(m.group(1)), m.group(2)
    return round(value / 1000 if unit == "us" else value * 1000 if unit == "s" else value, 3)


def wrk(address, connections, lua):
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{WRK_SECONDS}s", "--latency", "-s", lua, f"http://{address}"],
        capture_output=True, text=True, check=True).stdout
    row = {"connections": connections, "seconds": WRK_SECONDS}
    row["requests"] = int(re.search(r"(\d+) requests in", out).group(1))
    row["requests_per_s"] = round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)))
    row["latency_ms_avg"] = ms(re.search(r"Latency\s+(\S+)", out).group(1))
    for q in ("50", "75", "90", "99"):
        row[f"latency_ms_p{q}"] = ms(re.search(rf"\s{q}%\s+(\S+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    row["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    row["socket_errors"] = errors.group(1).strip() if errors else None
    row["fraction_2xx"] = round((row["requests"] - row["non_2xx"]) / row["requests"], 4)
    row["accepted"] = row["requests"] - row["non_2xx"]
    return row


def end_offsets(broker_address, topic):
    """Sum of the topic's partitions' log end offsets (`freshet topic describe`)."""
    out = subprocess.run([ARGS.freshet, "topic", "describe", topic, "--brokers", broker_address],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(n) for n in re.findall(r"LogEndOffset: (\d+)", out))


def table(results):
    lines = [f"Run {results['date']} on `{results['host']}` ({results['machine']['cpus']} CPUs), "
             f"embedded gateway, acks=all, topic of {results['partitions']} partitions; load generator "
             "on the same 2 cores.", "",
             "| load | requests | req/s | avg ms | p50 ms | p99 ms | max / p99.9 | 2xx | CPU-s / M records |",
             "|---|---|---|---|---|---|---|---|---|"]
    s = results["seed001"]
    lines.append(f"| seed 001: 1,000 users x 5 (asyncio) | {s['requests']} | {s['requests_per_s']} | "
                 f"{s['latency_ms_avg']} | {s['latency_ms_p50']} | {s['latency_ms_p99']} | max {s['latency_ms_max']} | "
                 f"{s['fraction_2xx']:.2%} | {s.get('cpu_s_per_million', '')} |")
    for w in results["wrk"]:
        lines.append(f"| wrk, {w['connections']} connections, {w['seconds']} s | {w['requests']} | {w['requests_per_s']} | "
                     f"{w['latency_ms_avg']} | {w['latency_ms_p50']} | {w['latency_ms_p99']} | | {w['fraction_2xx']:.2%} | "
                     f"{w.get('cpu_s_per_million', '')} |")
    lines.append("")
    lines.append(f"Records in the topic afterwards: {results['stored']}; requests answered 2xx: "
                 f"{results['accepted']} ({'equal' if results['stored'] == results['accepted'] else 'DIFFERENT'}).")
    return "\n".join(lines)


def update_readme(results, json_name):
    readme = bench.README
    begin, end = "<!-- gateway:begin -->", "<!-- gateway:end -->"
    section = f"{begin}\n\n{table(results)}\n\nRaw figures: [`results/{json_name}`](results/{json_name}).\n\n{end}"
    text = open(readme).read()
    if begin not in text:
        text += f"\n## HTTP gateway\n\n{begin}\n{end}\n"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    open(readme, "w").write(text)


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--freshet", required=True)
    parser.add_argument("--work", required=True)
    ARGS = parser.parse_args()
    shutil.rmtree(ARGS.work, ignore_errors=True)
    os.makedirs(ARGS.work)
    broker = bench.Broker(ARGS.freshet, os.path.join(ARGS.work, "data"),
                          os.path.join(ARGS.work, "broker.log"), http=True)
    bench.log(f"==> broker at {broker.address}, http at {broker.http}")
    partitions = 8
    now = datetime.datetime.now(datetime.timezone.utc)
    results = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "host": socket.gethostname(),
               "machine": {"cpus": os.cpu_count()}, "partitions": partitions, "wrk": []}
    try:
        subprocess.run([ARGS.freshet, "topic", "create", "forms", "--partitions", str(partitions),
                        "--brokers", broker.address], check=True)
        # One warm-up request (topic metadata, connections).
        urllib.request.urlopen(urllib.request.Request(
            f"http://{broker.http}/ingest/forms", data=FORM,
            headers={"Content-Type": "application/x-www-form-urlencoded"})).read()
        accepted = 1
        before = broker.cpu_seconds()
        seed = asyncio.run(seed_load(broker.http))
        seed["cpu_s_per_million"] = round((broker.cpu_seconds() - before) / seed["requests"] * 1e6, 1)
        results["seed001"] = seed
        accepted += seed["accepted"]
        bench.log(json.dumps(seed))
        lua = os.path.join(bench.BENCH, "ingest.lua")
        for connections in WRK_CONNECTIONS:
            before = broker.cpu_seconds()
            row = wrk(broker.http, connections, lua)
            row["cpu_s_per_million"] = round((broker.cpu_seconds() - before) / row["requests"] * 1e6, 1)
            results["wrk"].append(row)
            accepted += row["accepted"]
            bench.log(json.dumps(row))
        results["accepted"] = accepted
        results["stored"] = end_offsets(broker.address, "forms")
    finally:
        broker.stop()
    name = f"{now.strftime('%Y-%m-%d')}-{results['host']}-gateway.json"
    with open(os.path.join(bench.RESULTS, name), "w") as f:
        json.dump(results, f, indent=1)
    update_readme(results, name)
    print(table(results))


if __name__ == "__main__":
    main()
