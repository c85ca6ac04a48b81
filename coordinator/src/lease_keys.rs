//! Lease keys: whoever holds a worker token can name any lease (sweep, seed, fence: the fence
//! is a small number, easily guessed), so every write under a lease also presents the lease's
//! key, 16 random bytes only the worker granted the lease received. Checked here, for every
//! heartbeat, epoch row, completion and failure, before the store is asked to write: the
//! presented key's SHA-256 against the one the claim stored (`attempts.lease_key_hash`),
//! compared in constant time. A lease's hash never changes, so this replica keeps the ones it
//! granted or read (at most [`MOST`]), and a write costs a database read only the first time a
//! replica sees its lease.

use crate::store::{KeyHash, Store, key_hash};
use seedsweep_core::domain::{LeaseKey, LeaseRef};
use std::collections::HashMap;
use std::sync::Mutex;
use tonic::Status;

/// The most hashes kept; past it the map starts again empty (reads refill it).
const MOST: usize = 200_000;

#[derive(Default)]
pub struct LeaseKeys {
    known: Mutex<HashMap<(uuid::Uuid, i64, i64), [u8; 32]>>,
}

fn id(lease: LeaseRef) -> (uuid::Uuid, i64, i64) {
    (lease.sweep_id.0, lease.seed, lease.fence)
}

impl LeaseKeys {
    /// This replica granted `lease` with `key`.
    pub fn granted(&self, lease: LeaseRef, key: &LeaseKey) {
        self.remember(lease, key_hash(key));
    }

    fn remember(&self, lease: LeaseRef, hash: [u8; 32]) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MOST {
            known.clear();
        }
        known.insert(id(lease), hash);
    }

    /// Whether `presented` is `lease`'s key: FAILED_PRECONDITION if not (the caller does not
    /// hold the lease, as for a stale one). A lease granted before keys existed is checked by
    /// its fence alone, and one never granted is left to the store to refuse.
    pub async fn check(
        &self,
        store: &dyn Store,
        lease: LeaseRef,
        presented: &[u8],
    ) -> Result<(), Status> {
        let cached = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id(lease))
            .copied();
        let stored = match cached {
            Some(hash) => hash,
            None => match store
                .lease_key_hash(lease)
                .await
                .map_err(crate::service::status)?
            {
                KeyHash::Hash(hash) => {
                    self.remember(lease, hash);
                    hash
                }
                KeyHash::Unkeyed | KeyHash::NoLease => return Ok(()),
            },
        };
        let matches = <[u8; 16]>::try_from(presented)
            .is_ok_and(|key| same(&key_hash(&LeaseKey(key)), &stored));
        if !matches {
            return Err(Status::failed_precondition(format!(
                "{lease}: the lease key does not match: only the worker granted this lease may write under it"
            )));
        }
        Ok(())
    }
}

/// `a == b`, in time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_hashes_only() {
        let a = key_hash(&LeaseKey([7; 16]));
        let mut b = a;
        assert!(same(&a, &b));
        b[31] ^= 1;
        assert!(!same(&a, &b));
    }
}
