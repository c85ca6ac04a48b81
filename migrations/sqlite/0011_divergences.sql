-- A seed whose run diverged (a recipe's training loss, or a program's score, not finite; or a
-- program that said "diverged"): a finished seed (state 'done'), not a failure, and not retried.
-- It counts in every count of outcomes and in no statistic of the score; its finite epochs stay
-- in epoch_metrics under its fence.
CREATE TABLE divergences (
    sweep_id      TEXT NOT NULL,
    seed          INTEGER NOT NULL,
    fence         INTEGER NOT NULL,
    -- The epoch whose metrics were not finite.
    epoch         INTEGER NOT NULL CHECK (epoch > 0),
    -- The epochs finished with finite metrics before it (each one's row is in epoch_metrics);
    -- equal to epoch when a program's final evaluation was the one not finite.
    epochs        INTEGER NOT NULL CHECK (epochs >= 0 AND epochs <= epoch),
    seconds       REAL NOT NULL,
    worker_id     TEXT NOT NULL,
    device        TEXT NOT NULL,
    deterministic INTEGER NOT NULL,
    init_seed     INTEGER NOT NULL,
    order_seed    INTEGER NOT NULL,
    augment_seed  INTEGER NOT NULL,
    split_seed    INTEGER NOT NULL,
    finished_at   TEXT NOT NULL,
    PRIMARY KEY (sweep_id, seed),
    FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE
);
