//! Conversions from the lease's proto messages to the worker's training settings. A name this
//! worker does not know is an error that says what it knows (the worker needs an upgrade).

use crate::finetune::{self, BackboneConfig, BackboneFormat, FinetuneConfig, HeadInit, Optimizer};
use crate::imagefolder::OnBadImage;
use crate::model::{Arch, Init};
use crate::train::{AugmentPer, Padding, Precision, Schedule, TrainConfig};
use seedsweep_core::spec::Model;
use seedsweep_proto::v1 as pb;

/// A name of a closed set, read with the sweep file's table of names (`parse`, `known`); an
/// empty name is a lease from a coordinator older than the setting and means `absent`.
fn named<T>(
    setting: &str,
    name: &str,
    parse: fn(&str) -> Option<T>,
    known: fn() -> String,
    absent: Option<T>,
) -> Result<T, String> {
    match (parse(name), absent) {
        (Some(v), _) => Ok(v),
        (None, Some(v)) if name.is_empty() => Ok(v),
        (None, _) => Err(format!(
            "unknown {setting} `{name}` (this worker knows {})",
            known()
        )),
    }
}

/// The worker's training settings from a lease's; names this worker does not know are an error.
pub(crate) fn train_config(t: &pb::TrainConfig) -> Result<TrainConfig, String> {
    let arch = Arch::from(named("model", &t.model, Model::parse, Model::known, None)?);
    let schedule = named(
        "schedule",
        &t.schedule,
        Schedule::parse,
        Schedule::known,
        None,
    )?;
    if (arch == Arch::Airbench94) != (schedule == Schedule::Airbench) {
        return Err("model airbench94 and schedule airbench go together".into());
    }
    // Absent (0): a coordinator older than airbench94, and the old behaviour.
    let or_one = |v: f64| if v == 0.0 { 1.0 } else { v };
    let precision = named(
        "precision",
        &t.precision,
        Precision::parse,
        Precision::known,
        None,
    )?;
    // Absent settings below: what workers did before the setting existed.
    let init = named("init", &t.init, Init::parse, Init::known, Some(Init::Tch))?;
    let padding = named(
        "crop_padding_mode",
        &t.crop_padding_mode,
        Padding::parse,
        Padding::known,
        Some(Padding::ZerosAfterNormalisation),
    )?;
    let augment_per = named(
        "augment_per",
        &t.augment_per,
        AugmentPer::parse,
        AugmentPer::known,
        Some(AugmentPer::Image),
    )?;
    Ok(TrainConfig {
        arch,
        init,
        epochs: t.epochs,
        batch_size: t.batch_size,
        width: t.width,
        lr: t.lr,
        schedule,
        lr_peak_epoch: t.lr_peak_epoch,
        momentum: t.momentum,
        nesterov: t.nesterov,
        weight_decay: t.weight_decay,
        label_smoothing: t.label_smoothing,
        smoothed_loss_weight: t.smoothed_loss_weight,
        smoothed_loss_epsilon: t.smoothed_loss_epsilon,
        crop_padding: t.crop_padding,
        padding,
        flip: t.flip,
        cutout: t.cutout,
        cutout_at_borders: t.cutout_at_borders,
        augment_per,
        drop_last: t.drop_last,
        lr_in_momentum: t.lr_in_momentum,
        precision,
        channels_last: t.channels_last,
        deterministic: t.deterministic,
        eval_every: t.eval_every.max(1),
        checkpoint_every: t.checkpoint_every,
        holdout: t.holdout,
        final_epoch_fraction: or_one(t.final_epoch_fraction),
        bn_bias_lr_scale: or_one(t.bn_bias_lr_scale),
        whiten_bias_epochs: t.whiten_bias_epochs,
        lookahead: t.lookahead,
        tta_level: t.tta_level,
        alternating_flip: t.alternating_flip,
    })
}

/// The worker's finetune settings from a lease's; names this worker does not know are an error.
pub(crate) fn finetune_config(t: &pb::FinetuneConfig) -> Result<FinetuneConfig, String> {
    let b = t.backbone.as_ref().ok_or("the lease carried no backbone")?;
    let head = t.head.as_ref().ok_or("the lease carried no head phase")?;
    let phase = |p: &pb::Phase| finetune::Phase {
        steps: p.steps,
        batch_size: p.batch_size,
        lr: p.lr,
        lr_end: p.lr_end,
        weight_decay: p.weight_decay,
        momentum: p.momentum,
    };
    let three = |v: &[f64], what: &str| -> Result<[f64; 3], String> {
        v.try_into()
            .map_err(|_| format!("backbone {what} has {} values, not 3", v.len()))
    };
    Ok(FinetuneConfig {
        backbone: BackboneConfig {
            file: b.file.clone(),
            sha256: b.sha256.clone(),
            format: named(
                "backbone format",
                &b.format,
                BackboneFormat::parse,
                BackboneFormat::known,
                None,
            )?,
            arch: b.arch.clone(),
            features: b.features as i64,
            input_size: b.input_size as i64,
            mean: three(&b.mean, "mean")?,
            std: three(&b.std, "std")?,
        },
        head_init: named(
            "head_init",
            &t.head_init,
            HeadInit::parse,
            HeadInit::known,
            None,
        )?,
        head_init_std: t.head_init_std,
        label_smoothing: t.label_smoothing,
        optimizer: named(
            "optimizer",
            &t.optimizer,
            Optimizer::parse,
            Optimizer::known,
            None,
        )?,
        eval_every_steps: t.eval_every_steps.max(1),
        bad_images: named(
            "bad_images",
            &t.bad_images,
            OnBadImage::parse,
            OnBadImage::known,
            None,
        )?,
        augment: t.augment,
        head: phase(head),
        full: t.full.as_ref().map(phase),
    })
}
