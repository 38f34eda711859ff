"""The two benchmark queries of bench/pipeline written with Pathway (a Rust dataflow engine
driven from Python), run as their own process so that its CPU time can be read from /proc
(bench/pipeline starts it with bench/.venv-pathway's Python; not meant to be run by hand).

    pipeline_pathway.py A|B BROKER INPUT_TOPIC OUTPUT_TOPIC GROUP STATE_DIR LATENESS_MS

Windows per city (`instance`) over the `created_at` column, emitted once each
(`exactly_once_behavior` with the allowed lateness as its shift, so a window comes out
when event time passes its end plus the lateness, as Freshet's EMIT FINAL). Streaming
mode, no persistence. Output rows are JSON objects with Freshet's fields (Pathway adds
`time` and `diff`; exactly once, every diff is 1).
"""

import sys

import pathway as pw

HOP_SIZE, HOP_SLIDE, TUMBLE = 300_000, 60_000, 10_000


class Tweet(pw.Schema):
    created_at: int
    user_id: int
    city: str
    retweet: bool
    amount: int
    text: str


def main():
    query, broker, source, sink, group, _state_dir, lateness_ms = sys.argv[1:8]
    settings = {"bootstrap.servers": broker, "group.id": group,
                "auto.offset.reset": "earliest", "session.timeout.ms": "6000"}
    tweets = pw.io.kafka.read(settings, topic=source, schema=Tweet, format="json",
                              autocommit_duration_ms=50)
    behavior = pw.temporal.exactly_once_behavior(shift=int(lateness_ms))
    if query == "A":
        window = pw.temporal.sliding(hop=HOP_SLIDE, duration=HOP_SIZE, origin=0)
        rows = tweets.windowby(tweets.created_at, window=window, instance=tweets.city,
                               behavior=behavior).reduce(
            city=pw.this._pw_instance,
            window_start=pw.this._pw_window_start,
            window_end=pw.this._pw_window_end,
            tweets=pw.reducers.count(),
            retweets=pw.reducers.sum(pw.if_else(pw.this.retweet, 1, 0)),
            users=pw.reducers.count_distinct(pw.this.user_id),
        )
    elif query == "B":
        window = pw.temporal.tumbling(duration=TUMBLE, origin=0)
        rows = tweets.windowby(tweets.created_at, window=window, instance=tweets.city,
                               behavior=behavior).reduce(
            city=pw.this._pw_instance,
            window_start=pw.this._pw_window_start,
            window_end=pw.this._pw_window_end,
            n=pw.reducers.count(),
            total=pw.reducers.sum(pw.this.amount),
        )
    else:
        raise SystemExit(f"unknown query {query!r}: A or B")
    pw.io.kafka.write(rows, {"bootstrap.servers": broker}, topic_name=sink, format="json")
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)


if __name__ == "__main__":
    main()
