-- The SHA-256 of the lease's key (16 random bytes only the worker granted the lease receives);
-- every write under the lease presents the key. NULL for leases granted before keys existed:
-- their writes are checked by the fence alone.
ALTER TABLE attempts ADD COLUMN lease_key_hash BLOB;
