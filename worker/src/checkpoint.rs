//! Checkpoints of a run in training: the model, the optimiser's momentum buffers, the loss
//! scaler and the position of every generator, with the metrics of the epochs done, so that a run
//! resumed on any worker ends with the same numbers as an uninterrupted one.
//!
//! One run's checkpoint is `DIR/SWEEP/seed-SEED/checkpoint.safetensors` (its metadata, as JSON
//! bytes, is the tensor `meta`) and `checkpoint.sha256` beside it, written by [`write_checked`]. A checkpoint whose checksum does not match,
//! that cannot be read, or that was made for other settings, data or seeds is ignored (with a
//! warning) and the run starts from scratch: never resumed from a wrong state.

use crate::train::EpochMetrics;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor, nn};

const FORMAT: u32 = 1;
const DATA_FILE: &str = "checkpoint.safetensors";
const SUM_FILE: &str = "checkpoint.sha256";

/// What a checkpoint holds besides the model and optimiser.
pub struct Checkpoint {
    pub epoch: u32,
    pub history: Vec<EpochMetrics>,
    /// The loss scaler's scale and growth tracker (float16 training only).
    pub scaler: Option<(Tensor, Tensor)>,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    key: String,
    epoch: u32,
    /// ChaCha word positions, as decimal strings (u128).
    order_position: String,
    augment_position: String,
    history: Vec<EpochMetrics>,
}

/// A checkpoint read back, ready to restore.
pub struct Loaded {
    pub epoch: u32,
    pub history: Vec<EpochMetrics>,
    pub scaler: Option<(Tensor, Tensor)>,
    tensors: HashMap<String, Tensor>,
    order_position: u128,
    augment_position: u128,
}

/// Where one run's checkpoint lives, and the key it must carry to be used.
pub struct CheckpointStore {
    dir: PathBuf,
    key: String,
}

