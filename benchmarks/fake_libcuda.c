/* A stand-in for the CUDA driver library (libcuda.so.1) on a machine without a GPU, built by
 * benchmarks/host_stub.py. It lets Triton's real launcher (its C argument packing included) run up
 * to the driver call: cuLaunchKernelEx counts the launch and returns success without doing
 * anything. Only the entry points Triton's launcher and utilities reference are defined; the
 * ones that answer questions write plausible values (device 0, an sm_90 device, the pointer
 * itself as the device pointer). Nothing here touches memory a caller did not pass. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

typedef int CUresult;
static long long g_launches = 0;

long long fake_cuda_launches(void) { return g_launches; }
void fake_cuda_reset(void) { g_launches = 0; }

CUresult cuLaunchKernelEx(const void *config, void *f, void **params, void **extra) {
  (void)config; (void)f; (void)params; (void)extra;
  ++g_launches;
  return 0;
}
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void *stream, void **params, void **extra) {
  (void)f; (void)gx; (void)gy; (void)gz; (void)bx; (void)by; (void)bz; (void)smem; (void)stream; (void)params;
  (void)extra;
  ++g_launches;
  return 0;
}
CUresult cuPointerGetAttribute(void *data, int attribute, uint64_t ptr) {
  (void)attribute;
  if (data) *(uint64_t *)data = ptr;
  return 0;
}
CUresult cuPointerGetAttributes(unsigned n, int *attrs, void **data, uint64_t ptr) {
  (void)attrs; (void)ptr;
  for (unsigned i = 0; i < n; ++i) if (data && data[i]) *(uint64_t *)data[i] = 0;
  return 0;
}
CUresult cuCtxGetCurrent(void **pctx) { if (pctx) *pctx = (void *)1; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { (void)ctx; return 0; }
CUresult cuCtxGetDevice(int *dev) { if (dev) *dev = 0; return 0; }
CUresult cuCtxGetLimit(size_t *v, int limit) { (void)limit; if (v) *v = 0; return 0; }
CUresult cuCtxSetLimit(int limit, size_t v) { (void)limit; (void)v; return 0; }
CUresult cuDeviceGet(int *dev, int ordinal) { if (dev) *dev = ordinal; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, int dev) { (void)attr; (void)dev; if (v) *v = 0; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **pctx, int dev) { (void)dev; if (pctx) *pctx = (void *)1; return 0; }
CUresult cuDriverGetVersion(int *v) { if (v) *v = 13000; return 0; }
CUresult cuFuncGetAttribute(int *v, int attr, void *f) { (void)attr; (void)f; if (v) *v = 0; return 0; }
CUresult cuFuncSetAttribute(void *f, int attr, int v) { (void)f; (void)attr; (void)v; return 0; }
CUresult cuFuncSetCacheConfig(void *f, int c) { (void)f; (void)c; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; if (s) *s = "fake libcuda"; return 0; }
CUresult cuModuleGetFunction(void **f, void *m, const char *name) { (void)m; (void)name; if (f) *f = (void *)1; return 0; }
CUresult cuModuleLoadData(void **m, const void *image) { (void)image; if (m) *m = (void *)1; return 0; }
CUresult cuModuleUnload(void *m) { (void)m; return 0; }
CUresult cuOccupancyMaxActiveClusters(int *n, void *f, const void *config) { (void)f; (void)config; if (n) *n = 1; return 0; }
CUresult cuStreamIsCapturing(void *stream, int *status) { (void)stream; if (status) *status = 0; return 0; }
CUresult cuTensorMapEncodeTiled(void *m, ...) { (void)m; return 0; }
CUresult cuTensorMapEncodeIm2col(void *m, ...) { (void)m; return 0; }
