-- Leases by deadline: every claim asks whether a lease is overdue (once the coordinator has
-- served for a TTL), which this answers from the earliest deadline rather than by reading every
-- held seed's row.
CREATE INDEX seeds_lease_deadline ON seeds (lease_expires_at) WHERE state = 'leased';
