//! The two ResNet-9s the recipes use. Every conv is 3x3, padding 1, no bias, followed by
//! BatchNorm and the activation; `width` scales every channel count.
//!
//! - [`Arch::Resnet9`], D. Page's DAWNBench network ("How to train your ResNet", 2018): prep conv
//!   64; layer1 conv 128 + maxpool + residual(2 x 128); layer2 conv 256 + maxpool; layer3 conv
//!   512 + maxpool + residual(2 x 512); global max pool; linear 512 -> 10 without bias; output
//!   x 0.125; ReLU. 6,573,120 trainable parameters at width 1.0.
//! - [`Arch::Resnet9Skinny`], the "skinnier" network of Picard's seed study (davidpicard/deepseed):
//!   prep conv 64 + maxpool; layer1 conv 128 + maxpool + residual(2 x 128); layer2 conv 256 +
//!   maxpool; layer3 conv 256 + maxpool + residual(2 x 256); global max pool; linear 256 -> 10
//!   without bias; output x 0.1; CELU(alpha 0.1). 2,440,256 trainable parameters at width 1.0.
//!
//! The variable paths (`prep/conv`, `layer1/res1/bn`, ...) are the checkpoint format.

use tch::Tensor;
use tch::nn::{self, ModuleT};

const CELU_ALPHA: f64 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Resnet9,
    Resnet9Skinny,
}

impl Arch {
    pub fn parse(name: &str) -> Option<Arch> {
        match name {
            "resnet9" => Some(Arch::Resnet9),
            "resnet9-skinny" => Some(Arch::Resnet9Skinny),
            _ => None,
        }
    }

    /// Output channels of prep, layer1, layer2, layer3 at width 1.0.
    fn channels(self) -> [i64; 4] {
        match self {
            Arch::Resnet9 => [64, 128, 256, 512],
            Arch::Resnet9Skinny => [64, 128, 256, 256],
        }
    }

    fn output_scale(self) -> f64 {
        match self {
            Arch::Resnet9 => 0.125,
            Arch::Resnet9Skinny => 0.1,
        }
    }

    fn activation(self, x: &Tensor) -> Tensor {
        match self {
            Arch::Resnet9 => x.relu(),
            // CELU(x, a) = a * CELU(x / a, 1); libtorch's binding takes no alpha.
            Arch::Resnet9Skinny => (x / CELU_ALPHA).celu() * CELU_ALPHA,
        }
    }
}

fn channels(base: i64, width: f64) -> i64 {
    ((base as f64 * width).round() as i64).max(1)
}

fn conv_bn(p: nn::Path, arch: Arch, c_in: i64, c_out: i64, pool: bool) -> nn::SequentialT {
    let conv = nn::ConvConfig {
        padding: 1,
        bias: false,
        ..Default::default()
    };
    let block = nn::seq_t()
        .add(nn::conv2d(&p / "conv", c_in, c_out, 3, conv))
        .add(nn::batch_norm2d(&p / "bn", c_out, Default::default()))
        .add_fn(move |x| arch.activation(x));
    if pool {
        block.add_fn(|x| x.max_pool2d_default(2))
    } else {
        block
    }
}

/// conv-bn-act, max pool, then (optionally) a residual branch of two conv-bn-act.
fn layer(p: nn::Path, arch: Arch, c_in: i64, c_out: i64, residual: bool) -> impl ModuleT + use<> {
    let pre = conv_bn(&p / "prep", arch, c_in, c_out, true);
    let res = residual.then(|| {
        conv_bn(&p / "res1", arch, c_out, c_out, false).add(conv_bn(
            &p / "res2",
            arch,
            c_out,
            c_out,
            false,
        ))
    });
    nn::func_t(move |x, train| {
        let x = pre.forward_t(x, train);
        match &res {
            Some(r) => &x + r.forward_t(&x, train),
            None => x,
        }
    })
}

/// The network as its stages, so that tests can check each stage's output shape.
pub struct Resnet9 {
    stages: Vec<Box<dyn ModuleT>>,
}

impl std::fmt::Debug for Resnet9 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Resnet9 {{ {} stages }}", self.stages.len())
    }
}

