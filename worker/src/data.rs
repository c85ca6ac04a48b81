//! Datasets in the CIFAR-10 binary layout: `DATA_DIR/NAME/cifar-10-batches-bin/data_batch_1..5.bin`
//! and `test_batch.bin`, each a sequence of 3073-byte records (a label byte, then 1024 red, 1024
//! green and 1024 blue bytes, row-major). Files may hold any number of records.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

pub const SIDE: usize = 32;
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
pub const CLASSES: usize = 10;
pub const BATCH_DIR: &str = "cifar-10-batches-bin";
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILE: &str = "test_batch.bin";

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset's files are not there: a problem of the host, not of the seed.
    #[error("dataset `{name}` is missing: {path} does not exist. {hint}")]
    Missing {
        name: String,
        path: PathBuf,
        hint: String,
    },
    #[error("{path} is not a CIFAR-10 binary file: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error("failed to read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "dataset `cifar10` is missing and could not be downloaded ({reason}). Download {CIFAR10_URL} \
         (MD5 {CIFAR10_MD5}) where there is internet access and unpack it so that {} holds \
         data_batch_1.bin .. data_batch_5.bin and test_batch.bin", dir.display()
    )]
    Download { reason: String, dir: PathBuf },
}

/// One split as raw bytes: images `[n, 3, 32, 32]` uint8 and labels `[n]` int64, on the CPU.
pub struct Split {
    pub images: Tensor,
    pub labels: Tensor,
}

impl Split {
    pub fn len(&self) -> i64 {
        self.labels.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Dataset {
    pub name: String,
    pub train: Split,
    pub test: Split,
    /// `sha256:` of the six files' bytes, in their canonical order: results name the exact data.
    pub fingerprint: String,
    /// What runs derive from the data once and share, by key (see [`Dataset::cached`]).
    derived: Mutex<HashMap<String, Vec<Tensor>>>,
}

// SAFETY: a Dataset's tensors are written once, when it is loaded or (`derived`) first made
// under the lock, and only read afterwards (shallow clones, copies to a device, index_select),
// which libtorch allows from several threads at once; tch marks Tensor Send but not Sync only
// because it cannot know that.
unsafe impl Sync for Dataset {}

impl Dataset {
    pub fn new(name: &str, train: Split, test: Split, fingerprint: String) -> Dataset {
        Dataset {
            name: name.to_string(),
            train,
            test,
            fingerprint,
            derived: Mutex::new(HashMap::new()),
        }
    }

    /// The tensors `make` gives for `key`, made once and shared by every later run: a warm
    /// worker keeps its training set on the device, and whatever it computes from the data alone.
    /// The callers must not write to them.
    pub fn cached(&self, key: &str, make: impl FnOnce() -> Vec<Tensor>) -> Vec<Tensor> {
        let mut derived = self.derived.lock().unwrap_or_else(|p| p.into_inner());
        derived
            .entry(key.to_string())
            .or_insert_with(make)
            .iter()
            .map(Tensor::shallow_clone)
            .collect()
    }

    /// The training images (uint8) and labels on `device`, uploaded once.
    pub fn train_on(&self, device: Device) -> (Tensor, Tensor) {
        let key = format!("train/{device:?}");
        let [images, labels]: [Tensor; 2] = self
            .cached(&key, || {
                vec![
                    self.train.images.to_device(device),
                    self.train.labels.to_device(device),
                ]
            })
            .try_into()
            .expect("two tensors were cached");
        (images, labels)
    }
}

pub fn dataset_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(name).join(BATCH_DIR)
}

/// Loads dataset `name` from `data_dir`, checking every file's layout.
pub fn load(data_dir: &Path, name: &str) -> Result<Dataset, DataError> {
    let dir = dataset_dir(data_dir, name);
    for f in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        let path = dir.join(f);
        if !path.exists() {
            let hint = if name == "cifar10" {
                format!(
                    "Put the files of cifar-10-binary.tar.gz (from {CIFAR10_URL}) in {}",
                    dir.display()
                )
            } else {
                format!(
                    "Create it with `worker make-dataset synthetic --out {}`, or copy a dataset in the CIFAR-10 binary layout there",
                    data_dir.join(name).display()
                )
            };
            return Err(DataError::Missing {
                name: name.to_string(),
                path,
                hint,
            });
        }
    }
    let mut hasher = Sha256::new();
    let mut train_bytes = Vec::new();
    for f in TRAIN_FILES {
        let bytes = read_records(&dir.join(f))?;
        hasher.update(&bytes);
        train_bytes.extend_from_slice(&bytes);
    }
    let test_bytes = read_records(&dir.join(TEST_FILE))?;
    hasher.update(&test_bytes);
    for (bytes, what) in [
        (&train_bytes, "data_batch_*.bin files hold"),
        (&test_bytes, "test_batch.bin holds"),
    ] {
        if bytes.is_empty() {
            return Err(DataError::Corrupt {
                path: dir.clone(),
                problem: format!("its {what} no records"),
            });
        }
    }
    Ok(Dataset::new(
        name,
        split_from_records(&train_bytes),
        split_from_records(&test_bytes),
        format!("sha256:{:x}", hasher.finalize()),
    ))
}

