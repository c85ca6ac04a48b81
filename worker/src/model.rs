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
//! - [`Arch::Airbench94`], K. Jordan's airbench94 network (KellerJordan/cifar10-airbench,
//!   legacy/airbench94.py): a 2x2 conv of 24 filters without padding whose weights are frozen and
//!   set from the training data ([`crate::airbench`]; its bias trains), GELU; three conv groups
//!   of 64, 256, 256 channels, each conv - maxpool - BatchNorm - GELU - conv - BatchNorm - GELU;
//!   max pool 3; linear 256 -> 10 without bias; output x 1/9. Its BatchNorms have no weight (it
//!   is 1 and frozen in airbench), momentum 0.4 and epsilon 1e-12; each 3x3 conv starts as
//!   PyTorch's default with its first min(in, out) filters replaced by the identity (dirac).
//!   1,971,352 trainable parameters at width 1.0.
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
pub use seedsweep_core::spec::Init;
use seedsweep_core::spec::Model;

/// What each [`Init`] means for tch's layers.
trait InitLayers {
    fn weights(self, fan_in: i64) -> nn::Init;
    fn batch_norm(self) -> nn::BatchNormConfig;
}

impl InitLayers for Init {
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

/// The network (the sweep file's `train.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Resnet9,
    Resnet9Skinny,
    Airbench94,
}

impl From<Model> for Arch {
    fn from(m: Model) -> Arch {
        match m {
            Model::Resnet9 => Arch::Resnet9,
            Model::Resnet9Skinny => Arch::Resnet9Skinny,
            Model::Airbench94 => Arch::Airbench94,
        }
    }
}

impl Arch {
    /// Output channels of prep (airbench94: the whitening layer, whatever the width), layer1,
    /// layer2, layer3 at width 1.0.
    fn channels(self) -> [i64; 4] {
        match self {
            Arch::Resnet9 => [64, 128, 256, 512],
            Arch::Resnet9Skinny => [64, 128, 256, 256],
            Arch::Airbench94 => [WHITEN_FILTERS, 64, 256, 256],
        }
    }

    fn output_scale(self) -> f64 {
        match self {
            Arch::Resnet9 => 0.125,
            Arch::Resnet9Skinny => 0.1,
            Arch::Airbench94 => 1.0 / 9.0,
        }
    }

    fn activation(self, x: &Tensor) -> Tensor {
        match self {
            Arch::Resnet9 => x.relu(),
            // CELU(x, a) = a * CELU(x / a, 1); libtorch's binding takes no alpha.
            Arch::Resnet9Skinny => (x / CELU_ALPHA).celu() * CELU_ALPHA,
            Arch::Airbench94 => x.gelu("none"),
        }
    }

    /// The per-channel mean and standard deviation that images are normalised with, each as
    /// its network's authors' code has it. The mean is CIFAR-10's everywhere; the std is the
    /// data's (`np.std` of the training pixels) for Page (cifar10-fast `utils.py`,
    /// `cifar10_std`) and Jordan (airbench's `CIFAR_STD`), and the smaller figure that many
    /// CIFAR-10 scripts copy for Picard (deepseed `datasets.py`, `build_dataset`'s
    /// `_CIFAR_STD`).
    pub fn normalisation(self) -> ([f32; 3], [f32; 3]) {
        const MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
        match self {
            Arch::Resnet9 => (MEAN, [0.2471, 0.2435, 0.2616]),
            Arch::Resnet9Skinny => (MEAN, [0.2023, 0.1994, 0.2010]),
            Arch::Airbench94 => (MEAN, [0.2470, 0.2435, 0.2616]),
        }
    }
}

/// The whitening layer: two filters (w and -w) per eigenvector of 2x2x3 patches.
pub const WHITEN_FILTERS: i64 = 2 * 3 * WHITEN_KERNEL * WHITEN_KERNEL;
pub const WHITEN_KERNEL: i64 = 2;
/// The path of the whitening layer's frozen weights.
pub const WHITEN_WEIGHT: &str = "whiten.weight";
/// The path of the whitening layer's bias, trained for the first `whiten_bias_epochs`.
pub const WHITEN_BIAS: &str = "whiten.bias";

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
pub struct Network {
    stages: Vec<Box<dyn ModuleT>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Network {{ {} stages }}", self.stages.len())
    }
}

