"""Sinks into databases (issue 11), against a real PostgreSQL (Debian's package, started
here) and SQLite files:

- a stateless query into PostgreSQL and SQLite at once, the pipeline process killed
  (`kill -9`) again and again and PostgreSQL restarted while records flow: every record
  is in each table exactly once;
- a windowed query into PostgreSQL as upserts on its primary key: the table equals an
  independent oracle's windows;
- a row the database refuses goes to the dead-letter topic with the database's message,
  the others are written; a missing table is a clear error; passwords never show;
- PostgreSQL's two batches in flight commit over the positions stored, not the ones
  they expected: records another writer covered are not written again; and upserts
  of the same keys in every batch do not deadlock them, even when a batch is written
  again while the next one holds its keys.
"""

from __future__ import annotations

import glob
import http.server
import json
import math
import random
import sqlite3
import subprocess
import threading
import time

import pytest

from conftest import freshet_bin
from databases import Postgres, Redis
from helpers import admin, consume, create_topic, producer, wait_until, watermarks
from test_pipeline import BROKER_ENV, describe, generate, name, oracle_for, produce_json, put_pipeline, run_pipeline  # noqa: F401


@pytest.fixture(scope="module")
def pg():
    server = Postgres().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis():
    server = Redis().start()
    yield server
    server.close()


