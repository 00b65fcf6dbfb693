-- Read models: every table is derived from the event log and can be rebuilt from it.
-- Times are UTC (TIMESTAMP without zone) and always come from event times, never the clock.

CREATE TABLE IF NOT EXISTS checkpoints (
    projector   VARCHAR PRIMARY KEY,
    seq         BIGINT NOT NULL,
    at_time     TIMESTAMP
);

CREATE TABLE IF NOT EXISTS tasks (
    task_id         VARCHAR PRIMARY KEY,
    title           VARCHAR NOT NULL,
    dispatcher      VARCHAR NOT NULL,
    priority        VARCHAR NOT NULL,
    priority_rank   INTEGER NOT NULL,
    task_type       VARCHAR NOT NULL,
    agent           VARCHAR NOT NULL,
    group_name      VARCHAR NOT NULL,
    after_ids       VARCHAR[] NOT NULL,
    working_dir     VARCHAR NOT NULL,
    escalated_from  VARCHAR NOT NULL,
    escalated_to    VARCHAR NOT NULL,      -- the task this one was handed on to
    rework          BOOLEAN NOT NULL,
    state           VARCHAR NOT NULL,      -- queued, running, succeeded, failed, cancelled
    attempt         INTEGER NOT NULL,
    run_id          VARCHAR NOT NULL,      -- the current or last run
    reason          VARCHAR NOT NULL,
    cancel_requested BOOLEAN NOT NULL,
    created_at      TIMESTAMP NOT NULL,
    created_seq     BIGINT NOT NULL,
    updated_at      TIMESTAMP NOT NULL,
    last_seq        BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS runs (
    run_id          VARCHAR PRIMARY KEY,
    task_id         VARCHAR NOT NULL,
    title           VARCHAR NOT NULL,
    group_name      VARCHAR NOT NULL,
    attempt         INTEGER NOT NULL,
    handler         VARCHAR NOT NULL,
    agent           VARCHAR NOT NULL,
    state           VARCHAR NOT NULL,      -- running, succeeded, failed, cancelled
    stale           BOOLEAN NOT NULL,
    phase           VARCHAR NOT NULL,
    percent         INTEGER NOT NULL,
    action          VARCHAR NOT NULL,
    turns           INTEGER NOT NULL,
    tool_calls      INTEGER NOT NULL,
    tokens_in       BIGINT NOT NULL,
    tokens_out      BIGINT NOT NULL,
    cost_usd        DOUBLE NOT NULL,
    last_tool       VARCHAR NOT NULL,
    blockers        VARCHAR[] NOT NULL,
    heal_rounds     INTEGER NOT NULL,
    reason          VARCHAR NOT NULL,
    error           VARCHAR NOT NULL,
    failed_phase    VARCHAR NOT NULL,
    summary         VARCHAR NOT NULL,
    report_path     VARCHAR NOT NULL,
    plan_steps      VARCHAR[] NOT NULL,
    plan_source     VARCHAR NOT NULL,
    files_changed   VARCHAR[] NOT NULL,
    started_at      TIMESTAMP NOT NULL,
    last_heartbeat  TIMESTAMP NOT NULL,
    ended_at        TIMESTAMP
);

CREATE TABLE IF NOT EXISTS phases (
    run_id      VARCHAR NOT NULL,
    phase       VARCHAR NOT NULL,
    position    INTEGER NOT NULL,
    status      VARCHAR NOT NULL,          -- started, succeeded, failed, skipped
    started_at  TIMESTAMP,
    ended_at    TIMESTAMP,
    action      VARCHAR NOT NULL,
    result      VARCHAR NOT NULL,
    PRIMARY KEY (run_id, phase)
);

CREATE TABLE IF NOT EXISTS validations (
    run_id      VARCHAR NOT NULL,
    round       INTEGER NOT NULL,
    passed      BOOLEAN NOT NULL,
    missing     VARCHAR[] NOT NULL,
    command     VARCHAR NOT NULL,
    exit_code   INTEGER,
    output      VARCHAR NOT NULL,
    at_time     TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, round)
);

