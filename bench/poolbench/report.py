"""The report: the tables of each workload, the summary against the floor, ours against each
peer, and the targets with their verdicts."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .measure import jain, median, pct, summarise_latencies
from .peers import OUR_REUSE, PEERS, Subject
from .workloads import W5_SUBJECTS, SliceResult, ThreadSlice, thread_ratios, w5_ratio


def fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(r: float) -> str:
    return "-" if math.isnan(r) else f"{r:.2f}x"


def fmt_rate(r: float) -> str:
    return "-" if math.isnan(r) else f"{r / 1000:.1f}k/s"


def table(rows: list[list[str]], indent: str = "  ", right: Sequence[int] = ()) -> str:
    """Aligned columns; ``right``: indexes of right-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.append(indent + "  ".join(cells).rstrip())
    return "\n".join(out)


class LogCapture(logging.Handler):
    """Keeps the pools' warnings for the end of the run: the hanging host's connect failures
    are expected and only counted; anything else is printed in full."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def report(self) -> None:
        expected = [r for r in self.records if "bench-hanging" in r.getMessage()]
        other = [r for r in self.records if r not in expected]
        print(f"log       {len(self.records)} warning(s) from the pools: {len(expected)} from the "
              f"hanging host's pool (expected), {len(other)} other(s)")
        for r in other[:20]:
            print(f"  {r.levelname} {r.name}: {r.getMessage()}")


def print_sliced(title: str, subjects: list[Subject], res: SliceResult, rounds: int) -> None:
    print(f"\n{title}")
    print(f"  {rounds} round(s), subjects interleaved in shuffled order; median time per op, "
          "interquartile range, median of per-round ratios to the floor")
    print("  x floor: against the FIFO floor of its driver; x same order: against the floor "
          "with its reuse order (LIFO floor for the LIFO pools)")
    rows = [["subject", "median", "p25-p75", "x floor", "x same order"]]
    for s in subjects:
        vals = res.values[s.key]
        iqr = f"{fmt_time(pct(vals, 0.25))} - {fmt_time(pct(vals, 0.75))}"
        rows.append([s.label, fmt_time(median(vals)), iqr, fmt_ratio(median(res.ratios[s.key])),
                     fmt_ratio(median(res.same_order[s.key]))])
    print(table(rows, right=(1, 3, 4)))


def print_threads(title: str, subjects: list[Subject], res: dict[str, list[ThreadSlice]],
                  threads: int, rounds: int, duration: float) -> dict[str, float]:
    ratios = thread_ratios(res, subjects)
    print(f"\n{title}")
    print(f"  {rounds} round(s) of {duration:g} s slices per subject, interleaved; medians over "
          "rounds. cost = floor throughput / subject throughput (>1 slower). fairness: Jain's "
          f"index over the {threads} threads' op counts. backends: most seen in "
          "pg_stat_activity (every 0.1 s)")
    rows = [["subject", "ops/s", "cost", "fairness", "wait p50", "wait p99", "starved",
             "errors/s", "backends"]]
    for s in subjects:
        sl = res[s.key]
        starved = median([sum(1 for c in x.counts if c == 0) for x in sl])
        errs = median([x.errors / x.elapsed for x in sl])
        most = max(x.max_backends for x in sl)
        flag = " EXCEEDS" if most > s.maxconn else ""
        rows.append([
            s.label, fmt_rate(median([x.throughput for x in sl])), fmt_ratio(ratios[s.key]),
            f"{median([jain(x.counts) for x in sl]):.3f}",
            fmt_time(median([x.wait_p50 for x in sl])), fmt_time(median([x.wait_p99 for x in sl])),
            f"{starved:g}/{threads}", f"{errs:.0f}", f"{most}/{s.maxconn}{flag}",
        ])
    print(table(rows, right=(1, 2, 3, 4, 5, 6, 7)))
    kinds: dict[str, dict[str, int]] = {}
    for s in subjects:
        for x in res[s.key]:
            for k, v in x.error_kinds.items():
                kinds.setdefault(s.label, {})[k] = kinds.setdefault(s.label, {}).get(k, 0) + v
    for label, ks in kinds.items():
        print(f"  errors of {label}: " + ", ".join(f"{v} x {k}" for k, v in ks.items()))
    return ratios


def print_w5(res: dict[str, dict[str, list[float]]], reps: int, n: int) -> None:
    print(f"\nW5  cold start: construct a pool of {n} -> the caller's first SELECT 1, and -> "
          f"all {n} open")
    print(f"  {reps} repetition(s), subjects in shuffled order, medians; each pool closed and "
          "its backends gone before the next. ratios (median of per-repetition ratios): first "
          f"/ one connect, all / {n} sequential connects, same driver, same repetition. ours: "
          f"all open = a configure callback saw the {n}th connection and stats() shows idle + "
          f"in_use == {n}; psycopg_pool: wait()")
    rows = [["subject", "first query", "x 1 connect", f"all {n} open", f"x {n} connects"]]
    for k, label in W5_SUBJECTS.items():
        f, a = median(res[k]["first"]), median(res[k]["all"])
        rows.append([label, fmt_time(f), fmt_ratio(w5_ratio(res, k, "first")),
                     fmt_time(a) if not math.isnan(a) else "lazy",
                     fmt_ratio(w5_ratio(res, k, "all")) if not math.isnan(a) else "-"])
    print(table(rows, right=(1, 2, 3, 4)))


def print_hang(res: dict[str, Any], seconds: float, connect_timeout: int) -> dict[str, Any]:
    base = summarise_latencies(res["baseline"])
    hang = summarise_latencies(res["hanging"])
    st = res["hang_stats"]
    print(f"\nH   getconn latency, warm pool of ours (4 idle, 1 thread, getconn + SELECT 1 + "
          f"putconn, getconn timed), {seconds:g} s per phase")
    print(f"  second pool: minconn 4, background_prewarm, 127.0.0.1:{res['port']} listens and "
          f"never answers, connect_timeout {connect_timeout}; at the end of the phase: "
          f"{st['opening']} connect(s) in progress, {st['idle']} open, "
          f"{st['connect_errors']} connect error(s) so far")
    rows = [["phase", "samples", "p50", "p99", "p99.9", "max", "> 1 ms"]]
    for name, s in (("warm pool alone", base), ("while a hanging host prewarms", hang)):
        rows.append([name, str(s["n"]), fmt_time(s["p50"]), fmt_time(s["p99"]),
                     fmt_time(s["p99.9"]), fmt_time(s["max"]), str(s["over_1ms"])])
    print(table(rows, right=(1, 2, 3, 4, 5, 6)))
    return {"baseline": base, "hanging": hang, "hang_stats": st}


@dataclass
class Target:
    name: str
    goal: str
    measured: str
    ok: bool | None  # None: not measured


def summary(
    w1: SliceResult | None, w2: SliceResult | None, w3: dict[str, float] | None,
    w4: dict[str, float] | None, w5: dict[str, dict[str, list[float]]] | None,
    w3raw: dict[str, list[ThreadSlice]] | None, w4raw: dict[str, list[ThreadSlice]] | None,
    maxconn: int,
) -> None:
    cols = ["floor", "ours", "registry", *PEERS]
    names = {"floor": "floor", "ours": "ours", "registry": "registry.get().conn()", **PEERS}
    print("\nSUMMARY  cost relative to the floor, medians (>1 = slower; psycopg_pool against the "
          "psycopg 3 floor; W3/W4: floor throughput / throughput; W5: all 8 open / 8 sequential "
          "connects)")
    rows = [["workload", *(names[c] for c in cols)]]

    def sliced_row(label: str, res: SliceResult | None) -> None:
        if res is None:
            return
        row = [label]
        for c in cols:
            if c not in res.values:
                row.append("-")
            elif c == "floor":
                row.append(fmt_time(median(res.values["floor"])))
            else:
                row.append(fmt_ratio(median(res.ratios[c])))
        rows.append(row)

    def thread_row(label: str, ratios: dict[str, float] | None,
                   raw: dict[str, list[ThreadSlice]] | None) -> None:
        if ratios is None or raw is None:
            return
        row = [label]
        for c in cols:
            if c not in ratios:
                row.append("-")
                continue
            sl = raw[c]
            starved = median([sum(1 for n in x.counts if n == 0) for x in sl])
            most = max(x.max_backends for x in sl)
            if c == "floor":
                cell = fmt_rate(median([x.throughput for x in sl]))
            else:
                cell = fmt_ratio(ratios[c])
            if starved:
                cell += f" {starved:g} starve"
            if most > maxconn:
                cell += f" >max ({most})"
            row.append(cell)
        rows.append(row)

    sliced_row("W1 checkout+return", w1)
    sliced_row("W2 + SELECT 1", w2)
    if w2 is not None:
        row = ["W2 vs same-order floor"]
        for c in cols:
            row.append(fmt_ratio(median(w2.same_order[c])) if c in w2.same_order and
                       c != "floor" else "-")
        rows.append(row)
    thread_row("W3 8 thr, max 8", w3, w3raw)
    thread_row("W4 32 thr, max 8", w4, w4raw)
    if w5 is not None:
        eight = median(w5["connect2"]["all"])
        keymap = {"floor": "connect2", "ours": "ours", "registry": None, "pg2pool": "pg2pool",
                  "pg2_pool": "pg2_pool", "pg3pool": "pg3pool", "sa": "sa"}
        row = ["W5 cold, all 8 open"]
        for c in cols:
            k = keymap[c]
            if k is None:
                row.append("-")
            elif c == "floor":
                row.append(fmt_time(eight))
            else:
                a = median(w5[k]["all"])
                row.append("lazy" if math.isnan(a) else fmt_ratio(w5_ratio(w5, k, "all")))
        rows.append(row)
    print(table(rows))

    # ours against each peer: peer cost / our cost (>1: ours is faster)
    print("\nOURS VS PEERS  peer cost / our cost, medians of per-round ratios (>1: ours is "
          "faster; both normalised by their own driver's floor for psycopg_pool)")
    rows = [["workload", *PEERS.values()]]

    def peer_row_sliced(label: str, res: SliceResult | None) -> None:
        if res is None:
            return
        row = [label]
        for p in PEERS:
            rs = [rp / ro for rp, ro in zip(res.ratios[p], res.ratios["ours"], strict=True)]
            row.append(fmt_ratio(median(rs)))
        rows.append(row)

    def peer_row_threads(label: str, raw: dict[str, list[ThreadSlice]] | None) -> None:
        if raw is None:
            return
        row = [label]
        for p in PEERS:
            base_p = "pg3floor" if p == "pg3pool" else "floor"
            rs = []
            for xo, xp, bo, bp in zip(raw["ours"], raw[p], raw["floor"], raw[base_p],
                                      strict=True):
                if not (xo.ops and xp.ops):
                    continue
                rs.append((bp.throughput / xp.throughput) / (bo.throughput / xo.throughput))
            row.append(fmt_ratio(median(rs)))
        rows.append(row)

    peer_row_sliced("W1 checkout+return", w1)
    peer_row_sliced("W2 + SELECT 1", w2)
    if w2 is not None:
        row = ["W2 vs same-order floor"]
        for p in PEERS:
            rs = [rp / ro for rp, ro in zip(w2.same_order[p], w2.same_order["ours"], strict=True)]
            row.append(fmt_ratio(median(rs)))
        rows.append(row)
    peer_row_threads("W3 8 thr, max 8", w3raw)
    peer_row_threads("W4 32 thr, max 8", w4raw)
    if w5 is not None:
        ours_all = w5_ratio(w5, "ours", "all")
        ours_first = w5_ratio(w5, "ours", "first")
        row_a, row_f = ["W5 all 8 open"], ["W5 first query"]
        for p in PEERS:
            a = w5_ratio(w5, p, "all")
            row_a.append("lazy" if math.isnan(a) else fmt_ratio(a / ours_all))
            row_f.append(fmt_ratio(w5_ratio(w5, p, "first") / ours_first))
        rows.extend([row_f, row_a])
    print(table(rows))


def targets(
    w1: SliceResult | None, w2: SliceResult | None,
    w3raw: dict[str, list[ThreadSlice]] | None, w3: dict[str, float] | None,
    w4raw: dict[str, list[ThreadSlice]] | None, w4: dict[str, float] | None,
    w5: dict[str, dict[str, list[float]]] | None, hang: dict[str, Any] | None,
) -> list[Target]:
    out: list[Target] = []
    if w1 is not None:
        r = median(w1.ratios["ours"])
        out.append(Target("W1 checkout+return", "<= 1.60x floor", fmt_ratio(r), r <= 1.6))
    if w2 is not None:
        r = median(w2.same_order["ours"])
        out.append(Target("W2 + SELECT 1", f"<= 1.04x {OUR_REUSE.upper()} floor (ours' default "
                          "order)", fmt_ratio(r), r <= 1.04))
        rs = [a / b for a, b in zip(w2.values["registry"], w2.values["ours_cm"], strict=True)]
        r = median(rs)
        out.append(Target("W2 registry.get(name).conn()", "<= 1.05x pool.conn()", fmt_ratio(r),
                          r <= 1.05))
    if w3 is not None and w3raw is not None:
        r = w3["ours"]
        out.append(Target("W3 8 threads, max 8", "cost <= 1.04x floor", fmt_ratio(r), r <= 1.04))
    if w4 is not None and w4raw is not None:
        tput = 1 / w4["ours"]
        fair = median([jain(x.counts) for x in w4raw["ours"]])
        p99 = median([x.wait_p99 for x in w4raw["ours"]])
        p99_3 = median([x.wait_p99 for x in w4raw["pg3pool"]])
        out.append(Target("W4 32 threads, max 8: throughput", ">= 1.10x floor's",
                          fmt_ratio(tput), tput >= 1.1))
        out.append(Target("W4 fairness", ">= 0.95 (Jain)", f"{fair:.3f}", fair >= 0.95))
        out.append(Target("W4 p99 checkout wait", f"<= psycopg_pool's ({fmt_time(p99_3)})",
                          fmt_time(p99), p99 <= p99_3))
    if w5 is not None:
        one, eight = median(w5["connect2"]["first"]), median(w5["connect2"]["all"])
        f, a = median(w5["ours"]["first"]), median(w5["ours"]["all"])
        rf, ra = w5_ratio(w5, "ours", "first"), w5_ratio(w5, "ours", "all")
        out.append(Target("W5 first query", f"<= 1.2 connect times (1 connect: {fmt_time(one)})",
                          f"{rf:.2f} connects ({fmt_time(f)})", rf <= 1.2))
        out.append(Target("W5 all 8 open", f"<= 1.1x 8 sequential connects ({fmt_time(eight)})",
                          f"{ra:.2f}x ({fmt_time(a)})", ra <= 1.1))
    if hang is not None:
        p = hang["hanging"]["p99.9"]
        out.append(Target("H getconn p99.9, hanging host prewarming", "< 1 ms", fmt_time(p),
                          p < 1e-3))
    return out


def print_targets(ts: list[Target], quick: bool) -> None:
    print("\nTARGETS  our pool" + ("  (--quick: too few samples to judge; shown, not meant)"
                                   if quick else ""))
    rows = [["", "target", "goal", "measured"]]
    for t in ts:
        mark = "-" if t.ok is None else ("PASS" if t.ok else "MISS")
        rows.append([mark, t.name, t.goal, t.measured])
    print(table(rows))
    passed = sum(1 for t in ts if t.ok)
    print(f"  {passed}/{len(ts)} targets met")
