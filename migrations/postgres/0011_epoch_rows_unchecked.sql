-- An epoch row's seed is no longer checked by a foreign key for each row written: the
-- coordinator writes epoch rows only in the statement that locks their seeds' rows and joins
-- them (`record_epochs`), so the seed exists and stays while the row goes in. The check ran a
-- query per row (a fleet writes thousands a second): in a perf profile of the fleet benchmark,
-- the reference checks took about a tenth of PostgreSQL's CPU time, most of it for epoch rows.
-- Deleting seeds (with their sweep) still deletes their epoch rows, by the trigger below, once
-- per statement.
ALTER TABLE epoch_metrics DROP CONSTRAINT epoch_metrics_sweep_id_seed_fkey;

CREATE FUNCTION delete_epoch_rows_of_gone_seeds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM epoch_metrics e USING gone g WHERE e.sweep_id = g.sweep_id AND e.seed = g.seed;
    RETURN NULL;
END
$$;

CREATE TRIGGER seeds_delete_epoch_rows AFTER DELETE ON seeds
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION delete_epoch_rows_of_gone_seeds();
