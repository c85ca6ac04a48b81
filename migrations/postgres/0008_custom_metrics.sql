-- The metrics of a task = "command" program that are not known columns, as one JSON object of
-- name -> number per row (NULL for the built-in tasks). Query them with
-- (custom->>'name')::float8.
ALTER TABLE results ADD COLUMN custom jsonb;
ALTER TABLE epoch_metrics ADD COLUMN custom jsonb;
