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
//!
//! [`Init::Pytorch`] starts the weights as both papers' code does, with PyTorch's defaults:
//! convolutions and the linear layer uniform in +-1/sqrt(fan_in) (`kaiming_uniform_(a=sqrt(5))`),
//! BatchNorm weight 1 and bias 0. [`Init::Tch`] is tch's defaults (Kaiming uniform with the ReLU
//! gain, 2.45x wider, and BatchNorm weights uniform in [0, 1]), which sweeps submitted before the
//! `init` setting existed were trained with.

use tch::Tensor;
use tch::nn::{self, ModuleT};

const CELU_ALPHA: f64 = 0.1;

/// How the weights start (the sweep file's `train.init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Pytorch,
    Tch,
}

impl Init {
    /// The initialisation of a weight with `fan_in` inputs per output.
    fn weights(self, fan_in: i64) -> nn::Init {
        match self {
            Init::Pytorch => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                }
            }
            Init::Tch => nn::init::DEFAULT_KAIMING_UNIFORM,
        }
    }

    fn batch_norm(self) -> nn::BatchNormConfig {
        match self {
            Init::Pytorch => nn::BatchNormConfig {
                ws_init: nn::Init::Const(1.0),
                bs_init: nn::Init::Const(0.0),
                ..Default::default()
            },
            Init::Tch => Default::default(),
        }
    }
}

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

/// The architecture and how its weights start.
#[derive(Debug, Clone, Copy)]
struct Net {
    arch: Arch,
    init: Init,
}

fn conv_bn(p: nn::Path, net: Net, c_in: i64, c_out: i64, pool: bool) -> nn::SequentialT {
    let conv = nn::ConvConfig {
        padding: 1,
        bias: false,
        ws_init: net.init.weights(c_in * 9),
        ..Default::default()
    };
    let arch = net.arch;
    let block = nn::seq_t()
        .add(nn::conv2d(&p / "conv", c_in, c_out, 3, conv))
        .add(nn::batch_norm2d(&p / "bn", c_out, net.init.batch_norm()))
        .add_fn(move |x| arch.activation(x));
    if pool {
        block.add_fn(|x| x.max_pool2d_default(2))
    } else {
        block
    }
}

/// conv-bn-act, max pool, then (optionally) a residual branch of two conv-bn-act.
fn layer(p: nn::Path, net: Net, c_in: i64, c_out: i64, residual: bool) -> impl ModuleT + use<> {
    let pre = conv_bn(&p / "prep", net, c_in, c_out, true);
    let res = residual.then(|| {
        conv_bn(&p / "res1", net, c_out, c_out, false).add(conv_bn(
            &p / "res2",
            net,
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
pub fn build(p: &nn::Path, arch: Arch, init: Init, width: f64, classes: i64) -> Resnet9 {
    let [c0, c1, c2, c3] = arch.channels().map(|c| channels(c, width));
    let linear = nn::LinearConfig {
        bias: false,
        ws_init: init.weights(c3),
        ..Default::default()
    };
    let net = Net { arch, init };
    let scale = arch.output_scale();
    let prep_pools = arch == Arch::Resnet9Skinny;
    let classifier = nn::linear(p / "classifier", c3, classes, linear);
    Resnet9 {
        stages: vec![
            Box::new(conv_bn(p / "prep", net, 3, c0, prep_pools)),
            Box::new(layer(p / "layer1", net, c0, c1, true)),
            Box::new(layer(p / "layer2", net, c1, c2, false)),
            Box::new(layer(p / "layer3", net, c2, c3, true)),
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
        let net = build(&vs.root(), arch, Init::Pytorch, width, 10);
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

    /// PyTorch's defaults: BatchNorm weight 1 and bias 0; a conv's weights within 1/sqrt(fan_in)
    /// and filling it (so not tch's ReLU-gain bound, 2.45x wider); tch's defaults on request.
    #[test]
    fn pytorch_init_is_pytorchs_defaults() {
        let _init = crate::train::INIT_LOCK
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let var = |init: Init, name: &str| {
            let vs = nn::VarStore::new(Device::Cpu);
            tch::manual_seed(0);
            build(&vs.root(), Arch::Resnet9, init, 0.5, 10);
            vs.variables()[name].shallow_clone()
        };
        let max = |t: &Tensor| t.abs().max().double_value(&[]);
        let bn = var(Init::Pytorch, "layer1.prep.bn.weight");
        assert!(bn.eq(1.0).all().int64_value(&[]) == 1);
        assert!(
            var(Init::Pytorch, "layer1.prep.bn.bias")
                .eq(0.0)
                .all()
                .int64_value(&[])
                == 1
        );
        // layer1's conv: 32 -> 64 channels at width 0.5, fan_in 32 x 9.
        let bound = 1.0 / (32.0f64 * 9.0).sqrt();
        let conv = var(Init::Pytorch, "layer1.prep.conv.weight");
        assert!(
            max(&conv) <= bound && max(&conv) > 0.95 * bound,
            "{}",
            max(&conv)
        );
        let linear = var(Init::Pytorch, "classifier.weight");
        assert!(max(&linear) <= 1.0 / 256f64.sqrt());
        assert!(max(&var(Init::Tch, "layer1.prep.conv.weight")) > 2.0 * bound);
        assert!(
            var(Init::Tch, "layer1.prep.bn.weight")
                .lt(0.99)
                .any()
                .int64_value(&[])
                == 1
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
