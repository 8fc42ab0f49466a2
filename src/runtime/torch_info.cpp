// What libtorch itself says about this process, for `med3d doctor` and the
// GPU check: its build configuration (at::show_config), the CUDA runtime
// and cuDNN versions its CUDA library was built with, and (when compiled
// with CUDA headers, MED3D_CUDA_HEADERS) the caching allocator's peak
// memory. Every entry point catches C++ exceptions: a CPU-only libtorch
// answers "unknown" (-1), never std::terminate.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include <ATen/Context.h>
#include <ATen/Version.h>
#ifdef MED3D_CUDA_HEADERS
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace {
char* dup(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}
}  // namespace

extern "C" {

void med3d_torch_free_str(char* s) { std::free(s); }

// at::show_config(): "PyTorch built with: ... Build settings: TORCH_VERSION=..., USE_CUDA=ON, ...".
char* med3d_torch_show_config() {
  try {
    return dup(at::show_config());
  } catch (...) {
    return nullptr;
  }
}

// CUDA runtime version libtorch_cuda was built with (13000 = 13.0); -1 without libtorch_cuda.
int64_t med3d_torch_cudart_version() {
  try {
    return static_cast<int64_t>(at::detail::getCUDAHooks().versionCUDART());
  } catch (...) {
    return -1;
  }
}

// cuDNN version (91900 = 9.19.0); -1 without libtorch_cuda or cuDNN.
int64_t med3d_torch_cudnn_version() {
  try {
    return static_cast<int64_t>(at::detail::getCUDAHooks().versionCuDNN());
  } catch (...) {
    return -1;
  }
}

// 1 when this file was compiled with the CUDA allocator's headers.
int med3d_torch_has_cuda_stats() {
#ifdef MED3D_CUDA_HEADERS
  return 1;
#else
  return 0;
#endif
}

// Peak bytes allocated / reserved by the CUDA caching allocator on `device`
// since the last reset; 0 on success, 1 when unknown.
int med3d_torch_cuda_peak(int device, int64_t* allocated, int64_t* reserved) {
#ifdef MED3D_CUDA_HEADERS
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[agg].peak;
    *reserved = stats.reserved_bytes[agg].peak;
    return 0;
  } catch (...) {
    return 1;
  }
#else
  (void)device;
  (void)allocated;
  (void)reserved;
  return 1;
#endif
}

int med3d_torch_cuda_reset_peak(int device) {
#ifdef MED3D_CUDA_HEADERS
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return 1;
  }
#else
  (void)device;
  return 1;
#endif
}

}  // extern "C"
