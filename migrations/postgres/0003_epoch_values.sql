-- Per-epoch order statistics without a scan: for the accuracy metrics (a count of hits over a
-- fixed set of examples, so few distinct values), how many finished seeds had each value at each
-- epoch. Updated in the transaction that records a result, from that seed's epoch rows, so the
-- per-epoch spread (n, mean, std, extremes, exact quartiles) is read from at most a few thousand
-- rows per epoch whatever the number of seeds.
CREATE TABLE epoch_values (
    sweep_id UUID NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    metric   TEXT NOT NULL,
    epoch    INTEGER NOT NULL,
    value    DOUBLE PRECISION NOT NULL,
    n        BIGINT NOT NULL CHECK (n > 0),
    PRIMARY KEY (sweep_id, metric, epoch, value)
);

INSERT INTO epoch_values (sweep_id, metric, epoch, value, n)
SELECT e.sweep_id, m.metric, e.epoch, m.value, count(*)
FROM epoch_metrics e
JOIN results r ON r.sweep_id = e.sweep_id AND r.seed = e.seed AND e.epoch <= r.epochs
CROSS JOIN LATERAL (VALUES ('test_accuracy', e.test_accuracy), ('train_accuracy', e.train_accuracy),
                           ('test_top5', e.test_top5), ('val_accuracy', e.val_accuracy)) AS m (metric, value)
WHERE m.value IS NOT NULL
GROUP BY e.sweep_id, m.metric, e.epoch, m.value;

-- Per-epoch statistics describe the finished seeds (the same population as the results): a seed
-- that ran out of attempts keeps its partial curve in epoch_metrics but is not counted here.
DROP VIEW epoch_summary;
CREATE VIEW epoch_summary AS
SELECT e.sweep_id, e.epoch, count(e.test_accuracy) AS n,
       avg(e.test_accuracy) AS mean, stddev_samp(e.test_accuracy) AS std,
       min(e.test_accuracy) AS min, max(e.test_accuracy) AS max,
       avg(e.test_loss) AS mean_test_loss, avg(e.train_loss) AS mean_train_loss
FROM epoch_metrics e
JOIN results r ON r.sweep_id = e.sweep_id AND r.seed = e.seed AND e.epoch <= r.epochs
GROUP BY e.sweep_id, e.epoch;
