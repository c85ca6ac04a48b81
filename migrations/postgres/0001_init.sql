-- seedsweep schema, PostgreSQL. Users query sweeps, results and epoch_metrics directly; seeds and
-- attempts are the lease bookkeeping (see README, "Querying results with SQL").

CREATE TABLE sweeps (
    id           UUID PRIMARY KEY,
    -- Submission order: the claim serves older sweeps first.
    seq          BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    name         TEXT NOT NULL,
    task         TEXT NOT NULL,
    dataset      TEXT NOT NULL,
    -- The full resolved configuration (defaults filled in), as JSON.
    config       JSONB NOT NULL,
    max_attempts INTEGER NOT NULL CHECK (max_attempts > 0),
    -- Retries wait retry_backoff_seconds * 2^(failures - 1), at most retry_backoff_max_seconds,
    -- times a random factor in [0.5, 1.5).
    retry_backoff_seconds     DOUBLE PRECISION NOT NULL DEFAULT 10,
    retry_backoff_max_seconds DOUBLE PRECISION NOT NULL DEFAULT 600,
    -- Higher first; within a priority, older sweeps first.
    priority     INTEGER NOT NULL DEFAULT 0,
    -- 'paused' stops new leases; 'cancelled' also ends the leases held and is final.
    state        TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'paused', 'cancelled')),
    total_seeds  BIGINT NOT NULL CHECK (total_seeds > 0),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per (sweep, seed): its place in the lease lifecycle.
CREATE TABLE seeds (
    sweep_id         UUID NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    seed             BIGINT NOT NULL CHECK (seed >= 0),
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'leased', 'done', 'failed', 'cancelled')),
    -- The seed of each source of randomness for this run (see README, "Seed factors").
    init_seed        BIGINT NOT NULL CHECK (init_seed >= 0),
    order_seed       BIGINT NOT NULL CHECK (order_seed >= 0),
    augment_seed     BIGINT NOT NULL CHECK (augment_seed >= 0),
    split_seed       BIGINT NOT NULL CHECK (split_seed >= 0),
    -- Grows by one with each lease; every worker write names it.
    fence            BIGINT NOT NULL DEFAULT 0,
    -- Attempts that ended badly (reported failures and expired leases).
    failures         INTEGER NOT NULL DEFAULT 0,
    worker_id        TEXT,
    -- A pending seed waiting out its retry backoff is not claimed before this.
    not_before       TIMESTAMPTZ,
    lease_expires_at TIMESTAMPTZ,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sweep_id, seed)
);
-- Only what the claim needs; lease_expires_at stays unindexed so heartbeats are HOT updates.
CREATE INDEX seeds_pending ON seeds (sweep_id, seed) WHERE state = 'pending';
CREATE INDEX seeds_leased ON seeds (sweep_id, seed) WHERE state = 'leased';

-- One row per lease of a seed, with how it ended.
CREATE TABLE attempts (
    sweep_id   UUID NOT NULL,
    seed       BIGINT NOT NULL,
    fence      BIGINT NOT NULL,
    worker_id  TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    ended_at   TIMESTAMPTZ,
    outcome    TEXT NOT NULL DEFAULT 'running'
               CHECK (outcome IN ('running', 'succeeded', 'failed', 'released', 'expired', 'cancelled')),
    cause      TEXT,
    PRIMARY KEY (sweep_id, seed, fence),
    FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE
);

-- One row per finished seed.
CREATE TABLE results (
    sweep_id         UUID NOT NULL,
    seed             BIGINT NOT NULL,
    fence            BIGINT NOT NULL,
    test_accuracy    DOUBLE PRECISION NOT NULL CHECK (test_accuracy >= 0 AND test_accuracy <= 1),
    test_loss        DOUBLE PRECISION NOT NULL,
    train_loss       DOUBLE PRECISION NOT NULL,
    train_accuracy   DOUBLE PRECISION NOT NULL CHECK (train_accuracy >= 0 AND train_accuracy <= 1),
    epochs           INTEGER NOT NULL CHECK (epochs > 0),
    seconds          DOUBLE PRECISION NOT NULL,
    worker_id        TEXT NOT NULL,
    device           TEXT NOT NULL,
    data_fingerprint TEXT NOT NULL,
    -- The run's factor seeds, copied from seeds.
    init_seed        BIGINT NOT NULL,
    order_seed       BIGINT NOT NULL,
    augment_seed     BIGINT NOT NULL,
    split_seed       BIGINT NOT NULL,
    -- The arithmetic used ('fp32' on a CPU) and whether the run repeats bit for bit.
    precision        TEXT NOT NULL CHECK (precision IN ('fp32', 'fp16', 'bf16')),
    deterministic    BOOLEAN NOT NULL,
    -- Top-5 test accuracy (task finetune-head), NULL otherwise.
    test_top5        DOUBLE PRECISION CHECK (test_top5 >= 0 AND test_top5 <= 1),
    -- On the run's held-out validation images (train.holdout > 0), NULL otherwise.
    val_loss         DOUBLE PRECISION,
    val_accuracy     DOUBLE PRECISION CHECK (val_accuracy >= 0 AND val_accuracy <= 1),
    finished_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sweep_id, seed),
    FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE
);

-- One row per (sweep, seed, epoch), written as each epoch ends; `fence` is the lease that wrote it.
CREATE TABLE epoch_metrics (
    sweep_id       UUID NOT NULL,
    seed           BIGINT NOT NULL,
    epoch          INTEGER NOT NULL CHECK (epoch > 0),
    fence          BIGINT NOT NULL,
    train_loss     DOUBLE PRECISION NOT NULL,
    train_accuracy DOUBLE PRECISION NOT NULL,
    -- NULL for an epoch without an evaluation (the sweep's eval_every).
    test_loss      DOUBLE PRECISION,
    test_accuracy  DOUBLE PRECISION,
    test_top5      DOUBLE PRECISION,
    val_loss       DOUBLE PRECISION,
    val_accuracy   DOUBLE PRECISION,
    lr             DOUBLE PRECISION NOT NULL,
    seconds        DOUBLE PRECISION NOT NULL,
    recorded_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sweep_id, seed, epoch),
    FOREIGN KEY (sweep_id, seed) REFERENCES seeds (sweep_id, seed) ON DELETE CASCADE
);
