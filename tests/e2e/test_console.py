"""The web console of `freshet serve` in a real Chromium (Debian's, driven by
playwright-core through console/driver.js): every page renders with no console error,
the topics page lists what the test created, a record produced by a Kafka client shows
in the live tail within 1 s, the produce form stores a record, topics are created and
deleted from the page. A screenshot of each page is saved under the test's directory."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from gateway_fixtures import gateway_factory, get  # noqa: F401
from helpers import admin, consume, create_topic, producer, topic_name, wait_futures, wait_until, watermarks

BROKER_ENV = {"FRESHET_HTTP_LISTEN": "127.0.0.1:0", "FRESHET_HTTP_HISTORY_INTERVAL_MS": "200"}
DRIVER = Path(__file__).parent / "console" / "driver.js"


class Browser:
    """One Chromium page; each call sends a command to driver.js and reads its answer."""

    def __init__(self):
        self.proc = subprocess.Popen(["node", str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=DRIVER.parent)

    def __call__(self, op: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the browser driver ended (exit {self.proc.poll()})"
        answer = json.loads(line)
        assert answer["ok"], f"{op} {args}: {answer.get('error')}"
        return answer

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 - the driver is killed below either way
            pass
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


def topic_config(bootstrap: str, topic: str, key: str):
    """One config entry of a topic as a Kafka client's DescribeConfigs reads it."""
    from confluent_kafka.admin import ConfigResource
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    client = admin(bootstrap)  # kept until the answer: a dropped client fails its futures
    return wait_futures(client.describe_configs([resource]))[resource][key]


def no_errors(browser):
    errors = browser("errors")["errors"]
    assert errors == [], errors


