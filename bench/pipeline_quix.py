"""The two benchmark queries of bench/pipeline written with Quix Streams, run as their own
process so that its CPU time can be read from /proc (bench/pipeline starts it with the
venv's Python; not meant to be run by hand).

    pipeline_quix.py A|B BROKER INPUT_TOPIC OUTPUT_TOPIC GROUP STATE_DIR LATENESS_MS

Input records are keyed by city (Quix windows aggregate per message key); event time is
the `created_at` field. Windows are closed per partition (`closing_strategy="partition"`,
as Freshet's watermark is), with grace = the allowed lateness. No changelog topics
(Freshet's broker has cleanup.policy=delete only), at-least-once. Output rows are JSON
objects with the same fields as Freshet's, so one checker reads both.
"""

import sys

from quixstreams import Application
from quixstreams.dataframe.windows import Count, Sum


def created_at(value, _headers, _timestamp, _timestamp_type):
    return value["created_at"]


def main():
    query, broker, source, sink, group, state_dir, lateness_ms = sys.argv[1:8]
    lateness_ms = int(lateness_ms)
    app = Application(
        broker_address=broker,
        consumer_group=group,
        auto_offset_reset="earliest",
        use_changelog_topics=False,
        processing_guarantee="at-least-once",
        state_dir=state_dir,
        loglevel="WARNING",
    )
    tweets = app.topic(source, value_deserializer="json", key_deserializer="str",
                       timestamp_extractor=created_at)
    out = app.topic(sink, value_serializer="json", key_serializer="str")
    sdf = app.dataframe(tweets)
    if query == "A":
        # COUNT(*), COUNT(*) FILTER (WHERE retweet), COUNT(DISTINCT user_id): one reduce
        # whose state holds the distinct users as a dict used as a set (the state is
        # JSON-serialized, which has no set type).
        def initializer(value):
            return {"tweets": 1, "retweets": 1 if value["retweet"] else 0,
                    "users": {str(value["user_id"]): 1}}

        def reducer(state, value):
            state["tweets"] += 1
            if value["retweet"]:
                state["retweets"] += 1
            state["users"][str(value["user_id"])] = 1
            return state

        sdf = (sdf.hopping_window(duration_ms=300_000, step_ms=60_000, grace_ms=lateness_ms)
               .reduce(reducer=reducer, initializer=initializer)
               .final(closing_strategy="partition"))

        def row(window, key):
            v = window["value"]
            return {"city": key, "window_start": window["start"], "window_end": window["end"],
                    "tweets": v["tweets"], "retweets": v["retweets"], "users": len(v["users"])}
    elif query == "B":
        sdf = (sdf.tumbling_window(duration_ms=10_000, grace_ms=lateness_ms)
               .agg(n=Count(), total=Sum("amount"))
               .final(closing_strategy="partition"))

        def row(window, key):
            return {"city": key, "window_start": window["start"], "window_end": window["end"],
                    "n": window["n"], "total": window["total"]}
    else:
        raise SystemExit(f"unknown query {query!r}: A or B")
    sdf = sdf.apply(lambda window, key, _ts, _headers: row(window, key), metadata=True)
    sdf.to_topic(out)
    app.run()


if __name__ == "__main__":
    main()
