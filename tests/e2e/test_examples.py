"""The examples of issue 27 (`examples/NAME/run`): each example's `--check` (it starts
what it needs, runs a shortened load and checks every consumer against the load's own
oracle; its figures go to the report), and what each example's user looks at in a real
Chromium: the form, the poll's pages, the city windows' console page (the READMEs'
screenshots are these)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import freshet_bin
from gateway_fixtures import request
from helpers import consume, create_topic, producer, wait_until, watermarks
from test_console import Browser

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir() if (p / "run").is_file()))
def test_the_examples_check_passes(example, report, tmp_path):
    # The sensors' report (its plots) goes where the browser below can open it.
    out = ["--out", str(tmp_path / "report")] if example == "sensors" else []
    # This venv's Python: it has confluent-kafka, which the sensors' simulator uses.
    done = subprocess.run([sys.executable, str(EXAMPLES / example / "run"), "--check", "--freshet", str(freshet_bin()),
                           *out], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    figures = [line for line in done.stdout.splitlines() if line.startswith('{"example"')]
    assert figures, done.stdout[-2000:]
    report(f"example {example}", figures[-1])
    if out:
        browser = Browser()
        try:
            browser("open", url=f"file://{tmp_path / 'report' / 'index.html'}")
            images = browser("eval", expr="[...document.images].map(i => i.complete && i.naturalWidth)")["value"]
            assert images == [640] * 4, images
            assert "lost</td><td>0<" in browser("eval", expr="document.body.innerHTML")["value"]
            browser("screenshot", path=str(tmp_path / "sensors-report.png"), full=False)
            assert browser("errors")["errors"] == []
        finally:
            browser.close()


def test_the_poll_through_a_kafka_client(report):
    """examples/live-poll with its votes from one Kafka client (librdkafka) instead of
    HTTP users: the same checks."""
    done = subprocess.run([sys.executable, str(EXAMPLES / "live-poll" / "run"), "--check", "--via", "kafka",
                           "--freshet", str(freshet_bin())], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    report("example live-poll via kafka", [line for line in done.stdout.splitlines()
                                           if line.startswith('{"example"')][-1])


def test_the_forms_page_names_a_refused_field_and_stores_a_good_submission(broker_factory, tmp_path):
    """examples/forms/pages/index.html served by `pages_dir`, with the example's
    schema on `forms`: a malformed email is refused (422), the page names and marks
    the field and nothing is stored; corrected, the submission is in the topic."""
    forms = EXAMPLES / "forms"
    b = broker_factory(env={"FRESHET_HTTP_LISTEN": "127.0.0.1:0", "FRESHET_HTTP_PAGES_DIR": str(forms / "pages")})
    create_topic(b.bootstrap, "forms", partitions=4)
    schema = json.loads((forms / "form.schema.json").read_text())
    assert request("PUT", f"{b.http}/topics/forms/schema", json_body=schema).status == 204
    stored = lambda: sum(watermarks(b.bootstrap, "forms", p)[1] for p in range(4))
    browser = Browser()
    try:
        browser("open", url=f"{b.http}/pages/")
        browser("fill", selector="#name", value="Ann Lee")
        browser("fill", selector="#roll", value="42")
        browser("fill", selector="#email", value="ann at college")
        browser("fill", selector="#message", value="The lecture on waves was great, no cap.")
        browser("click", selector="button[type=submit]")
        browser("wait_text", selector="#result", text="Please fix")
        assert "email" in browser("texts", selector="#result li")["texts"][0]
        assert browser("eval", expr="document.getElementById('email').classList.contains('invalid')")["value"]
        browser("screenshot", path=str(tmp_path / "forms-refused.png"))
        assert stored() == 0
        # Chromium reports the 422 answer itself as a console error; nothing else.
        errors = browser("errors")["errors"]
        assert all("422" in e for e in errors), errors
        browser("fill", selector="#email", value="ann@college.example")
        browser("click", selector="button[type=submit]")
        browser("wait_text", selector="#result", text="Thank you, Ann Lee")
        browser("screenshot", path=str(tmp_path / "forms-stored.png"))
        assert browser("errors")["errors"] == []
        records = [json.loads(r.value) for r in consume(b.bootstrap, "forms", partitions=range(4))]
        assert len(records) == 1, records
        doc = records[0]
        assert {k: doc[k] for k in ("name", "roll", "email", "course")} == {
            "name": "Ann Lee", "roll": 42, "email": "ann@college.example", "course": "physics"}
        assert len(doc["id"]) == 36, doc  # the page's crypto.randomUUID()
    finally:
        browser.close()


def test_the_poll_pages_vote_and_show_the_tally_live(broker_factory, tmp_path):
    """examples/live-poll/pages served by `pages_dir`, with the example's schema and
    tally pipeline: a vote from the page is accepted, and the results page's bars show
    the tally of votes sent over HTTP meanwhile, live (no reload)."""
    poll = EXAMPLES / "live-poll"
    b = broker_factory(env={"FRESHET_HTTP_LISTEN": "127.0.0.1:0", "FRESHET_HTTP_PAGES_DIR": str(poll / "pages")})
    create_topic(b.bootstrap, "votes", partitions=4)
    create_topic(b.bootstrap, "tally")
    schema = json.loads((poll / "vote.schema.json").read_text())
    assert request("PUT", f"{b.http}/topics/votes/schema", json_body=schema).status == 204
    tally_sql = (poll / "pipelines" / "tally.sql").read_text()
    assert request("PUT", f"{b.http}/pipelines/tally", body=tally_sql, headers={"Content-Type": "text/plain"},
                   timeout=60).status == 201
    browser = Browser()
    try:
        browser("open", url=f"{b.http}/pages/results.html")
        browser("wait_selector", selector=".row")
        sent = {"rust": 7, "python": 5, "go": 3}
        for option, k in sent.items():
            for i in range(k):
                r = request("POST", f"{b.http}/ingest/votes",
                            json_body={"poll": "conf-2026", "option": option, "voter": f"{option}-{i}"})
                assert r.status == 202, r
        browser("wait_text", selector="#meta", text="15 votes", timeout_ms=20000)
        counts = browser("texts", selector=".count")["texts"]
        assert counts == ["7", "5", "3", "0", "0"], counts
        widths = browser("eval", expr="[...document.querySelectorAll('.fill')].map(e => parseFloat(e.style.width))")
        assert widths["value"] == [100, round(500 / 7, 2), round(300 / 7, 2), 0, 0], widths
        browser("screenshot", path=str(tmp_path / "live-poll-results.png"))
        # A vote from the voting page, seen by the results page.
        browser("open", url=f"{b.http}/pages/")
        browser("click", selector="#options button:nth-child(4)")
        browser("wait_text", selector="#status", text="Your vote for typescript is in.")
        browser("open", url=f"{b.http}/pages/results.html")
        browser("wait_text", selector="#meta", text="16 votes", timeout_ms=20000)
        assert browser("errors")["errors"] == []
    finally:
        browser.close()


def test_the_city_windows_pipeline_charts_its_windows_in_the_console(broker_factory, tmp_path):
    """examples/city-windows' pipeline, as the example defines it, on part of its
    recording: the console's page for it charts the windows, and every row its live
    table shows equals the windows the example computes independently; PostgreSQL
    holds every window (the README's screenshot)."""
    import importlib.machinery
    import importlib.util

    from databases import Postgres
    example = EXAMPLES / "city-windows"
    loader = importlib.machinery.SourceFileLoader("city_windows_run", str(example / "run"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    run = importlib.util.module_from_spec(spec)
    loader.exec_module(run)
    tweets = list(run.recording(1_500, 3))
    want = run.oracle(tweets)
    pg = Postgres().start()
    browser = Browser()
    try:
        pg.create_db("evilnet")
        b = broker_factory(env={"FRESHET_HTTP_LISTEN": "127.0.0.1:0"})
        create_topic(b.bootstrap, "tweets", partitions=2)
        sql = run.fill(example, "city_windows.sql", PG_URL=pg.url("evilnet"))
        assert request("PUT", f"{b.http}/pipelines/city_windows", body=sql, headers={"Content-Type": "text/plain"},
                       timeout=60).status == 201
        p = producer(b.bootstrap)
        for t in tweets:
            p.produce("tweets", json.dumps(t).encode())
        assert p.flush(30) == 0
        count = lambda: int(pg.psql("SELECT count(*) FROM city_windows", "evilnet")[0][0])
        wait_until(lambda: count() == len(want), timeout=60, what=lambda: f"{len(want)} windows ({count()})")
        browser("open", url=f"{b.http}/#/pipelines/city_windows")
        browser("wait_selector", selector="#results-chart svg", timeout_ms=20000)

        def shown():
            rows = browser("eval", expr="[...document.querySelectorAll('#results-body tr')]"
                                        ".map(tr => [...tr.children].map(td => td.innerText))")["value"]
            head = browser("texts", selector="#results thead th")["texts"]
            return {(r[head.index("city")], int(r[head.index("window_start")])):
                    tuple(int(r[head.index(c)]) for c in ("tweets", "retweets", "users")) for r in rows}

        wait_until(lambda: len(shown()) == min(200, len(want)) and all(want[k] == v for k, v in shown().items()),
                   timeout=30, what=lambda: f"the page's rows equal to the oracle's ({len(shown())} shown)")
        browser("screenshot", path=str(tmp_path / "city-windows-console.png"), full=False)
        assert browser("errors")["errors"] == []
    finally:
        browser.close()
        pg.close()
