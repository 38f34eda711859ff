"""HTTP-gateway helpers for the gateway tests, stdlib only: plain HTTP requests, a
standalone `freshet gateway` process, Server-Sent-Events clients (a thread-backed one
that stamps each event's arrival time, and an asyncio one for many subscribers), and
Prometheus text parsing.

Fixture:
  gateway_factory  starts standalone gateways owned by one test:
                   gateway_factory(brokers="H:P", env={"FRESHET_HTTP_...": "..."})
                   -> a `Gateway` (a `Broker` subclass: stop/kill/start/restart, `.http`,
                   stderr attached to a failing test's report)
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import START_TIMEOUT_S, Broker, BrokerError, BrokerFactory, freshet_bin

GATEWAY_LINE = re.compile(r"^freshet gateway listening on (?P<host>[^\s:]+):(?P<port>\d+), "
                          r"brokers (?P<brokers>\S+), spool in (?P<spool>.+)$")

# ---- plain HTTP -----------------------------------------------------------------


@dataclass
class Resp:
    status: int
    headers: dict  # lower-case name -> value
    body: bytes

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Resp({self.status}, {self.headers}, {self.body[:500]!r})"


def request(method: str, url: str, body: bytes | str | None = None, headers: dict | None = None,
            json_body=None, timeout: float = 30.0) -> Resp:
    """One request on its own connection. `json_body` is sent as application/json
    unless `headers` names another content type."""
    u = urllib.parse.urlsplit(url)
    headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body)
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    if isinstance(body, str):
        body = body.encode()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        path = u.path + (f"?{u.query}" if u.query else "")
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return Resp(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def get(url: str, **kw) -> Resp:
    return request("GET", url, **kw)


def post(url: str, **kw) -> Resp:
    return request("POST", url, **kw)


def ingest(base: str, topic: str, doc=None, key: str | None = None, partition: int | None = None,
           headers: dict | None = None, body: bytes | str | None = None, timeout: float = 30.0) -> Resp:
    """POST /ingest/{topic}: `doc` as JSON, or a raw `body` with the given headers."""
    q = {}
    if key is not None:
        q["key"] = key
    if partition is not None:
        q["partition"] = str(partition)
    url = f"{base}/ingest/{topic}" + (f"?{urllib.parse.urlencode(q)}" if q else "")
    if doc is not None:
        return post(url, json_body=doc, headers=headers, timeout=timeout)
    return post(url, body=body, headers=headers, timeout=timeout)


def assert_error(resp: Resp, status: int, code: int | None = None) -> dict:
    """The gateway's error body: JSON {"error_code": status*100+n, "message": ...}."""
    assert resp.status == status, f"expected HTTP {status}, got {resp}"
    try:
        body = resp.json()
    except ValueError:
        raise AssertionError(f"HTTP {status} without a JSON error body: {resp}")
    assert isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"], resp
    assert isinstance(body.get("error_code"), int) and body["error_code"] // 100 == status, resp
    if code is not None:
        assert body["error_code"] == code, f"expected error_code {code}: {resp}"
    return body


# ---- /metrics -------------------------------------------------------------------

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)'
                     r'(?:\{(?P<labels>(?:\w+="(?:[^"\\]|\\.)*",?)*)\})?\s+(?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict:
    """Prometheus text -> {(name, frozenset(labels.items())): value}. Fails on a line
    that is neither a comment nor a sample."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(_LABEL.findall(m["labels"] or ""))
        out[(m["name"], labels)] = float(m["value"])
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """One sample's value, 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def metrics(base: str) -> dict:
    r = get(f"{base}/metrics")
    assert r.status == 200, r
    assert r.headers.get("content-type", "").startswith("text/plain"), r.headers
    return parse_metrics(r.body.decode())


def health(base: str) -> dict:
    r = get(f"{base}/health")
    assert r.status == 200, r
    return r.json()


# ---- Server-Sent Events -----------------------------------------------------------


@dataclass
class SseEvent:
    id: str | None
    data: str | None
    t: float  # time.monotonic() when its last byte arrived

    def json(self):
        return json.loads(self.data)

    def positions(self) -> dict[int, int]:
        """`0:5,1:3` -> {0: 5, 1: 3}: the next offset per partition."""
        out = {}
        for part in (self.id or "").split(","):
            if part:
                p, o = part.split(":")
                out[int(p)] = int(o)
        return out


