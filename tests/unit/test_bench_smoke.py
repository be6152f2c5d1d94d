"""Smoke tests of the system benchmark tooling (bench/): not benchmarks, just that it works.

The baseline test starts the tiny gRPC echo server in a subprocess and measures for a fraction
of a second; the others feed synthetic results through the report and profile summaries.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_baseline_measures_a_noop_rpc_and_stream() -> None:
    from bench import baseline

    result = baseline.run_baseline(sys.executable, seconds=0.2, concurrency=4)

    assert result["unary_seq"]["calls"] > 0
    assert result["unary_seq"]["lat_ms"]["p50"] > 0
    assert result["unary_conc"]["per_s"] > 0
    assert result["stream_pingpong"]["pairs"] > 0
    assert result["stream_pipelined"]["pairs"] > 0


def _harness_result(single: float, batch: float, e2e: float, p99: float) -> dict[str, Any]:
    return {
        "version": "1.0", "concurrent": 8,
        "enqueue_single": {"jobs_s": single, "lat_ms": {"p50": 1000 / single, "p95": 2.0,
                                                        "p99": 3.0}},
        "enqueue_batch": {"jobs_s": batch},
        "enqueue_concurrent": {"jobs_s": single * 5},
        "configs": {"1x10": {"procs": 1, "concurrency": 10,
                             "e2e": {"throughput_jobs_s": e2e, "e2e_s": 1.0, "completed": 100,
                                     "failed": 0, "timed_out": False},
                             "paced": {"rate": e2e / 2, "achieved_rate": e2e / 2,
                                       "lat_ms": {"p50": 1.0, "p95": 2.0, "p99": p99,
                                                  "max": p99}}}},
    }


def test_report_compares_azolla_with_the_best_peer() -> None:
    results = {
        "mode": "quick", "machine": {"cpus": 2, "memory_gb": 24.0},
        "runs": [{"azolla-pool": _harness_result(2000, 30000, 9000, 5.0),
                  "pgqueuer": _harness_result(1800, 40000, 6000, 4.0),
                  "procrastinate": _harness_result(900, 17000, 700, 40.0)}],
        "restart": {"restart_to_first_dispatch_s": 0.5, "unfinished_at_kill": 10_000},
        "shepherd_death": {"kill_to_all_redispatched_s": 1.5, "attempts_running_at_kill": 4},
    }

    summary = report.summarize(results)
    rows = {r["figure"]: r for r in summary["rows"]}

    e2e = rows["End-to-end no-op tasks, pool mode (best worker config)"]
    assert e2e["met"] is True  # 9000 >= 1.5 * 6000
    assert rows["Batch submit (1,000 per call)"]["met"] is True
    assert rows["Submit latency p50 (1 client, sequential)"]["met"] is True  # 0.5 ms
    assert rows["  … → first dispatch committed"]["met"] is True
    death = next(r for r in summary["rows"] if r["figure"].startswith("Shepherd kill -9"))
    assert death["met"] is False
    text = report.table_text(summary)
    assert "1.50×" in text  # 9000 / 6000
    assert "Azolla ÷ PgQueuer" in report.table_md(summary)


def test_profile_summary_counts_self_and_inclusive_time(tmp_path: Path) -> None:
    from bench import system

    raw = tmp_path / "p.raw.txt"
    raw.write_text(
        "main (app.py:1);step (app.py:10);commit (store.py:5) 30\n"
        "main (app.py:1);step (app.py:10) 10\n"
        'process 12:"python -m worker";serve (worker.py:3);read (frames.py:9) 60\n')

    summary = system.summarize_profile(raw)

    assert summary["samples"] == 100
    assert summary["self_pct"][0] == ("read (frames.py)", 60.0)
    assert ("step (app.py)", 40.0) in summary["inclusive_pct"]
