-- Per-epoch order statistics without a scan: for the accuracy metrics (a count of hits over a
-- fixed set of examples, so few distinct values), how many finished seeds had each value at each
-- epoch. Updated in the transaction that records a result, from that seed's epoch rows.
CREATE TABLE epoch_values (
    sweep_id TEXT NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    metric   TEXT NOT NULL,
    epoch    INTEGER NOT NULL,
    value    REAL NOT NULL,
    n        INTEGER NOT NULL CHECK (n > 0),
    PRIMARY KEY (sweep_id, metric, epoch, value)
) WITHOUT ROWID;

INSERT INTO epoch_values (sweep_id, metric, epoch, value, n)
SELECT sweep_id, metric, epoch, value, count(*) FROM (
    SELECT e.sweep_id, 'test_accuracy' AS metric, e.epoch, e.test_accuracy AS value
    FROM epoch_metrics e JOIN results r ON r.sweep_id = e.sweep_id AND r.seed = e.seed AND e.epoch <= r.epochs
    UNION ALL
    SELECT e.sweep_id, 'train_accuracy', e.epoch, e.train_accuracy
    FROM epoch_metrics e JOIN results r ON r.sweep_id = e.sweep_id AND r.seed = e.seed AND e.epoch <= r.epochs
    UNION ALL
    SELECT e.sweep_id, 'test_top5', e.epoch, e.test_top5
    FROM epoch_metrics e JOIN results r ON r.sweep_id = e.sweep_id AND r.seed = e.seed AND e.epoch <= r.epochs
    UNION ALL
    SELECT e.sweep_id, 'val_accuracy', e.epoch, e.val_accuracy
    FROM epoch_metrics e JOIN results r ON r.sweep_id = e.sweep_id AND r.seed = e.seed AND e.epoch <= r.epochs
) WHERE value IS NOT NULL
GROUP BY sweep_id, metric, epoch, value;

-- Per-epoch statistics describe the finished seeds (the same population as the results).
DROP VIEW epoch_summary;
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
