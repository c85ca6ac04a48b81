-- The bare SQL of one lease cycle, for pgbench: the coordinator's claim, then a fenced completion.
WITH next AS (
    SELECT c.sweep_id, c.seed
    FROM (SELECT id FROM sweeps WHERE state = 'active' ORDER BY priority DESC, seq) w
    CROSS JOIN LATERAL (
        SELECT sweep_id, seed FROM seeds
        WHERE sweep_id = w.id AND state = 'pending' AND (not_before IS NULL OR not_before <= now())
        ORDER BY seed LIMIT 1 FOR UPDATE SKIP LOCKED) c
    LIMIT 1)
UPDATE seeds s SET state = 'leased', fence = s.fence + 1, worker_id = 'pgbench',
    lease_expires_at = now() + interval '60 seconds', not_before = NULL, updated_at = now()
FROM next WHERE s.sweep_id = next.sweep_id AND s.seed = next.seed
RETURNING s.seed AS seed, s.fence AS fence \gset
UPDATE seeds SET state = 'done', lease_expires_at = NULL, updated_at = now()
WHERE sweep_id = (SELECT id FROM sweeps ORDER BY seq LIMIT 1) AND seed = :seed AND fence = :fence
  AND state = 'leased';
