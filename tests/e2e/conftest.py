"""Broker fixtures for the end-to-end tests.

Every test talks to a real `freshet serve` process through third-party clients. The
broker binary is `$FRESHET_BIN`, else `target/release/freshet` at the repository root.

Fixtures:
  broker          one broker per test module (module-level `BROKER_ENV` dict adds
                  environment, e.g. {"FRESHET_MAX_REQUEST_BYTES": "65536"})
  broker_factory  starts brokers owned by one test: broker_factory(env={...}, config={...},
                  args=[...]) (config is written as a TOML file passed with --config; args
                  are extra `serve` flags)
  report          report("section", "line") adds a line to the run's closing summary

A `Broker` can `stop()` (SIGTERM, must exit cleanly), `kill()` (SIGKILL), `start()` again
and `restart()` on the same data directory. Its stderr goes to a file; when a test fails,
the part of every involved broker's stderr written during that test is attached to the
failure report.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTEN_LINE = re.compile(r"^freshet listening on (?P<host>[^\s:]+):(?P<port>\d+)"
                         r"(?:, http on (?P<http_host>[^\s:]+):(?P<http_port>\d+))?, data in (?P<data>.+)$")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
STDERR_TAIL_BYTES = 30_000


def freshet_bin() -> Path:
    path = Path(os.environ.get("FRESHET_BIN") or REPO_ROOT / "target" / "release" / "freshet")
    if not path.is_file():
        pytest.fail(f"broker binary {path} not found: run `cargo build --release -p cli` or set FRESHET_BIN")
    return path


class BrokerError(AssertionError):
    pass


class Broker:
    """One `freshet serve` process on a data directory that outlives restarts."""

    def __init__(self, data_dir: Path, log_path: Path, env: dict[str, str] | None = None,
                 config: dict | None = None, args: list[str] | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.args = list(args or [])  # extra `serve` flags; may be changed between starts
        self.config_path: Path | None = None
        if config:
            self.config_path = self.data_dir.parent / f"{self.data_dir.name}.toml"
            self.config_path.write_text(_toml(config))
        self.proc: subprocess.Popen | None = None
        self.host = ""
        self.port = 0
        self.http_port: int | None = None
        self.reported_data_dir = ""
        self.starts = 0
        self._stdout_lines: queue.Queue = queue.Queue()

    # ---- lifecycle -------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        assert self.running, "broker is not running"
        return f"{self.host}:{self.port}"

    @property
    def http(self) -> str:
        """Base URL of the embedded HTTP gateway (start with FRESHET_HTTP_LISTEN set)."""
        assert self.running and self.http_port, "broker is not running with the HTTP gateway"
        return f"http://{self.host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, port: int = 0) -> "Broker":
        """Start on the same data dir; port 0 picks a fresh ephemeral port."""
        assert not self.running, "broker already running"
        cmd = [str(freshet_bin()), "serve", "--data-dir", str(self.data_dir),
               "--listen", f"127.0.0.1:{port}"]
        if self.config_path:
            cmd += ["--config", str(self.config_path)]
        cmd += self.args
        # The embedded HTTP gateway only where a test asks for it (its own Kafka clients
        # would otherwise add connections to every broker under test).
        self._spawn(cmd, {"FRESHET_HTTP_LISTEN": "off"})
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._stdout_lines.get(timeout=max(0.0, min(remaining, 0.5)))
            except queue.Empty:
                line = None
            if line is None:
                if self.proc.poll() is not None:
                    raise BrokerError(f"broker exited with {self.proc.returncode} before listening; "
                                      f"stderr:\n{self.stderr_tail()}")
                if remaining <= 0:
                    self.kill()
                    raise BrokerError(f"broker printed no listening line in {START_TIMEOUT_S}s; "
                                      f"stderr:\n{self.stderr_tail()}")
                continue
            m = LISTEN_LINE.match(line.rstrip("\n"))
            if not m:
                self.kill()
                raise BrokerError(f"unexpected first stdout line {line!r}; stderr:\n{self.stderr_tail()}")
            self.host, self.port = m["host"], int(m["port"])
            self.http_port = int(m["http_port"]) if m["http_port"] else None
            self.reported_data_dir = m["data"]
            assert self.port != 0, line
            assert Path(self.reported_data_dir) == self.data_dir.resolve(), \
                f"broker reports data dir {self.reported_data_dir!r}, started with {self.data_dir}"
            return self

    def _spawn(self, cmd: list[str], defaults: dict[str, str]) -> None:
        """Starts `cmd` with a clean FRESHET_* environment (`defaults`, then the test's
        `env`), stderr appended to the log, stdout lines pumped to `_stdout_lines`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHET_") or k == "FRESHET_BIN"}
        env.setdefault("RUST_BACKTRACE", "1")
        env.setdefault("NO_COLOR", "1")  # plain stderr in failure reports
        env.update(defaults)
        env.update(self.env)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(cmd)} env={self.env}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=log, env=env)
        self._stdout_lines = queue.Queue()
        threading.Thread(target=self._pump_stdout, args=(self.proc, self._stdout_lines),
                         daemon=True).start()

    def _pump_stdout(self, proc: subprocess.Popen, lines: queue.Queue) -> None:
        first = True
        for raw in proc.stdout:
            text = raw.decode("utf-8", "replace")
            if first:
                lines.put(text)
                first = False
            else:  # the contract is ONE stdout line; anything else is kept in the log
                with open(self.log_path, "ab") as log:
                    log.write(b"[stdout] " + raw)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait: a clean shutdown must exit 0 in time."""
        if not self.running:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BrokerError(f"broker did not exit within {timeout}s of SIGTERM; stderr:\n{self.stderr_tail()}")
        if code != 0:
            raise BrokerError(f"broker exited with {code} after SIGTERM; stderr:\n{self.stderr_tail()}")
        return code

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def restart(self, kill: bool = False, same_port: bool = False) -> "Broker":
        port = self.port if same_port else 0
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(port=port)

    # ---- inspection ------------------------------------------------------------

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def stderr_since(self, offset: int, limit: int = STDERR_TAIL_BYTES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        if len(data) > limit:
            data = b"[... cut ...]\n" + data[-limit:]
        return data.decode("utf-8", "replace")

    def stderr_tail(self, limit: int = STDERR_TAIL_BYTES) -> str:
        return self.stderr_since(max(0, self.log_size() - limit), limit)

    def partition_dir(self, topic: str, partition: int) -> Path:
        """The directory holding one partition's segment files (Kafka layout TOPIC-N)."""
        want = f"{topic}-{partition}"
        found = [p for p in self.data_dir.rglob(want) if p.is_dir()]
        assert len(found) == 1, f"expected one {want} dir under {self.data_dir}, found {found}"
        return found[0]


