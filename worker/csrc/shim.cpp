// The few libtorch switches that tch does not expose, compiled against the same libtorch by
// build.rs. Every function catches C++ exceptions: an error comes back as a malloc'd message
// (free it with seedsweep_free), success as a null pointer.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>

#include <cstdlib>
#include <cstring>
#include <exception>

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

void seedsweep_free(char *message) { std::free(message); }
}
