// An emulated GPU behind the CUDA driver API: built as a shared library whose soname is
// libcuda.so, and loaded into a test process before cudarc looks for the driver, it is the driver
// cudarc finds (the dynamic loader hands out an already loaded library whose soname matches). So
// whale-kernels' own launchers (crates/kernels/src/cuda) run unchanged on the CPU: memory is host
// memory, streams and events are synchronous, a module's PTX is known by its .entry names, and
// cuLaunchKernel runs the kernel of that name in its module's host emulation (launch.h's
// whale_emulate_launch, one library per kernels/*.cu, registered with
// whale_emulated_driver_add_module). The device is an H200 as the launchers see it: sm_90, 132
// multiprocessors, 227 KB of shared memory per block. Driven by crates/kernels/tests/common/
// emulator.rs (emulated_gpu); what it cannot check is the hardware itself.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

constexpr CUresult kSuccess = 0, kInvalidValue = 1, kInvalidDevice = 101, kNotFound = 500, kLaunchFailed = 719;

struct Param {
    unsigned size, pointee;
};
typedef int (*SignatureFn)(const char*, const Param**, unsigned*);
typedef int (*LaunchFn)(const char*, const unsigned*, const unsigned*, unsigned, int, void**, const long long*,
                        const int*, char*, size_t);

struct Library {
    SignatureFn signature;
    LaunchFn launch;
};

struct Function {
    std::string name;
    const Library* lib;
    unsigned n_params;
};

struct Module {
    std::vector<std::unique_ptr<Function>> functions;
};

std::mutex lock;
std::vector<std::unique_ptr<Library>> libraries;
int context_token, stream_token, event_token; // addresses stand for the handles

} // namespace

extern "C" {

// Registers the host emulation of one kernel module (a library built from launch.h); 0 or -1.
__attribute__((visibility("default"))) int whale_emulated_driver_add_module(const char* path) {
    void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) return -1;
    auto signature = reinterpret_cast<SignatureFn>(dlsym(h, "whale_emulate_signature"));
    auto launch = reinterpret_cast<LaunchFn>(dlsym(h, "whale_emulate_launch"));
    if (!signature || !launch) return -1;
    std::lock_guard<std::mutex> g(lock);
    libraries.push_back(std::unique_ptr<Library>(new Library{signature, launch}));
    return 0;
}

#define API extern "C" __attribute__((visibility("default")))

API CUresult cuInit(unsigned) { return kSuccess; }
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return kSuccess;
}
API CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return kSuccess;
}
API CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return kInvalidDevice;
    *d = 0;
    return kSuccess;
}
API CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, size_t(len), "emulated H200 (whale host emulation)");
    return kSuccess;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = size_t(141) << 30;
    return kSuccess;
}
API CUresult cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
    case 1: *v = 1024; break;   // max threads per block
    case 10: *v = 32; break;    // warp size
    case 16: *v = 132; break;   // multiprocessors
    case 75: *v = 9; break;     // compute capability
    case 76: *v = 0; break;
    case 97: *v = 232448; break; // shared memory per block, opted in
    default: *v = 0;             // memory pools (115) among them: cudarc then allocates synchronously
    }
    return kSuccess;
}
API CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &context_token;
    return kSuccess;
}
API CUresult cuDevicePrimaryCtxRelease_v2(int) { return kSuccess; }
API CUresult cuCtxSetCurrent(void*) { return kSuccess; }
API CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = &context_token;
    return kSuccess;
}
API CUresult cuCtxSynchronize() { return kSuccess; }

API CUresult cuStreamCreate(void** s, unsigned) {
    *s = &stream_token;
    return kSuccess;
}
API CUresult cuStreamDestroy_v2(void*) { return kSuccess; }
API CUresult cuStreamSynchronize(void*) { return kSuccess; }
API CUresult cuStreamWaitEvent(void*, void*, unsigned) { return kSuccess; }
API CUresult cuEventCreate(void** e, unsigned) {
    *e = &event_token;
    return kSuccess;
}
API CUresult cuEventDestroy_v2(void*) { return kSuccess; }
API CUresult cuEventRecord(void*, void*) { return kSuccess; }
API CUresult cuEventSynchronize(void*) { return kSuccess; }
API CUresult cuEventQuery(void*) { return kSuccess; }
API CUresult cuEventElapsedTime(float* ms, void*, void*) {
    *ms = 0.0f;
    return kSuccess;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    void* m = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
    if (!m) return 2; // out of memory
    *p = reinterpret_cast<CUdeviceptr>(m);
    return kSuccess;
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
API CUresult cuMemFree_v2(CUdeviceptr p) {
    std::free(reinterpret_cast<void*>(p));
    return kSuccess;
}
API CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
API CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    *free = *total = size_t(141) << 30;
    return kSuccess;
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return kSuccess;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) { return cuMemcpyHtoD_v2(dst, src, n); }
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return kSuccess;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoH_v2(dst, src, n); }
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return kSuccess;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoD_v2(dst, src, n); }
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    std::memset(reinterpret_cast<void*>(dst), v, n);
    return kSuccess;
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void*) { return cuMemsetD8_v2(dst, v, n); }

// A module is its PTX's .entry names, each found in a registered emulation library.
API CUresult cuModuleLoadData(void** module, const void* image) {
    std::string ptx(static_cast<const char*>(image));
    auto m = new Module;
    std::lock_guard<std::mutex> g(lock);
    for (size_t at = ptx.find(".entry "); at != std::string::npos; at = ptx.find(".entry ", at + 1)) {
        size_t begin = at + 7, end = ptx.find('(', begin);
        std::string name = ptx.substr(begin, end - begin);
        while (!name.empty() && name.back() == ' ') name.pop_back();
        for (auto& lib : libraries) {
            const Param* params;
            unsigned n;
            if (lib->signature(name.c_str(), &params, &n) == 0) {
                m->functions.push_back(std::unique_ptr<Function>(new Function{name, lib.get(), n}));
                break;
            }
        }
    }
    *module = m;
    return kSuccess;
}
API CUresult cuModuleUnload(void* module) {
    delete static_cast<Module*>(module);
    return kSuccess;
}
API CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    for (auto& fn : static_cast<Module*>(module)->functions)
        if (fn->name == name) {
            *f = fn.get();
            return kSuccess;
        }
    std::fprintf(stderr, "emulated driver: no host emulation of kernel %s\n", name);
    return kNotFound;
}
API CUresult cuFuncSetAttribute(void*, int, int) { return kSuccess; }
API CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return kSuccess;
}

API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned smem, void*, void** params, void** extra) {
    if (!f || extra) return kInvalidValue;
    const Function& fn = *static_cast<Function*>(f);
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    // Buffers are the kernel's own device memory: no guarded copies (their sizes are unknown here).
    std::vector<long long> bytes(fn.n_params, -1);
    std::vector<int> writable(fn.n_params, 0);
    char error[512] = {0};
    std::lock_guard<std::mutex> g(lock); // the emulation runs one kernel at a time
    if (fn.lib->launch(fn.name.c_str(), grid, block, smem, 0, params, bytes.data(), writable.data(), error,
                       sizeof error) != 0) {
        std::fprintf(stderr, "emulated driver: %s: %s\n", fn.name.c_str(), error);
        return kLaunchFailed;
    }
    return kSuccess;
}

API CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == kLaunchFailed ? "the emulated launch failed (its reason is on stderr)" : "an emulated driver error";
    return kSuccess;
}
API CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == kLaunchFailed ? "CUDA_ERROR_LAUNCH_FAILED" : "CUDA_ERROR (emulated)";
    return kSuccess;
}

} // extern "C"
