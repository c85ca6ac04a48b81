-- A lease cycle's rows are no longer checked by foreign keys as they are written: the claim's
-- attempt row and the completion's result, bitmap and two fold-queue rows go in only in the
-- statement that updates (and so locks) their seed's row, so the seed exists and stays while
-- they do. The five checks ran a query each per cycle: without them the 16-worker closed loop
-- ran 6% faster (BENCHMARKS.md, the twelfth run). Deleting seeds (with their sweep) still
-- deletes all their rows, by the trigger of migration 0011, once per statement.
ALTER TABLE attempts DROP CONSTRAINT attempts_sweep_id_seed_fkey;
ALTER TABLE results DROP CONSTRAINT results_sweep_id_seed_fkey;
ALTER TABLE result_bitmaps DROP CONSTRAINT result_bitmaps_sweep_id_seed_fkey;
ALTER TABLE test_sets_unfolded DROP CONSTRAINT test_sets_unfolded_sweep_id_seed_fkey;
ALTER TABLE aggregates_unfolded DROP CONSTRAINT aggregates_unfolded_sweep_id_seed_fkey;

CREATE OR REPLACE FUNCTION delete_epoch_rows_of_gone_seeds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM test_sets_unfolded q USING gone g WHERE q.sweep_id = g.sweep_id AND q.seed = g.seed;
    DELETE FROM aggregates_unfolded q USING gone g WHERE q.sweep_id = g.sweep_id AND q.seed = g.seed;
    DELETE FROM result_bitmaps b USING gone g WHERE b.sweep_id = g.sweep_id AND b.seed = g.seed;
    DELETE FROM results r USING gone g WHERE r.sweep_id = g.sweep_id AND r.seed = g.seed;
    DELETE FROM attempts a USING gone g WHERE a.sweep_id = g.sweep_id AND a.seed = g.seed;
    DELETE FROM epoch_metrics e USING gone g WHERE e.sweep_id = g.sweep_id AND e.seed = g.seed;
    RETURN NULL;
END
$$;
ALTER FUNCTION delete_epoch_rows_of_gone_seeds() RENAME TO delete_rows_of_gone_seeds;
ALTER TRIGGER seeds_delete_epoch_rows ON seeds RENAME TO seeds_delete_rows;
