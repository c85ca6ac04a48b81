-- Results whose bitmaps are not yet in their sweep's test_sets tally. Recording a result queues
-- its bitmap here; the coordinator folds the queue into the tally in batches (every 2 s, and before
-- the statistics read the tally), so that no completion rewrites the tally row (40 KB for
-- CIFAR-10's 10,000 examples), which every recorder of a sweep would otherwise wait for in turn.
CREATE TABLE test_sets_unfolded (
    sweep_id UUID NOT NULL,
    seed     BIGINT NOT NULL,
    PRIMARY KEY (sweep_id, seed),
    FOREIGN KEY (sweep_id, seed) REFERENCES result_bitmaps (sweep_id, seed) ON DELETE CASCADE
);

-- The sweeps migration 0004 left to be tallied from their bitmaps are queued whole.
DELETE FROM test_sets WHERE sweep_id IN (SELECT sweep_id FROM test_sets_pending);
INSERT INTO test_sets_unfolded (sweep_id, seed)
SELECT b.sweep_id, b.seed FROM result_bitmaps b JOIN test_sets_pending p ON p.sweep_id = b.sweep_id;
DROP TABLE test_sets_pending;
