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
