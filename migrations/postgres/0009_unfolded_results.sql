-- Results not yet in their sweep's live aggregates (`aggregates`) and per-epoch value counts
-- (`epoch_values`). A completion queues its result here instead of updating those rows, which
-- every recorder of the sweep shares and would otherwise wait for in turn (each holding them
-- through its commit); the coordinator folds the queue in batches (every 2 s, and before a read
-- of the aggregates or counts), with test_sets_unfolded. SQLite, one writer at a time, updates
-- them as it records each result.
CREATE TABLE aggregates_unfolded (
    sweep_id UUID NOT NULL,
    seed     BIGINT NOT NULL,
    PRIMARY KEY (sweep_id, seed),
    FOREIGN KEY (sweep_id, seed) REFERENCES results (sweep_id, seed) ON DELETE CASCADE
);