class _Chunked:
    """Incremental HTTP/1.1 chunked-transfer decoder."""

    def __init__(self):
        self.buf = b""
        self.left = 0        # bytes of the current chunk still to come
        self.state = "size"  # size | data | crlf | done

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = []
        while True:
            if self.state == "size":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    break
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                self.left = int(line.split(b";")[0].strip(), 16)
                self.state = "data" if self.left else "done"
            elif self.state == "data":
                if not self.buf:
                    break
                take = self.buf[:self.left]
                self.buf = self.buf[len(take):]
                self.left -= len(take)
                out.append(take)
                if self.left == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(self.buf) < 2:
                    break
                assert self.buf[:2] == b"\r\n", f"bad chunk trailer {self.buf[:10]!r}"
                self.buf = self.buf[2:]
                self.state = "size"
            else:
                break
        return b"".join(out)


class SseParser:
    """Bytes of an event stream -> events (comment lines such as keep-alives are
    dropped; an event with an id and no data is kept: the stream's first event)."""

    def __init__(self):
        self.buf = b""
        self.id: str | None = None
        self.data: list[str] = []
        self.any = False

    def feed(self, data: bytes, t: float) -> list[SseEvent]:
        self.buf += data
        events = []
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                break
            line = self.buf[:i].rstrip(b"\r").decode()
            self.buf = self.buf[i + 1:]
            if line == "":
                if self.any:
                    events.append(SseEvent(self.id, "\n".join(self.data) if self.data else None, t))
                self.id, self.data, self.any = None, [], False
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                self.id, self.any = value, True
            elif name == "data":
                self.data.append(value)
                self.any = True
        return events


def _head(path: str, host: str, port: int, headers: dict | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _parse_head(raw: bytes) -> tuple[int, dict]:
    text = raw.decode("latin-1")
    status_line, *rest = text.split("\r\n")
    status = int(status_line.split()[1])
    hdrs = {}
    for line in rest:
        if line:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
    return status, hdrs


class SseStream:
    """A live stream read by a thread that stamps every event's arrival.
    `status`/`headers` are known when the constructor returns; a non-200 answer's
    body is in `body`."""

    def __init__(self, base: str, path: str, headers: dict | None = None, timeout: float = 30.0):
        u = urllib.parse.urlsplit(base)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(_head(path, u.hostname, u.port, headers))
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"stream {path}: connection closed before an answer ({raw!r})")
            raw += chunk
        head, rest = raw.split(b"\r\n\r\n", 1)
        self.status, self.headers = _parse_head(head)
        self.events: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self.body = b""
        self._chunked = _Chunked() if self.headers.get("transfer-encoding") == "chunked" else None
        if self.status != 200:
            self.body = self._read_body(rest)
            self.sock.close()
            return
        self.sock.settimeout(None)
        self._parser = SseParser()
        self._feed(rest, time.monotonic())
        threading.Thread(target=self._run, daemon=True).start()

    def _read_body(self, rest: bytes) -> bytes:
        n = int(self.headers.get("content-length", "-1"))
        data = rest
        while n < 0 or len(data) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return self._chunked.feed(data) if self._chunked else data

    def _feed(self, data: bytes, t: float) -> None:
        if self._chunked:
            data = self._chunked.feed(data)
        for e in self._parser.feed(data, t):
            self.events.put(e)

    def _run(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                t = time.monotonic()
                if not data:
                    break
                self._feed(data, t)
        except OSError:
            pass
        finally:
            self.closed.set()

    def next(self, timeout: float = 10.0) -> SseEvent:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no stream event within {timeout}s"
                                 + (" (the stream was closed)" if self.closed.is_set() else ""))

    def take(self, n: int, timeout: float = 20.0) -> list[SseEvent]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(out)} of {n} stream events within {timeout}s: "
                                     f"{[e.id for e in out[-5:]]}")
            out.append(self.next(timeout=left))
        return out

    def quiet(self, timeout: float) -> list[SseEvent]:
        """Whatever arrives within `timeout` (to check that nothing more comes)."""
        out = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.events.get(timeout=left))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


async def sse_async(base: str, path: str, headers: dict | None = None):
    """asyncio version: returns (status, headers, async iterator of SseEvent, writer)."""
    u = urllib.parse.urlsplit(base)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(_head(path, u.hostname, u.port, headers))
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status, hdrs = _parse_head(head[:-4])
    chunked = _Chunked() if hdrs.get("transfer-encoding") == "chunked" else None
    parser = SseParser()

    async def events():
        while True:
            data = await reader.read(65536)
            if not data:
                return
            t = time.monotonic()
            if chunked:
                data = chunked.feed(data)
            for e in parser.feed(data, t):
                yield e

    return status, hdrs, events(), writer


# ---- a standalone gateway process ---------------------------------------------------


