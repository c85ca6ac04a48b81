//! ImageFolder datasets, as ImageNet is usually stored: `DATA_DIR/NAME/train/<class>/*` and
//! `DATA_DIR/NAME/val/<class>/*`, images in JPEG or PNG. Classes are the sorted folder names of
//! `train/`; `val/` may hold any of them.
//!
//! Decoding runs on a pool of CPU threads, a chunk of images at a time, with the next chunk
//! decoded while the current one is used (bounded prefetch: two chunks in memory at most). An
//! unreadable image is reported with its path and either skipped or made an error, per
//! [`OnBadImage`]; never a crash without a message.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// File extensions read as images (case-insensitive).
pub const EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("{path}: {problem}")]
    Layout { path: PathBuf, problem: String },
    #[error("failed to read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot decode image {path}: {problem} (set `bad_images = \"skip\"` to skip such files)"
    )]
    BadImage { path: String, problem: String },
}

/// One image file and its class index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub path: PathBuf,
    pub label: i64,
}

/// An image to decode: a file ([`Item`]) or pixels already in memory ([`Pixels`]).
pub trait Picture: Sync {
    fn label(&self) -> i64;
    /// What an error message calls it (a file's path).
    fn name(&self) -> String;
    fn rgb(&self) -> Result<image::RgbImage, String>;
}

impl Picture for Item {
    fn label(&self) -> i64 {
        self.label
    }
    fn name(&self) -> String {
        self.path.display().to_string()
    }
    fn rgb(&self) -> Result<image::RgbImage, String> {
        decode(&self.path)
    }
}

impl<P: Picture> Picture for &P {
    fn label(&self) -> i64 {
        (*self).label()
    }
    fn name(&self) -> String {
        (*self).name()
    }
    fn rgb(&self) -> Result<image::RgbImage, String> {
        (*self).rgb()
    }
}

/// One image of a CIFAR-layout set held in memory: channel-major bytes of a `side` x `side` image.
pub struct Pixels<'a> {
    pub chw: &'a [u8],
    pub side: u32,
    pub label: i64,
    pub index: usize,
}

impl Picture for Pixels<'_> {
    fn label(&self) -> i64 {
        self.label
    }
    fn name(&self) -> String {
        format!("training image {}", self.index)
    }
    fn rgb(&self) -> Result<image::RgbImage, String> {
        let plane = (self.side * self.side) as usize;
        if self.chw.len() != 3 * plane {
            return Err(format!("{} bytes, not 3 x {plane}", self.chw.len()));
        }
        Ok(image::RgbImage::from_fn(self.side, self.side, |x, y| {
            let i = (y * self.side + x) as usize;
            image::Rgb([self.chw[i], self.chw[plane + i], self.chw[2 * plane + i]])
        }))
    }
}

#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub train: Vec<Item>,
    pub val: Vec<Item>,
    /// `sha256:` over every file's split, class, name and size: it names the exact file set without
    /// reading every byte of a large dataset.
    pub fingerprint: String,
}

/// What to do with an image that cannot be decoded (the sweep file's `on_bad_image`).
pub use seedsweep_core::spec::finetune::BadImages as OnBadImage;

