-- Live aggregates and the statistics views (see the PostgreSQL migration of the same name).

CREATE TABLE aggregates (
    sweep_id TEXT NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    metric   TEXT NOT NULL,
    n        INTEGER NOT NULL,
    mean     REAL NOT NULL,
    m2       REAL NOT NULL,
    min      REAL NOT NULL,
    min_seed INTEGER NOT NULL,
    max      REAL NOT NULL,
    max_seed INTEGER NOT NULL,
    PRIMARY KEY (sweep_id, metric)
);

-- results' rowid gives the order results were recorded in (the store reads it as `seq`).

CREATE VIEW sweep_summary AS
SELECT w.id AS sweep_id, w.name, w.task, w.state,
       (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id) AS seeds,
       (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'done') AS done,
       (SELECT count(*) FROM seeds s WHERE s.sweep_id = w.id AND s.state = 'failed') AS failed,
       a.n, a.mean,
       CASE WHEN a.n > 1 THEN sqrt(a.m2 / (a.n - 1)) ELSE 0 END AS std,
       a.min, a.max, a.max - a.min AS gap, a.max_seed AS best_seed, a.min_seed AS worst_seed
FROM sweeps w
LEFT JOIN aggregates a ON a.sweep_id = w.id AND a.metric = 'test_accuracy';

-- SQLite has no stddev: the sample std from sums (exact enough for accuracies in [0, 1]).
CREATE VIEW epoch_summary AS
SELECT sweep_id, epoch, count(test_accuracy) AS n,
       avg(test_accuracy) AS mean,
       CASE WHEN count(test_accuracy) > 1
            THEN sqrt(max(0, (sum(test_accuracy * test_accuracy)
                              - sum(test_accuracy) * sum(test_accuracy) / count(test_accuracy))
                             / (count(test_accuracy) - 1)))
       END AS std,
       min(test_accuracy) AS min, max(test_accuracy) AS max,
       avg(test_loss) AS mean_test_loss, avg(train_loss) AS mean_train_loss
FROM epoch_metrics
GROUP BY sweep_id, epoch;

-- Which test examples each run's final evaluation got right: bit i (least significant first
-- within each byte) for example i; NULL when the worker did not report it.
ALTER TABLE results ADD COLUMN test_examples INTEGER CHECK (test_examples > 0);
ALTER TABLE results ADD COLUMN test_correct BLOB;
