//! ResNet-9 of the DAWNBench lineage (D. Page, "How to train your ResNet", 2018):
//! prep conv 64; layer1 conv 128 + maxpool + residual(2 x 128); layer2 conv 256 + maxpool;
//! layer3 conv 512 + maxpool + residual(2 x 512); global max pool; linear 512 -> 10 without bias;
//! output x 0.125. Every conv is 3x3, padding 1, no bias, followed by BatchNorm and ReLU.
//! 6,573,120 trainable parameters at width 1.0; `width` scales every channel count.
//!
//! The variable paths (`prep/conv`, `layer1/res1/bn`, ...) are the checkpoint format.

use tch::Tensor;
use tch::nn::{self, ModuleT};

fn channels(base: i64, width: f64) -> i64 {
    ((base as f64 * width).round() as i64).max(1)
}

fn conv_bn(p: nn::Path, c_in: i64, c_out: i64) -> nn::SequentialT {
    let conv = nn::ConvConfig {
        padding: 1,
        bias: false,
        ..Default::default()
    };
    nn::seq_t()
        .add(nn::conv2d(&p / "conv", c_in, c_out, 3, conv))
        .add(nn::batch_norm2d(&p / "bn", c_out, Default::default()))
        .add_fn(|x| x.relu())
}

/// conv-bn-relu, max pool, then (optionally) a residual branch of two conv-bn-relu.
fn layer(p: nn::Path, c_in: i64, c_out: i64, residual: bool) -> impl ModuleT + use<> {
    let pre = conv_bn(&p / "prep", c_in, c_out).add_fn(|x| x.max_pool2d_default(2));
    let res = residual
        .then(|| conv_bn(&p / "res1", c_out, c_out).add(conv_bn(&p / "res2", c_out, c_out)));
    nn::func_t(move |x, train| {
        let x = pre.forward_t(x, train);
        match &res {
            Some(r) => &x + r.forward_t(&x, train),
            None => x,
        }
    })
}

/// Builds ResNet-9 under `p` for 3-channel 32x32 inputs and `classes` outputs.
pub fn resnet9(p: &nn::Path, width: f64, classes: i64) -> nn::SequentialT {
    let (c64, c128, c256, c512) = (
        channels(64, width),
        channels(128, width),
        channels(256, width),
        channels(512, width),
    );
    let linear = nn::LinearConfig {
        bias: false,
        ..Default::default()
    };
    nn::seq_t()
        .add(conv_bn(p / "prep", 3, c64))
        .add(layer(p / "layer1", c64, c128, true))
        .add(layer(p / "layer2", c128, c256, false))
        .add(layer(p / "layer3", c256, c512, true))
        .add_fn(|x| x.adaptive_max_pool2d([1, 1]).0.flat_view())
        .add(nn::linear(p / "classifier", c512, classes, linear))
        .add_fn(|x| x * 0.125)
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

    #[test]
    fn full_width_matches_the_reference_parameter_count() {
        // Building a model draws from libtorch's global generator: not while a seed initialises.
        let _init = crate::train::INIT_LOCK
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let vs = nn::VarStore::new(Device::Cpu);
        let net = resnet9(&vs.root(), 1.0, 10);
        assert_eq!(parameter_count(&vs), 6_573_120);
        let y = net.forward_t(
            &Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)),
            false,
        );
        assert_eq!(y.size(), vec![2, 10]);
    }

    #[test]
    fn width_scales_channels() {
        // Building a model draws from libtorch's global generator: not while a seed initialises.
        let _init = crate::train::INIT_LOCK
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = resnet9(&vs.root(), 0.25, 10);
        let n = parameter_count(&vs);
        // Convolutions dominate and scale with width^2.
        assert!(n > 6_573_120 / 20 && n < 6_573_120 / 12, "{n}");
    }
}