impl CheckpointStore {
    /// `key` names everything that determines the run (settings, seeds, data): a checkpoint made
    /// under another key is not used.
    pub fn new(root: &Path, sweep_id: &str, seed: i64, key: &str) -> CheckpointStore {
        CheckpointStore {
            dir: root.join(sweep_id).join(format!("seed-{seed}")),
            key: key.to_string(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn save(
        &self,
        ckpt: &Checkpoint,
        vs: &nn::VarStore,
        buffers: &[Tensor],
        order_rng: &ChaCha8Rng,
        augment_rng: &ChaCha8Rng,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let meta = Meta {
            format: FORMAT,
            key: self.key.clone(),
            epoch: ckpt.epoch,
            order_position: order_rng.get_word_pos().to_string(),
            augment_position: augment_rng.get_word_pos().to_string(),
            history: ckpt.history.clone(),
        };
        let meta = serde_json::to_vec(&meta)?;
        let mut named: Vec<(String, Tensor)> = Vec::new();
        named.push(("meta".into(), Tensor::from_slice(&meta)));
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in vars {
            named.push((
                format!("model/{name}"),
                t.to_device(Device::Cpu).contiguous(),
            ));
        }
        for (i, b) in buffers.iter().enumerate() {
            named.push((
                format!("momentum/{i}"),
                b.to_device(Device::Cpu).contiguous(),
            ));
        }
        if let Some((scale, tracker)) = &ckpt.scaler {
            named.push(("scaler/scale".into(), scale.to_device(Device::Cpu)));
            named.push(("scaler/growth".into(), tracker.to_device(Device::Cpu)));
        }
        write_checked(&self.dir.join(DATA_FILE), &self.dir.join(SUM_FILE), &named)
    }

    /// The checkpoint, if there is a sound one for this run.
    pub fn load(&self) -> Option<Loaded> {
        let data = self.dir.join(DATA_FILE);
        if !data.exists() {
            return None;
        }
        match self.try_load(&data) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(path = %data.display(), problem = %e, "ignoring the checkpoint; training from scratch");
                None
            }
        }
    }

    fn try_load(&self, data: &Path) -> anyhow::Result<Loaded> {
        let mut tensors = read_checked(data, &self.dir.join(SUM_FILE))?;
        let meta = tensors
            .remove("meta")
            .ok_or_else(|| anyhow::anyhow!("it has no metadata"))?;
        let meta: Meta = serde_json::from_slice(&Vec::<u8>::try_from(&meta)?)?;
        anyhow::ensure!(
            meta.format == FORMAT,
            "it has format {}, this worker reads {FORMAT}",
            meta.format
        );
        anyhow::ensure!(
            meta.key == self.key,
            "it was made for other settings, seeds or data"
        );
        anyhow::ensure!(
            meta.history.len() == meta.epoch as usize,
            "it holds {} epochs of metrics for epoch {}",
            meta.history.len(),
            meta.epoch
        );
        let scaler = match (
            tensors.remove("scaler/scale"),
            tensors.remove("scaler/growth"),
        ) {
            (Some(s), Some(g)) => Some((s, g)),
            _ => None,
        };
        Ok(Loaded {
            epoch: meta.epoch,
            history: meta.history,
            scaler,
            tensors,
            order_position: meta.order_position.parse()?,
            augment_position: meta.augment_position.parse()?,
        })
    }
}

impl Loaded {
    /// Copies the saved state into a freshly built model, optimiser and generators.
    pub fn restore(
        &self,
        vs: &nn::VarStore,
        buffers: &mut [Tensor],
        order_rng: &mut ChaCha8Rng,
        augment_rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<()> {
        let get = |name: &str, like: &Tensor| -> anyhow::Result<&Tensor> {
            let t = self
                .tensors
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("the checkpoint lacks `{name}`"))?;
            anyhow::ensure!(
                t.size() == like.size() && t.kind() == like.kind(),
                "`{name}` has shape {:?} {:?}, the model {:?} {:?}",
                t.size(),
                t.kind(),
                like.size(),
                like.kind()
            );
            Ok(t)
        };
        tch::no_grad(|| -> anyhow::Result<()> {
            for (name, mut v) in vs.variables() {
                v.copy_(get(&format!("model/{name}"), &v)?);
            }
            for (i, b) in buffers.iter_mut().enumerate() {
                let saved = get(&format!("momentum/{i}"), b)?.shallow_clone();
                b.copy_(&saved);
            }
            Ok(())
        })?;
        order_rng.set_word_pos(self.order_position);
        augment_rng.set_word_pos(self.augment_position);
        Ok(())
    }
}

/// A temporary name beside `path`, for writing it whole before renaming it into place: random,
/// so that nothing can have planted a link where it is written (the folder may be shared with
/// the programs of task command).
fn temporary(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(
        ".{name}.tmp.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

/// Writes `named` tensors to `data` (safetensors) and their SHA-256 to `sum`, each to a temporary
/// file synced and renamed into place, the checksum last: a reader never trusts a partial file.
/// Also the format of the feature cache.
pub(crate) fn write_checked(
    data: &Path,
    sum: &Path,
    named: &[(String, Tensor)],
) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temporary(data);
    Tensor::write_safetensors(named, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    let bytes = std::fs::read(&tmp)?;
    std::fs::rename(&tmp, data)?;
    let sum_tmp = temporary(sum);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&sum_tmp)?;
    writeln!(f, "{:x}", Sha256::digest(&bytes))?;
    f.sync_all()?;
    std::fs::rename(&sum_tmp, sum)?;
    Ok(())
}

/// Reads what [`write_checked`] wrote, refusing a file whose checksum is missing or differs.
pub(crate) fn read_checked(data: &Path, sum: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(data)?;
    let want = std::fs::read_to_string(sum)
        .map_err(|e| anyhow::anyhow!("no readable checksum beside it ({e})"))?;
    anyhow::ensure!(
        want.trim() == format!("{:x}", Sha256::digest(&bytes)),
        "its checksum does not match (a partial or corrupt file)"
    );
    Ok(Tensor::read_safetensors(data)?.into_iter().collect())
}