fn read_records(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let corrupt = |problem: String| DataError::Corrupt {
        path: path.to_path_buf(),
        problem,
    };
    if bytes.len() % RECORD_BYTES != 0 {
        return Err(corrupt(format!(
            "{} bytes is not a whole number of {RECORD_BYTES}-byte records (the file is truncated or not CIFAR-10 binary)",
            bytes.len()
        )));
    }
    if let Some((i, rec)) = bytes
        .chunks(RECORD_BYTES)
        .enumerate()
        .find(|(_, r)| r[0] as usize >= CLASSES)
    {
        return Err(corrupt(format!(
            "record {i} has label {}; labels are 0..9",
            rec[0]
        )));
    }
    Ok(bytes)
}

fn split_from_records(bytes: &[u8]) -> Split {
    let n = bytes.len() / RECORD_BYTES;
    let mut labels = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * IMAGE_BYTES);
    for rec in bytes.chunks(RECORD_BYTES) {
        labels.push(rec[0] as i64);
        pixels.extend_from_slice(&rec[1..]);
    }
    Split {
        images: Tensor::from_slice(&pixels).view([n as i64, 3, SIDE as i64, SIDE as i64]),
        labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
    }
}

/// Writes records as CIFAR-10 binary files: the train records spread over the five batch files.
/// Files are written to a scratch folder and renamed into place, so a crash leaves no half set.
pub fn write_dataset(out: &Path, train: &[u8], test: &[u8]) -> std::io::Result<()> {
    let dir = out.join(BATCH_DIR);
    let tmp = out.join(format!(".{BATCH_DIR}.tmp.{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    let n = train.len() / RECORD_BYTES;
    let per_file = n.div_ceil(TRAIN_FILES.len());
    for (i, f) in TRAIN_FILES.iter().enumerate() {
        let start = (i * per_file).min(n) * RECORD_BYTES;
        let end = ((i + 1) * per_file).min(n) * RECORD_BYTES;
        fs::File::create(tmp.join(f))?.write_all(&train[start..end])?;
    }
    fs::File::create(tmp.join(TEST_FILE))?.write_all(test)?;
    fs::write(
        tmp.join("batches.meta.txt"),
        (0..CLASSES)
            .map(|c| format!("class{c}\n"))
            .collect::<String>(),
    )?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&tmp, &dir)
}

/// Generates a dataset with class-dependent structure plus noise: each class has its own colour
/// cast and oriented stripe pattern; every image shifts its pattern at random, varies its contrast,
/// borrows part of another class's pattern and adds pixel noise. A ResNet learns it well but not
/// perfectly, so different seeds end with different accuracies. Returns (train, test) records.
pub fn synthetic_records(train: usize, test: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    struct Class {
        colour: [f32; 3],
        freq: f32,
        angle: f32,
        blob: (f32, f32),
    }
    let classes: Vec<Class> = (0..CLASSES)
        .map(|c| Class {
            colour: [
                rng.random_range(-40.0..40.0),
                rng.random_range(-40.0..40.0),
                rng.random_range(-40.0..40.0),
            ],
            freq: 0.25 + 0.12 * (c % 5) as f32 + rng.random_range(0.0..0.05),
            angle: std::f32::consts::PI * (c as f32 / CLASSES as f32) + rng.random_range(-0.1..0.1),
            blob: (rng.random_range(8.0..24.0), rng.random_range(8.0..24.0)),
        })
        .collect();
    let pattern = |k: &Class, x: f32, y: f32, phase: f32| -> f32 {
        let (s, c) = k.angle.sin_cos();
        let stripes = ((x * c + y * s) * k.freq + phase).sin();
        let d2 = (x - k.blob.0).powi(2) + (y - k.blob.1).powi(2);
        stripes + 1.5 * (-d2 / 40.0).exp()
    };
    let mut make = |count: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(count * RECORD_BYTES);
        for _ in 0..count {
            let label = rng.random_range(0..CLASSES);
            let other = (label + rng.random_range(1..CLASSES)) % CLASSES;
            let mix: f32 = rng.random_range(0.0..0.8);
            let contrast: f32 = rng.random_range(15.0..45.0);
            let (dx, dy): (f32, f32) = (rng.random_range(-4.0..4.0), rng.random_range(-4.0..4.0));
            let phase: f32 = rng.random_range(0.0..std::f32::consts::TAU);
            out.push(label as u8);
            for ch in 0..3 {
                for y in 0..SIDE {
                    for x in 0..SIDE {
                        let (fx, fy) = (x as f32 + dx, y as f32 + dy);
                        let v = (1.0 - mix) * pattern(&classes[label], fx, fy, phase)
                            + mix * pattern(&classes[other], fx, fy, phase);
                        let noise: f32 =
                            rng.random_range(-1.0f32..1.0) + rng.random_range(-1.0f32..1.0);
                        let p = 128.0
                            + classes[label].colour[ch] * (1.0 - mix)
                            + contrast * v
                            + 45.0 * noise;
                        out.push(p.clamp(0.0, 255.0) as u8);
                    }
                }
            }
        }
        out
    };
    let train_records = make(train);
    let test_records = make(test);
    (train_records, test_records)
}

pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// How long a CIFAR-10 download may take to connect, to answer, and to send the whole archive
/// (170 MB): a stalled mirror fails the download instead of holding the lease for ever.
const DOWNLOAD_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const DOWNLOAD_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
const DOWNLOAD_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Moves an unpacked copy of the batches into place. Another process, on this host or another
/// that shares the folder, may have put its complete copy there first: that copy is kept.
fn install(unpacked: &Path, dest: &Path) -> Result<(), DataError> {
    match fs::rename(unpacked, dest) {
        Ok(()) => Ok(()),
        Err(_) if is_complete(dest) => Ok(()),
        Err(source) => Err(DataError::Io {
            path: dest.to_path_buf(),
            source,
        }),
    }
}

/// Whether `dir` holds every batch file.
fn is_complete(dir: &Path) -> bool {
    TRAIN_FILES
        .iter()
        .chain([&TEST_FILE])
        .all(|f| dir.join(f).is_file())
}

/// Downloads CIFAR-10 from `url` (the official one, or a mirror), checks its MD5 and unpacks it into
/// `DATA_DIR/cifar10`. Everything happens in a scratch folder that is renamed into place only when
/// complete, so a failed download leaves nothing behind.
pub fn download_cifar10(data_dir: &Path, url: &str) -> Result<(), DataError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DataError::Io { path, source }
    };
    fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    // One download at a time among the workers that share the folder (an exclusive lock on a
    // file beside the dataset, released when the file closes, also when a worker dies); the
    // others wait, then find the complete copy. The lock file stays: deleting it would let a
    // waiter lock a file no later worker sees.
    let lock_path = data_dir.join(".cifar10.download.lock");
    let lock = fs::File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    if is_complete(&data_dir.join("cifar10").join(BATCH_DIR)) {
        return Ok(());
    }
    fetch_cifar10(data_dir, url)
}