impl Network {
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

impl ModuleT for Network {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for stage in &self.stages {
            x = stage.forward_t(&x, train);
        }
        x
    }
}

/// Builds `arch` under `p` for 3-channel 32x32 inputs and `classes` outputs.
pub fn build(p: &nn::Path, arch: Arch, init: Init, width: f64, classes: i64) -> Network {
    match arch {
        Arch::Resnet9 | Arch::Resnet9Skinny => resnet9(p, arch, init, width, classes),
        Arch::Airbench94 => airbench94(p, width, classes),
    }
}

/// A global max pool, as max_pool2d over the whole map: the same numbers as an adaptive max pool
/// to 1x1, and unlike it, its CUDA backward has a deterministic kernel.
fn global_max_pool() -> impl ModuleT {
    nn::func_t(|x, _| {
        let side = [x.size()[2], x.size()[3]];
        x.max_pool2d(side, side, [0, 0], [1, 1], false).flat_view()
    })
}

fn resnet9(p: &nn::Path, arch: Arch, init: Init, width: f64, classes: i64) -> Network {
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
    Network {
        stages: vec![
            Box::new(conv_bn(p / "prep", net, 3, c0, prep_pools)),
            Box::new(layer(p / "layer1", net, c0, c1, true)),
            Box::new(layer(p / "layer2", net, c1, c2, false)),
            Box::new(layer(p / "layer3", net, c2, c3, true)),
            Box::new(global_max_pool()),
            Box::new(nn::func_t(move |x, _| x.apply(&classifier) * scale)),
        ],
    }
}

/// airbench's BatchNorm: a trained bias, no weight, momentum 0.4 (its 0.6 is the share kept).
fn batch_norm_without_weight(p: nn::Path, c: i64) -> impl ModuleT + use<> {
    let bias = p.zeros("bias", &[c]);
    let mean = p.zeros_no_train("running_mean", &[c]);
    let var = p.ones_no_train("running_var", &[c]);
    nn::func_t(move |x, train| {
        x.batch_norm(
            None,
            Some(&bias),
            Some(&mean),
            Some(&var),
            train,
            0.4,
            1e-12,
            true,
        )
    })
}

/// A 3x3 conv as airbench starts it: PyTorch's default, then the identity in its first
/// min(in, out) filters.
fn dirac_conv(p: nn::Path, c_in: i64, c_out: i64) -> nn::Conv2D {
    let conv = nn::conv2d(
        p,
        c_in,
        c_out,
        3,
        nn::ConvConfig {
            padding: 1,
            bias: false,
            ws_init: Init::Pytorch.weights(c_in * 9),
            ..Default::default()
        },
    );
    let k = c_in.min(c_out);
    tch::no_grad(|| {
        let mut head = conv.ws.narrow(0, 0, k);
        let _ = head.zero_();
        head.select(2, 1).select(2, 1).copy_(&Tensor::eye_m(
            k,
            c_in,
            (conv.ws.kind(), conv.ws.device()),
        ));
    });
    conv
}

/// airbench's conv group: conv, max pool, BatchNorm, GELU, conv, BatchNorm, GELU.
fn conv_group(p: nn::Path, c_in: i64, c_out: i64) -> nn::SequentialT {
    let gelu = |x: &Tensor| Arch::Airbench94.activation(x);
    nn::seq_t()
        .add(dirac_conv(&p / "conv1", c_in, c_out))
        .add_fn(|x| x.max_pool2d_default(2))
        .add(batch_norm_without_weight(&p / "norm1", c_out))
        .add_fn(gelu)
        .add(dirac_conv(&p / "conv2", c_out, c_out))
        .add(batch_norm_without_weight(&p / "norm2", c_out))
        .add_fn(gelu)
}

