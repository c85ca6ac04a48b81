-- Where the attempt's output is, on the worker that ran it (task command: the run's log file
-- under the worker's --log-dir); NULL for the built-in tasks.
ALTER TABLE attempts ADD COLUMN log TEXT;
