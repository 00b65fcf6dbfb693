-- Read-model queries. Each section is one statement, run by shipyard/projections/queries.py.

-- name: history
SELECT run_id, task_id, title, agent, group_name, attempt, outcome, reason, phase_results,
       started_at, ended_at, duration_s, turns, cost_usd, heal_rounds
FROM history
-- The page's keys first, from the one column they need; the page's rows are then fetched
-- by key (the join's key range skips all but the newest row groups): a top-N over every
-- column of every run costs several times more.
WHERE finished_seq IN (
    SELECT finished_seq
    FROM history
    WHERE ($outcome = '' OR outcome = $outcome)
      AND ($agent = '' OR agent = $agent)
      AND ($search = '' OR contains(lower(title), lower($search)) OR task_id = $search)
      AND ($before = 0 OR finished_seq < $before)
    ORDER BY finished_seq DESC
    LIMIT $limit)
ORDER BY finished_seq DESC;

-- name: history_count
SELECT count(*)
FROM history
WHERE ($outcome = '' OR outcome = $outcome)
  AND ($agent = '' OR agent = $agent)
  AND ($search = '' OR contains(lower(title), lower($search)) OR task_id = $search);

-- name: history_cursor
SELECT finished_seq FROM history WHERE run_id = $run_id;

-- name: live_runs
SELECT r.run_id, r.task_id, r.title, r.group_name, r.attempt, r.handler, r.agent, r.state,
       r.stale, r.phase, r.percent, r.action, r.turns, r.tool_calls, r.tokens_in,
       r.tokens_out, r.cost_usd, r.last_tool, r.blockers, r.started_at, r.last_heartbeat
FROM runs r
WHERE r.state = 'running'
ORDER BY r.group_name, r.started_at;

-- name: run
SELECT run_id, task_id, title, group_name, attempt, handler, agent, state, stale, phase,
       percent, action, turns, tool_calls, tokens_in, tokens_out, cost_usd, last_tool,
       blockers, heal_rounds, reason, error, failed_phase, summary, report_path, plan_steps,
       plan_source, files_changed, started_at, last_heartbeat, ended_at
FROM runs WHERE run_id = $run_id;

-- name: run_phases
SELECT phase, position, status, started_at, ended_at, action, result
FROM phases WHERE run_id = $run_id ORDER BY position;

-- name: run_validations
SELECT round, passed, missing, command, exit_code, output, at_time
FROM validations WHERE run_id = $run_id ORDER BY round;

-- name: task
SELECT task_id, title, dispatcher, priority, task_type, agent, group_name, after_ids,
       working_dir, escalated_from, escalated_to, rework, state, attempt, run_id, reason,
       cancel_requested, created_at, updated_at
FROM tasks WHERE task_id = $task_id;

-- name: task_runs
SELECT run_id FROM runs WHERE task_id = $task_id ORDER BY attempt, started_at;

-- name: tasks
SELECT t.task_id, t.title, t.dispatcher, t.priority, t.task_type, t.agent, t.group_name,
       t.after_ids, t.working_dir, t.escalated_from, t.escalated_to, t.rework,
       CASE WHEN t.state = 'queued' AND EXISTS (
                SELECT 1 FROM unnest(t.after_ids) AS a(id)
                LEFT JOIN tasks p ON p.task_id = a.id
                WHERE p.state IS DISTINCT FROM 'succeeded')
            THEN 'blocked' ELSE t.state END AS state,
       t.attempt, t.run_id, t.reason, t.cancel_requested, t.created_at, t.updated_at
FROM tasks t
WHERE ($state = '' OR t.state = $state OR ($state = 'blocked' AND t.state = 'queued'))
ORDER BY t.created_seq DESC
LIMIT $limit;

-- name: activity
SELECT seq, at_time, task_id, run_id, kind, actor, text
FROM activity
WHERE ($task_id = '' OR task_id = $task_id)
  AND ($before = 0 OR seq < $before)
ORDER BY seq DESC
LIMIT $limit;

-- name: kanban
WITH task_cards AS (
    SELECT t.task_id AS card_id, t.task_id, t.run_id, 'task' AS kind, t.title,
           CASE
             WHEN t.state = 'queued' AND EXISTS (
                  SELECT 1 FROM unnest(t.after_ids) AS a(id)
                  LEFT JOIN tasks p ON p.task_id = a.id
                  WHERE p.state IS DISTINCT FROM 'succeeded') THEN 'blocked'
             WHEN t.state = 'queued' THEN 'queued'
             WHEN t.state = 'running' AND r.phase IN ('validate', 'heal') THEN 'validating'
             WHEN t.state = 'running' THEN 'in_progress'
             WHEN t.state = 'succeeded' THEN 'done'
             ELSE 'failed'
           END AS column_name,
           t.created_seq AS position, t.priority_rank, t.priority, t.group_name, t.agent,
           t.updated_at
    -- Open tasks, and finished ones since $since, as two scans: with an OR neither can
    -- skip anything, while updated_at alone skips the row groups of older tasks.
    FROM (SELECT * FROM tasks WHERE state NOT IN ('succeeded', 'failed', 'cancelled')
          UNION ALL
          SELECT * FROM tasks
          WHERE state IN ('succeeded', 'failed', 'cancelled') AND updated_at >= $since) t
    LEFT JOIN runs r ON r.run_id = t.run_id
)
SELECT * EXCLUDE (task_position, step) FROM (
    SELECT card_id, task_id, run_id, kind, title, column_name, position, priority_rank,
           priority, group_name, agent, updated_at, '' AS parent,
           position AS task_position, 0 AS step
    FROM task_cards
    UNION ALL
    SELECT c.card_id, c.task_id, c.run_id, 'step', c.title, c.column_name, c.position,
           c.priority_rank, '', '', '', c.updated_at, c.task_id,
           tc.position, 1
    FROM cards c JOIN task_cards tc ON tc.task_id = c.task_id AND tc.run_id = c.run_id
    -- A task back in the queue for another attempt shows no steps of the old one.
    WHERE tc.column_name NOT IN ('queued', 'blocked')
)
ORDER BY priority_rank, task_position, step, position;

-- name: agents
SELECT name, current_runs, runs_total, succeeded, failed, last_seen FROM agents ORDER BY name;

-- name: handlers
SELECT handler_id, host, pid, capacity, runs, last_seen FROM handlers ORDER BY handler_id;

-- name: queue_depth
SELECT priority, count(*) FROM tasks WHERE state = 'queued' GROUP BY priority;

-- name: tasks_by_state
SELECT state, count(*) FROM tasks GROUP BY state;

-- name: runs_by_state
SELECT state, count(*), count(*) FILTER (WHERE stale) FROM runs GROUP BY state;

-- name: inbox
SELECT m.message_id, m.thread_id, m.reply_to, m.sender, m.recipient, m.type, m.body,
       m.priority, m.task_id, m.sent_at,
       EXISTS (SELECT 1 FROM message_reads r
               WHERE r.message_id = m.message_id AND r.reader = $agent) AS read
FROM messages m
WHERE (m.recipient = $agent OR (m.recipient = '*' AND m.sender <> $agent))
  AND (NOT $unread OR NOT EXISTS (SELECT 1 FROM message_reads r
                                  WHERE r.message_id = m.message_id AND r.reader = $agent))
ORDER BY m.seq
LIMIT $limit;

-- name: unread_counts
SELECT a.agent, count(*) AS unread
FROM (SELECT DISTINCT recipient AS agent FROM messages WHERE recipient <> '*'
      UNION SELECT DISTINCT sender FROM messages) a
JOIN messages m ON (m.recipient = a.agent OR (m.recipient = '*' AND m.sender <> a.agent))
WHERE NOT EXISTS (SELECT 1 FROM message_reads r
                  WHERE r.message_id = m.message_id AND r.reader = a.agent)
GROUP BY a.agent
ORDER BY a.agent;

-- name: thread
SELECT m.message_id, m.thread_id, m.reply_to, m.sender, m.recipient, m.type, m.body,
       m.priority, m.task_id, m.sent_at,
       coalesce(list(r.reader ORDER BY r.reader) FILTER (WHERE r.reader IS NOT NULL), [])
FROM messages m LEFT JOIN message_reads r ON r.message_id = m.message_id
WHERE m.thread_id = $thread_id
GROUP BY ALL
ORDER BY m.sent_at, m.message_id;

-- name: threads
SELECT thread_id, started_by, first_body, task_id, participants, messages, started_at, last_at
FROM threads
WHERE ($agent = '' OR list_contains(participants, $agent) OR list_contains(participants, '*'))
ORDER BY last_at DESC
LIMIT $limit;

-- name: groups
-- A running group counts its tasks live; a finished one shows the outcome recorded for it.
SELECT g.group_name, g.state, len(g.tasks) AS total,
       CASE WHEN g.finished_at IS NULL
            THEN count(t.task_id) FILTER (WHERE t.state = 'succeeded')
            ELSE len(g.succeeded) END AS succeeded,
       CASE WHEN g.finished_at IS NULL
            THEN count(t.task_id) FILTER (WHERE t.state IN ('failed', 'cancelled'))
            ELSE len(g.failed) END AS failed,
       count(t.task_id) FILTER (WHERE t.state = 'running') AS running,
       CASE WHEN g.finished_at IS NULL
            THEN coalesce(list(t.task_id ORDER BY t.created_seq)
                          FILTER (WHERE t.state IN ('failed', 'cancelled')), [])
            ELSE g.failed END AS failed_tasks,
       g.tasks, g.started_at, g.finished_at
FROM groups g LEFT JOIN tasks t ON t.task_id IN (SELECT unnest(g.tasks))
WHERE g.finished_at IS NULL OR g.finished_at >= $since
GROUP BY g.group_name, g.state, g.tasks, g.succeeded, g.failed, g.started_at, g.finished_at
ORDER BY g.finished_at IS NOT NULL, g.started_at DESC
LIMIT $limit;