class Webhook:
    """A receiver that answers 503 to every third request: the sink must retry with
    the same Idempotency-Key. Keeps the rows of each key it accepted."""

    def __init__(self, tls=None):
        self.accepted: dict[str, list] = {}
        self.requests = 0
        self.refused = 0
        self.lock = threading.Lock()
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                key = self.headers["Idempotency-Key"]
                with hook.lock:
                    hook.requests += 1
                    fail = hook.requests % 3 == 0
                    if fail:
                        hook.refused += 1
                    else:
                        hook.accepted[key] = json.loads(body)
                self.send_response(503 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # an ssl.SSLContext: https, handshakes in accept()
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/forms"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def rows(self) -> list:
        with self.lock:
            return [row for rows in self.accepted.values() for row in rows]

    def close(self):
        self.server.shutdown()


def sink_topics(bootstrap: str, pipeline: str) -> list[str]:
    md = admin(bootstrap).list_topics(timeout=10)
    return [t for t in md.topics if t.startswith(f"_freshet.pipeline.{pipeline}.") and ".sink." in t]


def sink_caught_up(pg: Postgres, db: str, bootstrap: str, sink_id: str, topic: str, partitions: int) -> bool:
    """Whether the positions stored with the rows under `sink_id` cover the end of
    `topic`, what the sink reads."""
    stored = dict(pg.psql(f"SELECT partition, next_offset FROM freshet_offsets WHERE sink = '{sink_id}'", db))
    return all(int(stored.get(str(p), 0)) >= watermarks(bootstrap, topic, p)[1] for p in range(partitions))


def paced_feed(bootstrap: str, topic: str, docs: list[dict]) -> threading.Thread:
    """A started thread producing `docs` in order, 50 every 20 ms (so batches are in
    flight while the test acts); join it to know every record is acknowledged."""
    def feed():
        p = producer(bootstrap, **{"enable.idempotence": True, "linger.ms": 5})
        for i in range(0, len(docs), 50):
            for d in docs[i:i + 50]:
                p.produce(topic, json.dumps(d).encode())
            p.poll(0)
            time.sleep(0.02)  # pacing, not synchronisation
        assert p.flush(30) == 0

    feeder = threading.Thread(target=feed)
    feeder.start()
    return feeder


def test_each_record_once_in_postgres_sqlite_redis_through_20_kill_9_and_a_database_restart(broker, pg, redis,
                                                                                             tmp_path, report):
    src = name("forms")
    partitions = 2
    create_topic(broker.bootstrap, src, partitions=partitions)
    db = name("forms").lower()
    pg.create_db(db)
    lite = tmp_path / "forms.db"
    pipeline = name("store")
    sql_file = tmp_path / "store.sql"
    sql_file.write_text(f"""
SET 'checkpoint-interval' = '200ms';
CREATE SINK pg WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'submissions',
                     create_table = true, batch_rows = 300);
CREATE SINK lite WITH (connector = 'sqlite', path = '{lite}', table = 'submissions', create_table = true);
CREATE SINK kv WITH (connector = 'redis', url = '{redis.url(1)}', table = 'sub', primary_key = 'id');
INSERT INTO pg SELECT CAST(id AS BIGINT) AS id, name, email, _timestamp AS received_at FROM {src};
INSERT INTO kv SELECT CAST(id AS BIGINT) AS id, name FROM {src};
INSERT INTO lite SELECT CAST(id AS BIGINT) AS id, name FROM {src} WHERE id % 2 = 0;
""")
    n = 12_000
    docs = [{"id": i, "name": f"user {i}", "email": f"u{i}@example.org"} for i in range(n)]
    log = open(tmp_path / "pipeline.stderr.log", "ab")

    def start():
        return subprocess.Popen([str(freshet_bin()), "pipeline", "run", pipeline, str(sql_file),
                                 "--brokers", broker.bootstrap], stdout=subprocess.DEVNULL, stderr=log)

    def sent():
        return sum(watermarks(broker.bootstrap, src, p)[1] for p in range(partitions))

    def feed():
        p = producer(broker.bootstrap, **{"enable.idempotence": True, "linger.ms": 5})
        for i in range(0, n, 100):
            for d in docs[i:i + 100]:
                p.produce(src, json.dumps(d).encode(), partition=d["id"] % partitions)
            p.poll(0)
            time.sleep(0.2)  # pacing (about 24 s in all), not synchronisation
        assert p.flush(30) == 0

    proc = start()
    feeder = threading.Thread(target=feed)
    feeder.start()
    rnd = random.Random(5)
    marks = sorted(rnd.sample(range(300, n - 300), 21))
    try:
        for i, mark in enumerate(marks):
            wait_until(lambda: sent() >= mark, timeout=60, what=f"{mark} records sent")
            if i == 10:
                # PostgreSQL goes away under load, then comes back.
                pg.stop("immediate")
                time.sleep(1.0)  # the outage itself, not synchronisation
                pg.start()
                continue
            proc.kill()
            proc.wait(10)
            proc = start()
        feeder.join(120)
        count = lambda: int(pg.psql("SELECT count(*) FROM submissions", db)[0][0])
        wait_until(lambda: count() >= n, timeout=120, what=lambda: f"{n} rows in PostgreSQL (have {count()})")
        # Every query into each sink is stateless and reads one source: the sinks read
        # the source themselves (fused), their positions are its offsets (under the
        # sink topic's id + '.source'), and their topics stay empty.
        topics = {t.rsplit(".", 1)[-1]: t for t in sink_topics(broker.bootstrap, pipeline)}
        assert all(watermarks(broker.bootstrap, t, p)[1] == 0 for t in topics.values() for p in range(partitions))
        wait_until(lambda: sink_caught_up(pg, db, broker.bootstrap, topics["pg"] + ".source", src, partitions),
                   timeout=60, what="the PostgreSQL sink at the end of its source")
        rows = pg.psql("SELECT count(*), count(DISTINCT id), min(id), max(id), "
                       "count(*) FILTER (WHERE email = 'u' || id || '@example.org' AND name = 'user ' || id), "
                       "count(*) FILTER (WHERE received_at > now() - interval '1 hour') FROM submissions", db)[0]
        assert [int(x) for x in rows] == [n, n, 0, n - 1, n, n], rows
        lite_count = lambda: sqlite3.connect(lite).execute("SELECT count(*), count(DISTINCT id) FROM submissions").fetchone()
        wait_until(lambda: lite_count()[0] >= n // 2, timeout=60, what=lambda: f"{n // 2} rows in SQLite ({lite_count()})")
        # The SQLite sink's positions cover its whole source: nothing more will come.
        con = sqlite3.connect(lite)
        wait_until(lambda: all(
            (con.execute("SELECT next_offset FROM freshet_offsets WHERE sink = ? AND partition = ?",
                         (topics["lite"] + ".source", p)).fetchone() or [0])[0] >= watermarks(broker.bootstrap, src, p)[1]
            for p in range(partitions)), timeout=60, what="the SQLite sink at the end of its source")
        assert lite_count() == (n // 2, n // 2)
        ids = {r[0] for r in con.execute("SELECT id FROM submissions")}
        assert ids == {i for i in range(n) if i % 2 == 0}
        wait_until(lambda: int(redis.cli("DBSIZE", db=1)[0]) >= n + 1, timeout=60, what="every row in Redis")
        assert int(redis.cli("DBSIZE", db=1)[0]) == n + 1  # and freshet_offsets
        assert redis.cli("HGET", f"sub:{n - 1}", "name", db=1) == [f"user {n - 1}"]
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
    report("sinks", f"{n} records into PostgreSQL, SQLite and Redis with {len(marks) - 1} kill -9 of the pipeline "
                    f"and one PostgreSQL restart: each row once in each table")


def test_two_queries_into_one_fused_sink_write_each_row_once_through_kill_9(broker, tmp_path):
    """Two stateless queries from one source into one sink (fused: the sink reads the
    source itself): a record gives two rows, one, or none (each query has a WHERE),
    numbered within the record so that a batch never cuts one in two. The pipeline is
    killed (-9) five times while the records arrive in small batches of 5; every
    expected row is in the table once, the oracle computed here from the records."""
    src = name("pairs")
    create_topic(broker.bootstrap, src)
    lite = tmp_path / "pairs.db"
    pipeline = name("pairs")
    sql_file = tmp_path / "pairs.sql"
    sql_file.write_text(f"""
CREATE SINK pairs_db WITH (connector = 'sqlite', path = '{lite}', table = 'pairs', create_table = true, batch_rows = 5);
INSERT INTO pairs_db SELECT CAST(id AS BIGINT) AS id, 'even' AS kind FROM {src} WHERE id % 2 = 0;
INSERT INTO pairs_db SELECT CAST(id AS BIGINT) AS id, 'third' AS kind FROM {src} WHERE id % 3 = 0;
""")
    n = 3_000
    expected = sorted([(i, "even") for i in range(n) if i % 2 == 0] + [(i, "third") for i in range(n) if i % 3 == 0])
    log = open(tmp_path / "pipeline.stderr.log", "ab")
    proc = run_pipeline(broker, pipeline, sql_file, log)

    def rows():
        try:
            return sqlite3.connect(lite, timeout=5).execute("SELECT id, kind FROM pairs").fetchall()
        except sqlite3.OperationalError:
            return []  # the table is not created yet

    try:
        for k in range(5):
            produce_json(broker.bootstrap, src, [{"id": i} for i in range(k * n // 5, (k + 1) * n // 5)])
            wait_until(lambda: len(rows()) > k * len(expected) // 5, timeout=60, what=f"rows of part {k}")
            proc.kill()
            proc.wait(10)
            proc = run_pipeline(broker, pipeline, sql_file, log)
        wait_until(lambda: len(rows()) >= len(expected), timeout=60,
                   what=lambda: f"{len(expected)} rows (have {len(rows())})")
        # The stored position covers the whole source: nothing more will come.
        topic = [t for t in sink_topics(broker.bootstrap, pipeline) if t.endswith(".sink.pairs_db")][0]
        con = sqlite3.connect(lite, timeout=5)
        wait_until(lambda: (con.execute("SELECT next_offset FROM freshet_offsets WHERE sink = ?",
                                        (topic + ".source",)).fetchone() or [0])[0] >= n,
                   timeout=60, what="the sink's position at the end of its source")
        assert sorted(rows()) == expected
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def test_window_upserts_equal_the_oracle(broker, pg):
    src = name("tweets")
    create_topic(broker.bootstrap, src)
    docs = generate(3_000, seed=21)
    produce_json(broker.bootstrap, src, docs)
    db = name("polls").lower()
    pg.create_db(db)
    pg.psql("CREATE TABLE city_counts (city TEXT, window_start TIMESTAMPTZ, window_end TIMESTAMPTZ, "
            "n BIGINT, users BIGINT, total DOUBLE PRECISION, extra TEXT DEFAULT 'kept', "
            "PRIMARY KEY (city, window_start))", db)
    pipeline = name("counts")
    sql = f"""
SET 'allowed-lateness' = '2s';
SET 'emit-interval' = '50ms';
CREATE SINK counts_db WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'city_counts',
                            primary_key = 'city, window_start', batch_rows = 50);
INSERT INTO counts_db
SELECT city, window_start, window_end, COUNT(*) AS n, COUNT(DISTINCT user_id) AS users, SUM(v) AS total
FROM TUMBLE({src}, ts, INTERVAL '10' SECOND)
GROUP BY city, window_start, window_end;
"""
    assert put_pipeline(broker, pipeline, sql).status == 201
    want, _ = oracle_for(docs, "tumble", size=10_000)

    def table() -> dict:
        rows = pg.psql("SELECT city, (extract(epoch FROM window_start) * 1000)::bigint, "
                       "(extract(epoch FROM window_end) * 1000)::bigint, n, users, total, extra FROM city_counts", db)
        return {(r[0], int(r[1]), int(r[2])): r[3:] for r in rows}

    def expected() -> dict:
        out = {}
        for k, w in want.items():
            total = w["total"]
            out[k] = [str(w["n"]), str(w["users"]), "" if total is None else str(float(total)).removesuffix(".0"), "kept"]
        return out

    wait_until(lambda: {k: v for k, v in table().items() if k in want} == expected(), timeout=60,
               what=lambda: f"the table equal to the oracle's {len(want)} windows")
    # No window the oracle does not have but the still-open last one.
    extra = set(table()) - set(want)
    assert all(k[0] == "zz" for k in extra), extra
    # The password never shows.
    d = describe(broker, pipeline)
    assert pg.PASSWORD not in json.dumps(d) and "freshet:***@" in d["sql"], d


def test_redis_sorted_sets_order_rows_by_a_column(broker, redis):
    """Seed 001's plan: form submissions in a Redis sorted set ordered by the time they
    were received (members: the rows as JSON), and a live tally as a leaderboard (a
    grouped query upserted on its primary key: members are the keys, scores the
    counts, beside each key's hash). A row without a usable score is dead-lettered."""
    src = name("submissions")
    create_topic(broker.bootstrap, src)
    rng = random.Random(5)
    choices = ["red", "green", "blue", "black"]
    times = rng.sample(range(10_000_000), 500)  # distinct: the order is by score alone
    docs = [{"id": i, "name": f"user {i}", "choice": rng.choice(choices),
             "received_at": 1_764_547_200_000 + times[i]} for i in range(500)]
    docs[17]["received_at"] = None
    docs[18]["received_at"] = "not a time"
    produce_json(broker.bootstrap, src, docs)
    pipeline = name("ordered")
    dead = f"{pipeline}.dead-letter"
    sql = f"""
CREATE SINK ordered WITH (connector = 'redis', url = '{redis.url(5)}', table = 'forms_by_time', score = 'received_at');
CREATE SINK board WITH (connector = 'redis', url = '{redis.url(5)}', table = 'votes', primary_key = 'choice', score = 'n');
INSERT INTO ordered SELECT CAST(id AS BIGINT) AS id, name, received_at FROM {src};
INSERT INTO board SELECT choice, COUNT(*) AS n FROM {src} GROUP BY choice;
"""
    assert put_pipeline(broker, pipeline, sql).status == 201
    good = [d for d in docs if isinstance(d["received_at"], int)]
    card = lambda key: int(redis.cli("ZCARD", key, db=5)[0])
    wait_until(lambda: card("forms_by_time") >= len(good), timeout=60,
               what=lambda: f"{len(good)} members (have {card('forms_by_time')})")
    # The independent oracle: the rows sorted by received_at in Python.
    want = sorted(good, key=lambda d: d["received_at"])
    got = redis.cli("ZRANGE", "forms_by_time", "0", "-1", "WITHSCORES", db=5)
    members, scores = [json.loads(m) for m in got[::2]], [int(s) for s in got[1::2]]
    assert [m["id"] for m in members] == [d["id"] for d in want]
    assert scores == [d["received_at"] for d in want]
    assert all(m == {k: d[k] for k in ("id", "name", "received_at")} for m, d in zip(members, want))

    wait_until(lambda: watermarks(broker.bootstrap, dead)[1] >= 2, timeout=30, what="2 dead letters")
    letters = consume(broker.bootstrap, dead)
    errors = {json.loads(r.value)["id"]: dict(r.headers)["freshet.error"].decode() for r in letters}
    assert sorted(errors) == [17, 18], errors
    assert "score column 'received_at' is NULL" in errors[17], errors
    assert "not a number or an ISO-8601 time" in errors[18], errors

    tally = {c: sum(1 for d in docs if d["choice"] == c) for c in choices}
    board = lambda: redis.cli("ZRANGE", "votes", "0", "-1", "WITHSCORES", db=5)
    want_board = [x for c, n in sorted(tally.items(), key=lambda kv: (kv[1], kv[0])) for x in (c, str(n))]
    wait_until(lambda: board() == want_board, timeout=60, what=lambda: f"the leaderboard {want_board} (have {board()})")
    assert redis.cli("HGET", "votes:blue", "n", db=5) == [str(tally["blue"])]


def test_a_refused_row_goes_to_the_dead_letter_topic_and_the_rest_is_written(broker, pg):
    src = name("votes")
    create_topic(broker.bootstrap, src)
    db = name("votes").lower()
    pg.create_db(db)
    pg.psql("CREATE TABLE votes (id BIGINT PRIMARY KEY, choice TEXT NOT NULL, weight INT CHECK (weight > 0))", db)
    docs = [{"id": i, "choice": None if i == 7 else "a", "weight": -1 if i == 13 else 1} for i in range(40)]
    docs.append({"id": 41, "choice": "b", "weight": "heavy"})  # not an integer
    produce_json(broker.bootstrap, src, docs)
    # Refused before the database: a value that is not JSON, and an id CAST cannot
    # read (the sink reads its source itself, so it dead-letters them, once each).
    p = producer(broker.bootstrap)
    p.produce(src, b"not json {")
    p.produce(src, json.dumps({"id": "forty-three", "choice": "c", "weight": 1}).encode())
    assert p.flush(10) == 0
    pipeline = name("votes")
    dead = f"{pipeline}.dead-letter"
    sql = f"""
CREATE SINK v WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'votes', primary_key = 'id');
INSERT INTO v SELECT CAST(id AS BIGINT) AS id, choice, weight FROM {src};
"""
    assert put_pipeline(broker, pipeline, sql).status == 201
    ids = lambda: sorted(int(r[0]) for r in pg.psql("SELECT id FROM votes", db))
    wait_until(lambda: len(ids()) >= 38, timeout=60, what=lambda: f"38 rows written (have {len(ids())})")
    wait_until(lambda: watermarks(broker.bootstrap, dead)[1] >= 5, timeout=30, what="5 dead letters")
    assert ids() == [i for i in range(40) if i not in (7, 13)]
    letters = consume(broker.bootstrap, dead)
    assert len(letters) == 5
    by_db = [r for r in letters if "freshet.sink" in dict(r.headers)]
    errors = {json.loads(r.value)["id"]: dict(r.headers)["freshet.error"].decode() for r in by_db}
    assert "null value in column \"choice\"" in errors[7], errors
    assert "check constraint" in errors[13], errors
    assert "integer" in errors[41], errors
    assert all(dict(r.headers)["freshet.sink"] == b"v" for r in by_db)
    # Each from its source record (the sink reads the source itself).
    assert sorted(dict(r.headers)["freshet.source"].decode() for r in by_db) == [f"{src}/0/{o}" for o in (13, 40, 7)]
    before = {r.value: dict(r.headers) for r in letters if r not in by_db}
    forty_three = json.dumps({"id": "forty-three", "choice": "c", "weight": 1}).encode()
    assert sorted(before) == sorted([b"not json {", forty_three]), before
    assert "not JSON" in before[b"not json {"]["freshet.error"].decode()
    assert before[b"not json {"]["freshet.source"] == f"{src}/0/41".encode()
    assert before[forty_three]["freshet.error"].decode().startswith("id: "), before[forty_three]
    assert before[forty_three]["freshet.source"] == f"{src}/0/42".encode()
    assert describe(broker, pipeline)["dead_lettered"] == 5

    # A table that is not there: a clear error, and the pipeline stops.
    missing = name("missing")
    sql = f"""
CREATE SINK m WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'nowhere');
INSERT INTO m SELECT CAST(id AS BIGINT) AS id FROM {src};
"""
    assert put_pipeline(broker, missing, sql).status == 201
    wait_until(lambda: describe(broker, missing)["status"] == "failed", timeout=30, what="the pipeline failed")
    d = describe(broker, missing)
    assert "table \"nowhere\" does not exist" in d["last_error"], d
    assert pg.PASSWORD not in json.dumps(d)


def test_a_table_dropped_while_running_stops_the_pipeline_with_its_error(broker, pg):
    """The sink's writer thread meets a definition error mid-run (its table dropped):
    the pipeline stops with the database's message even though no more records come."""
    src = name("dropped")
    create_topic(broker.bootstrap, src)
    db = name("dropped").lower()
    pg.create_db(db)
    pg.psql("CREATE TABLE t (id BIGINT)", db)
    produce_json(broker.bootstrap, src, [{"id": i} for i in range(10)])
    pipeline = name("dropped")
    assert put_pipeline(broker, pipeline, f"""
CREATE SINK d WITH (connector = 'postgres', url = '{pg.url(db)}', table = 't');
INSERT INTO d SELECT CAST(id AS BIGINT) AS id FROM {src};
""").status == 201
    count = lambda: int(pg.psql("SELECT count(*) FROM t", db)[0][0])
    wait_until(lambda: count() == 10, timeout=60, what=lambda: f"10 rows ({count()})")
    pg.psql("DROP TABLE t", db)
    produce_json(broker.bootstrap, src, [{"id": 10}])
    wait_until(lambda: describe(broker, pipeline)["status"] == "failed", timeout=30,
               what=lambda: f"the pipeline failed ({describe(broker, pipeline)})")
    error = describe(broker, pipeline)["last_error"]
    assert "sink 'd'" in error and "does not exist" in error, error


def test_copy_upsert_and_statement_write_the_same_values(broker, pg):
    """A batch without a primary key goes to PostgreSQL by COPY (text format, escaped
    by Freshet); with one, by an upsert statement of the whole batch; a single row
    (batch_rows = 1 here) by a statement of its own. The same rows through the three
    paths give the same table, for text with tabs, newlines and backslashes, epoch
    milliseconds and ISO strings into timestamps, objects into jsonb, booleans,
    floats and NULLs, and a refused row is dead-lettered by each path alone."""
    src = name("notes")
    create_topic(broker.bootstrap, src)
    db = name("notes").lower()
    pg.create_db(db)
    columns = ("id BIGINT {pk}, note TEXT, at TIMESTAMPTZ, seen TIMESTAMPTZ, day DATE, doc JSONB, "
               "flag BOOLEAN, amount DOUBLE PRECISION CHECK (amount >= 0)")
    pg.psql(f"CREATE TABLE by_copy ({columns.format(pk='')})", db)
    pg.psql(f"CREATE TABLE by_upsert ({columns.format(pk='PRIMARY KEY')})", db)
    pg.psql(f"CREATE TABLE by_statement ({columns.format(pk='PRIMARY KEY')})", db)
    rnd = random.Random(11)
    texts = ["plain", "tab\there", "new\nline", "back\\slash \\N", "crlf\r\n", "quote ' \"", "é ☃ 𝄞", "", None]
    docs = []
    for i in range(200):
        docs.append({"id": i, "note": rnd.choice(texts),
                     "seen": rnd.choice([None, "2026-12-01T10:11:12.345Z", "2026-12-01 23:59:59+02:00"]),
                     "doc": rnd.choice([None, {"a": [1, 2, {"b": "x\ty"}]}, {}, "text", 3]),
                     "flag": rnd.choice([True, False, None]),
                     "amount": rnd.choice([0, 1.5, 1e-7, 12345678.25, None])})
    docs[150]["amount"] = -1  # refused by the CHECK, on both paths
    produce_json(broker.bootstrap, src, docs)
    pipeline = name("notes")
    select = (f"SELECT CAST(id AS BIGINT) AS id, note, _timestamp AS at, seen, _timestamp AS day, doc, flag, amount "
              f"FROM {src}")
    sql = f"""
CREATE SINK c WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'by_copy', batch_rows = 64);
CREATE SINK u WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'by_upsert', primary_key = 'id',
                    batch_rows = 64);
CREATE SINK s WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'by_statement', primary_key = 'id',
                    batch_rows = 1);
INSERT INTO c {select};
INSERT INTO u {select};
INSERT INTO s {select};
"""
    assert put_pipeline(broker, pipeline, sql).status == 201
    count = lambda t: int(pg.psql(f"SELECT count(*) FROM {t}", db)[0][0])
    for table in ("by_copy", "by_upsert", "by_statement"):
        wait_until(lambda: count(table) >= len(docs) - 1, timeout=60,
                   what=lambda: f"{len(docs) - 1} rows in {table} (have {count(table)})")
    dead = f"{pipeline}.dead-letter"
    wait_until(lambda: watermarks(broker.bootstrap, dead)[1] >= 3, timeout=30, what="3 dead letters")
    rows = lambda t: [r[0] for r in pg.psql(f"SELECT row_to_json(t)::text FROM {t} t ORDER BY id", db)]
    by_copy, by_upsert, by_statement = rows("by_copy"), rows("by_upsert"), rows("by_statement")
    assert len(by_copy) == len(docs) - 1
    assert by_copy == by_statement
    assert by_upsert == by_statement
    # And they are the values sent, read back independently of both paths.
    for got, want in zip((json.loads(r) for r in by_copy), (d for d in docs if d["id"] != 150)):
        assert got["id"] == want["id"] and got["note"] == want["note"] and got["flag"] == want["flag"]
        assert got["doc"] == want["doc"], (got, want)
        assert (got["amount"] is None) == (want["amount"] is None)
        assert want["amount"] is None or math.isclose(got["amount"], want["amount"])
    # The batches went in whole (rows of one COPY share their transaction id, xmin);
    # a COPY that failed (a value badly escaped) would have fallen back to one row
    # per savepoint, each with an xmin of its own, and hidden the fault. Only the
    # refused row's batch does that.
    for table in ("by_copy", "by_upsert"):
        shared_xmin = int(pg.psql(f"SELECT count(*) FROM {table} WHERE xmin IN "
                                  f"(SELECT xmin FROM {table} GROUP BY xmin HAVING count(*) > 1)", db)[0][0])
        assert shared_xmin >= len(docs) // 2, f"{table}: only {shared_xmin} rows went in by a COPY of several"
    letters = consume(broker.bootstrap, dead)
    assert sorted(dict(r.headers)["freshet.sink"] for r in letters) == [b"c", b"s", b"u"]
    assert all(json.loads(r.value)["id"] == 150 for r in letters)


def test_one_topic_into_five_sinks_at_once_each_row_once(broker, pg, redis, tmp_path, report):
    """Seed 001's forms: stored in PostgreSQL, SQLite and Redis, confirmed by webhook and
    written to JSON-lines files, by one pipeline; a second pipeline added later reads
    the same topic without touching the first."""
    src = name("forms")
    create_topic(broker.bootstrap, src, partitions=2)
    n = 3_000
    docs = [{"id": i, "name": f"user {i}", "email": f"u{i}@example.org"} for i in range(n)]
    for p in (0, 1):
        produce_json(broker.bootstrap, src, [d for d in docs if d["id"] % 2 == p], partition=p)
    db = name("forms").lower()
    pg.create_db(db)
    hook = Webhook()
    files = tmp_path / "files"
    pipeline = name("fanout")
    select = f"SELECT CAST(id AS BIGINT) AS id, name, email FROM {src}"
    sql = f"""
CREATE SINK pg WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'submissions', create_table = true);
CREATE SINK lite WITH (connector = 'sqlite', path = '{tmp_path / "forms.db"}', table = 'submissions', create_table = true);
CREATE SINK kv WITH (connector = 'redis', url = '{redis.url(3)}', table = 'form', primary_key = 'id');
CREATE SINK hook WITH (connector = 'http', url = '{hook.url}', timeout = '5s', batch_rows = 200);
CREATE SINK jsonl WITH (connector = 'file', path = '{files}', roll_size = '64KB');
INSERT INTO pg {select};
INSERT INTO lite {select};
INSERT INTO kv {select};
INSERT INTO hook {select};
INSERT INTO jsonl {select};
"""
    try:
        assert put_pipeline(broker, pipeline, sql).status == 201
        want = {d["id"]: d for d in docs}

        def pg_ids():
            return [int(r[0]) for r in pg.psql("SELECT id FROM submissions", db)]

        def lite_ids():
            return [r[0] for r in sqlite3.connect(tmp_path / "forms.db").execute("SELECT id FROM submissions")]

        def redis_keys():
            return redis.cli("KEYS", "form:*", db=3)

        def file_rows():
            out = []
            for f in sorted(glob.glob(str(files / "jsonl-*.jsonl"))):
                out += [json.loads(line) for line in open(f)]
            return out

        for what, get in [("PostgreSQL", pg_ids), ("SQLite", lite_ids), ("Redis", redis_keys),
                          ("the webhook", hook.rows), ("the files", file_rows)]:
            wait_until(lambda: len(get()) >= n, timeout=90, what=lambda: f"{n} rows in {what} (have {len(get())})")
        assert sorted(pg_ids()) == sorted(want)
        assert sorted(lite_ids()) == sorted(want)
        assert sorted(redis_keys()) == sorted(f"form:{i}" for i in want)
        fields = redis.cli("HGETALL", "form:42", db=3)
        assert dict(zip(fields[::2], fields[1::2])) == {"id": "42", "name": "user 42", "email": "u42@example.org"}
        assert hook.refused > 0
        got = hook.rows()
        assert sorted(r["id"] for r in got) == sorted(want), "each row once at the webhook (by Idempotency-Key)"
        assert all(r == want[r["id"]] for r in got)
        rows = file_rows()
        assert sorted(r["id"] for r in rows) == sorted(want) and all(r == want[r["id"]] for r in rows)
        assert len(glob.glob(str(files / "jsonl-*.jsonl"))) > 1, "rolled at 64 KB"

        # Plug and play: another pipeline over the same topic, added while the first runs.
        second = name("count")
        assert put_pipeline(broker, second, f"""
CREATE SINK c WITH (connector = 'sqlite', path = '{tmp_path / "counts.db"}', table = 'by_parity',
                    primary_key = 'parity', create_table = true);
INSERT INTO c SELECT CAST(id AS BIGINT) % 2 AS parity, COUNT(*) AS n FROM {src} GROUP BY CAST(id AS BIGINT) % 2;
""").status == 201
        counts = lambda: dict(sqlite3.connect(tmp_path / "counts.db").execute("SELECT parity, n FROM by_parity").fetchall())
        wait_until(lambda: counts() == {0: n // 2, 1: n // 2}, timeout=60, what=lambda: f"counts by parity ({counts()})")
        assert describe(broker, pipeline)["status"] == "running"
    finally:
        hook.close()
    report("sinks", f"{n} records into PostgreSQL, SQLite, Redis, a webhook failing 1 request in 3 and "
                    f"JSON-lines files at once: each row once in each")


def test_an_https_webhook_trusts_mozillas_roots_or_the_named_ca(broker, tmp_path):
    """A webhook over TLS: with the CA that signed its certificate named (`ca`), every
    row arrives once (retries included); without it, the certificate is refused with
    an error that says what to do, and nothing is sent."""
    import ssl

    import trustme
    ca = trustme.CA()
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    src = name("secure")
    create_topic(broker.bootstrap, src)
    n = 300
    docs = [{"id": i, "name": f"user {i}"} for i in range(n)]
    produce_json(broker.bootstrap, src, docs)
    trusted, untrusted = Webhook(tls=server), Webhook(tls=server)
    assert trusted.url.startswith("https://")
    pipeline, stranger = name("https"), name("untrusted")
    select = f"SELECT CAST(id AS BIGINT) AS id, name FROM {src}"
    try:
        assert put_pipeline(broker, pipeline, f"""
CREATE SINK hook WITH (connector = 'http', url = '{trusted.url}', ca = '{ca_file}', batch_rows = 50);
INSERT INTO hook {select};
""").status == 201
        assert put_pipeline(broker, stranger, f"""
CREATE SINK hook WITH (connector = 'http', url = '{untrusted.url}', batch_rows = 50);
INSERT INTO hook {select};
""").status == 201
        wait_until(lambda: len(trusted.rows()) >= n, timeout=60, what=lambda: f"{n} rows over https ({len(trusted.rows())})")
        assert sorted(r["id"] for r in trusted.rows()) == list(range(n))
        assert all(r == docs[r["id"]] for r in trusted.rows())
        assert trusted.refused > 0, "retries over TLS too"
        wait_until(lambda: "certificate" in (describe(broker, stranger)["last_error"] or ""), timeout=30,
                   what="the untrusted certificate reported")
        error = describe(broker, stranger)["last_error"]
        assert "ca = '...'" in error, error
        assert untrusted.requests == 0 and untrusted.rows() == []
    finally:
        trusted.close()
        untrusted.close()


def test_a_database_outage_grows_the_lag_and_nothing_is_lost(broker, pg):
    src = name("orders")
    create_topic(broker.bootstrap, src)
    db = name("orders").lower()
    pg.create_db(db)
    pipeline = name("orders")
    sql = f"""
CREATE SINK o WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'orders', create_table = true);
INSERT INTO o SELECT CAST(id AS BIGINT) AS id FROM {src};
"""
    assert put_pipeline(broker, pipeline, sql).status == 201
    produce_json(broker.bootstrap, src, [{"id": i} for i in range(100)])
    count = lambda: int(pg.psql("SELECT count(*) FROM orders", db)[0][0])
    wait_until(lambda: count() == 100, timeout=60, what="the first 100 rows")
    pg.stop("immediate")
    try:
        produce_json(broker.bootstrap, src, [{"id": i} for i in range(100, 1_100)])
        sink = lambda: describe(broker, pipeline)["sinks"]["o"]
        wait_until(lambda: sink()["lag"] >= 1_000, timeout=30, what=lambda: f"the lag at 1000 ({sink()})")
        d = describe(broker, pipeline)
        assert d["status"] == "running" and "PostgreSQL" in d["last_error"], d
        assert pg.PASSWORD not in json.dumps(d)
    finally:
        pg.start()
    wait_until(lambda: count() == 1_100, timeout=60, what=lambda: f"1100 rows after the outage ({count()})")
    wait_until(lambda: describe(broker, pipeline)["sinks"]["o"]["lag"] == 0, timeout=30, what="the lag back at 0")
    assert int(pg.psql("SELECT count(DISTINCT id) FROM orders", db)[0][0]) == 1_100


def test_postgres_batches_commit_over_the_stored_positions_not_the_expected_ones(broker, pg):
    """PostgreSQL takes two batches at a time: a batch's rows go in over the positions
    the batch before it will store, while that one commits, and it commits only if the
    stored positions are those. Another writer moves the stored position on mid-stream:
    the records it covers are not written and every other one is, once (a writer that
    trusted the positions it expected would write them too)."""
    src = name("moved")
    create_topic(broker.bootstrap, src)
    db = name("moved").lower()
    pg.create_db(db)
    pipeline = name("moved")
    sql = f"""
CREATE SINK m WITH (connector = 'postgres', url = '{pg.url(db)}', table = 'moved', create_table = true,
                    batch_rows = 50);
INSERT INTO m SELECT CAST(id AS BIGINT) AS id FROM {src};
"""
    assert put_pipeline(broker, pipeline, sql).status == 201
    n, skip = 6_000, 500

    # One partition, in order: record `id` is at offset `id`.
    feeder = paced_feed(broker.bootstrap, src, [{"id": j} for j in range(n)])
    try:
        count = lambda: int(pg.psql("SELECT count(*) FROM moved", db)[0][0])
        wait_until(lambda: count() >= 1_000, timeout=60, what="1000 rows written")
        # Another writer applies `skip` records: the stored position moves on (waiting
        # for the sink's lock if a batch holds it).
        moved = pg.psql(f"WITH u AS (UPDATE freshet_offsets SET next_offset = next_offset + {skip} "
                        f"RETURNING next_offset) SELECT next_offset FROM u", db)
        assert len(moved) == 1, moved
        end = int(moved[0][0])
        assert end < n - 1_000, f"the feed ended before the move ({end})"
    finally:
        feeder.join(60)
    stored = lambda: int(pg.psql("SELECT next_offset FROM freshet_offsets", db)[0][0])
    wait_until(lambda: stored() >= n, timeout=60, what=lambda: f"the positions at the end ({stored()})")
    ids = [int(r[0]) for r in pg.psql("SELECT id FROM moved ORDER BY id", db)]
    assert ids == [i for i in range(n) if not end - skip <= i < end], (len(ids), end)


def test_upserts_of_the_same_keys_in_every_batch_do_not_stall_the_two_writers(broker, pg):
    """Every batch upserts the same 50 keys: a batch written ahead must not take a row
    lock the batch before it still needs (it would wait for that batch's commit while
    that batch waited for its lock: a deadlock PostgreSQL cannot see). The positions
    reach the end of the source, and each key holds its last value."""
    src = name("samekeys")
    create_topic(broker.bootstrap, src)
    n = 20_000
    produce_json(broker.bootstrap, src, [{"k": i % 50, "v": i} for i in range(n)])
    db = name("samekeys").lower()
    pg.create_db(db)
    pg.psql("CREATE TABLE t (k BIGINT PRIMARY KEY, v BIGINT)", db)
    pipeline = name("same-keys")
    sql = f"""
CREATE SINK s WITH (connector = 'postgres', url = '{pg.url(db)}', table = 't', primary_key = 'k', batch_rows = 100);
INSERT INTO s SELECT CAST(k AS BIGINT) AS k, CAST(v AS BIGINT) AS v FROM {src};
"""
    r = put_pipeline(broker, pipeline, sql)
    assert r.status == 201, r
    stored = lambda: int(pg.psql("SELECT coalesce(sum(next_offset), 0) FROM freshet_offsets", db)[0][0])
    wait_until(lambda: stored() >= n, timeout=60, what=lambda: f"the positions at {n} (at {stored()})")
    rows = {int(k): int(v) for k, v in pg.psql("SELECT k, v FROM t", db)}
    assert rows == {k: n - 50 + k for k in range(50)}, rows


def test_a_batch_written_again_is_not_blocked_by_the_next_ones_upserts(broker, pg):
    """Upserts of the same 50 keys in every batch while another writer moves the stored
    position on: the batch in flight finds positions it did not expect and is written
    again, the plain way, needing the keys the next batch (written ahead) has locked;
    that batch rolls back instead of waiting for it. Nothing stalls, and each key holds
    its last value."""
    src = name("againkeys")
    create_topic(broker.bootstrap, src)
    db = name("againkeys").lower()
    pg.create_db(db)
    pg.psql("CREATE TABLE t (k BIGINT PRIMARY KEY, v BIGINT)", db)
    # A slow store of the positions (50 ms, as a busy database): the next batch is
    # always written ahead while one commits.
    pg.psql("CREATE TABLE freshet_offsets (sink TEXT NOT NULL, partition INTEGER NOT NULL, "
            "next_offset BIGINT NOT NULL, origins TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (sink, partition));"
            "CREATE FUNCTION slow() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$ "
            "LANGUAGE plpgsql;"
            "CREATE TRIGGER slow BEFORE UPDATE ON freshet_offsets FOR EACH ROW EXECUTE FUNCTION slow()", db)
    pipeline = name("againkeys")
    sql = f"""
CREATE SINK s WITH (connector = 'postgres', url = '{pg.url(db)}', table = 't', primary_key = 'k', batch_rows = 50);
INSERT INTO s SELECT CAST(k AS BIGINT) AS k, CAST(v AS BIGINT) AS v FROM {src};
"""
    r = put_pipeline(broker, pipeline, sql)
    assert r.status == 201, r
    n = 8_000

    feeder = paced_feed(broker.bootstrap, src, [{"k": j % 50, "v": j} for j in range(n)])
    try:
        stored = lambda: int(pg.psql("SELECT coalesce(sum(next_offset), 0) FROM freshet_offsets", db)[0][0])
        wait_until(lambda: stored() >= 1_000, timeout=60, what="1000 records applied")
        for _ in range(5):  # moves of 10 records: the batch in flight still writes 40
            # (A stalled sink holds the row: the statement fails after 20 s, not hangs.)
            moved = pg.psql("SET statement_timeout = '20s'; WITH u AS (UPDATE freshet_offsets SET "
                            "next_offset = next_offset + 10 RETURNING next_offset) SELECT next_offset FROM u", db)
            moved = [r for r in moved if r != ["SET"]]
            assert len(moved) == 1 and int(moved[0][0]) < n - 500, moved
            time.sleep(0.2)  # spacing of the moves, not synchronisation
    finally:
        feeder.join(60)
    wait_until(lambda: stored() >= n, timeout=60, what=lambda: f"the positions at {n} (at {stored()})")
    rows = {int(k): int(v) for k, v in pg.psql("SELECT k, v FROM t", db)}
    assert rows == {k: n - 50 + k for k in range(50)}, rows
