/* perf host benchmark: a stand-in for libcuda.so.1 with no GPU behind it.
 *
 * Triton's real launcher (backends/nvidia/driver.c, compiled by Triton as `cuda_utils`) is
 * linked against this library instead of NVIDIA's, so everything a kernel call does on the
 * host runs as on a GPU machine (argument binding, cache lookups, packing every argument in
 * C, pointer queries) except the launch itself: cuLaunchKernelEx only counts. The device
 * answers as an H200 (sm_90, 132 SMs); module loading hands out dummy handles and pointer
 * queries return the pointer they are given (host memory is never dereferenced).
 *
 * Only the entry points driver.c uses are defined (perf/host_driver.py builds and loads it).
 */
#include "cuda.h"

#include <stddef.h>

static unsigned long long launches = 0;
static unsigned long long next_module = 0x1000;
static int context_token;

unsigned long long triton_bn_stub_launches(void) { return launches; }

CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams,
                                  void **extra) {
  (void)config, (void)f, (void)kernelParams, (void)extra;
  ++launches;
  return CUDA_SUCCESS;
}

/* ---------------------------------------------------------------- device: an H200 */
CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal) {
  *device = ordinal;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
  (void)dev;
  switch (attrib) {
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *pi = 9; break;
  case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *pi = 0; break;
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *pi = 232448; break;
  case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *pi = 233472; break;
  case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *pi = 65536; break;
  case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *pi = 132; break;
  case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *pi = 32; break;
  case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *pi = 1980000; break;
  case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *pi = 3201000; break;
  case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *pi = 6144; break;
  default: *pi = 0; break;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDriverGetVersion(int *driverVersion) {
  *driverVersion = 12080;
  return CUDA_SUCCESS;
}

/* ---------------------------------------------------------------- context: always current */
CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
  (void)dev;
  *pctx = (CUcontext)&context_token;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext *pctx) {
  *pctx = (CUcontext)&context_token;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetCurrent(CUcontext ctx) {
  (void)ctx;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetDevice(CUdevice *device) {
  *device = 0;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetLimit(size_t *pvalue, CUlimit limit) {
  (void)limit;
  *pvalue = 0;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxSetLimit(CUlimit limit, size_t value) {
  (void)limit, (void)value;
  return CUDA_SUCCESS;
}

/* ---------------------------------------------------------------- modules and functions */
CUresult CUDAAPI cuModuleLoadData(CUmodule *module, const void *image) {
  (void)image;
  *module = (CUmodule)(next_module++);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleUnload(CUmodule hmod) {
  (void)hmod;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name) {
  (void)name;
  *hfunc = (CUfunction)hmod;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncGetAttribute(int *pi, CUfunction_attribute attrib, CUfunction hfunc) {
  (void)hfunc;
  switch (attrib) {
  case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
  case CU_FUNC_ATTRIBUTE_NUM_REGS: *pi = 32; break;
  default: *pi = 0; break;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncSetAttribute(CUfunction hfunc, CUfunction_attribute attrib, int value) {
  (void)hfunc, (void)attrib, (void)value;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction hfunc, CUfunc_cache config) {
  (void)hfunc, (void)config;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuOccupancyMaxActiveClusters(int *numClusters, CUfunction func, const CUlaunchConfig *config) {
  (void)func, (void)config;
  *numClusters = 1;
  return CUDA_SUCCESS;
}

/* ---------------------------------------------------------------- memory and streams */
CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr ptr) {
  (void)attribute;
  *(CUdeviceptr *)data = ptr; /* the "device pointer" of a host pointer is itself */
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamIsCapturing(CUstream hStream, CUstreamCaptureStatus *captureStatus) {
  (void)hStream;
  *captureStatus = CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGetErrorString(CUresult error, const char **pStr) {
  (void)error;
  *pStr = "error in the libcuda stub of the perf host benchmark";
  return CUDA_SUCCESS;
}

/* Tensor-memory descriptors (TMA): triton_bn does not use them; refuse, loudly. */
CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap *tensorMap, CUtensorMapDataType tensorDataType,
                                        cuuint32_t tensorRank, void *globalAddress, const cuuint64_t *globalDim,
                                        const cuuint64_t *globalStrides, const cuuint32_t *boxDim,
                                        const cuuint32_t *elementStrides, CUtensorMapInterleave interleave,
                                        CUtensorMapSwizzle swizzle, CUtensorMapL2promotion l2Promotion,
                                        CUtensorMapFloatOOBfill oobFill) {
  (void)tensorMap, (void)tensorDataType, (void)tensorRank, (void)globalAddress, (void)globalDim;
  (void)globalStrides, (void)boxDim, (void)elementStrides, (void)interleave, (void)swizzle;
  (void)l2Promotion, (void)oobFill;
  return CUDA_ERROR_NOT_SUPPORTED;
}

CUresult CUDAAPI cuTensorMapEncodeIm2col(CUtensorMap *tensorMap, CUtensorMapDataType tensorDataType,
                                         cuuint32_t tensorRank, void *globalAddress, const cuuint64_t *globalDim,
                                         const cuuint64_t *globalStrides, const int *pixelBoxLowerCorner,
                                         const int *pixelBoxUpperCorner, cuuint32_t channelsPerPixel,
                                         cuuint32_t pixelsPerColumn, const cuuint32_t *elementStrides,
                                         CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                         CUtensorMapL2promotion l2Promotion, CUtensorMapFloatOOBfill oobFill) {
  (void)tensorMap, (void)tensorDataType, (void)tensorRank, (void)globalAddress, (void)globalDim;
  (void)globalStrides, (void)pixelBoxLowerCorner, (void)pixelBoxUpperCorner, (void)channelsPerPixel;
  (void)pixelsPerColumn, (void)elementStrides, (void)interleave, (void)swizzle, (void)l2Promotion, (void)oobFill;
  return CUDA_ERROR_NOT_SUPPORTED;
}
