// The few libtorch switches that tch does not expose, compiled against the same libtorch by
// build.rs. Every function catches C++ exceptions: an error comes back as a malloc'd message
// (free it with seedsweep_free), success as a null pointer.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <optional>
#include <vector>

static char *copy_message(const char *what) {
  char *out = static_cast<char *>(std::malloc(std::strlen(what) + 1));
  if (out != nullptr) {
    std::strcpy(out, what);
  }
  return out;
}

extern "C" {

// Deterministic algorithms everywhere (cuDNN deterministic, no cuDNN autotuning), or the fast
// default (autotuning on).
char *seedsweep_set_deterministic(int on) {
  try {
    at::globalContext().setDeterministicCuDNN(on != 0);
    at::globalContext().setBenchmarkCuDNN(on == 0);
    at::globalContext().setDeterministicAlgorithms(on != 0, /*warn_only=*/false);
    return nullptr;
  } catch (const std::exception &e) {
    return copy_message(e.what());
  }
}

// The type CUDA autocast casts to, for the calling thread: bfloat16 or (default) float16.
char *seedsweep_set_autocast_bf16(int on) {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, on != 0 ? at::kBFloat16 : at::kHalf);
    return nullptr;
  } catch (const std::exception &e) {
    return copy_message(e.what());
  }
}

// Enters a CUDA autocast region (or a region without it) for the calling thread; returns whether
// autocast was on before, for seedsweep_autocast_exit. (tch's own helper calls deprecated
// functions that print a warning.)
int seedsweep_autocast_enter(int enabled) {
  bool before = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
  at::autocast::increment_nesting();
  return before ? 1 : 0;
}

void seedsweep_autocast_exit(int before) {
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(at::kCUDA, before != 0);
}

// A new tensor with the data of `t` in channels_last (NHWC) memory format; null on error.
at::Tensor *seedsweep_channels_last(const at::Tensor *t) {
  try {
    return new at::Tensor(t->contiguous(at::MemoryFormat::ChannelsLast));
  } catch (const std::exception &) {
    return nullptr;
  }
}

// Whether `t` is laid out in channels_last format.
int seedsweep_is_channels_last(const at::Tensor *t) {
  try {
    return t->is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : 0;
  } catch (const std::exception &) {
    return 0;
  }
}

// One SGD step over all parameters that have a gradient, as torch.optim.SGD(fused=True):
// momentum, dampening 0, optional Nesterov and weight decay, in one fused kernel per device.
// With `found_inf` (a one-element float tensor, non-zero when a gradient overflowed) the step is
// skipped on the device, without a host synchronisation.
char *seedsweep_fused_sgd(at::Tensor **params, at::Tensor **buffers, int n, double weight_decay,
                          double momentum, double lr, int nesterov, const at::Tensor *found_inf) {
  try {
    std::vector<at::Tensor> ps, gs, bs;
    for (int i = 0; i < n; ++i) {
      const at::Tensor &g = params[i]->grad();
      if (!g.defined()) {
        continue;
      }
      ps.push_back(*params[i]);
      gs.push_back(g);
      bs.push_back(*buffers[i]);
    }
    at::NoGradGuard no_grad;
    std::optional<at::Tensor> inf;
    if (found_inf != nullptr) {
      inf = *found_inf;
    }
    at::_fused_sgd_(ps, gs, bs, weight_decay, momentum, lr, /*dampening=*/0.0, nesterov != 0,
                    /*maximize=*/false, /*is_first_step=*/false, std::nullopt, inf);
    return nullptr;
  } catch (const std::exception &e) {
    return copy_message(e.what());
  }
}

// Drops the parameters' gradients (zero_grad(set_to_none=True)): no kernels, and backward
// writes fresh gradients instead of accumulating into zeroed ones.
void seedsweep_grads_to_none(at::Tensor **params, int n) {
  for (int i = 0; i < n; ++i) {
    params[i]->mutable_grad().reset();
  }
}

// Makes the calling thread launch its CUDA work on a stream of its own from libtorch's pool, so
// that seeds training on several threads (--slots) overlap on the device instead of queueing on
// the default stream. Goes through c10's device-generic interface, which libc10_cuda registers
// when it loads, so no CUDA headers are needed here.
char *seedsweep_use_own_stream(int device) {
  try {
    const auto *impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    impl->exchangeStream(impl->getStreamFromGlobalPool(d, /*isHighPriority=*/false));
    return nullptr;
  } catch (const std::exception &e) {
    return copy_message(e.what());
  }
}

void seedsweep_free(char *message) { std::free(message); }
}
