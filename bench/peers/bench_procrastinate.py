"""Procrastinate peer benchmark (psycopg 3 connector). Run: python bench_procrastinate.py --help

The producer's App uses a pool of ``PRODUCER_POOL`` connections, so the concurrent and paced
phases may defer from many coroutines at once.
"""
from __future__ import annotations

import logging
from importlib.metadata import version

import procrastinate
import psycopg
from common import main

# Our App is built in __main__ on purpose (workers are started from this file and
# find the task by name), so drop the library's "app defined in __main__" warning.
logging.getLogger("procrastinate.blueprints").addFilter(
    lambda r: getattr(r, "action", "") != "app_defined_in___main__")


PRODUCER_POOL = 10


class ProcrastinatePeer:
    NAME = "procrastinate"
    DB = "peerbench_procrastinate"
    DEFAULT_CONFIGS = "1x10,2x10,1x50"

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.sql = None  # plain psycopg connection for setup/cleanup/progress queries
        self.on_start = lambda t: None
        self.app = self._make_app(pool_max=PRODUCER_POOL)

    def _make_app(self, pool_max: int) -> procrastinate.App:
        app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=self.dsn, min_size=1, max_size=pool_max))

        @app.task(name="noop", queue="bench")
        async def noop(t: float | None = None) -> None:
            self.on_start(t)

        self.noop = noop
        return app

    @staticmethod
    def version() -> str:
        return version("procrastinate")

    @staticmethod
    def worker_settings(conc: int) -> dict:
        return {"concurrency": conc, "pool_max_size": conc + 2, "listen_notify": True,
                "delete_jobs": "never (default)", "fetch_job_polling_interval_s": 5.0}

    async def setup(self) -> None:
        self.sql = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await self.sql.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await self.app.open_async()
        await self.app.schema_manager.apply_schema_async()

    async def close(self) -> None:
        await self.app.close_async()
        await self.sql.close()

    async def clean(self) -> None:
        await self.sql.execute("TRUNCATE procrastinate_jobs, procrastinate_events, "
                               "procrastinate_periodic_defers, procrastinate_workers CASCADE")

    async def enqueue_one(self, ts: float | None) -> None:
        await (self.noop.defer_async() if ts is None else self.noop.defer_async(t=ts))

    async def enqueue_batch(self, k: int) -> None:
        await self.noop.batch_defer_async(*({} for _ in range(k)))

    async def remaining(self) -> int:
        cur = await self.sql.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")
        return (await cur.fetchone())[0]

    async def completion(self) -> tuple[int, int, float | None]:
        cur = await self.sql.execute(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),"
            "       count(*) FILTER (WHERE status IN ('failed', 'aborted', 'cancelled')),"
            "       (SELECT extract(epoch FROM max(at))::float8 FROM procrastinate_events"
            "         WHERE type = 'succeeded')"
            "  FROM procrastinate_jobs")
        return tuple(await cur.fetchone())

    async def run_worker(self, conc: int, on_start, ready) -> None:
        self.on_start = on_start
        s = self.worker_settings(conc)
        self.app = self._make_app(pool_max=s["pool_max_size"])
        async with self.app.open_async():
            ready()
            # install_signal_handlers (default True): SIGTERM -> graceful stop
            await self.app.run_worker_async(concurrency=conc, queues=["bench"], wait=True,
                                            listen_notify=True, install_signal_handlers=True)


if __name__ == "__main__":
    main(ProcrastinatePeer)
