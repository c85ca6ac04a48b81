-- A seed whose run diverged (a recipe's training loss, or a program's score, not finite; or a
-- program that said "diverged"): a finished seed (state 'done'), not a failure, and not retried.
-- It counts in every count of outcomes and in no statistic of the score; its finite epochs stay
-- in epoch_metrics under its fence. Written only in the transaction that locks its seed's row;
-- deleting seeds deletes it by the trigger.
CREATE TABLE divergences (
    sweep_id      UUID NOT NULL,
    seed          BIGINT NOT NULL,
    fence         BIGINT NOT NULL,
    -- The epoch whose metrics were not finite.
    epoch         INTEGER NOT NULL CHECK (epoch > 0),
    -- The epochs finished with finite metrics before it (each one's row is in epoch_metrics);
    -- equal to epoch when a program's final evaluation was the one not finite.
    epochs        INTEGER NOT NULL CHECK (epochs >= 0 AND epochs <= epoch),
    seconds       DOUBLE PRECISION NOT NULL,
    worker_id     TEXT NOT NULL,
    device        TEXT NOT NULL,
    deterministic BOOLEAN NOT NULL,
    init_seed     BIGINT NOT NULL,
    order_seed    BIGINT NOT NULL,
    augment_seed  BIGINT NOT NULL,
    split_seed    BIGINT NOT NULL,
    finished_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sweep_id, seed)
);

CREATE OR REPLACE FUNCTION delete_rows_of_gone_seeds() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM test_sets_unfolded q USING gone g WHERE q.sweep_id = g.sweep_id AND q.seed = g.seed;
    DELETE FROM aggregates_unfolded q USING gone g WHERE q.sweep_id = g.sweep_id AND q.seed = g.seed;
    DELETE FROM result_bitmaps b USING gone g WHERE b.sweep_id = g.sweep_id AND b.seed = g.seed;
    DELETE FROM results r USING gone g WHERE r.sweep_id = g.sweep_id AND r.seed = g.seed;
    DELETE FROM divergences d USING gone g WHERE d.sweep_id = g.sweep_id AND d.seed = g.seed;
    DELETE FROM attempts a USING gone g WHERE a.sweep_id = g.sweep_id AND a.seed = g.seed;
    DELETE FROM epoch_metrics e USING gone g WHERE e.sweep_id = g.sweep_id AND e.seed = g.seed;
    RETURN NULL;
END
$$;