/// Whether `dir` looks like an ImageFolder dataset (it has `train/`).
pub fn is_image_folder(dir: &Path) -> bool {
    dir.join("train").is_dir()
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, FolderError> {
    let read = std::fs::read_dir(dir).map_err(|source| FolderError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(|source| FolderError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Scans `root` (holding `train/` and `val/`).
pub fn scan(root: &Path) -> Result<ImageFolder, FolderError> {
    let layout = |path: &Path, problem: String| FolderError::Layout {
        path: path.to_path_buf(),
        problem,
    };
    let train_dir = root.join("train");
    let val_dir = root.join("val");
    for d in [&train_dir, &val_dir] {
        if !d.is_dir() {
            return Err(layout(
                d,
                "missing: an ImageFolder dataset has train/<class>/* and val/<class>/*".into(),
            ));
        }
    }
    let classes: Vec<String> = sorted_entries(&train_dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
        .collect();
    if classes.len() < 2 {
        return Err(layout(
            &train_dir,
            format!(
                "has {} class folder(s); a classification dataset needs at least 2",
                classes.len()
            ),
        ));
    }
    let mut hasher = Sha256::new();
    let mut split = |name: &str, dir: &Path| -> Result<Vec<Item>, FolderError> {
        let mut items = Vec::new();
        for class_dir in sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()) {
            let class = class_dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let Some(label) = classes.iter().position(|c| *c == class) else {
                return Err(layout(
                    &class_dir,
                    format!("class `{class}` is not among the classes of train/"),
                ));
            };
            for file in sorted_entries(&class_dir)?
                .into_iter()
                .filter(|p| is_image(p))
            {
                let size = std::fs::metadata(&file)
                    .map_err(|source| FolderError::Io {
                        path: file.clone(),
                        source,
                    })?
                    .len();
                let file_name = file.file_name().unwrap_or_default().to_string_lossy();
                hasher.update(format!("{name}/{class}/{file_name}\0{size}\0"));
                items.push(Item {
                    path: file,
                    label: label as i64,
                });
            }
        }
        if items.is_empty() {
            return Err(layout(dir, "holds no .jpg, .jpeg or .png images".into()));
        }
        Ok(items)
    };
    let train = split("train", &train_dir)?;
    let val = split("val", &val_dir)?;
    Ok(ImageFolder {
        root: root.to_path_buf(),
        classes,
        train,
        val,
        fingerprint: format!("sha256:{:x}", hasher.finalize()),
    })
}

/// How an image becomes a `size` x `size` RGB input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    /// Evaluation: resize the shorter side to size * 256/224, then the centre `size` square.
    ResizeCentreCrop,
    /// Training: a random crop of 8% to 100% of the area with aspect ratio 3/4 to 4/3, resized
    /// to `size`, flipped with probability 1/2 (10 tries, then the centre crop).
    RandomResizedCropFlip,
}

fn decode(path: &Path) -> Result<image::RgbImage, String> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    Ok(reader.decode().map_err(|e| e.to_string())?.to_rgb8())
}

/// A crop (x, y, w, h) of a `width` x `height` image for `transform`, drawing from `rng` for the
/// random one; and whether to flip.
fn crop_box(
    width: u32,
    height: u32,
    size: u32,
    transform: Transform,
    rng: &mut ChaCha8Rng,
) -> ((u32, u32, u32, u32), bool) {
    match transform {
        Transform::ResizeCentreCrop => {
            // The centre square of side shorter * 224/256, resized to `size` later.
            let side = ((width.min(height) as f64) * 224.0 / 256.0)
                .round()
                .max(1.0) as u32;
            let side = side.min(width).min(height);
            let _ = size;
            (((width - side) / 2, (height - side) / 2, side, side), false)
        }
        Transform::RandomResizedCropFlip => {
            let area = (width * height) as f64;
            for _ in 0..10 {
                let target = area * rng.random_range(0.08..=1.0);
                let log_ratio = rng.random_range((3f64 / 4.0).ln()..=(4f64 / 3.0).ln());
                let ratio = log_ratio.exp();
                let w = (target * ratio).sqrt().round() as u32;
                let h = (target / ratio).sqrt().round() as u32;
                if w >= 1 && h >= 1 && w <= width && h <= height {
                    let x = rng.random_range(0..=width - w);
                    let y = rng.random_range(0..=height - h);
                    return ((x, y, w, h), rng.random_bool(0.5));
                }
            }
            let side = width.min(height);
            (
                ((width - side) / 2, (height - side) / 2, side, side),
                rng.random_bool(0.5),
            )
        }
    }
}

/// Decodes one image into `size` x `size` RGB bytes, channel-major (3 x size x size).
pub fn load(
    picture: &impl Picture,
    size: u32,
    transform: Transform,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<u8>, String> {
    let img = picture.rgb()?;
    let ((x, y, w, h), flip) = crop_box(img.width(), img.height(), size, transform, rng);
    let cropped = image::imageops::crop_imm(&img, x, y, w, h).to_image();
    let mut resized =
        image::imageops::resize(&cropped, size, size, image::imageops::FilterType::Triangle);
    if flip {
        image::imageops::flip_horizontal_in_place(&mut resized);
    }
    let plane = (size * size) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, px) in resized.pixels().enumerate() {
        out[i] = px[0];
        out[plane + i] = px[1];
        out[2 * plane + i] = px[2];
    }
    Ok(out)
}

/// A decoded chunk: images (3 x size x size bytes each) and labels, in the order asked for.
#[derive(Debug, Default)]
pub struct Chunk {
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
    /// Positions (in the order asked for) that were skipped as unreadable.
    pub skipped: Vec<usize>,
}

/// How [`decode_chunks`] decodes.
#[derive(Debug, Clone, Copy)]
pub struct Decoding {
    /// Output side in pixels.
    pub size: u32,
    pub transform: Transform,
    pub threads: usize,
    /// Images per chunk.
    pub chunk: usize,
    pub on_bad: OnBadImage,
}

type Decoded = Vec<(usize, Result<Vec<u8>, String>)>;

/// Decodes `items` in chunks on a pool of threads, the next chunk while the caller uses the
/// current one, and hands each chunk to `use_chunk` in order; an error of `use_chunk` stops the
/// decoding and is returned. Per-image randomness comes from `seed_of(position)`, so it does not
/// depend on the thread that decodes an image.
pub fn decode_chunks<P: Picture, E: From<FolderError>>(
    items: &[P],
    how: Decoding,
    seed_of: &(dyn Fn(usize) -> u64 + Sync),
    mut use_chunk: impl FnMut(Chunk) -> Result<(), E>,
) -> Result<(), E> {
    let Decoding {
        size,
        transform,
        threads,
        chunk,
        on_bad,
    } = how;
    let threads = threads.max(1);
    let chunk = chunk.max(1);
    let bytes = 3 * (size * size) as usize;
    std::thread::scope(|scope| {
        // One decoded chunk may wait while the caller uses another: bounded prefetch.
        let (tx, rx) = mpsc::sync_channel::<Result<Chunk, FolderError>>(1);
        scope.spawn(move || {
            for (c, part) in items.chunks(chunk).enumerate() {
                let start = c * chunk;
                let per_thread = part.len().div_ceil(threads);
                let decoded: Vec<Decoded> = std::thread::scope(|s| {
                    let handles: Vec<_> = part
                        .chunks(per_thread)
                        .enumerate()
                        .map(|(t, piece)| {
                            s.spawn(move || {
                                piece
                                    .iter()
                                    .enumerate()
                                    .map(|(k, item)| {
                                        let at = start + t * per_thread + k;
                                        let mut rng =
                                            <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(
                                                seed_of(at),
                                            );
                                        (at, load(item, size, transform, &mut rng))
                                    })
                                    .collect()
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("a decoding thread panicked"))
                        .collect()
                });
                let mut out = Chunk {
                    images: Vec::with_capacity(part.len() * bytes),
                    labels: Vec::with_capacity(part.len()),
                    skipped: Vec::new(),
                };
                let mut failed = None;
                for (at, result) in decoded.into_iter().flatten() {
                    let item = &items[at];
                    match result {
                        Ok(pixels) => {
                            out.images.extend_from_slice(&pixels);
                            out.labels.push(item.label());
                        }
                        Err(problem) if on_bad == OnBadImage::Skip => {
                            tracing::warn!(path = %item.name(), %problem, "skipping an unreadable image");
                            out.skipped.push(at);
                        }
                        Err(problem) => {
                            failed = Some(FolderError::BadImage {
                                path: item.name(),
                                problem,
                            });
                            break;
                        }
                    }
                }
                let stop = failed.is_some();
                if tx.send(failed.map_or(Ok(out), Err)).is_err() || stop {
                    return;
                }
            }
        });
        // Returning early drops the receiver, which stops the decoding thread at its next send.
        for received in rx {
            use_chunk(received?)?;
        }
        Ok(())
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny ImageFolder of generated images: real PNG and JPEG files, and one corrupt file.
    pub(crate) fn tiny_folder(dir: &Path) {
        for (split, n) in [("train", 3), ("val", 2)] {
            for (c, class) in ["cat", "dog"].into_iter().enumerate() {
                let d = dir.join(split).join(class);
                std::fs::create_dir_all(&d).unwrap();
                for i in 0..n {
                    let img = image::RgbImage::from_fn(40 + 3 * i, 30 + 5 * c as u32, |x, y| {
                        image::Rgb([(x * 6) as u8, (y * 8) as u8, (c * 200) as u8])
                    });
                    let ext = if i % 2 == 0 { "png" } else { "JPG" };
                    img.save(d.join(format!("{i}.{ext}"))).unwrap();
                }
            }
        }
    }

    #[test]
    fn scans_classes_and_files_and_fingerprints_them() {
        let dir = tempfile::tempdir().unwrap();
        tiny_folder(dir.path());
        std::fs::write(dir.path().join("train/cat/notes.txt"), "not an image").unwrap();
        let f = scan(dir.path()).unwrap();
        assert_eq!(f.classes, vec!["cat", "dog"]);
        assert_eq!((f.train.len(), f.val.len()), (6, 4));
        assert_eq!(f.train[3].label, 1);
        let again = scan(dir.path()).unwrap();
        assert_eq!(f.fingerprint, again.fingerprint);
        std::fs::copy(
            dir.path().join("val/cat/0.png"),
            dir.path().join("val/cat/9.png"),
        )
        .unwrap();
        assert_ne!(scan(dir.path()).unwrap().fingerprint, f.fingerprint);
        std::fs::create_dir_all(dir.path().join("val/bird")).unwrap();
        std::fs::write(dir.path().join("val/bird/0.png"), b"x").unwrap();
        let e = scan(dir.path()).unwrap_err().to_string();
        assert!(e.contains("class `bird`"), "{e}");
    }

    #[test]
    fn decodes_in_order_with_seeded_augmentation_and_reports_bad_images() {
        let dir = tempfile::tempdir().unwrap();
        tiny_folder(dir.path());
        let f = scan(dir.path()).unwrap();
        let mut items = f.train.clone();
        std::fs::write(dir.path().join("train/dog/bad.png"), b"not a png").unwrap();
        items.insert(
            2,
            Item {
                path: dir.path().join("train/dog/bad.png"),
                label: 1,
            },
        );
        let run = |threads, chunk, transform, on_bad| {
            let mut got = Vec::new();
            let how = Decoding {
                size: 16,
                transform,
                threads,
                chunk,
                on_bad,
            };
            let r = decode_chunks(&items, how, &|i| i as u64, |c| {
                got.push(c);
                Ok::<_, FolderError>(())
            });
            (r, got)
        };
        let (r, a) = run(1, 3, Transform::RandomResizedCropFlip, OnBadImage::Skip);
        r.unwrap();
        let (r, b) = run(3, 2, Transform::RandomResizedCropFlip, OnBadImage::Skip);
        r.unwrap();
        let flat = |cs: &[Chunk]| -> (Vec<u8>, Vec<i64>, Vec<usize>) {
            (
                cs.iter().flat_map(|c| c.images.clone()).collect(),
                cs.iter().flat_map(|c| c.labels.clone()).collect(),
                cs.iter().flat_map(|c| c.skipped.clone()).collect(),
            )
        };
        // The same bytes whatever the threads and chunking: the draws follow the position.
        assert_eq!(flat(&a), flat(&b));
        let (images, labels, skipped) = flat(&a);
        assert_eq!(skipped, vec![2]);
        assert_eq!(labels.len(), 6);
        assert_eq!(images.len(), 6 * 3 * 16 * 16);
        let (r, _) = run(2, 4, Transform::ResizeCentreCrop, OnBadImage::Fail);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("bad.png") && e.contains("skip"), "{e}");
    }
}