-- Build History: one row per finished run, with the eight phase results in order.
CREATE TABLE IF NOT EXISTS history (
    run_id          VARCHAR PRIMARY KEY,
    task_id         VARCHAR NOT NULL,
    title           VARCHAR NOT NULL,
    agent           VARCHAR NOT NULL,
    group_name      VARCHAR NOT NULL,
    attempt         INTEGER NOT NULL,
    outcome         VARCHAR NOT NULL,
    reason          VARCHAR NOT NULL,
    phase_results   VARCHAR[] NOT NULL,
    started_at      TIMESTAMP NOT NULL,
    ended_at        TIMESTAMP NOT NULL,
    duration_s      DOUBLE NOT NULL,
    turns           INTEGER NOT NULL,
    cost_usd        DOUBLE NOT NULL,
    heal_rounds     INTEGER NOT NULL,
    finished_seq    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_end ON history (finished_seq);

-- Activity: a timeline of every run and every notable event.
CREATE TABLE IF NOT EXISTS activity (
    seq         BIGINT PRIMARY KEY,
    at_time     TIMESTAMP NOT NULL,
    task_id     VARCHAR NOT NULL,
    run_id      VARCHAR NOT NULL,
    kind        VARCHAR NOT NULL,
    actor       VARCHAR NOT NULL,
    text        VARCHAR NOT NULL
);

-- Kanban: a card per task (column from its state) and a card per plan step under it.
CREATE TABLE IF NOT EXISTS cards (
    card_id     VARCHAR PRIMARY KEY,
    task_id     VARCHAR NOT NULL,
    run_id      VARCHAR NOT NULL,
    kind        VARCHAR NOT NULL,          -- task, step
    title       VARCHAR NOT NULL,
    column_name VARCHAR NOT NULL,
    position    BIGINT NOT NULL,
    priority_rank INTEGER NOT NULL,
    updated_at  TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS handlers (
    handler_id  VARCHAR PRIMARY KEY,
    host        VARCHAR NOT NULL,
    pid         INTEGER NOT NULL,
    capacity    INTEGER NOT NULL,
    runs        VARCHAR[] NOT NULL,
    last_seen   TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS agents (
    name        VARCHAR PRIMARY KEY,
    current_runs VARCHAR[] NOT NULL,
    runs_total  BIGINT NOT NULL,
    succeeded   BIGINT NOT NULL,
    failed      BIGINT NOT NULL,
    last_seen   TIMESTAMP NOT NULL
);

CREATE TABLE IF NOT EXISTS rejections (
    rejection_id VARCHAR PRIMARY KEY,
    command     VARCHAR NOT NULL,
    dispatcher  VARCHAR NOT NULL,
    problems    VARCHAR[] NOT NULL,
    at_time     TIMESTAMP NOT NULL
);

-- Agent comms: messages in threads, and who has read what.
CREATE TABLE IF NOT EXISTS messages (
    message_id  VARCHAR PRIMARY KEY,
    thread_id   VARCHAR NOT NULL,
    reply_to    VARCHAR NOT NULL,
    sender      VARCHAR NOT NULL,
    recipient   VARCHAR NOT NULL,          -- an agent, or '*' for everyone
    type        VARCHAR NOT NULL,
    body        VARCHAR NOT NULL,
    priority    VARCHAR NOT NULL,
    task_id     VARCHAR NOT NULL,
    sent_at     TIMESTAMP NOT NULL,
    seq         BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS message_reads (
    message_id  VARCHAR NOT NULL,
    reader      VARCHAR NOT NULL,
    read_at     TIMESTAMP NOT NULL,
    PRIMARY KEY (message_id, reader)
);

CREATE TABLE IF NOT EXISTS threads (
    thread_id   VARCHAR PRIMARY KEY,
    started_by  VARCHAR NOT NULL,
    first_body  VARCHAR NOT NULL,
    task_id     VARCHAR NOT NULL,
    participants VARCHAR[] NOT NULL,
    messages    BIGINT NOT NULL,
    started_at  TIMESTAMP NOT NULL,
    last_at     TIMESTAMP NOT NULL
);

-- Tasks dispatched with the same `group`, run in parallel; the outcome is set once, when the
-- last of them has finished (group_finished).
CREATE TABLE IF NOT EXISTS groups (
    group_name      VARCHAR PRIMARY KEY,
    tasks           VARCHAR[] NOT NULL,
    succeeded       VARCHAR[] NOT NULL,
    failed          VARCHAR[] NOT NULL,    -- failed or cancelled
    state           VARCHAR NOT NULL,      -- running, passed, failed
    started_at      TIMESTAMP NOT NULL,
    finished_at     TIMESTAMP
);
