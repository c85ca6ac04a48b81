-- Test-set statistics without reading every bitmap (README, "Statistics"): per sweep and
-- test-set size, each example's error count over the finished seeds (`wrong`: one little-endian
-- 4-byte count per example) and exact sums of each run's hits (all examples, even- and
-- odd-numbered ones, their squares and the even x odd product). Updated in the transaction that
-- records a result with a bitmap, at a cost that does not grow with the sweep.
CREATE TABLE test_sets (
    sweep_id  UUID NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    examples  BIGINT NOT NULL CHECK (examples > 0),
    runs      BIGINT NOT NULL CHECK (runs > 0),
    hits      BIGINT NOT NULL,
    hits_sq   BIGINT NOT NULL,
    even_hits BIGINT NOT NULL,
    even_sq   BIGINT NOT NULL,
    odd_hits  BIGINT NOT NULL,
    odd_sq    BIGINT NOT NULL,
    even_odd  BIGINT NOT NULL,
    wrong     BYTEA NOT NULL CHECK (length(wrong) = 4 * examples),
    PRIMARY KEY (sweep_id, examples)
);

-- Sweeps whose bitmaps were recorded before this table existed: the coordinator tallies each
-- from its bitmaps when it starts, then deletes the row.
CREATE TABLE test_sets_pending (
    sweep_id UUID PRIMARY KEY REFERENCES sweeps (id) ON DELETE CASCADE
);
INSERT INTO test_sets_pending SELECT DISTINCT sweep_id FROM results WHERE test_correct IS NOT NULL;

-- A bitmap (1,250 bytes for CIFAR-10's 10,000 test images) inline would make each results row
-- ten times longer, and every read of a metric over the results (the statistics read one
-- column of every finished seed) ten times slower. Kept out of line, in the TOAST table, for the
-- results recorded from now on (`VACUUM FULL results` moves those recorded before).
ALTER TABLE results ALTER COLUMN test_correct SET STORAGE EXTERNAL;
ALTER TABLE results SET (toast_tuple_target = 256);