def test_every_page_renders_and_works(broker, browser, tmp_path, report):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    topic = create_topic(broker.bootstrap, topic_name("console"), partitions=2)
    p = producer(broker.bootstrap)
    for i in range(30):
        p.produce(topic, json.dumps({"i": i}).encode(), partition=i % 2)
    assert p.flush(30) == 0

    # Overview: the cards and the chart, the time to first render.
    opened = browser("open", url=f"{broker.http}/")
    shown = browser("wait_text", selector="#card-topics .value", text="", timeout_ms=10000)
    topics_card = browser("texts", selector="#card-topics .value")["texts"][0]
    listed = get(f"{broker.http}/console/api/overview").json()
    assert int(topics_card.replace(",", "")) == listed["topics"] >= 1
    assert listed["size_bytes"] > 0 and browser("texts", selector="#card-size .value")["texts"][0].endswith("B")
    browser("wait_selector", selector="svg.chart polyline.in", timeout_ms=10000)
    browser("screenshot", path=str(shots / "overview.png"))
    no_errors(browser)
    report("console", f"overview: page loaded in {opened['ms']} ms, cards shown {shown['ms']} ms later")

    # Topics: the topic is listed with its partitions and records; filter by name.
    browser("open", url=f"{broker.http}/#/topics")
    browser("fill", selector="#topic-search", value=topic)
    browser("wait_selector", selector=f'tr[data-topic="{topic}"]')
    row = browser("texts", selector=f'tr[data-topic="{topic}"] td')["texts"]
    assert row[0] == topic and row[1] == "2" and row[2] == "30", row
    # Its size (DescribeLogDirs) is what its partitions' segment files hold on disk;
    # its retention the broker's default of 7 days.
    shown_bytes = browser("eval", expr=f"document.querySelector('tr[data-topic=\"{topic}\"] td[data-bytes]').dataset.bytes")["value"]
    on_disk = sum(f.stat().st_size for pt in (0, 1) for f in broker.partition_dir(topic, pt).glob("*.log"))
    assert int(shown_bytes) == on_disk > 0, (shown_bytes, on_disk)
    assert row[4] == "7d 0h", row
    browser("screenshot", path=str(shots / "topics.png"))
    no_errors(browser)

    # Create and delete a topic from the page (the deletion asks first).
    created = topic_name("made")
    browser("fill", selector="#topic-search", value="")
    browser("fill", selector="#new-topic-name", value=created)
    browser("fill", selector="#new-topic-partitions", value="3")
    browser("click", selector="#create-topic button[type=submit]")
    wait_until(lambda: created in get(f"{broker.http}/topics").json(), timeout=15, what="the topic made from the page")
    assert len(get(f"{broker.http}/console/api/topics/{created}").json()["partitions"]) == 3
    browser("fill", selector="#topic-search", value=created)
    browser("wait_selector", selector=f'tr[data-topic="{created}"]')
    browser("click", selector=f'tr[data-topic="{created}"] button.danger')
    wait_until(lambda: created not in get(f"{broker.http}/topics").json(), timeout=15, what="the topic deleted from the page")
    assert any(created in d for d in browser("dialogs")["dialogs"]), "deleting asks for a confirmation"
    no_errors(browser)

    # A topic's page: partitions with offsets, the live tail, the produce form.
    browser("open", url=f"{broker.http}/#/topics/{topic}")
    browser("wait_selector", selector="#partitions-body tr")
    ends = [row.split("\t") for row in browser("texts", selector="#partitions-body tr")["texts"]]
    for partition in (0, 1):
        low, high = watermarks(broker.bootstrap, topic, partition)
        assert ends[partition][2:4] == [str(low), str(high)], ends
    # Open once the stream's start is fixed (at the end of the topic): produce after.
    browser("wait_selector", selector='#tail[data-open="true"]', state="attached")
    marker = f"live-{time.monotonic_ns()}"
    sent = time.monotonic()
    p.produce(topic, json.dumps({"marker": marker}).encode(), partition=1)
    assert p.flush(10) == 0
    seen = browser("wait_text", selector="#tail div", text=marker, timeout_ms=5000)
    latency = time.monotonic() - sent
    report("console", f"live tail: a produced record shown {latency * 1000:.0f} ms after the produce call")
    assert latency < 1.0, f"the record took {latency:.2f} s to show in the live tail"
    # The filter hides what does not match.
    browser("fill", selector="#tail-filter", value="no-such-text")
    hidden = browser("eval", expr="[...document.querySelectorAll('#tail div')].every(d => d.hidden)")["value"]
    assert hidden
    browser("fill", selector="#tail-filter", value="")
    # The produce form stores a record.
    browser("fill", selector="#produce-key", value="k1")
    browser("fill", selector="#produce-value", value='{"from": "the form"}')
    browser("click", selector="#produce button[type=submit]")
    browser("wait_text", selector="#produce-result", text="stored at partition")
    stored = [r for r in consume(broker.bootstrap, topic, partitions=(0, 1)) if r.key == b"k1"]
    assert [json.loads(r.value) for r in stored] == [{"from": "the form"}]
    # Search from an offset, and from a time: the records a Kafka client reads there.
    all_records = consume(broker.bootstrap, topic, partitions=(0,))
    browser("fill", selector="#search-partition", value="0")
    browser("fill", selector="#search-from", value="10")
    browser("click", selector="#search button[type=submit]")
    browser("wait_selector", selector='#search-body tr[data-offset="10"]', state="attached")
    shown = [int(o) for o in browser("eval", expr="[...document.querySelectorAll('#search-body tr')].map(r => r.dataset.offset)")["value"]]
    assert shown == [r.offset for r in all_records if r.offset >= 10], shown
    at = all_records[12].timestamp
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at / 1000)) + f".{at % 1000:03d}Z"
    browser("fill", selector="#search-from", value=iso)
    browser("click", selector="#search button[type=submit]")
    first = min(r.offset for r in all_records if r.timestamp >= at)
    browser("wait_selector", selector=f'#search-body tr[data-offset="{first}"]:first-child', state="attached")
    # Configs as the cluster describes them; the schema (none here).
    browser("wait_selector", selector='#configs-body tr[data-config="retention.ms"]', state="attached")
    assert "No JSON Schema" in browser("texts", selector="#schema")["texts"][0]
    # Edit a config on the page: a Kafka client reads the new value; "Default" returns
    # it to the cluster's default.
    default_retention = topic_config(broker.bootstrap, topic, "retention.ms")
    assert default_retention.is_default
    browser("click", selector='button[data-config-edit="retention.ms"]')
    browser("fill", selector='input[data-config-input="retention.ms"]', value="3600000")
    browser("click", selector='button[data-config-save="retention.ms"]')
    browser("wait_text", selector='#configs-body tr[data-config="retention.ms"]', text="3600000")
    edited = topic_config(broker.bootstrap, topic, "retention.ms")
    assert (edited.value, edited.is_default) == ("3600000", False), edited
    # A value the cluster refuses is an error on the page, and changes nothing.
    browser("click", selector='button[data-config-edit="retention.ms"]')
    browser("fill", selector='input[data-config-input="retention.ms"]', value="soon")
    browser("click", selector='button[data-config-save="retention.ms"]')
    browser("wait_text", selector="#error", text="retention.ms")
    browser("errors")  # the 400 the browser logged is the refusal asked for
    assert topic_config(broker.bootstrap, topic, "retention.ms").value == "3600000"
    browser("click", selector='button[data-config-cancel="retention.ms"]')
    browser("click", selector='button[data-config-default="retention.ms"]')
    wait_until(lambda: topic_config(broker.bootstrap, topic, "retention.ms").is_default, timeout=10,
               what="retention.ms back to its default")
    assert topic_config(broker.bootstrap, topic, "retention.ms").value == default_retention.value
    browser("screenshot", path=str(shots / "topic.png"))
    no_errors(browser)
    assert seen["ms"] >= 0

    # The gateway's page: the requests just made show in its charts.
    browser("open", url=f"{broker.http}/#/gateway")
    browser("wait_text", selector="#gateway-cluster .value", text="reachable")
    browser("wait_selector", selector="#gateway-charts svg polyline", state="attached")
    browser("screenshot", path=str(shots / "gateway.png"))
    no_errors(browser)
    report("console", f"screenshots in {shots}")


