-- no-transaction
-- Only a run's score is required: a program of the researcher's own may leave out the
-- accuracies, losses and learning rate it does not have, which are then NULL (never a stand-in
-- value). SQLite cannot drop NOT NULL in place, so `results` and `epoch_metrics` are rebuilt
-- (SQLite's documented twelve steps: foreign keys off outside the transaction, so that dropping
-- the old `results` does not cascade to `result_bitmaps`). Row ids are kept: readers that follow
-- a sweep page through `results` by rowid. Each sweep also records its score and which way the
-- score improves, which `sweep_summary` follows.
PRAGMA foreign_keys = OFF;
BEGIN;

CREATE TABLE results_rebuilt (
    sweep_id         TEXT NOT NULL,
    seed             INTEGER NOT NULL,
    fence            INTEGER NOT NULL,
    -- NULL when the run did not report it (the built-in tasks report all four).
    test_accuracy    REAL CHECK (test_accuracy >= 0 AND test_accuracy <= 1),
    test_loss        REAL,
    train_loss       REAL,
    train_accuracy   REAL CHECK (train_accuracy >= 0 AND train_accuracy <= 1),
    epochs           INTEGER NOT NULL CHECK (epochs > 0),
    seconds          REAL NOT NULL,
    worker_id        TEXT NOT NULL,
    device           TEXT NOT NULL,
    data_fingerprint TEXT NOT NULL,
    -- The run's factor seeds, copied from seeds.
    init_seed        INTEGER NOT NULL,
    order_seed       INTEGER NOT NULL,
    augment_seed     INTEGER NOT NULL,
    split_seed       INTEGER NOT NULL,
    -- The arithmetic used ('fp32' on a CPU) and whether the run repeats bit for bit.
    precision        TEXT NOT NULL CHECK (precision IN ('fp32', 'fp16', 'bf16')),
    deterministic    INTEGER NOT NULL,
    -- Top-5 test accuracy (task finetune-head), NULL otherwise.
    test_top5        REAL CHECK (test_top5 >= 0 AND test_top5 <= 1),
    -- On the run's held-out validation images (train.holdout > 0), NULL otherwise.
    val_loss         REAL,
    val_accuracy     REAL CHECK (val_accuracy >= 0 AND val_accuracy <= 1),
    finished_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- A command sweep's metrics that are not known columns: a JSON object, NULL when none.
    custom           TEXT,
    PRIMARY KEY (sweep_id, seed),
    FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE
);
INSERT INTO results_rebuilt (rowid, sweep_id, seed, fence, test_accuracy, test_loss, train_loss,
                             train_accuracy, epochs, seconds, worker_id, device, data_fingerprint,
                             init_seed, order_seed, augment_seed, split_seed, precision,
                             deterministic, test_top5, val_loss, val_accuracy, finished_at, custom)
SELECT rowid, sweep_id, seed, fence, test_accuracy, test_loss, train_loss, train_accuracy, epochs,
       seconds, worker_id, device, data_fingerprint, init_seed, order_seed, augment_seed,
       split_seed, precision, deterministic, test_top5, val_loss, val_accuracy, finished_at, custom
FROM results;

CREATE TABLE epoch_metrics_rebuilt (
    sweep_id       TEXT NOT NULL,
    seed           INTEGER NOT NULL,
    epoch          INTEGER NOT NULL CHECK (epoch > 0),
    fence          INTEGER NOT NULL,
    -- NULL when the run did not report it; the test metrics also for an epoch without an
    -- evaluation (the sweep's eval_every).
    train_loss     REAL,
    train_accuracy REAL,
    test_loss      REAL,
    test_accuracy  REAL,
    test_top5      REAL,
    val_loss       REAL,
    val_accuracy   REAL,
    lr             REAL,
    seconds        REAL NOT NULL,
    recorded_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    custom         TEXT,
    PRIMARY KEY (sweep_id, seed, epoch),
    FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE
);
INSERT INTO epoch_metrics_rebuilt (rowid, sweep_id, seed, epoch, fence, train_loss,
                                   train_accuracy, test_loss, test_accuracy, test_top5, val_loss,
                                   val_accuracy, lr, seconds, recorded_at, custom)
SELECT rowid, sweep_id, seed, epoch, fence, train_loss, train_accuracy, test_loss, test_accuracy,
       test_top5, val_loss, val_accuracy, lr, seconds, recorded_at, custom
FROM epoch_metrics;

-- The views that read the old tables go first: a rename checks every view.
DROP VIEW epoch_summary;
DROP VIEW sweep_summary;
DROP TABLE results;
DROP TABLE epoch_metrics;
ALTER TABLE results_rebuilt RENAME TO results;
ALTER TABLE epoch_metrics_rebuilt RENAME TO epoch_metrics;

-- Each sweep's score and its direction ('max': higher is better), as the coordinator resolves
-- them from the sweep file (`command.score`, `command.score_direction`). Sweeps from before
-- read them from their stored settings: a known loss, or seconds, improves downwards.
ALTER TABLE sweeps ADD COLUMN score TEXT NOT NULL DEFAULT 'test_accuracy';
ALTER TABLE sweeps ADD COLUMN score_direction TEXT NOT NULL DEFAULT 'max'
    CHECK (score_direction IN ('max', 'min'));
UPDATE sweeps SET score = coalesce(json_extract(config, '$.command.score'), 'test_accuracy');
UPDATE sweeps SET score_direction = 'min'
WHERE score IN ('test_loss', 'train_loss', 'val_loss', 'seconds');

-- One row per sweep: its seeds by state and its score over the finished seeds, the best and
-- the worst seed by the score's direction.
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

CREATE VIEW epoch_summary AS
SELECT e.sweep_id, e.epoch, count(e.test_accuracy) AS n,
       avg(e.test_accuracy) AS mean,
       CASE WHEN count(e.test_accuracy) > 1
            THEN sqrt(max(0, (sum(e.test_accuracy * e.test_accuracy)
                              - sum(e.test_accuracy) * sum(e.test_accuracy) / count(e.test_accuracy))
                             / (count(e.test_accuracy) - 1)))
       END AS std,
       min(e.test_accuracy) AS min, max(e.test_accuracy) AS max,
       avg(e.test_loss) AS mean_test_loss, avg(e.train_loss) AS mean_train_loss
FROM epoch_metrics e
JOIN results r ON r.sweep_id = e.sweep_id AND r.seed = e.seed AND e.epoch <= r.epochs
GROUP BY e.sweep_id, e.epoch;

-- Nothing may point nowhere: a row that does fails this insert, and the migration with it
-- (the transaction is never committed).
CREATE TEMP TABLE rebuilt_references (dangling INTEGER CHECK (dangling = 0));
INSERT INTO rebuilt_references SELECT count(*) FROM pragma_foreign_key_check;
DROP TABLE rebuilt_references;
COMMIT;
PRAGMA foreign_keys = ON;
