//! A real dataset that installs offline: the UCI "Optical Recognition of Handwritten Digits" test
//! set (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0) as scikit-learn ships it,
//! `sklearn/datasets/data/digits.csv.gz` (scikit-learn is BSD-3-Clause): 1,797 images of 8x8
//! pixels in 0..16, written by 43 people, one CSV line each (64 pixels, then the label).
//!
//! [`records`] turns it into CIFAR-10 binary records: each pixel becomes a 4x4 block (32x32),
//! its value scaled to 0..255 and copied to the three channels. Every fifth image (line 0, 5,
//! 10, ...) is a test image: 1,437 training and 360 test images. Nothing is random, so every
//! host that makes it gets the same bytes (and the same dataset fingerprint).

use crate::data::{CLASSES, RECORD_BYTES, SIDE};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// SHA-256 of the decompressed CSV text (the same in scikit-learn 1.5 and 1.9).
pub const CSV_SHA256: &str = "6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8";
const PIXELS: usize = 64;
const SCALE: usize = SIDE / 8;

#[derive(Debug, thiserror::Error)]
pub enum DigitsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not scikit-learn's digits.csv.gz: its text has SHA-256 {got}, expected \
         {CSV_SHA256}. Give the file sklearn/datasets/data/digits.csv.gz from a scikit-learn \
         wheel or installation (scripts/digits.sh fetches one)"
    )]
    Checksum { path: String, got: String },
    #[error("{path}, line {line}: {problem}")]
    Line {
        path: String,
        line: usize,
        problem: String,
    },
}

/// Reads `source` (the gzipped CSV, or the CSV itself) and returns (train, test) records.
pub fn records(source: &Path) -> Result<(Vec<u8>, Vec<u8>), DigitsError> {
    let path = source.display().to_string();
    let io = |source| DigitsError::Io {
        path: path.clone(),
        source,
    };
    let raw = std::fs::read(source).map_err(io)?;
    let text = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(io)?;
        out
    } else {
        raw
    };
    let got = format!("{:x}", Sha256::digest(&text));
    if got != CSV_SHA256 {
        return Err(DigitsError::Checksum { path, got });
    }
    let text = String::from_utf8_lossy(&text);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        let record = record(line).map_err(|problem| DigitsError::Line {
            path: path.clone(),
            line: i + 1,
            problem,
        })?;
        if i % 5 == 0 { &mut test } else { &mut train }.extend_from_slice(&record);
    }
    Ok((train, test))
}

/// One CSV line as a CIFAR-10 record.
fn record(line: &str) -> Result<Vec<u8>, String> {
    let values: Vec<usize> = line
        .split(',')
        .map(|v| v.trim().parse::<f64>().map(|f| f as usize))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a number: {e}"))?;
    let (pixels, label) = match values.as_slice() {
        [pixels @ .., label] if pixels.len() == PIXELS => (pixels, *label),
        _ => return Err(format!("{} values, expected {}", values.len(), PIXELS + 1)),
    };
    if label >= CLASSES || pixels.iter().any(|&p| p > 16) {
        return Err("a label above 9 or a pixel above 16".into());
    }
    let mut out = Vec::with_capacity(RECORD_BYTES);
    out.push(label as u8);
    for _channel in 0..3 {
        for y in 0..SIDE {
            for x in 0..SIDE {
                let v = pixels[(y / SCALE) * 8 + x / SCALE];
                out.push(((v * 255 + 8) / 16) as u8);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_becomes_a_grey_upscaled_record() {
        let mut line: Vec<String> = (0..64).map(|i| (i % 17).to_string()).collect();
        line.push("7".into());
        let r = record(&line.join(",")).unwrap();
        assert_eq!(r.len(), RECORD_BYTES);
        assert_eq!(r[0], 7);
        // Pixel (0, 1) of the 8x8 image is 1: the block x in 4..8 of rows 0..4, in every channel.
        let plane = SIDE * SIDE;
        for c in 0..3 {
            assert_eq!(r[1 + c * plane + 5], 16);
            assert_eq!(r[1 + c * plane + 3 * SIDE + 7], 16);
            assert_eq!(r[1 + c * plane], 0);
        }
        // Pixel 16, (2, 0), is 16: white, rows 8..12 and columns 0..4.
        assert_eq!(r[1 + 8 * SIDE], 255);
        assert_eq!(r[1 + 11 * SIDE + 3], 255);
        assert!(record("1,2,3").unwrap_err().contains("3 values"));
        assert!(record(&format!("{},10", vec!["0"; 64].join(","))).is_err());
    }

    #[test]
    fn refuses_a_file_that_is_not_the_digits() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("digits.csv");
        std::fs::write(&f, "0,1,2\n").unwrap();
        let e = records(&f).unwrap_err().to_string();
        assert!(e.contains("is not scikit-learn's digits.csv.gz"), "{e}");
        assert!(records(&dir.path().join("missing")).is_err());
    }
}
