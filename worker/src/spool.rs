//! The spool: a finished seed's result and its epochs, kept on local disk from the moment
//! training ends until the coordinator has recorded them, so that no outage and no crash of the
//! worker loses a trained seed. One file per lease, written atomically (a scratch file, synced,
//! then renamed) and checksummed; a worker delivers what its spool holds before it leases
//! anything new. Whether a late result still counts is the coordinator's call, by the fence.

use prost::Message;
use seedsweep_proto::v1 as pb;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The first bytes of a spool file: the format, then the payload's SHA-256, then the payload
/// (a `SpooledResult`).
const MAGIC: &[u8; 16] = b"seedsweep-spool1";
const SUFFIX: &str = "result";

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

/// A result found in the spool.
#[derive(Debug)]
pub struct Spooled {
    pub path: PathBuf,
    pub result: pb::SpooledResult,
}

impl Spool {
    /// Opens (creating) the spool folder, and checks that this worker can write to it.
    pub fn open(dir: &Path) -> anyhow::Result<Spool> {
        use anyhow::Context;
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the spool folder {} (set --spool-dir to a writable local folder)",
                dir.display()
            )
        })?;
        let probe = dir.join(format!(".probe.{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .with_context(|| {
                format!(
                    "cannot write to the spool folder {} (set --spool-dir to a writable local folder)",
                    dir.display()
                )
            })?;
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    /// Keeps `result` until [`Spool::remove`]: on disk, synced, under a name that says which
    /// lease it is. A second put of the same lease replaces the first.
    pub fn put(&self, result: &pb::SpooledResult) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let lease = result
            .result
            .as_ref()
            .and_then(|r| r.lease.as_ref())
            .ok_or_else(|| std::io::Error::other("a spooled result without its lease"))?;
        let name = format!("{}-{}-{}.{SUFFIX}", lease.sweep_id, lease.seed, lease.fence);
        let path = self.dir.join(name);
        let scratch = self
            .dir
            .join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
        let written = (|| {
            // Made new, never through a link someone left where it goes.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&scratch)?;
            f.write_all(&encode(result))?;
            f.sync_all()?;
            std::fs::rename(&scratch, &path)?;
            // The rename itself survives a power cut once the folder is synced.
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&scratch);
        }
        written.map(|()| path)
    }

    /// Forgets a result the coordinator has (or refused for good).
    pub fn remove(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a delivered result from the spool");
        }
    }

    /// The results waiting for `coordinator`, oldest first. A file that fails its checksum is
    /// renamed `*.corrupt` (kept for a person to look at) and reported; results of another
    /// coordinator are left where they are.
    pub fn pending(&self, coordinator: &str) -> std::io::Result<Vec<Spooled>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some(SUFFIX) {
                continue;
            }
            let modified = std::fs::metadata(&path)?.modified()?;
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| decode(&b))
            {
                Ok(result) if result.coordinator == coordinator => {
                    found.push((modified, Spooled { path, result }))
                }
                Ok(result) => tracing::warn!(
                    path = %path.display(), coordinator = result.coordinator,
                    "the spool holds a result for another coordinator; leaving it"
                ),
                Err(problem) => {
                    let aside = path.with_extension("corrupt");
                    tracing::error!(path = %path.display(), problem, aside = %aside.display(), "a spooled result is unreadable; set aside");
                    std::fs::rename(&path, &aside)?;
                }
            }
        }
        found.sort_by_key(|(modified, _)| *modified);
        Ok(found.into_iter().map(|(_, s)| s).collect())
    }
}

fn encode(result: &pb::SpooledResult) -> Vec<u8> {
    let payload = result.encode_to_vec();
    let mut out = Vec::with_capacity(MAGIC.len() + 32 + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

fn decode(bytes: &[u8]) -> Result<pb::SpooledResult, String> {
    let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) else {
        return Err("not a seedsweep spool file".into());
    };
    if rest.len() < 32 {
        return Err("truncated".into());
    }
    let (sum, payload) = rest.split_at(32);
    if Sha256::digest(payload)[..] != *sum {
        return Err("checksum mismatch".into());
    }
    pb::SpooledResult::decode(payload).map_err(|e| format!("undecodable: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(seed: i64) -> pb::SpooledResult {
        let lease = pb::LeaseRef {
            sweep_id: "5d1b3b0e-8d0c-4a62-9d4c-3f4b8b7d9a10".into(),
            seed,
            fence: 3,
            // The lease's key goes with the result: delivered after a restart, it is presented.
            key: vec![7; 16],
        };
        pb::SpooledResult {
            coordinator: "http://head:50051".into(),
            epochs: vec![pb::EpochMetrics {
                lease: Some(lease.clone()),
                epoch: 1,
                train_loss: Some(1.5),
                ..Default::default()
            }],
            result: Some(pb::CompleteSeedRequest {
                lease: Some(lease),
                test_accuracy: Some(0.5),
                epochs: 1,
                test_correct: vec![0b1010_1010; 1250],
                test_examples: 10_000,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_result_comes_back_as_it_went_in_and_is_gone_once_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        let path = spool.put(&result(7)).unwrap();
        spool.put(&result(8)).unwrap();
        let found = spool.pending("http://head:50051").unwrap();
        assert_eq!(found.len(), 2);
        let seven = found.iter().find(|s| s.path == path).unwrap();
        assert_eq!(seven.result, result(7));
        assert!(spool.pending("http://elsewhere:50051").unwrap().is_empty());
        spool.remove(&path);
        assert_eq!(spool.pending("http://head:50051").unwrap().len(), 1);
    }

    #[test]
    fn a_damaged_file_is_set_aside_not_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let path = spool.put(&result(1)).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        std::fs::write(dir.path().join("short.result"), b"seedsweep-spool1").unwrap();
        assert!(spool.pending("http://head:50051").unwrap().is_empty());
        assert!(path.with_extension("corrupt").exists());
        assert!(dir.path().join("short.corrupt").exists());
    }
}
