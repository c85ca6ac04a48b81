-- Test-set statistics without reading every bitmap (README, "Statistics"): per sweep and
-- test-set size, each example's error count over the finished seeds (`wrong`: one little-endian
-- 4-byte count per example) and exact sums of each run's hits (all examples, even- and
-- odd-numbered ones, their squares and the even x odd product). Updated in the transaction that
-- records a result with a bitmap, at a cost that does not grow with the sweep.
CREATE TABLE test_sets (
    sweep_id  TEXT NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    examples  INTEGER NOT NULL CHECK (examples > 0),
    runs      INTEGER NOT NULL CHECK (runs > 0),
    hits      INTEGER NOT NULL,
    hits_sq   INTEGER NOT NULL,
    even_hits INTEGER NOT NULL,
    even_sq   INTEGER NOT NULL,
    odd_hits  INTEGER NOT NULL,
    odd_sq    INTEGER NOT NULL,
    even_odd  INTEGER NOT NULL,
    wrong     BLOB NOT NULL CHECK (length(wrong) = 4 * examples),
    PRIMARY KEY (sweep_id, examples)
);

-- Sweeps whose bitmaps were recorded before this table existed: the coordinator tallies each
-- from its bitmaps when it starts, then deletes the row.
CREATE TABLE test_sets_pending (
    sweep_id TEXT PRIMARY KEY REFERENCES sweeps (id) ON DELETE CASCADE
);
INSERT INTO test_sets_pending SELECT DISTINCT sweep_id FROM results WHERE test_correct IS NOT NULL;

-- Each result's correctness bitmap (1,250 bytes for CIFAR-10's 10,000 test images) in a table of
-- its own: inline, it made every results row several times longer, and every read of a metric
-- over the results (the statistics read one column of every finished seed) that much slower.
CREATE TABLE result_bitmaps (
    sweep_id     TEXT NOT NULL,
    seed         INTEGER NOT NULL,
    test_examples INTEGER NOT NULL CHECK (test_examples > 0),
    test_correct BLOB NOT NULL,
    PRIMARY KEY (sweep_id, seed),
    FOREIGN KEY (sweep_id, seed) REFERENCES results (sweep_id, seed) ON DELETE CASCADE
);
INSERT INTO result_bitmaps (sweep_id, seed, test_examples, test_correct)
SELECT sweep_id, seed, test_examples, test_correct FROM results WHERE test_correct IS NOT NULL;
ALTER TABLE results DROP COLUMN test_correct;
ALTER TABLE results DROP COLUMN test_examples;
