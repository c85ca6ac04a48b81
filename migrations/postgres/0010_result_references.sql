-- A result's bitmap and its place in the fold queue reference its seed instead of its result.
-- PostgreSQL checks a reference with a plan it keeps per connection; made while `results` had
-- never been analysed (a new database's first sweep), that plan read `results_seq` (the sweep's
-- every result, filtered by seed) rather than the primary key, so each completion cost more as
-- the sweep grew (3 ms each at 4,000 results, two per completion). `seeds` is analysed as each
-- sweep goes in, and its primary key is its only index on both columns. The result and its
-- bitmap are still written in one statement; deleting a seed still deletes both.
ALTER TABLE result_bitmaps
    DROP CONSTRAINT result_bitmaps_sweep_id_seed_fkey,
    ADD FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE;
ALTER TABLE aggregates_unfolded
    DROP CONSTRAINT aggregates_unfolded_sweep_id_seed_fkey,
    ADD FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE;
