-- seedsweep schema, SQLite. Ids are TEXT text; times are UTC ISO 8601 text, which sorts in time order. Users query sweeps, results and epoch_metrics directly; seeds and
-- attempts are the lease bookkeeping (see README, "Querying results with SQL").

CREATE TABLE sweeps (
    id           TEXT PRIMARY KEY,
    -- Submission order: the claim serves older sweeps first.
    seq          INTEGER NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    task         TEXT NOT NULL,
    dataset      TEXT NOT NULL,
    -- The full resolved configuration (defaults filled in), as JSON.
    config       TEXT NOT NULL,
    max_attempts INTEGER NOT NULL CHECK (max_attempts > 0),
    -- Retries wait retry_backoff_seconds * 2^(failures - 1), at most retry_backoff_max_seconds,
    -- times a random factor in [0.5, 1.5).
    retry_backoff_seconds     REAL NOT NULL DEFAULT 10,
    retry_backoff_max_seconds REAL NOT NULL DEFAULT 600,
    -- Higher first; within a priority, older sweeps first.
    priority     INTEGER NOT NULL DEFAULT 0,
    -- 'paused' stops new leases; 'cancelled' also ends the leases held and is final.
    state        TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'paused', 'cancelled')),
    total_seeds  INTEGER NOT NULL CHECK (total_seeds > 0),
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- One row per (sweep, seed): its place in the lease lifecycle.
CREATE TABLE seeds (
    sweep_id         TEXT NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    seed             INTEGER NOT NULL CHECK (seed >= 0),
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'leased', 'done', 'failed', 'cancelled')),
    -- The seed of each source of randomness for this run (see README, "Seed factors").
    init_seed        INTEGER NOT NULL CHECK (init_seed >= 0),
    order_seed       INTEGER NOT NULL CHECK (order_seed >= 0),
    augment_seed     INTEGER NOT NULL CHECK (augment_seed >= 0),
    split_seed       INTEGER NOT NULL CHECK (split_seed >= 0),
    -- Grows by one with each lease; every worker write names it.
    fence            INTEGER NOT NULL DEFAULT 0,
    -- Attempts that ended badly (reported failures and expired leases).
    failures         INTEGER NOT NULL DEFAULT 0,
    worker_id        TEXT,
    -- A pending seed waiting out its retry backoff is not claimed before this.
    not_before       TEXT,
    lease_expires_at TEXT,
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (sweep_id, seed)
);
-- Only what the claim needs.
CREATE INDEX seeds_pending ON seeds (sweep_id, seed) WHERE state = 'pending';
CREATE INDEX seeds_leased ON seeds (sweep_id, seed) WHERE state = 'leased';

-- One row per lease of a seed, with how it ended.
CREATE TABLE attempts (
    sweep_id   TEXT NOT NULL,
    seed       INTEGER NOT NULL,
    fence      INTEGER NOT NULL,
    worker_id  TEXT NOT NULL,
    started_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    ended_at   TEXT,
    outcome    TEXT NOT NULL DEFAULT 'running'
               CHECK (outcome IN ('running', 'succeeded', 'failed', 'released', 'expired', 'cancelled')),
    cause      TEXT,
    PRIMARY KEY (sweep_id, seed, fence),
    FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE
);

-- One row per finished seed.
CREATE TABLE results (
    sweep_id         TEXT NOT NULL,
    seed             INTEGER NOT NULL,
    fence            INTEGER NOT NULL,
    test_accuracy    REAL NOT NULL CHECK (test_accuracy >= 0 AND test_accuracy <= 1),
    test_loss        REAL NOT NULL,
    train_loss       REAL NOT NULL,
    train_accuracy   REAL NOT NULL CHECK (train_accuracy >= 0 AND train_accuracy <= 1),
    epochs           INTEGER NOT NULL CHECK (epochs > 0),
    seconds          REAL NOT NULL,
    worker_id        TEXT NOT NULL,
    device           TEXT NOT NULL,
    data_fingerprint TEXT NOT NULL,
    -- The run's factor seeds, copied from seeds.
    init_seed        INTEGER NOT NULL,
    order_seed       INTEGER NOT NULL,
    augment_seed     INTEGER NOT NULL,
    split_seed       INTEGER NOT NULL,
    -- The arithmetic used ('fp32' on a CPU) and whether the run repeats bit for bit.
    precision        TEXT NOT NULL CHECK (precision IN ('fp32', 'fp16', 'bf16')),
    deterministic    INTEGER NOT NULL,
    -- Top-5 test accuracy (task finetune-head), NULL otherwise.
    test_top5        REAL CHECK (test_top5 >= 0 AND test_top5 <= 1),
    -- On the run's held-out validation images (train.holdout > 0), NULL otherwise.
    val_loss         REAL,
    val_accuracy     REAL CHECK (val_accuracy >= 0 AND val_accuracy <= 1),
    finished_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (sweep_id, seed),
    FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE
);

-- One row per (sweep, seed, epoch), written as each epoch ends; `fence` is the lease that wrote it.
CREATE TABLE epoch_metrics (
    sweep_id       TEXT NOT NULL,
    seed           INTEGER NOT NULL,
    epoch          INTEGER NOT NULL CHECK (epoch > 0),
    fence          INTEGER NOT NULL,
    train_loss     REAL NOT NULL,
    train_accuracy REAL NOT NULL,
    -- NULL for an epoch without an evaluation (the sweep's eval_every).
    test_loss      REAL,
    test_accuracy  REAL,
    test_top5      REAL,
    val_loss       REAL,
    val_accuracy   REAL,
    lr             REAL NOT NULL,
    seconds        REAL NOT NULL,
    recorded_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (sweep_id, seed, epoch),
    FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE
);
