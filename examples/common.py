"""What the examples share: Freshet and PostgreSQL started for them (`bench/bench.py`'s
`Broker`, `tests/e2e/databases.py`'s `Postgres`), an HTTP load of many keep-alive
users, and small helpers. Standard library only."""

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.request

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(EXAMPLES)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
from bench import Broker  # noqa: E402,F401  (freshet serve on free ports)
from databases import Postgres  # noqa: E402  (PostgreSQL in a temporary directory)


def stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt, so the example's cleanup
    runs, even where SIGINT was ignored when it started (a background job)."""
    def stop(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def keep_running():
    """Until Ctrl-C or SIGTERM."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def log(*a):
    print(*a, flush=True)


def kafka_client(script, argv):
    """confluent-kafka (librdkafka's Python client), for an example that produces as a
    Kafka client: when this Python lacks it, a virtual environment in examples/.venv
    gets it from PyPI and `script` runs again there with `argv`."""
    try:
        import confluent_kafka
        return confluent_kafka
    except ImportError:
        venv = os.path.join(EXAMPLES, ".venv")
        python = os.path.join(venv, "bin", "python")
        if os.path.realpath(sys.executable) == os.path.realpath(python):
            raise
        if not os.path.exists(python):
            subprocess.run([sys.executable, "-m", "venv", venv], check=True)
            subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "--only-binary=:all:", "confluent-kafka==2.16.1"], check=True)
        os.execv(python, [python, os.path.abspath(script), *argv])


def quiet_logger():
    """A logger for librdkafka that shows nothing (each refused reconnect while a
    broker is down would be printed)."""
    import logging
    quiet = logging.getLogger("librdkafka")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    return quiet


def start_postgres():
    """Debian's PostgreSQL in a temporary directory (as the `postgres` user when root)."""
    try:
        return Postgres().start()
    except RuntimeError as e:
        raise SystemExit(f"{e}\nThis example needs Debian's PostgreSQL: apt-get install postgresql")


def allow_connections(users):
    """A connection per user on each side: raise the open-file limit (inherited by
    the servers started after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * users + 1024)), hard))


async def one_user(host, port, requests, latencies, answers, on_answer):
    """One user of a load: a connection, its requests (`(path, doc)`, JSON posted) one
    after another; `on_answer(doc, status, body, at)` after each."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for path, doc in requests:
            body = json.dumps(doc).encode()
            head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            start = time.perf_counter()
            writer.write(head + body)
            await writer.drain()
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            answer = await reader.readexactly(length)
            at = time.perf_counter()
            latencies.append(at - start)
            status = int(status_line.split()[1])
            answers.append((doc, status, answer))
            on_answer(doc, status, answer, at)
    finally:
        writer.close()


def load(http_address, per_user, on_answer=lambda *a: None):
    """Every user's requests (`per_user`: a list of `(path, doc)` lists) at once, each
    user on its own keep-alive connection. Returns (seconds, latencies, answers)."""
    host, port = http_address.rsplit(":", 1)
    latencies, answers = [], []

    async def all_users():
        await asyncio.gather(*(one_user(host, int(port), r, latencies, answers, on_answer) for r in per_user))

    start = time.perf_counter()
    asyncio.run(all_users())
    return time.perf_counter() - start, latencies, answers


def latency_figures(seconds, latencies):
    """Requests/s and response times (ms) of a load."""
    ms = sorted(x * 1000 for x in latencies)
    return {"seconds": round(seconds, 2), "requests_per_s": round(len(ms) / seconds),
            "avg_ms": round(sum(ms) / len(ms), 1), "p50_ms": round(ms[len(ms) // 2], 1),
            "p99_ms": round(ms[int(len(ms) * 0.99)], 1), "max_ms": round(ms[-1], 1)}


def fill(directory, template, **values):
    """The text of `directory/pipelines/template` with each `${KEY}` replaced."""
    with open(os.path.join(directory, "pipelines", template)) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace("${" + k + "}", v)
    return text


def http_json(method, url, doc=None, text=None):
    """A request with a JSON document (or plain `text`) as its body; its status."""
    data, kind = (json.dumps(doc).encode(), "application/json") if text is None else (text.encode(), "text/plain")
    req = urllib.request.Request(url, data=data if doc is not None or text is not None else None, method=method,
                                 headers={"Content-Type": kind})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


def row_count(pg, db, table):
    """Rows in `table`, 0 while it does not exist yet (a sink with `create_table`
    makes it when it starts)."""
    try:
        return int(pg.psql(f"SELECT count(*) FROM {table}", db)[0][0])
    except subprocess.CalledProcessError:
        return 0


def wait_for(what, cond, timeout):
    deadline = time.monotonic() + timeout
    while True:
        ok, detail = cond()
        if ok:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"FAILED: {what} within {timeout} s ({detail})")
        time.sleep(0.25)