class BrokerFactory:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.brokers: list[Broker] = []

    def __call__(self, env: dict[str, str] | None = None, config: dict | None = None,
                 start: bool = True, name: str | None = None, args: list[str] | None = None) -> Broker:
        name = name or f"broker{len(self.brokers)}"
        b = Broker(self.tmp_path / name, self.tmp_path / f"{name}.stderr.log", env=env, config=config,
                   args=args)
        self.brokers.append(b)
        if start:
            b.start()
        return b

    def close(self) -> list[str]:
        problems = []
        for b in self.brokers:
            if b.running:
                try:
                    b.stop()
                except BrokerError as e:
                    problems.append(str(e))
        return problems


def _toml(config: dict) -> str:
    out = []
    for k, v in config.items():
        if isinstance(v, bool):
            out.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, int):
            out.append(f"{k} = {v}")
        else:
            out.append(f'{k} = "{v}"')
    return "\n".join(out) + "\n"


# ---- fixtures -------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker(request, tmp_path_factory):
    env = getattr(request.module, "BROKER_ENV", None)
    name = request.module.__name__.rsplit(".", 1)[-1]
    base = tmp_path_factory.mktemp(name)
    b = Broker(base / "data", base / "broker.stderr.log", env=env)
    b.start()
    yield b
    if not b.running and b.proc is not None:
        raise BrokerError(f"module broker died (exit {b.proc.returncode}); stderr:\n{b.stderr_tail()}")
    b.stop()


@pytest.fixture(autouse=True)
def _module_broker_alive(request):
    """A broker that dies under a test fails that test, and the next test gets a new one."""
    yield
    if "broker" in request.fixturenames:
        b = request.getfixturevalue("broker")
        if b.proc is not None and not b.running:
            code = b.proc.returncode
            tail = b.stderr_tail()
            b.start()  # the module's next test needs a broker either way
            if code not in (0, -signal.SIGKILL):  # 0 / SIGKILL: the test stopped it on purpose
                pytest.fail(f"broker died during the test with exit status {code}; stderr:\n{tail}")


@pytest.fixture
def broker_factory(tmp_path):
    f = BrokerFactory(tmp_path)
    yield f
    problems = f.close()
    if problems:
        pytest.fail("\n".join(problems))


_REPORT_KEY = pytest.StashKey[dict]()


@pytest.fixture
def report(request):
    sections = request.config.stash.setdefault(_REPORT_KEY, {})

    def add(section: str, line: str) -> None:
        sections.setdefault(section, []).append(line)
        print(f"[{section}] {line}")
    return add


# ---- reporting hooks ------------------------------------------------------------

def _brokers_of(item) -> list[Broker]:
    out = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Broker):
            out.append(value)
        elif isinstance(value, BrokerFactory):
            out.extend(value.brokers)
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    offsets = item.stash.setdefault(_LOG_OFFSETS, {})
    if call.when == "setup":
        for b in _brokers_of(item):
            offsets[id(b)] = b.log_size()
    if rep.failed:
        for b in _brokers_of(item):
            text = b.stderr_since(offsets.get(id(b), 0))
            rep.sections.append((f"broker stderr ({b.log_path}) during {call.when}", text or "(empty)"))


_LOG_OFFSETS = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    sections = config.stash.get(_REPORT_KEY, {})
    if not sections:
        return
    terminalreporter.section("freshet e2e report")
    for name, lines in sections.items():
        for line in lines:
            terminalreporter.write_line(f"{name}: {line}")
