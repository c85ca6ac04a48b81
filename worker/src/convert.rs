//! Conversions from the lease's proto messages to the worker's training settings. A name this
//! worker does not know is an error that says what it knows (the worker needs an upgrade).

use crate::finetune::{self, BackboneConfig, FinetuneConfig};
use crate::imagefolder::OnBadImage;
use crate::model::{Arch, Init};
use crate::train::{AugmentPer, EpochMetrics, Padding, Precision, Schedule, TrainConfig};
use seedsweep_proto::v1 as pb;

fn unknown(setting: &str, name: &str, known: &str) -> String {
    format!("unknown {setting} `{name}` (this worker knows {known})")
}

/// The worker's training settings from a lease's; names this worker does not know are an error.
pub(crate) fn train_config(t: &pb::TrainConfig) -> Result<TrainConfig, String> {
    let arch = Arch::parse(&t.model)
        .ok_or_else(|| unknown("model", &t.model, "resnet9, resnet9-skinny, airbench94"))?;
    let schedule = match t.schedule.as_str() {
        "linear" => Schedule::Linear,
        "picard" => Schedule::Picard,
        "airbench" => Schedule::Airbench,
        other => return Err(unknown("schedule", other, "linear, picard, airbench")),
    };
    if (arch == Arch::Airbench94) != (schedule == Schedule::Airbench) {
        return Err("model airbench94 and schedule airbench go together".into());
    }
    // Absent (0): a coordinator older than airbench94, and the old behaviour.
    let or_one = |v: f64| if v == 0.0 { 1.0 } else { v };
    let precision = match t.precision.as_str() {
        "fp32" => Precision::Fp32,
        "fp16" => Precision::Fp16,
        "bf16" => Precision::Bf16,
        other => return Err(unknown("precision", other, "fp32, fp16, bf16")),
    };
    // An empty name is a lease from a coordinator older than the setting: what workers did then.
    let init = match t.init.as_str() {
        "pytorch" => Init::Pytorch,
        "tch" | "" => Init::Tch,
        other => return Err(unknown("init", other, "pytorch, tch")),
    };
    let padding = match t.crop_padding_mode.as_str() {
        "reflect" => Padding::Reflect,
        "zeros-after-normalisation" | "" => Padding::ZerosAfterNormalisation,
        "zeros-before-normalisation" => Padding::ZerosBeforeNormalisation,
        other => {
            return Err(unknown(
                "crop_padding_mode",
                other,
                "reflect, zeros-after-normalisation, zeros-before-normalisation",
            ));
        }
    };
    let augment_per = match t.augment_per.as_str() {
        "image" | "" => AugmentPer::Image,
        "batch" => AugmentPer::Batch,
        other => return Err(unknown("augment_per", other, "image, batch")),
    };
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
            format: match b.format.as_str() {
                "torchscript" => finetune::Format::Torchscript,
                "safetensors" => finetune::Format::Safetensors,
                other => return Err(format!("unknown backbone format `{other}`")),
            },
            arch: b.arch.clone(),
            features: b.features as i64,
            input_size: b.input_size as i64,
            mean: three(&b.mean, "mean")?,
            std: three(&b.std, "std")?,
        },
        head_init: match t.head_init.as_str() {
            "normal" => finetune::HeadInit::Normal,
            "default" => finetune::HeadInit::Default,
            other => return Err(format!("unknown head_init `{other}`")),
        },
        head_init_std: t.head_init_std,
        label_smoothing: t.label_smoothing,
        optimizer: match t.optimizer.as_str() {
            "sgd" => finetune::Optimizer::Sgd,
            "adamw" => finetune::Optimizer::AdamW,
            other => return Err(format!("unknown optimizer `{other}`")),
        },
        eval_every_steps: t.eval_every_steps.max(1),
        bad_images: match t.bad_images.as_str() {
            "skip" => OnBadImage::Skip,
            "fail" => OnBadImage::Fail,
            other => return Err(format!("unknown bad_images `{other}`")),
        },
        augment: t.augment,
        head: phase(head),
        full: t.full.as_ref().map(phase),
    })
}

pub(crate) fn epoch_pb(lease: &pb::LeaseRef, m: &EpochMetrics) -> pb::EpochMetrics {
    pb::EpochMetrics {
        lease: Some(lease.clone()),
        epoch: m.epoch,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        test_loss: m.test_loss,
        test_accuracy: m.test_accuracy,
        test_top5: m.test_top5,
        val_loss: m.val_loss,
        val_accuracy: m.val_accuracy,
        lr: m.lr,
        seconds: m.seconds,
    }
}
