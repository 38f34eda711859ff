"""An independent model of what a windowed pipeline must compute, for the pipeline tests.

It replays the input records in the order one partition delivers them, decides which are
late with the documented rule (docs/sql.md: a record is late when a window it belongs to
has already closed, that is when the earliest window containing it ends at or before the
watermark; for sessions when t + gap <= watermark; watermark = highest event time seen
minus the allowed lateness, before the record is counted), and computes every closed
window's aggregates from the accepted records by brute force."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Event:
    key: str
    t: int
    row: dict


def _tumble_or_hop_windows(t: int, size: int, slide: int) -> list[tuple[int, int]]:
    first = ((t - size) // slide + 1) * slide
    out = []
    s = first
    while s <= t:
        if s + size > t:
            out.append((s, s + size))
        s += slide
    return out


def aggregates(rows: list[dict], value_field="v", user_field="user_id", flag_field="retweet") -> dict:
    values = [r.get(value_field) for r in rows if r.get(value_field) is not None]
    return {
        "n": len(rows),
        "nv": len(values),
        "users": len({r[user_field] for r in rows if r.get(user_field) is not None}),
        "flagged": sum(1 for r in rows if r.get(flag_field) is True),
        "total": sum(values) if values else None,
        "lo": min(values) if values else None,
        "hi": max(values) if values else None,
        "mean": (sum(values) / len(values)) if values else None,
    }


def windowed(events: list[Event], kind: str, lateness: int, size: int = 0, slide: int = 0,
             gap: int = 0):
    """Returns (closed windows {(key, start, end): [rows]}, late events, final watermark)."""
    wm = None
    max_t = None
    late: list[Event] = []
    accepted: list[tuple[Event, list]] = []
    # Sessions: key -> list of [start, end, rows] open sessions; closed -> dict.
    open_sessions: dict[str, list[list]] = {}
    closed: dict[tuple, list] = {}
    for e in events:
        if kind in ("tumble", "hop"):
            wins = _tumble_or_hop_windows(e.t, size, slide if kind == "hop" else size)
            earliest_end = min(end for _, end in wins)
            if wm is not None and earliest_end <= wm:
                late.append(e)
            else:
                accepted.append((e, wins))
        else:
            if wm is not None and e.t + gap <= wm:
                late.append(e)
            else:
                sessions = open_sessions.setdefault(e.key, [])
                merged = [e.t, e.t + gap, [e.row]]
                keep = []
                for s in sessions:
                    if e.t < s[1] and e.t + gap > s[0]:
                        merged = [min(merged[0], s[0]), max(merged[1], s[1]), merged[2] + s[2]]
                    else:
                        keep.append(s)
                keep.append(merged)
                open_sessions[e.key] = keep
        max_t = e.t if max_t is None else max(max_t, e.t)
        new_wm = max_t - lateness
        wm = new_wm if wm is None else max(wm, new_wm)
        if kind == "session":
            for key, sessions in open_sessions.items():
                still = []
                for s in sessions:
                    if s[1] <= wm:
                        closed[(key, s[0], s[1])] = s[2]
                    else:
                        still.append(s)
                open_sessions[key] = still
    if kind in ("tumble", "hop"):
        for e, wins in accepted:
            for (s, end) in wins:
                if end <= wm:
                    closed.setdefault((e.key, s, end), []).append(e.row)
    return closed, late, wm
