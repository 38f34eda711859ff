"""librdkafka's own test suite against Freshet: a fixed selection of its tests/
directory (producer, consumer, offset commit, groups, admin, idempotence), built
from the source the rdkafka-sys crate bundles (scripts/librdkafka-tests), each
test run by its `test-runner` against a fresh `freshet serve` configured as the
suite's default scenario expects: auto-created topics with 4 partitions, and Kafka's
code default of 3 s for group.initial.rebalance.delay.ms (trivup's brokers set no
override; Freshet's default is 0, as Kafka's shipped server.properties): test 0102
starts two static members together and expects them in one first generation.

Full mode, not `-Q`: in quick mode the runner drops every subtest not marked quick
and still reports the test PASSED. A test counts as passed only when the runner
exits 0 and reports each of its tests that talk to the broker PASSED (none SKIPPED).

A test that fails for a feature Freshet does not have yet is listed in
EXPECTED_FAILURES with the reason; the list is checked both ways (strict xfail):
an expected failure that starts passing fails the run, so the list stays true.

LIBRDKAFKA_TEST_RUNNER names a prebuilt runner; otherwise the module builds it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The broker version the tests assume (TEST_KAFKA_VERSION gates what each test
# tries): the Kafka release whose APIs and versions Freshet answers for what
# these tests use.
KAFKA_VERSION = "3.4.0"

SUITE = [
    "0001", "0002", "0003", "0005", "0007", "0008", "0012", "0013", "0014", "0015",
    "0017", "0018", "0019", "0022", "0026", "0029", "0030", "0031", "0033", "0034",
    "0036", "0041", "0048", "0050", "0054", "0056", "0061", "0067", "0073", "0082",
    "0090", "0099", "0102", "0129",
]
# Not in it: 0103 (transactions) creates its topics with replication factor 3, which
# one node refuses as Kafka does; 0098 needs Java's TransactionProducerCli. The
# transactions they cover are tested with confluent-kafka in test_transactions.py.

# test -> why it fails on Freshet today (checked: it must fail).
EXPECTED_FAILURES: dict[str, str] = {}

# One test's limit: the runner has its own per-test timeouts (a few minutes at most).
TEST_TIMEOUT_S = 420

SUMMARY_LINE = re.compile(r"^\|\S*\s+(\d{4}\w*)\s+\|\S*\s+(PASSED|FAILED|SKIPPED|RUNNING|NOT STARTED)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def runner() -> Path:
    given = os.environ.get("LIBRDKAFKA_TEST_RUNNER")
    if given:
        return Path(given)
    built = subprocess.run([str(ROOT / "scripts" / "librdkafka-tests")], capture_output=True,
                           text=True, timeout=1200)
    assert built.returncode == 0, f"building librdkafka's test-runner failed:\n{built.stderr[-4000:]}"
    return Path(built.stdout.strip().splitlines()[-1])


def outcomes(output: str) -> dict[str, str]:
    """Test name -> outcome, from the runner's closing summary table."""
    found = {}
    for line in ANSI.sub("", output).splitlines():
        m = SUMMARY_LINE.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def run_one(runner: Path, bootstrap: str, number: str, workdir: Path) -> tuple[int, str]:
    conf = workdir / "test.conf"
    conf.write_text(f"metadata.broker.list={bootstrap}\n")
    env = {**os.environ, "TESTS": number, "RDKAFKA_TEST_CONF": str(conf),
           "TEST_KAFKA_VERSION": KAFKA_VERSION}
    # The runner writes its stats files to the working directory.
    proc = subprocess.run([str(runner)], cwd=workdir, env=env, capture_output=True, text=True,
                          errors="replace", timeout=TEST_TIMEOUT_S)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.timeout(TEST_TIMEOUT_S + 60)
@pytest.mark.parametrize("number", [
    pytest.param(n, marks=pytest.mark.xfail(reason=EXPECTED_FAILURES[n], strict=True))
    if n in EXPECTED_FAILURES else n
    for n in SUITE
])
def test_librdkafka(runner, broker_factory, tmp_path, number):
    b = broker_factory(config={"num_partitions": 4, "auto_create_topics": True,
                               "group_initial_rebalance_delay_ms": 3000})
    code, output = run_one(runner, b.bootstrap, number, tmp_path)
    (tmp_path / "runner.log").write_text(output)
    found = outcomes(output)
    # Not ours: `_local` tests need no broker, `_mock` ones run against librdkafka's
    # built-in mock cluster (both may skip for reasons of their own).
    broker_tests = {name: o for name, o in found.items()
                    if name.startswith(number) and not name.endswith(("_local", "_mock"))}
    tail = "\n".join(ANSI.sub("", output).splitlines()[-60:])
    assert broker_tests, f"the runner reported no test {number} (exit {code}):\n{tail}"
    not_passed = {name: o for name, o in broker_tests.items() if o != "PASSED"}
    assert code == 0 and not not_passed, \
        f"librdkafka test {number}: exit {code}, {not_passed or 'failed'}; log {tmp_path / 'runner.log'}:\n{tail}"
