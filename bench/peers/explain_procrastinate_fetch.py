"""Show Procrastinate's fetch-candidate plan on a never-analyzed vs analyzed table.

Evidence for RESULTS.md observation 3. Needs the cluster running
(./pg_cluster.sh start); recreates the schema in peerbench_procrastinate.
Usage: /tmp/peerbench/venv/bin/python explain_procrastinate_fetch.py [jobs=20000]
"""
import asyncio
import sys

from bench_procrastinate import ProcrastinatePeer
from common import dsn_for

# The candidate part of procrastinate_fetch_job_v2 (3.10.0), lock checks included.
QUERY = """EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF)
SELECT jobs.id FROM procrastinate_jobs AS jobs
 WHERE NOT EXISTS (SELECT 1 FROM procrastinate_jobs other_jobs
                    WHERE jobs.lock IS NOT NULL AND other_jobs.lock = jobs.lock
                      AND (other_jobs.status = 'doing'
                           OR (other_jobs.status = 'todo'
                               AND (other_jobs.priority > jobs.priority
                                    OR (other_jobs.priority = jobs.priority
                                        AND other_jobs.id < jobs.id)))))
   AND jobs.status = 'todo' AND jobs.queue_name = ANY('{bench}')
   AND (jobs.scheduled_at IS NULL OR jobs.scheduled_at <= now())
 ORDER BY jobs.priority DESC, jobs.id ASC LIMIT 1 FOR UPDATE OF jobs SKIP LOCKED"""


async def main(n: int) -> None:
    peer = ProcrastinatePeer(dsn_for(ProcrastinatePeer.DB))
    await peer.setup()
    try:
        for i in range(0, n, 1000):
            await peer.enqueue_batch(min(1000, n - i))
        for label in ("fresh schema, never analyzed", "after ANALYZE"):
            cur = await peer.sql.execute(QUERY)
            print(f"== {label}\n" + "\n".join(r[0] for r in await cur.fetchall()))
            await peer.sql.execute("ANALYZE procrastinate_jobs")
    finally:
        await peer.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
