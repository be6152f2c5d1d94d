"""Median-of-runs tables (markdown) from results/*.json.

Usage: python summarize.py [results_dir]   -> prints markdown to stdout.
Runs are grouped by (library, version, label, synchronous_commit); each number
is the median over that group's runs; "[min–max]" gives the spread across runs.
(bench/run.py makes its own tables; this is for runs made by hand or run_all.sh.)
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def med(vals):
    vals = [v for v in vals if isinstance(v, int | float)]
    return (statistics.median(vals), len(vals)) if vals else (None, 0)


def fmt(x, nd=0):
    return "—" if x is None else f"{x:,.{nd}f}"


def spread(vals, nd=0):
    """'median [min–max]' over the runs that produced a value."""
    vals = [v for v in vals if isinstance(v, int | float)]
    if not vals:
        return "—"
    m = statistics.median(vals)
    if len(vals) == 1:
        return fmt(m, nd)
    return f"{fmt(m, nd)} [{fmt(min(vals), nd)}–{fmt(max(vals), nd)}]"


def dig(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def enqueue_table(groups) -> None:
    print("### Enqueue rate (no worker running), median jobs/s\n")
    head = ["library", "version", "label", "sync_commit", "runs", "single (awaited, 1 conn)",
            "single p50 / p99 ms", "batch (chunks)", "concurrent (coroutines)"]
    print(row(head))
    print("|" + "---|" * len(head))
    for (lib, ver, label, sc, *_), runs in groups.items():
        s, _ = med([dig(r, "enqueue_single", "jobs_s") for r in runs])
        p50, _ = med([dig(r, "enqueue_single", "lat_ms", "p50") for r in runs])
        p99, _ = med([dig(r, "enqueue_single", "lat_ms", "p99") for r in runs])
        b, _ = med([dig(r, "enqueue_batch", "jobs_s") for r in runs])
        c, _ = med([dig(r, "enqueue_concurrent", "jobs_s") for r in runs])
        batch = runs[0]["batch"]
        conc = runs[0].get("concurrent") or 0
        print(row([lib, ver, label or "-", sc, len(runs), f"{fmt(s)} (n={runs[0]['single_n']})",
                   f"{fmt(p50, 2)} / {fmt(p99, 2)}",
                   f"{fmt(b)} (n={runs[0]['n']}, {batch}/call)",
                   f"{fmt(c)} ({conc})" if conc else "not run"]))


def notes_for(rc) -> str:
    notes = []
    errs = [dig(x, "e2e", "error") or dig(x, "paced", "error") for x in rc]
    if any(errs):
        notes.append(f"{sum(bool(e) for e in errs)} run(s) errored")
    to = sum(bool(dig(x, "e2e", "timed_out")) for x in rc)
    if to:
        notes.append(f"{to} e2e run(s) timed out")
    failed = sum((dig(x, "e2e", "failed") or 0) + (dig(x, "paced", "failed") or 0)
                 for x in rc)
    if failed:
        notes.append(f"{failed} failed jobs")
    late = med([dig(x, "paced", "late_sends") for x in rc])[0]
    if late:
        notes.append(f"~{late:.0f} paced sends >10 ms late")
    return "; ".join(notes) or "-"


def worker_table(groups) -> None:
    print("\n### Workers: end-to-end throughput and paced enqueue-to-start latency "
          "(median [min–max] over runs)\n")
    head = ["library", "label", "sync_commit", "workers (procs x conc)", "e2e s (N)",
            "e2e jobs/s", "host CPU busy %", "CPU s host / workers / producer / postgres",
            "paced rate achieved", "p50 ms", "p95 ms", "p99 ms", "max ms", "notes"]
    print(row(head))
    print("|" + "---|" * len(head))
    for (lib, ver, label, sc, *_), runs in groups.items():
        cfgs = list(dict.fromkeys(c for r in runs for c in r["configs"]))
        for c in cfgs:
            rc = [r["configs"].get(c, {}) for r in runs]
            e2e_s, ok = med([dig(x, "e2e", "e2e_s") for x in rc
                             if not dig(x, "e2e", "timed_out")])
            ran = sum("e2e" in x for x in rc)
            tp = spread([dig(x, "e2e", "throughput_jobs_s") for x in rc])
            cpu = {k: med([dig(x, "e2e", k) for x in rc])[0]
                   for k in ("host_cpu_busy_pct", "host_cpu_busy_s", "worker_cpu_s",
                             "producer_cpu_s", "postgres_cpu_s")}
            rate, _ = med([dig(x, "paced", "rate") for x in rc])
            ar, _ = med([dig(x, "paced", "achieved_rate") for x in rc])
            lat = {p: spread([dig(x, "paced", "lat_ms", p) for x in rc], 1)
                   for p in ("p50", "p95", "p99", "max")}
            first = next(x for x in rc if x)
            procs, conc = first["procs"], first["concurrency"]
            e2e_cell = (f"{fmt(e2e_s, 2)} ({runs[0]['n']}, {ok}/{ran} ok)" if ran
                        else "not run")
            cpus = " / ".join(fmt(cpu[k], 1) for k in ("host_cpu_busy_s", "worker_cpu_s",
                                                        "producer_cpu_s", "postgres_cpu_s"))
            print(row([f"{lib} {ver}", label or "-", sc, f"{procs} x {conc}", e2e_cell, tp,
                       fmt(cpu["host_cpu_busy_pct"]), cpus,
                       f"{fmt(ar)}/s of {fmt(rate or runs[0]['rate'])}/s", lat["p50"],
                       lat["p95"], lat["p99"], lat["max"], notes_for(rc)]))


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    groups = defaultdict(list)
    for f in sorted(root.glob("*.json")):
        r = json.loads(f.read_text())
        if "library" not in r:
            continue
        key = (r["library"], r["version"], r.get("label", ""),
               r["pg_settings"]["synchronous_commit"], r["n"], r["single_n"], r["rate"],
               r.get("analyzed_after_batch", False))
        groups[key].append(r)
    enqueue_table(groups)
    worker_table(groups)


if __name__ == "__main__":
    main()
