//! Safe wrappers over `csrc/shim.cpp`: libtorch switches that tch does not expose
//! (deterministic algorithms, the autocast type, the channels_last memory format).

use std::ffi::{CStr, c_char, c_int};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn seedsweep_set_deterministic(on: c_int) -> *mut c_char;
    fn seedsweep_set_autocast_bf16(on: c_int) -> *mut c_char;
    fn seedsweep_channels_last(t: *const C_tensor) -> *mut C_tensor;
    fn seedsweep_is_channels_last(t: *const C_tensor) -> c_int;
    fn seedsweep_fused_sgd(
        params: *const *mut C_tensor,
        buffers: *const *mut C_tensor,
        n: c_int,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        nesterov: c_int,
        found_inf: *const C_tensor,
    ) -> *mut c_char;
    fn seedsweep_grads_to_none(params: *const *mut C_tensor, n: c_int);
    fn seedsweep_use_own_stream(device: c_int) -> *mut c_char;
    fn seedsweep_autocast_enter(enabled: c_int) -> c_int;
    fn seedsweep_autocast_exit(before: c_int);
    fn seedsweep_free(message: *mut c_char);
}

fn check(message: *mut c_char) -> Result<(), String> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null result is a NUL-terminated string the shim allocated; freed once here.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    unsafe { seedsweep_free(message) };
    Err(text)
}

static DETERMINISTIC: AtomicBool = AtomicBool::new(false);

/// Turns deterministic algorithms on for the whole process (they stay on: several seeds may train
/// at once, and a seed that asked for exact repeats must keep them). Without it the process
/// keeps libtorch's fast default with cuDNN autotuning, see [`favour_speed`].
pub fn set_deterministic(on: bool) -> Result<(), String> {
    if on && !DETERMINISTIC.swap(true, Ordering::SeqCst) {
        // SAFETY: a plain call into the shim; it catches every C++ exception.
        check(unsafe { seedsweep_set_deterministic(1) })?;
    }
    Ok(())
}

/// The fast default: cuDNN autotuning on, unless a seed asked for deterministic algorithms.
pub fn favour_speed() -> Result<(), String> {
    if DETERMINISTIC.load(Ordering::SeqCst) {
        return Ok(());
    }
    // SAFETY: as above.
    check(unsafe { seedsweep_set_deterministic(0) })
}

/// CUDA autocast casts to bfloat16 (`true`) or float16, for the calling thread.
pub fn set_autocast_bfloat16(on: bool) -> Result<(), String> {
    // SAFETY: as above.
    check(unsafe { seedsweep_set_autocast_bf16(c_int::from(on)) })
}

/// Runs `f` with CUDA autocast on for the calling thread when `enabled`; otherwise just runs it
/// (fp32 training pays nothing per step).
pub fn autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if !enabled {
        return f();
    }
    // SAFETY: plain calls into the shim; they only set thread-local autocast state.
    let before = unsafe { seedsweep_autocast_enter(c_int::from(enabled)) };
    let out = f();
    unsafe { seedsweep_autocast_exit(before) };
    out
}

/// `t` in channels_last memory format (for 4-d tensors; others come back as they are).
pub fn channels_last(t: &Tensor) -> Tensor {
    if t.dim() != 4 {
        return t.shallow_clone();
    }
    // SAFETY: `as_ptr` is a live tensor handle; the shim returns a new owned handle or null.
    let out = unsafe { seedsweep_channels_last(t.as_ptr()) };
    if out.is_null() {
        tracing::warn!("could not convert a tensor to channels_last; keeping its layout");
        return t.shallow_clone();
    }
    // SAFETY: `out` is a fresh heap-allocated at::Tensor that we now own.
    unsafe { Tensor::from_ptr(out) }
}

fn handles(tensors: &[Tensor]) -> Vec<*mut C_tensor> {
    tensors
        .iter()
        .map(|t| t.as_ptr() as *mut C_tensor)
        .collect()
}

/// SGD settings for [`fused_sgd`].
#[derive(Debug, Clone, Copy)]
pub struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
}

/// One fused SGD step (libtorch's `_fused_sgd_`) over `params` and their momentum `buffers`; with
/// `found_inf` non-zero on the device the step is skipped there.
pub fn fused_sgd(
    params: &[Tensor],
    buffers: &[Tensor],
    step: SgdStep,
    found_inf: Option<&Tensor>,
) -> Result<(), String> {
    assert_eq!(
        params.len(),
        buffers.len(),
        "one momentum buffer per parameter"
    );
    let (p, b) = (handles(params), handles(buffers));
    let inf = found_inf.map_or(std::ptr::null(), Tensor::as_ptr);
    // SAFETY: live tensor handles, `n` of each; the shim catches every C++ exception.
    check(unsafe {
        seedsweep_fused_sgd(
            p.as_ptr(),
            b.as_ptr(),
            p.len() as c_int,
            step.weight_decay,
            step.momentum,
            step.lr,
            c_int::from(step.nesterov),
            inf,
        )
    })
}

/// Drops the gradients of `params` (set to none, as PyTorch's default `zero_grad`).
pub fn grads_to_none(params: &[Tensor]) {
    let p = handles(params);
    // SAFETY: live tensor handles; resetting a gradient cannot throw.
    unsafe { seedsweep_grads_to_none(p.as_ptr(), p.len() as c_int) }
}

/// Makes the calling thread launch its work on CUDA device `device` on a stream of its own.
pub fn use_own_stream(device: usize) -> Result<(), String> {
    // SAFETY: a plain call into the shim; it catches every C++ exception.
    check(unsafe { seedsweep_use_own_stream(device as c_int) })
}

pub fn is_channels_last(t: &Tensor) -> bool {
    // SAFETY: a live tensor handle; the shim only reads it.
    unsafe { seedsweep_is_channels_last(t.as_ptr()) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn converts_to_channels_last_keeping_values() {
        let x = Tensor::arange(2 * 3 * 4 * 5, (Kind::Float, Device::Cpu)).view([2, 3, 4, 5]);
        assert!(!is_channels_last(&x));
        let y = channels_last(&x);
        assert!(is_channels_last(&y));
        assert_eq!(y.stride(), vec![60, 1, 15, 3]);
        assert!(y.equal(&x));
    }

    #[test]
    fn autocast_type_switches() {
        set_autocast_bfloat16(true).unwrap();
        set_autocast_bfloat16(false).unwrap();
    }
}
