"""The two benchmark queries of bench/pipeline written with Bytewax (a Rust dataflow
engine driven from Python), run as their own process so that its CPU time can be read
from /proc (bench/pipeline starts it with bench/.venv-bytewax's Python; not meant to be
run by hand).

    pipeline_bytewax.py A|B BROKER INPUT_TOPIC OUTPUT_TOPIC GROUP STATE_DIR LATENESS_MS

Records are keyed by city; event time is the `created_at` field, through Bytewax's
EventClock with the allowed lateness as its wait (Bytewax keeps a watermark per key).
The input is read to its end (`tail=False`), at which point Bytewax closes every open
window, as the far-future record closes Freshet's. No recovery store (at-most-once, the
cheapest mode). Output rows are JSON objects with the same fields as Freshet's.
"""

import json
import sys
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
import bytewax.operators.windowing as win
from bytewax.connectors.kafka import KafkaSinkMessage
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow
from bytewax.testing import run_main

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
HOP_SIZE, HOP_SLIDE, TUMBLE = 300_000, 60_000, 10_000


def event_time(record):
    return EPOCH + timedelta(milliseconds=record["created_at"])


def main():
    query, broker, source, sink, _group, _state_dir, lateness_ms = sys.argv[1:8]
    flow = Dataflow(f"bench-{query}")
    messages = kop.input("in", flow, brokers=[broker], topics=[source], tail=False)
    records = op.map("parse", messages.oks, lambda m: json.loads(m.value))
    keyed = op.key_on("by-city", records, lambda r: r["city"])
    clock = win.EventClock(event_time, wait_for_system_duration=timedelta(milliseconds=int(lateness_ms)))
    if query == "A":
        windower = win.SlidingWindower(length=timedelta(milliseconds=HOP_SIZE),
                                       offset=timedelta(milliseconds=HOP_SLIDE), align_to=EPOCH)
        size, step = HOP_SIZE, HOP_SLIDE

        def builder():
            return [0, 0, set()]

        def folder(acc, r):
            acc[0] += 1
            acc[1] += 1 if r["retweet"] else 0
            acc[2].add(r["user_id"])
            return acc

        def merger(a, b):
            return [a[0] + b[0], a[1] + b[1], a[2] | b[2]]

        def fields(acc):
            return {"tweets": acc[0], "retweets": acc[1], "users": len(acc[2])}
    elif query == "B":
        windower = win.TumblingWindower(length=timedelta(milliseconds=TUMBLE), align_to=EPOCH)
        size, step = TUMBLE, TUMBLE

        def builder():
            return [0, 0]

        def folder(acc, r):
            acc[0] += 1
            acc[1] += r["amount"]
            return acc

        def merger(a, b):
            return [a[0] + b[0], a[1] + b[1]]

        def fields(acc):
            return {"n": acc[0], "total": acc[1]}
    else:
        raise SystemExit(f"unknown query {query!r}: A or B")
    windows = win.fold_window("window", keyed, clock, windower, builder, folder, merger)

    def row(key_and_window):
        city, (window_id, acc) = key_and_window
        start = window_id * step  # windows aligned to the epoch
        value = {"city": city, "window_start": start, "window_end": start + size, **fields(acc)}
        return KafkaSinkMessage(city.encode(), json.dumps(value).encode())

    kop.output("out", op.map("row", windows.down, row), brokers=[broker], topic=sink)
    run_main(flow)


if __name__ == "__main__":
    main()