/// The download itself, under [`download_cifar10`]'s lock.
fn fetch_cifar10(data_dir: &Path, url: &str) -> Result<(), DataError> {
    use md5::Md5;
    let target = data_dir.join("cifar10");
    let fail = |reason: String| DataError::Download {
        reason,
        dir: dataset_dir(data_dir, "cifar10"),
    };
    fs::create_dir_all(&target).map_err(|source| DataError::Io {
        path: target.clone(),
        source,
    })?;
    // Unique across the hosts and processes that may share this folder.
    let scratch = target.join(format!(
        ".download.{}.{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    fs::create_dir_all(&scratch).map_err(|source| DataError::Io {
        path: scratch.clone(),
        source,
    })?;
    let result = (|| {
        let archive = scratch.join("cifar-10-binary.tar.gz");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(DOWNLOAD_CONNECT_TIMEOUT))
            .timeout_recv_response(Some(DOWNLOAD_RESPONSE_TIMEOUT))
            .timeout_recv_body(Some(DOWNLOAD_BODY_TIMEOUT))
            .build()
            .into();
        let response = agent
            .get(url)
            .call()
            .map_err(|e| fail(format!("GET {url}: {e}")))?;
        let mut body = response.into_body().into_reader();
        let mut file = fs::File::create(&archive).map_err(|source| DataError::Io {
            path: archive.clone(),
            source,
        })?;
        let mut hasher = Md5::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = body
                .read(&mut buf)
                .map_err(|e| fail(format!("reading {url}: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(|source| DataError::Io {
                path: archive.clone(),
                source,
            })?;
        }
        let md5 = format!("{:x}", hasher.finalize());
        if md5 != CIFAR10_MD5 {
            return Err(fail(format!(
                "MD5 mismatch: got {md5}, expected {CIFAR10_MD5}"
            )));
        }
        let tar_gz = fs::File::open(&archive).map_err(|source| DataError::Io {
            path: archive.clone(),
            source,
        })?;
        tar::Archive::new(flate2::read::GzDecoder::new(tar_gz))
            .unpack(&scratch)
            .map_err(|e| fail(format!("unpacking {}: {e}", archive.display())))?;
        install(&scratch.join(BATCH_DIR), &target.join(BATCH_DIR))
    })();
    let _ = fs::remove_dir_all(&scratch);
    // Leave no empty dataset folder behind either.
    let _ = fs::remove_dir(&target);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that finds another downloading waits for it and takes its complete copy,
    /// fetching nothing itself.
    #[test]
    fn a_second_download_waits_for_the_first_and_takes_its_copy() {
        let dir = tempfile::tempdir().unwrap();
        let lock = fs::File::create(dir.path().join(".cifar10.download.lock")).unwrap();
        lock.lock().unwrap();
        let data_dir = dir.path().to_path_buf();
        // Nothing listens there: fetching would fail.
        let waiter =
            std::thread::spawn(move || download_cifar10(&data_dir, "http://127.0.0.1:9/x"));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!waiter.is_finished(), "the second download did not wait");
        let (train, test) = synthetic_records(10, 10, 1);
        write_dataset(&dir.path().join("cifar10"), &train, &test).unwrap();
        drop(lock);
        waiter.join().unwrap().unwrap();
    }

    fn batches(dir: &Path, text: &str) {
        fs::create_dir_all(dir).unwrap();
        for f in TRAIN_FILES.iter().chain([&TEST_FILE]) {
            fs::write(dir.join(f), text).unwrap();
        }
    }

    /// Two downloads into shared storage: the first copy in place wins, the second is accepted
    /// as done; a half copy in the way is an error, not a success.
    #[test]
    fn installing_a_copy_keeps_a_complete_one_already_there() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join(BATCH_DIR);
        let (first, second) = (root.path().join("a"), root.path().join("b"));
        batches(&first, "first");
        batches(&second, "second");
        install(&first, &dest).unwrap();
        install(&second, &dest).unwrap();
        assert_eq!(fs::read_to_string(dest.join(TEST_FILE)).unwrap(), "first");

        let half = root.path().join("half");
        fs::create_dir_all(half.join(BATCH_DIR)).unwrap();
        fs::write(half.join(BATCH_DIR).join(TEST_FILE), "partial").unwrap();
        let third = root.path().join("c");
        batches(&third, "third");
        assert!(install(&third, &half.join(BATCH_DIR)).is_err());
    }

    #[test]
    fn writes_and_reads_back_the_binary_layout() {
        let dir = tempfile::tempdir().unwrap();
        let (train, test) = synthetic_records(23, 7, 1);
        write_dataset(&dir.path().join("s"), &train, &test).unwrap();
        let d = load(dir.path(), "s").unwrap();
        assert_eq!((d.train.len(), d.test.len()), (23, 7));
        assert_eq!(d.train.images.size(), vec![23, 3, 32, 32]);
        assert_eq!(d.train.labels.int64_value(&[0]), train[0] as i64);
        assert_eq!(d.train.images.int64_value(&[0, 0, 0, 1]), train[2] as i64);
        let again = load(dir.path(), "s").unwrap();
        assert_eq!(d.fingerprint, again.fingerprint);
    }

    #[test]
    fn generation_is_seeded() {
        assert_eq!(synthetic_records(5, 2, 9), synthetic_records(5, 2, 9));
        assert_ne!(synthetic_records(5, 2, 9), synthetic_records(5, 2, 10));
    }

    #[test]
    fn rejects_corrupt_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(dir.path(), "nothing"),
            Err(DataError::Missing { .. })
        ));
        let (train, test) = synthetic_records(10, 2, 1);
        write_dataset(&dir.path().join("s"), &train, &test).unwrap();
        let f = dataset_dir(dir.path(), "s").join(TEST_FILE);
        fs::write(&f, &test[..100]).unwrap();
        let e = load(dir.path(), "s").err().unwrap().to_string();
        assert!(
            e.contains("test_batch.bin") && e.contains("truncated"),
            "{e}"
        );
        let mut bad = test.clone();
        bad[0] = 42;
        fs::write(&f, &bad).unwrap();
        assert!(
            load(dir.path(), "s")
                .err()
                .unwrap()
                .to_string()
                .contains("label 42")
        );
    }
}
