-- A sweep's seeds are inserted in batches, each its own short transaction, so that a big
-- submission never holds the database for long. Until the last batch is in, `loading_at` holds
-- the time of the latest one: the claim skips the sweep and listings hide it. A load that stopped
-- more than ten minutes ago (its coordinator died) is deleted by the next submission.
ALTER TABLE sweeps ADD COLUMN loading_at TIMESTAMPTZ;
