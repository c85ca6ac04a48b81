-- Only a run's score is required: a program of the researcher's own may leave out the
-- accuracies, losses and learning rate it does not have, which are then NULL (never a stand-in
-- value). Each sweep also records its score and which way the score improves, which
-- `sweep_summary` follows.
ALTER TABLE results ALTER COLUMN test_accuracy DROP NOT NULL,
                    ALTER COLUMN test_loss DROP NOT NULL,
                    ALTER COLUMN train_loss DROP NOT NULL,
                    ALTER COLUMN train_accuracy DROP NOT NULL;
ALTER TABLE epoch_metrics ALTER COLUMN train_loss DROP NOT NULL,
                          ALTER COLUMN train_accuracy DROP NOT NULL,
                          ALTER COLUMN lr DROP NOT NULL;

-- Each sweep's score and its direction ('max': higher is better), as the coordinator resolves
-- them from the sweep file (`command.score`, `command.score_direction`). Sweeps from before
-- read them from their stored settings: a known loss, or seconds, improves downwards.
ALTER TABLE sweeps ADD COLUMN score TEXT NOT NULL DEFAULT 'test_accuracy',
                   ADD COLUMN score_direction TEXT NOT NULL DEFAULT 'max'
                       CHECK (score_direction IN ('max', 'min'));
UPDATE sweeps SET score = coalesce(config #>> '{command,score}', 'test_accuracy')
WHERE config #>> '{command,score}' IS NOT NULL;
UPDATE sweeps SET score_direction = 'min'
WHERE score IN ('test_loss', 'train_loss', 'val_loss', 'seconds');

-- One row per sweep: its seeds by state and its score over the finished seeds, the best and
-- the worst seed by the score's direction.
DROP VIEW sweep_summary;
CREATE VIEW sweep_summary AS
SELECT w.id AS sweep_id, w.name, w.task, w.state,
       (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id) AS seeds,
       (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'done') AS done,
       (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'failed') AS failed,
       a.n, a.mean,
       CASE WHEN a.n > 1 THEN sqrt(a.m2 / (a.n - 1)) ELSE 0 END AS std,
       a.min, a.max, a.max - a.min AS gap,
       CASE w.score_direction WHEN 'min' THEN a.min_seed ELSE a.max_seed END AS best_seed,
       CASE w.score_direction WHEN 'min' THEN a.max_seed ELSE a.min_seed END AS worst_seed,
       w.score, w.score_direction
FROM sweeps w
LEFT JOIN aggregates a ON a.sweep_id = w.id AND a.metric = w.score;