fn airbench94(p: &nn::Path, width: f64, classes: i64) -> Network {
    let [c0, c1, c2, c3] = Arch::Airbench94.channels();
    let [c1, c2, c3] = [c1, c2, c3].map(|c| channels(c, width));
    let k = WHITEN_KERNEL;
    // Set from the training data before the first step; never trained.
    let whiten = (p / "whiten").zeros_no_train("weight", &[c0, 3, k, k]);
    let whiten_bias = (p / "whiten").zeros("bias", &[c0]);
    let classifier = nn::linear(
        p / "classifier",
        c3,
        classes,
        nn::LinearConfig {
            bias: false,
            ws_init: Init::Pytorch.weights(c3),
            ..Default::default()
        },
    );
    let scale = Arch::Airbench94.output_scale();
    Network {
        stages: vec![
            Box::new(nn::func_t(move |x, _| {
                let x = x.conv2d(&whiten, Some(&whiten_bias), [1, 1], [0, 0], [1, 1], 1);
                Arch::Airbench94.activation(&x)
            })),
            Box::new(conv_group(p / "block1", c0, c1)),
            Box::new(conv_group(p / "block2", c1, c2)),
            Box::new(conv_group(p / "block3", c2, c3)),
            Box::new(nn::func_t(|x, _| {
                x.max_pool2d([3, 3], [3, 3], [0, 0], [1, 1], false)
                    .flat_view()
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

    /// The network, its parameter count and each stage's output shape for two images.
    fn built(arch: Arch, width: f64) -> (nn::VarStore, i64, Vec<Vec<i64>>) {
        // Building a model draws from libtorch's global generator: not while a seed initialises.
        let _init = crate::train::INIT_LOCK
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let vs = nn::VarStore::new(Device::Cpu);
        let net = build(&vs.root(), arch, Init::Pytorch, width, 10);
        let x = Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let outs = net.stage_outputs(&x, false);
        let n = parameter_count(&vs);
        (vs, n, outs.iter().map(Tensor::size).collect())
    }

    fn shapes(arch: Arch, width: f64) -> (i64, Vec<Vec<i64>>) {
        let (_, n, s) = built(arch, width);
        (n, s)
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

    /// airbench's parameter count and stage shapes at width 1.0 (checked against a PyTorch
    /// build of the reference network: 1,972,792 parameters, of which 1,971,352 require
    /// gradients; here the 1,152 BatchNorm weights, fixed at 1, do not exist).
    #[test]
    fn airbench94_matches_the_reference() {
        let (vs, n, shapes) = built(Arch::Airbench94, 1.0);
        assert_eq!(n, 1_971_352);
        assert_eq!(
            shapes,
            vec![
                vec![2, 24, 31, 31],
                vec![2, 64, 15, 15],
                vec![2, 256, 7, 7],
                vec![2, 256, 3, 3],
                vec![2, 256],
                vec![2, 10]
            ]
        );
        // Dirac: a conv group's second conv starts as the identity.
        let w = vs.variables()["block2.conv2.weight"].shallow_clone();
        assert_eq!(w.double_value(&[5, 5, 1, 1]), 1.0);
        assert_eq!(w.abs().sum(Kind::Double).double_value(&[]), 256.0);
        // The first conv's first 24 filters are the identity, the other 40 PyTorch's default.
        let first = vs.variables()["block1.conv1.weight"].shallow_clone();
        assert_eq!(
            first
                .narrow(0, 0, 24)
                .abs()
                .sum(Kind::Double)
                .double_value(&[]),
            24.0
        );
        let bound = 1.0 / (24.0f64 * 9.0).sqrt();
        let rest = first.narrow(0, 24, 40).abs().max().double_value(&[]);
        assert!(rest <= bound && rest > 0.9 * bound, "{rest}");
    }

    #[test]
    fn width_scales_channels() {
        let (n, s) = shapes(Arch::Resnet9, 0.25);
        // Convolutions dominate and scale with width^2.
        assert!(n > 6_573_120 / 20 && n < 6_573_120 / 12, "{n}");
        assert_eq!(s[3], vec![2, 128, 4, 4]);
    }
}