def test_the_group_page_shows_the_lag_the_offsets_give(broker, browser, tmp_path):
    from confluent_kafka import Consumer, TopicPartition
    topic = create_topic(broker.bootstrap, topic_name("lagged"), partitions=2)
    produced_at = time.time()
    p = producer(broker.bootstrap)
    for i in range(40):
        p.produce(topic, json.dumps({"i": i}).encode(), partition=i % 2)
    assert p.flush(30) == 0
    group = topic_name("console-group")
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest", "session.timeout.ms": 30000})
    try:
        c.subscribe([topic])
        wait_until(lambda: len(c.assignment()) == 2 or c.poll(0.2) is not None and len(c.assignment()) == 2,
                   timeout=30, what="the member's assignment")
        c.commit(offsets=[TopicPartition(topic, 0, 5), TopicPartition(topic, 1, 20)], asynchronous=False)
        committed = {tp.partition: tp.offset for tp in c.committed(
            [TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)}
        want = {pt: watermarks(broker.bootstrap, topic, pt)[1] - committed[pt] for pt in (0, 1)}
        assert want == {0: 15, 1: 0}

        browser("open", url=f"{broker.http}/#/groups")
        browser("wait_selector", selector=f'tr[data-group="{group}"]')
        row = browser("texts", selector=f'tr[data-group="{group}"] td')["texts"]
        assert row[0] == group and row[1] == "Stable" and row[2] == "consumer" and row[4] == "1", row
        assert row[3] in ("range", "roundrobin"), row  # confluent-kafka's default assignors
        browser("screenshot", path=str(tmp_path / "groups.png"))
        no_errors(browser)

        browser("open", url=f"{broker.http}/#/groups/{group}")
        browser("wait_selector", selector=f'tr[data-partition="{topic}:0"]')
        for pt in (0, 1):
            cells = browser("texts", selector=f'tr[data-partition="{topic}:{pt}"] td')["texts"]
            assert int(cells[2]) == committed[pt] and int(cells[4]) == want[pt], (pt, cells)
            if want[pt]:
                # The age of the oldest record not consumed: produced in this test.
                assert 0 <= float(cells[5]) <= time.time() - produced_at + 1, cells
            else:
                assert float(cells[5]) == 0, cells
        assert browser("texts", selector="#group-lag .value")["texts"] == ["15"]
        assigned = browser("texts", selector="#members-body td")["texts"][3]
        assert assigned == f"{topic}:0,1", assigned
        browser("wait_selector", selector="#lag-chart svg")
        browser("screenshot", path=str(tmp_path / "group.png"))
        no_errors(browser)
        # A reset while the group has a member is refused, and says why.
        browser("fill", selector="#reset-topic", value=topic)
        browser("fill", selector="#reset-to", value="earliest")
        browser("click", selector="#reset button[type=submit]")
        browser("wait_text", selector="#error", text="is active")
        browser("errors")  # the 409 the browser logged is the refusal asked for
    finally:
        c.close()
    # Once the member has left, the reset commits the log start of each partition.
    wait_until(lambda: get(f"{broker.http}/console/api/groups/{group}").json()["state"] == "Empty",
               timeout=30, what="the group empty")
    browser("click", selector="#reset button[type=submit]")
    browser("wait_text", selector="#reset-result", text="committed")
    check = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        after = {tp.partition: tp.offset for tp in check.committed(
            [TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)}
    finally:
        check.close()
    assert after == {pt: watermarks(broker.bootstrap, topic, pt)[0] for pt in (0, 1)}, after
    browser("wait_text", selector="#group-lag .value", text="40")


def test_a_pipelines_results_update_on_its_page(broker, browser, tmp_path):
    from test_pipeline import name
    src = create_topic(broker.bootstrap, name("votes"))
    out = name("tally")
    pipeline = name("tally")
    sql = f"INSERT INTO {out} SELECT choice, COUNT(*) AS votes FROM {src} GROUP BY choice EMIT CHANGES;"
    browser("open", url=f"{broker.http}/#/pipelines")
    browser("fill", selector="#new-pipeline-name", value=pipeline)
    browser("fill", selector="#new-pipeline-sql", value=sql)
    browser("click", selector="#create-pipeline button[type=submit]")
    browser("wait_text", selector="#pipeline-status .value", text="running", timeout_ms=30000)
    p = producer(broker.bootstrap)
    tally: dict[str, int] = {}

    def vote(choices):
        for c in choices:
            p.produce(src, json.dumps({"choice": c}).encode())
            tally[c] = tally.get(c, 0) + 1
        assert p.flush(30) == 0

    def table():
        rows = browser("eval", expr="[...document.querySelectorAll('#results-body tr')]"
                                    ".map(tr => [...tr.children].map(td => td.innerText))")["value"]
        head = browser("texts", selector="#results thead th")["texts"]
        return {r[head.index("choice")]: int(r[head.index("votes")]) for r in rows} if rows else {}

    vote(["a", "b", "a", "c", "a"])
    wait_until(lambda: table() == tally, timeout=30, what=lambda: f"the table at {tally}: {table()}")
    vote(["b", "b", "c"])  # the same rows update in place
    wait_until(lambda: table() == tally, timeout=30, what=lambda: f"the table at {tally}: {table()}")
    browser("wait_text", selector="#pipeline-in .value", text="8", timeout_ms=10000)
    # Pause: the run stops and leaves the pipeline's groups (answered once it has);
    # votes meanwhile wait in the topic, and a resume goes on from the checkpoints.
    browser("click", selector="#pause-pipeline")
    browser("wait_text", selector="#pipeline-status .value", text="paused", timeout_ms=10000)
    assert get(f"{broker.http}/pipelines/{pipeline}").json()["status"] == "paused"
    groups = get(f"{broker.http}/console/api/groups?search=freshet-pipeline-{pipeline}-").json()["groups"]
    assert groups and all(g["members"] == 0 for g in groups), groups
    browser("wait_text", selector="#pause-pipeline", text="Resume")
    before = dict(tally)
    vote(["c", "c", "d"])
    assert table() == before, "a paused pipeline changed its results"
    browser("click", selector="#pause-pipeline")
    browser("wait_text", selector="#pipeline-status .value", text="running", timeout_ms=30000)
    wait_until(lambda: table() == tally, timeout=30, what=lambda: f"the table at {tally} after the resume: {table()}")
    browser("wait_text", selector="#results-chart", text="no windows")
    browser("screenshot", path=str(tmp_path / "pipeline.png"))
    no_errors(browser)
    # The list of pipelines shows it running, with its counts.
    browser("open", url=f"{broker.http}/#/pipelines")
    browser("wait_text", selector=f'tr[data-pipeline="{pipeline}"]', text="running")
    browser("screenshot", path=str(tmp_path / "pipelines.png"))
    no_errors(browser)
    browser("open", url=f"{broker.http}/#/pipelines/{pipeline}")
    browser("wait_selector", selector="#delete-pipeline")
    browser("click", selector="#delete-pipeline")
    wait_until(lambda: get(f"{broker.http}/pipelines/{pipeline}").status == 404, timeout=30,
               what="the pipeline deleted from its page")
    browser("wait_selector", selector="#pipelines-body", state="attached")
    no_errors(browser)


def test_the_console_of_a_standalone_gateway(broker_factory, gateway_factory, browser, tmp_path):
    """`freshet gateway` in front of a cluster (here a `freshet serve` without HTTP)
    serves the same console, a Kafka client of that cluster."""
    b = broker_factory(name="behind-gateway")
    gw = gateway_factory(brokers=b.bootstrap)
    topic = create_topic(b.bootstrap, topic_name("standalone"), partitions=3)
    p = producer(b.bootstrap)
    for i in range(12):
        p.produce(topic, json.dumps({"i": i}).encode(), partition=i % 3)
    assert p.flush(30) == 0
    browser("open", url=f"{gw.http}/")
    browser("wait_text", selector="#card-brokers .value", text=f":{b.port}")
    browser("open", url=f"{gw.http}/#/topics")
    browser("fill", selector="#topic-search", value=topic)
    browser("wait_selector", selector=f'tr[data-topic="{topic}"]')
    row = browser("texts", selector=f'tr[data-topic="{topic}"] td')["texts"]
    assert row[:3] == [topic, "3", "12"], row
    browser("open", url=f"{gw.http}/#/topics/{topic}")
    browser("wait_selector", selector="#partitions-body tr")
    assert len(browser("texts", selector="#partitions-body tr")["texts"]) == 3
    browser("screenshot", path=str(tmp_path / "standalone-topic.png"))
    no_errors(browser)


SCALE_TOPICS = 10_000
SCALE_GROUPS = 1_000
PAGE = 50


def test_ten_thousand_topics_and_a_thousand_groups_page(broker_factory, browser, tmp_path, report):
    """Issue 12, part 4: the topics and groups pages of a large cluster show a page at a
    time, the same page a Kafka client's own listing gives, in bounded time; the browser
    holds one page of rows."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import NewTopic
    b = broker_factory(env=BROKER_ENV, name="scale")
    a = admin(b.bootstrap)
    names = [f"scale-{i:05d}" for i in range(SCALE_TOPICS)]
    t0 = time.monotonic()
    for i in range(0, SCALE_TOPICS, 1000):
        wait_futures(a.create_topics([NewTopic(n, num_partitions=1, replication_factor=1) for n in names[i:i + 1000]],
                                     operation_timeout=120), timeout=180)
    created_s = time.monotonic() - t0
    # A group per commit: no members, state Empty (what `kafka-consumer-groups` makes
    # with --reset-offsets).
    groups = [f"scale-group-{i:04d}" for i in range(SCALE_GROUPS)]
    t0 = time.monotonic()
    pending = {}
    for g in groups:
        pending.update(a.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(g, [TopicPartition(names[0], 0, 0)])]))
    wait_futures(pending, timeout=120)
    committed_s = time.monotonic() - t0
    listed = sorted(t for t in a.list_topics(timeout=30).topics if not t.startswith("_"))
    assert listed == names
    their_groups = sorted(g.group_id for g in a.list_consumer_groups().result(timeout=30).valid)
    assert set(groups) <= set(their_groups)

    def timed(path):
        t = time.monotonic()
        r = get(f"{b.http}{path}")
        assert r.status == 200, (path, r.status, r.text())
        return r.json(), time.monotonic() - t

    first, first_s = timed(f"/console/api/topics?limit={PAGE}")
    assert first["total"] == SCALE_TOPICS and [t["name"] for t in first["topics"]] == names[:PAGE], first["total"]
    last, last_s = timed(f"/console/api/topics?offset={SCALE_TOPICS - PAGE}&limit={PAGE}")
    assert [t["name"] for t in last["topics"]] == names[-PAGE:]
    page, groups_s = timed(f"/console/api/groups?offset={PAGE}&limit={PAGE}")
    assert page["total"] == len(their_groups)
    assert [g["name"] for g in page["groups"]] == their_groups[PAGE:2 * PAGE]
    assert all(g["state"] == "Empty" and g["members"] == 0 for g in page["groups"]), page["groups"][:3]
    one, group_s = timed(f"/console/api/groups/{groups[7]}")
    assert [(r["topic"], r["partition"], r["committed"]) for r in one["partitions"]] == [(names[0], 0, 0)], one
    searched, _ = timed(f"/console/api/groups?search=group-099&limit={PAGE}")
    assert [g["name"] for g in searched["groups"]] == [g for g in their_groups if "group-099" in g]

    # In the browser: one page of rows, the pager's total, the next page.
    opened = browser("open", url=f"{b.http}/#/topics")
    shown = browser("wait_text", selector="#topics-pager", text=f"of {SCALE_TOPICS:,}", timeout_ms=20000)
    assert browser("eval", expr="document.querySelectorAll('tr[data-topic]').length")["value"] == PAGE
    browser("click", selector="#topics-next")
    browser("wait_text", selector="#topics-pager", text=f"{PAGE + 1}–{2 * PAGE} of", timeout_ms=20000)
    assert browser("texts", selector="tr[data-topic] td:first-child")["texts"] == names[PAGE:2 * PAGE]
    browser("screenshot", path=str(tmp_path / "topics-10k.png"))
    browser("open", url=f"{b.http}/#/groups")
    groups_shown = browser("wait_text", selector="#groups-pager", text=f"of {len(their_groups):,}", timeout_ms=20000)
    assert browser("eval", expr="document.querySelectorAll('tr[data-group]').length")["value"] == PAGE
    browser("open", url=f"{b.http}/")
    overview = browser("wait_text", selector="#card-topics .value", text=f"{SCALE_TOPICS:,}", timeout_ms=20000)
    no_errors(browser)

    # What the server spends doing nothing with this many topics (its metrics history
    # samples every history_interval_ms; BROKER_ENV sets 200 ms, five times the default).
    cpu = process_cpu_s(b.proc.pid)
    t0 = time.monotonic()
    time.sleep(5)  # measuring an idle interval, not waiting for anything
    idle_cpu = (process_cpu_s(b.proc.pid) - cpu) / (time.monotonic() - t0)
    report("console", f"{SCALE_TOPICS} topics created in {created_s:.1f} s, {SCALE_GROUPS} groups in "
                      f"{committed_s:.1f} s; API: first topics page {first_s * 1000:.0f} ms, last "
                      f"{last_s * 1000:.0f} ms, a groups page {groups_s * 1000:.0f} ms, a group {group_s * 1000:.0f} ms; browser: topics page "
                      f"{opened['ms'] + shown['ms']} ms, groups page {groups_shown['ms']} ms, overview "
                      f"{overview['ms']} ms; idle server CPU {idle_cpu * 100:.0f}% of a core")
    for what, took in (("first topics page", first_s), ("last topics page", last_s), ("groups page", groups_s),
                       ("group's page", group_s)):
        assert took < 3.0, f"the {what} took {took:.2f} s"
    assert idle_cpu < 0.3, f"the idle server used {idle_cpu * 100:.0f}% of a core"


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/PID/stat, clock ticks)."""
    import os
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
