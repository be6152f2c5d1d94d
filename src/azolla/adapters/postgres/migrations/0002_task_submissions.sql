-- 0002: transactional enqueue (an outbox).
--
-- A Python caller that shares the database inserts a row here inside its own transaction
-- (azolla.enqueue_in_transaction): the task exists if and only if that transaction commits.
-- The orchestrator's intake LISTENs on channel 'azolla_submissions' (the enqueue helper sends one
-- NOTIFY per transaction; PostgreSQL folds identical notifications of one transaction), turns
-- each row into a task with the row's task id, and deletes the row after the task's event is
-- committed. A crash between the two leaves the row, and the next pass finds the task already
-- recorded and only deletes the row. Rows live for milliseconds; this small table is the only
-- place Azolla deletes rows on a hot path.
--
-- `request` is the serialised azolla.orchestrator.CreateTaskRequest (the same message and the
-- same validation as the gRPC CreateTask call).

CREATE TABLE azolla_task_submissions (
    task_id    uuid        PRIMARY KEY,
    request    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX azolla_task_submissions_created_idx ON azolla_task_submissions (created_at);