impl Resnet9 {
    /// The output of every stage: prep, layer1, layer2, layer3, pool, classifier.
    pub fn stage_outputs(&self, x: &Tensor, train: bool) -> Vec<Tensor> {
        let mut outputs: Vec<Tensor> = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let next = stage.forward_t(outputs.last().unwrap_or(x), train);
            outputs.push(next);
        }
        outputs
    }
}

impl ModuleT for Resnet9 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for stage in &self.stages {
            x = stage.forward_t(&x, train);
        }
        x
    }
}

/// Builds `arch` under `p` for 3-channel 32x32 inputs and `classes` outputs.
pub fn build(p: &nn::Path, arch: Arch, width: f64, classes: i64) -> Resnet9 {
    let [c0, c1, c2, c3] = arch.channels().map(|c| channels(c, width));
    let linear = nn::LinearConfig {
        bias: false,
        ..Default::default()
    };
    let scale = arch.output_scale();
    let prep_pools = arch == Arch::Resnet9Skinny;
    let classifier = nn::linear(p / "classifier", c3, classes, linear);
    Resnet9 {
        stages: vec![
            Box::new(conv_bn(p / "prep", arch, 3, c0, prep_pools)),
            Box::new(layer(p / "layer1", arch, c0, c1, true)),
            Box::new(layer(p / "layer2", arch, c1, c2, false)),
            Box::new(layer(p / "layer3", arch, c2, c3, true)),
            // A global max pool, as max_pool2d over the whole map: the same numbers as an adaptive
            // max pool to 1x1, and unlike it, its CUDA backward has a deterministic kernel.
            Box::new(nn::func_t(|x, _| {
                let side = [x.size()[2], x.size()[3]];
                x.max_pool2d(side, side, [0, 0], [1, 1], false).flat_view()
            })),
            Box::new(nn::func_t(move |x, _| x.apply(&classifier) * scale)),
        ],
    }
}

/// Trainable parameters (running BatchNorm statistics excluded).
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(Tensor::numel)
        .map(|n| n as i64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn shapes(arch: Arch, width: f64) -> (i64, Vec<Vec<i64>>) {
        // Building a model draws from libtorch's global generator: not while a seed initialises.
        let _init = crate::train::INIT_LOCK
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let vs = nn::VarStore::new(Device::Cpu);
        let net = build(&vs.root(), arch, width, 10);
        let x = Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let outs = net.stage_outputs(&x, false);
        (
            parameter_count(&vs),
            outs.iter().map(Tensor::size).collect(),
        )
    }

    /// The `dawnbench` recipe's network against Page's reference.
    #[test]
    fn resnet9_matches_the_reference() {
        let (n, s) = shapes(Arch::Resnet9, 1.0);
        assert_eq!(n, 6_573_120);
        assert_eq!(
            s,
            vec![
                vec![2, 64, 32, 32],
                vec![2, 128, 16, 16],
                vec![2, 256, 8, 8],
                vec![2, 512, 4, 4],
                vec![2, 512],
                vec![2, 10]
            ]
        );
    }

    /// The `paper-short` and `paper-long` recipes' network against deepseed's.
    #[test]
    fn skinny_resnet9_matches_the_reference() {
        let (n, s) = shapes(Arch::Resnet9Skinny, 1.0);
        // 3x3 convs 3-64, 64-128, 2x 128-128, 128-256, 256-256, 2x 256-256: 2,434,752; BatchNorm
        // weight and bias of 1,472 channels: 2,944; linear 256 x 10: 2,560.
        assert_eq!(n, 2_440_256);
        assert_eq!(
            s,
            vec![
                vec![2, 64, 16, 16],
                vec![2, 128, 8, 8],
                vec![2, 256, 4, 4],
                vec![2, 256, 2, 2],
                vec![2, 256],
                vec![2, 10]
            ]
        );
    }

    #[test]
    fn width_scales_channels() {
        let (n, s) = shapes(Arch::Resnet9, 0.25);
        // Convolutions dominate and scale with width^2.
        assert!(n > 6_573_120 / 20 && n < 6_573_120 / 12, "{n}");
        assert_eq!(s[3], vec![2, 128, 4, 4]);
    }
}