class Gateway(Broker):
    """One `freshet gateway` process; its spool directory outlives restarts. `.http` is
    its base URL, `.port` its HTTP port (so `start(port=...)` and
    `restart(same_port=True)` keep the address)."""

    def __init__(self, brokers: str, spool_dir: Path, log_path: Path, env: dict | None = None,
                 config_path: Path | None = None):
        super().__init__(spool_dir, log_path, env=env)
        self.brokers = brokers
        self.config_path = config_path

    def start(self, port: int = 0) -> "Gateway":
        assert not self.running, "gateway already running"
        cmd = [str(freshet_bin()), "gateway", "--brokers", self.brokers,
               "--http-listen", f"127.0.0.1:{port}", "--spool-dir", str(self.data_dir)]
        if self.config_path:
            cmd += ["--config", str(self.config_path)]
        self._spawn(cmd, {})
        try:
            line = self._stdout_lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            self.kill()
            raise BrokerError(f"gateway printed no listening line in {START_TIMEOUT_S}s; "
                              f"stderr:\n{self.stderr_tail()}")
        m = GATEWAY_LINE.match(line.rstrip("\n"))
        if not m:
            self.kill()
            raise BrokerError(f"unexpected gateway stdout line {line!r}; stderr:\n{self.stderr_tail()}")
        self.host, self.port = m["host"], int(m["port"])
        self.http_port = self.port
        assert m["brokers"] == self.brokers, line
        assert Path(m["spool"]) == self.data_dir.resolve(), line
        return self

    def _pump_stdout(self, proc, lines) -> None:
        first = True
        for raw in proc.stdout:
            if first:
                lines.put(raw.decode("utf-8", "replace"))
                first = False
            else:
                with open(self.log_path, "ab") as log:
                    log.write(b"[stdout] " + raw)
        if first:  # exited without a line: let start() fail at once
            lines.put(f"(exit before the listening line; stderr:\n{self.stderr_tail()})")

    @property
    def spool_dir(self) -> Path:
        return self.data_dir


class GatewayFactory(BrokerFactory):
    def __call__(self, brokers: str, env: dict | None = None, config: str | None = None,
                 start: bool = True, name: str | None = None) -> Gateway:
        """`config`: TOML text for --config (e.g. an [http.schemas] table)."""
        name = name or f"gateway{len(self.brokers)}"
        config_path = None
        if config is not None:
            config_path = self.tmp_path / f"{name}.toml"
            config_path.write_text(config)
        g = Gateway(brokers, self.tmp_path / f"{name}-spool", self.tmp_path / f"{name}.stderr.log",
                    env=env, config_path=config_path)
        self.brokers.append(g)
        if start:
            g.start()
        return g


@pytest.fixture
def gateway_factory(tmp_path):
    f = GatewayFactory(tmp_path)
    yield f
    problems = f.close()
    if problems:
        pytest.fail("\n".join(problems))


# ---- waiting on the gateway -------------------------------------------------------------


def hold_request(gw: "Gateway", topic: str, body: bytes, timeout: float = 20.0):
    """Starts `POST /ingest/{topic}` with `body` but sends only its first 10 bytes, and
    returns (socket, a 503 answer to a probe) once the request holds the gateway's only
    request slot (the gateway must run with FRESHET_HTTP_MAX_CONCURRENT_REQUESTS=1).
    The probe (GET /topics) writes nothing; when it wins the race for the slot, the
    held request is answered 503 at once and a new one is started."""
    import select
    head = (f"POST /ingest/{topic} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    slow = None
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"the held request never took the only slot in {timeout}s"
        if slow is None:
            slow = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            slow.sendall(head + body[:10])
        if select.select([slow], [], [], 0.05)[0]:
            early = slow.recv(65536)
            assert early.startswith(b"HTTP/1.1 503"), early
            slow.close()
            slow = None
            continue
        r = get(f"{gw.http}/topics")
        if r.status == 503:
            return slow, r
        assert r.status == 200, r


def finish_request(slow: socket.socket, body: bytes) -> bytes:
    """Sends the rest of a `hold_request` body; returns the raw answer."""
    slow.sendall(body[10:])
    answer = b""
    while chunk := slow.recv(65536):
        answer += chunk
    slow.close()
    return answer


# ---- waiting on the gateway -------------------------------------------------------------


def wait_spool_empty(base: str, timeout: float = 60.0) -> dict:
    from helpers import wait_until

    def drained():
        h = health(base)
        return h if h["spool"]["records"] == 0 and h["spool"]["held_bytes"] == 0 else None
    return wait_until(drained, timeout=timeout, interval=0.2, what=f"the spool of {base} to drain")


@dataclass
class Tally:
    """Counts of a load run, for the report."""
    posted: int = 0
    ok: int = 0
    spooled: int = 0
    failed: int = 0
    statuses: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"posted {self.posted}, 2xx {self.ok} (spooled {self.spooled}), non-2xx {self.failed} "
                f"{dict(sorted(self.statuses.items()))}")
