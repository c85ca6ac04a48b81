-- The metrics of a task = "command" program that are not known columns, as one JSON object of
-- name -> number per row (NULL for the built-in tasks). Query them with
-- json_extract(custom, '$.name').
ALTER TABLE results ADD COLUMN custom TEXT;
ALTER TABLE epoch_metrics ADD COLUMN custom TEXT;
