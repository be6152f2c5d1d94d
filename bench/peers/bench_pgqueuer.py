"""PgQueuer peer benchmark (asyncpg driver). Run: python bench_pgqueuer.py --help

Producer: one asyncpg connection for setup, batch enqueue and progress queries, and a pool
(``PRODUCER_POOL`` connections, ``AsyncpgPoolDriver``) for single enqueues, so the concurrent
and paced phases may call ``enqueue_one`` from many coroutines at once (one connection cannot
run two queries at a time).
"""
from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from importlib.metadata import version

import asyncpg
from common import main
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, Queries, QueueManager

EP = "noop"
PRODUCER_POOL = 10


class PgQueuerPeer:
    NAME = "pgqueuer"
    DB = "peerbench_pgqueuer"
    DEFAULT_CONFIGS = "1x10,2x10,1x50,1x0"  # "x0" = library defaults

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.conn = self.q = self.pool = self.qp = None

    @staticmethod
    def version() -> str:
        return version("pgqueuer")

    @staticmethod
    def worker_settings(conc: int) -> dict:
        # conc > 0: max_concurrent_tasks caps this worker's picked jobs at `conc`
        # (the library requires batch_size <= max_concurrent_tasks / 2).
        # conc == 0: QueueManager.run() defaults, batch_size=10 and no cap.
        s = {"driver": "asyncpg (1 connection per worker)", "durability": "durable (default)"}
        if conc == 0:
            return s | {"max_concurrent_tasks": None, "batch_size": 10}
        return s | {"max_concurrent_tasks": conc, "batch_size": max(1, conc // 2)}

    async def setup(self) -> None:
        self.conn = await asyncpg.connect(self.dsn)
        self.q = Queries(AsyncpgDriver(self.conn))
        if await self.q.schema_is_installed():
            await self.q.uninstall()
        await self.q.install()
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=PRODUCER_POOL)
        self.qp = Queries(AsyncpgPoolDriver(self.pool))

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        await self.conn.close()

    async def clean(self) -> None:
        await self.conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")

    async def enqueue_one(self, ts: float | None) -> None:
        await self.qp.enqueue(EP, None if ts is None else repr(ts).encode())

    async def enqueue_batch(self, k: int) -> None:
        await self.q.enqueue([EP] * k, [None] * k, [0] * k)

    async def remaining(self) -> int:
        return await self.conn.fetchval("SELECT count(*) FROM pgqueuer")

    async def completion(self) -> tuple[int, int, float | None]:
        row = await self.conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'successful') AS ok,"
            "       count(*) FILTER (WHERE status IN ('exception', 'failed')) AS bad,"
            "       extract(epoch FROM max(created) FILTER (WHERE status = 'successful'))::float8"
            "       AS last"
            "  FROM pgqueuer_log")
        return row["ok"], row["bad"], row["last"]

    async def run_worker(self, conc: int, on_start, ready) -> None:
        conn = await asyncpg.connect(self.dsn)
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint(EP)
        async def noop(job) -> None:
            on_start(float(job.payload) if job.payload else None)

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, qm.shutdown.set)
        s = self.worker_settings(conc)
        ready()
        await qm.run(batch_size=s["batch_size"], max_concurrent_tasks=s["max_concurrent_tasks"],
                     dequeue_timeout=timedelta(seconds=5))


if __name__ == "__main__":
    main(PgQueuerPeer)
