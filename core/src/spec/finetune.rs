//! The `finetune-head` task's part of a sweep file: `[backbone]` (a pretrained network the user
//! provides, found by each worker under its `--model-dir` and checked against its SHA-256) and
//! `[finetune]` (how the new classifier head is trained). Validated here, once, like the rest of
//! the file.

use crate::domain::names;
use crate::spec::{SpecError, invalid};
use serde::{Deserialize, Serialize};

/// How the backbone file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackboneFormat {
    /// A TorchScript module (`torch.jit.trace` / `torch.jit.script`) mapping images to features.
    Torchscript,
    /// Weights (a torchvision state dict) for an architecture the worker builds: `arch`.
    Safetensors,
}

names!(BackboneFormat as "backbone format" {
    Torchscript => "torchscript",
    Safetensors => "safetensors",
});

/// Architectures the worker builds for safetensors weights, with their feature widths.
pub const ARCHS: [(&str, u32); 3] = [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backbone {
    /// The file, relative to each worker's `--model-dir`.
    pub file: String,
    /// Its SHA-256 (64 hex digits); a worker refuses a file that does not match.
    pub sha256: String,
    /// Guessed from the extension when absent (.pt, .ts, .jit: torchscript; .safetensors).
    #[serde(default)]
    pub format: Option<BackboneFormat>,
    /// For safetensors: resnet18, resnet34 or resnet50.
    #[serde(default)]
    pub arch: Option<String>,
    /// The width of the features the backbone returns.
    pub features: u32,
    /// The side of the square input it expects.
    #[serde(default = "defaults::input_size")]
    pub input_size: u32,
    /// Per-channel normalisation of RGB in [0, 1].
    #[serde(default = "defaults::mean")]
    pub mean: [f64; 3],
    #[serde(default = "defaults::std")]
    pub std: [f64; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadInit {
    /// Weights from N(0, head_init_std^2), bias zero (the paper's ViT recipe).
    Normal,
    /// libtorch's default for a linear layer (uniform, Kaiming).
    Default,
}

names!(HeadInit as "head_init" {
    Normal => "normal",
    Default => "default",
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optimizer {
    Sgd,
    Adamw,
}

names!(Optimizer as "optimizer" {
    Sgd => "sgd",
    Adamw => "adamw",
});

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadImages {
    /// Report each unreadable image by path and leave it out.
    Skip,
    /// Fail the seed, naming the image.
    Fail,
}

names!(BadImages as "on_bad_image" {
    Skip => "skip",
    Fail => "fail",
});

/// One phase: its own steps, batch size and cosine learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub steps: u32,
    pub batch_size: u32,
    /// The learning rate at the first step, decayed along a cosine to `lr_end` at the last.
    pub lr: f64,
    #[serde(default)]
    pub lr_end: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// SGD momentum (Nesterov off); unused by AdamW.
    #[serde(default = "defaults::momentum")]
    pub momentum: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finetune {
    #[serde(default = "defaults::head_init")]
    pub head_init: HeadInit,
    #[serde(default = "defaults::head_init_std")]
    pub head_init_std: f64,
    #[serde(default)]
    pub label_smoothing: f64,
    #[serde(default = "defaults::optimizer")]
    pub optimizer: Optimizer,
    /// Random-resized-crop and flip on training images. Off, the head trains on features the
    /// worker computes once per dataset and caches.
    #[serde(default)]
    pub augment: bool,
    /// Evaluate (top-1, top-5) every this many steps, and after the last.
    #[serde(default = "defaults::eval_every_steps")]
    pub eval_every_steps: u32,
    #[serde(default = "defaults::bad_images")]
    pub bad_images: BadImages,
    /// Phase 1: the head alone, the backbone frozen.
    pub head: Phase,
    /// Phase 2 (optional): the whole network.
    #[serde(default)]
    pub full: Option<Phase>,
}

impl Finetune {
    /// How many evaluations a run reports (its "epochs"): one every `eval_every_steps` steps of
    /// each phase, the last step of a phase included.
    pub fn evaluations(&self) -> u32 {
        evaluations(
            self.head.steps,
            self.full.as_ref().map(|p| p.steps),
            self.eval_every_steps,
        )
    }
}

/// How many evaluations a run of `head_steps` (and `full_steps` of phase 2) reports when it
/// evaluates every `every` steps and at the end of each phase.
pub fn evaluations(head_steps: u32, full_steps: Option<u32>, every: u32) -> u32 {
    let every = every.max(1);
    head_steps.div_ceil(every) + full_steps.map_or(0, |s| s.div_ceil(every))
}

mod defaults {
    use super::{BadImages, HeadInit, Optimizer};
    pub fn input_size() -> u32 {
        224
    }
    pub fn mean() -> [f64; 3] {
        [0.485, 0.456, 0.406]
    }
    pub fn std() -> [f64; 3] {
        [0.229, 0.224, 0.225]
    }
    pub fn momentum() -> f64 {
        0.9
    }
    pub fn head_init() -> HeadInit {
        HeadInit::Normal
    }
    pub fn head_init_std() -> f64 {
        0.01
    }
    pub fn optimizer() -> Optimizer {
        Optimizer::Sgd
    }
    pub fn eval_every_steps() -> u32 {
        500
    }
    pub fn bad_images() -> BadImages {
        BadImages::Skip
    }
}

/// The `finetune-head` settings of a sweep, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneSpec {
    pub backbone: Backbone,
    pub finetune: Finetune,
}

impl FinetuneSpec {
    pub fn parse(
        backbone: Option<toml::Value>,
        finetune: Option<toml::Value>,
    ) -> Result<FinetuneSpec, SpecError> {
        let (Some(backbone), Some(finetune)) = (backbone, finetune) else {
            return invalid(
                "task \"finetune-head\" needs a [backbone] table (file, sha256, features, ...) and a [finetune] table with [finetune.head]; see README, \"Fine-tuning a pretrained network's head\"",
            );
        };
        let mut backbone: Backbone = backbone.try_into().map_err(|e: toml::de::Error| {
            SpecError::new(format!("[backbone]: {}", e.message().trim_end()))
        })?;
        let finetune: Finetune = finetune.try_into().map_err(|e: toml::de::Error| {
            SpecError::new(format!("[finetune]: {}", e.message().trim_end()))
        })?;
        backbone.validate()?;
        finetune.validate()?;
        Ok(FinetuneSpec { backbone, finetune })
    }
}

/// Whether `f` may name a backbone file: a path relative to the workers' `--model-dir`, with no
/// `..`, empty or control characters. The worker checks a lease's file again before it opens it.
pub fn check_backbone_file(f: &str) -> Result<(), String> {
    if f.is_empty()
        || f.starts_with('/')
        || f.split('/').any(|part| part == ".." || part.is_empty())
        || f.chars().any(char::is_control)
    {
        return Err(format!(
            "`backbone.file` = \"{f}\": give a path relative to the workers' --model-dir, without `..`"
        ));
    }
    Ok(())
}

impl Backbone {
    fn validate(&mut self) -> Result<(), SpecError> {
        check_backbone_file(&self.file).map_err(SpecError::new)?;
        let f = &self.file;
        let hex = self.sha256.to_ascii_lowercase();
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return invalid(format!(
                "`backbone.sha256` = \"{}\": give the file's SHA-256 as 64 hex digits (sha256sum FILE)",
                self.sha256
            ));
        }
        self.sha256 = hex;
        let guessed = match f.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()) {
            Some(e) if ["pt", "ts", "jit", "pth"].contains(&e.as_str()) => {
                Some(BackboneFormat::Torchscript)
            }
            Some(e) if e == "safetensors" => Some(BackboneFormat::Safetensors),
            _ => None,
        };
        let format = self.format.or(guessed).ok_or_else(|| {
            SpecError::new(format!(
                "`backbone.format` is missing and `{f}` does not say it: set \"torchscript\" or \"safetensors\""
            ))
        })?;
        self.format = Some(format);
        match (format, self.arch.as_deref()) {
            (BackboneFormat::Safetensors, Some(arch)) => {
                let Some((_, width)) = ARCHS.iter().find(|(a, _)| *a == arch) else {
                    return invalid(format!(
                        "`backbone.arch` = \"{arch}\": the worker builds resnet18, resnet34 or resnet50; export other networks as TorchScript"
                    ));
                };
                if self.features != *width {
                    return invalid(format!(
                        "`backbone.features` = {}: {arch} gives {width} features",
                        self.features
                    ));
                }
            }
            (BackboneFormat::Safetensors, None) => {
                return invalid(
                    "`backbone.arch` is needed for safetensors weights: resnet18, resnet34 or resnet50",
                );
            }
            (BackboneFormat::Torchscript, Some(_)) => {
                return invalid(
                    "`backbone.arch` applies to safetensors weights only; a TorchScript module carries its architecture",
                );
            }
            (BackboneFormat::Torchscript, None) => {}
        }
        if !(1..=100_000).contains(&self.features) {
            return invalid(format!(
                "`backbone.features` = {}: give the feature width, 1 to 100000",
                self.features
            ));
        }
        if !(8..=1024).contains(&self.input_size) {
            return invalid(format!(
                "`backbone.input_size` = {}: give 8 to 1024 pixels",
                self.input_size
            ));
        }
        if self.mean.iter().any(|m| !m.is_finite())
            || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return invalid("`backbone.mean` must be finite and `backbone.std` finite and > 0");
        }
        Ok(())
    }
}

impl Phase {
    fn validate(&self, name: &str) -> Result<(), SpecError> {
        if !(1..=10_000_000).contains(&self.steps) {
            return invalid(format!(
                "`finetune.{name}.steps` = {}: give 1 to 10000000",
                self.steps
            ));
        }
        if !(1..=65_536).contains(&self.batch_size) {
            return invalid(format!(
                "`finetune.{name}.batch_size` = {}: give 1 to 65536",
                self.batch_size
            ));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return invalid(format!("`finetune.{name}.lr` = {}: must be >= 0", self.lr));
        }
        if !(self.lr_end.is_finite() && (0.0..=self.lr).contains(&self.lr_end)) {
            return invalid(format!(
                "`finetune.{name}.lr_end` = {}: must be between 0 and lr ({})",
                self.lr_end, self.lr
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return invalid(format!(
                "`finetune.{name}.weight_decay` = {}: must be >= 0",
                self.weight_decay
            ));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return invalid(format!(
                "`finetune.{name}.momentum` = {}: must be in [0, 1)",
                self.momentum
            ));
        }
        Ok(())
    }
}

impl Finetune {
    fn validate(&self) -> Result<(), SpecError> {
        self.head.validate("head")?;
        if let Some(full) = &self.full {
            full.validate("full")?;
        }
        if !(self.head_init_std.is_finite() && self.head_init_std > 0.0) {
            return invalid(format!(
                "`finetune.head_init_std` = {}: must be > 0",
                self.head_init_std
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return invalid(format!(
                "`finetune.label_smoothing` = {}: must be in [0, 1)",
                self.label_smoothing
            ));
        }
        if self.eval_every_steps == 0 {
            return invalid("`finetune.eval_every_steps` = 0: give at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
[backbone]
file = "tiny.safetensors"
sha256 = "AB12000000000000000000000000000000000000000000000000000000000000"
arch = "resnet18"
features = 512
input_size = 32

[finetune]
[finetune.head]
steps = 20
batch_size = 8
lr = 0.02
"#;

    fn parse(text: &str) -> Result<FinetuneSpec, SpecError> {
        let t: toml::Table = toml::from_str(text).unwrap();
        FinetuneSpec::parse(t.get("backbone").cloned(), t.get("finetune").cloned())
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_and_fills_defaults() {
        let s = parse(OK).unwrap();
        assert_eq!(s.backbone.format, Some(BackboneFormat::Safetensors));
        assert!(s.backbone.sha256.starts_with("ab12"));
        assert_eq!(s.finetune.head_init, HeadInit::Normal);
        assert_eq!(s.finetune.optimizer, Optimizer::Sgd);
        assert_eq!(s.finetune.head.momentum, 0.9);
        assert!(s.finetune.full.is_none() && !s.finetune.augment);
        let two = parse(&format!(
            "{}[finetune.full]\nsteps = 5\nbatch_size = 4\nlr = 0.001\n",
            OK.replace("[finetune]", "[finetune]\naugment = true")
        ))
        .unwrap();
        assert!(two.finetune.augment);
        assert_eq!(two.finetune.full.unwrap().steps, 5);
        let ts = parse(
            &OK.replace("tiny.safetensors", "dino.pt")
                .replace("arch = \"resnet18\"\n", "")
                .replace("512", "384"),
        )
        .unwrap();
        assert_eq!(ts.backbone.format, Some(BackboneFormat::Torchscript));
    }

    /// The README's example sweeps parse once their checksum is filled in, and not before.
    #[test]
    fn the_example_sweeps_are_valid() {
        for name in ["resnet50", "dino-resnet50", "dino-vits16"] {
            let path = format!(
                "{}/../examples/finetune-{name}.toml",
                env!("CARGO_MANIFEST_DIR")
            );
            let text = std::fs::read_to_string(&path).unwrap();
            let e = crate::spec::SweepSpec::parse(&text)
                .unwrap_err()
                .to_string();
            assert!(e.contains("backbone.sha256"), "{path}: {e}");
            let filled = text.replace(
                "REPLACE with the sha256 that export_backbone.py printed",
                &"ab".repeat(32),
            );
            let spec =
                crate::spec::SweepSpec::parse(&filled).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(spec.finetune.is_some());
        }
    }

    #[test]
    fn rejects_bad_settings_naming_the_key() {
        assert!(err(&OK.replace("tiny.safetensors", "../x.safetensors")).contains("backbone.file"));
        assert!(err(&OK.replace("AB12", "XY12")).contains("backbone.sha256"));
        assert!(err(&OK.replace("resnet18", "vgg")).contains("backbone.arch"));
        assert!(err(&OK.replace("features = 512", "features = 384")).contains("512 features"));
        assert!(err(&OK.replace("tiny.safetensors", "tiny.bin")).contains("backbone.format"));
        assert!(err(&OK.replace("steps = 20", "steps = 0")).contains("finetune.head.steps"));
        assert!(err(&OK.replace("lr = 0.02", "lr = 0.02\nlr_end = 1.0")).contains("lr_end"));
        assert!(
            err(&format!(
                "{OK}[finetune.full]\nsteps = 5\nbatch_size = 0\nlr = 0.1\n"
            ))
            .contains("finetune.full.batch_size")
        );
        assert!(err(&OK.replace("[finetune]", "[finetune]\ncolour = 1")).contains("colour"));
        assert!(err("[backbone]\n").contains("needs a [backbone]"));
    }
}
