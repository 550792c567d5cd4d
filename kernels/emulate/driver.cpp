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
//
// Its memory is stricter than a GPU's, so a launcher's mistakes show:
// - each allocation is mapped on its own and ends (rounded up to 16 bytes) against an
//   inaccessible page, and a freed one becomes inaccessible (the newest 256 stay so before they
//   are unmapped and their addresses reused): a kernel reading or writing past a buffer, or
//   using a freed one, faults, and the fault is the launch's error, naming the thread and block;
// - new memory is filled with 0xff bytes (NaN as floats), so reading what was never written shows;
// - a copy or memset that does not fit its allocation, and a launch whose pointer argument is in
//   no allocation, are errors; so is a launch past the hardware's grid and block limits, or one
//   asking for more than 48 KB of dynamic shared memory without cuFuncSetAttribute's leave;
// - during a launch, an allocation that the kernel reaches only through `const` pointers is read
//   only, so a kernel writing its input faults.
// With WHALE_EMULATED_EAGER_COPIES=1, cp.async copies land when issued instead of when waited
// for (cuda_host.h), which shows a stage refilled before every thread has read it.
// Modules come from whale_emulated_driver_add_module, or from WHALE_EMULATED_MODULES (cuInit).
// With WHALE_EMULATED_LAUNCHES set to a path, the name of each kernel launched is appended to
// that file (once per process): the tests check with it that every kernel ran.
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

namespace {

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

constexpr CUresult kSuccess = 0, kInvalidValue = 1, kInvalidDevice = 101, kNotFound = 500, kLaunchFailed = 719;

struct Param { // launch.h's emu::Param
    unsigned size, pointee, read_only;
};
typedef int (*SignatureFn)(const char*, const Param**, unsigned*);
typedef int (*LaunchFn)(const char*, const unsigned*, const unsigned*, unsigned, void**, char*, size_t);

struct Library {
    SignatureFn signature;
    LaunchFn launch;
};

// The H200's limits, as the launchers see them.
constexpr int kDefaultDynamicShared = 48 * 1024, kMaxDynamicShared = 232448;
constexpr int kFuncMaxThreadsPerBlock = 0, kFuncMaxDynamicShared = 8; // CUfunction_attribute

struct Function {
    std::string name;
    const Library* lib;
    const Param* params;
    unsigned n_params;
    // Dynamic shared memory a launch may ask for: 48 KB unless cuFuncSetAttribute allowed more.
    int max_dynamic_shared = kDefaultDynamicShared;
};

// One cuMemAlloc: `span` bytes mapped at `base` (whole pages), then an inaccessible page; the
// allocation's `bytes` end at most 15 bytes before that page.
struct Allocation {
    unsigned char* base;
    size_t span, bytes;
};

struct Module {
    std::vector<std::unique_ptr<Function>> functions;
};

std::mutex lock;
std::vector<std::unique_ptr<Library>> libraries;
std::map<CUdeviceptr, Allocation> allocations; // by address of the first byte
std::deque<Allocation> quarantine;              // freed, inaccessible, oldest first
constexpr size_t kQuarantined = 256;
std::set<std::string> launched;
int context_token, stream_token, event_token; // addresses stand for the handles

std::string last_error; // the newest message below, for whale_emulated_driver_last_error

// Says on stderr what went wrong, and remembers it.
__attribute__((format(printf, 1, 2))) void complain(const char* format, ...) {
    char text[768];
    va_list args;
    va_start(args, format);
    std::vsnprintf(text, sizeof text, format, args);
    va_end(args);
    last_error = text;
    std::fprintf(stderr, "emulated driver: %s\n", text);
}

size_t page_size() { return size_t(sysconf(_SC_PAGESIZE)); }

// The allocation holding [p, p + n) (a pointer one past the end included, for n = 0), or null.
const Allocation* holding(CUdeviceptr p, size_t n) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return nullptr;
    --it;
    return p + n <= it->first + it->second.bytes ? &it->second : nullptr;
}

// Whether [p, p + n) is device memory; says on stderr which call went astray if not.
bool fits(const char* call, CUdeviceptr p, size_t n) {
    std::lock_guard<std::mutex> g(lock);
    if (holding(p, n)) return true;
    complain("%s of %zu bytes at %#llx: not inside one allocation", call, n, p);
    return false;
}

void log_launch(const std::string& name) {
    if (!launched.insert(name).second) return;
    if (const char* path = std::getenv("WHALE_EMULATED_LAUNCHES"))
        if (FILE* f = std::fopen(path, "a")) {
            std::fprintf(f, "%s\n", name.c_str());
            std::fclose(f);
        }
}

} // namespace

extern "C" {

// Registers the host emulation of one kernel module (a library built from launch.h); 0 or -1.
__attribute__((visibility("default"))) int whale_emulated_driver_add_module(const char* path) {
    void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) return -1;
    auto signature = reinterpret_cast<SignatureFn>(dlsym(h, "whale_emulate_signature"));
    auto launch = reinterpret_cast<LaunchFn>(dlsym(h, "whale_emulate_launch"));
    auto eager = reinterpret_cast<void (*)(int)>(dlsym(h, "whale_emulate_eager_copies"));
    if (!signature || !launch || !eager) return -1;
    const char* mode = std::getenv("WHALE_EMULATED_EAGER_COPIES");
    eager(mode && std::strcmp(mode, "0") != 0);
    std::lock_guard<std::mutex> g(lock);
    libraries.push_back(std::unique_ptr<Library>(new Library{signature, launch}));
    return 0;
}

// The driver's newest complaint (an empty string if none), copied into `text` of `len` bytes.
__attribute__((visibility("default"))) void whale_emulated_driver_last_error(char* text, size_t len) {
    std::lock_guard<std::mutex> g(lock);
    std::snprintf(text, len, "%s", last_error.c_str());
}

#define API extern "C" __attribute__((visibility("default")))

// A process that did not register its modules itself (a program run with this library first on
// LD_LIBRARY_PATH, like `whale pretrain --device cuda`) names them in WHALE_EMULATED_MODULES,
// separated by ':'; cuInit registers them, once.
API CUresult cuInit(unsigned) {
    static const CUresult registered = [] {
        const char* list = std::getenv("WHALE_EMULATED_MODULES");
        std::string paths = list ? list : "";
        for (size_t start = 0; start < paths.size();) {
            size_t end = paths.find(':', start);
            if (end == std::string::npos) end = paths.size();
            std::string path = paths.substr(start, end - start);
            if (!path.empty() && whale_emulated_driver_add_module(path.c_str()) != 0) {
                const char* why = dlerror();
                std::lock_guard<std::mutex> g(lock);
                complain("WHALE_EMULATED_MODULES: %s is not a kernel module's host emulation%s%s", path.c_str(),
                         why ? ": " : "", why ? why : "");
                return kNotFound;
            }
            start = end + 1;
        }
        return kSuccess;
    }();
    return registered;
}
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
    const size_t page = page_size(), body = (bytes + 15) / 16 * 16;
    const size_t span = body == 0 ? page : (body + page - 1) / page * page;
    void* m = mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return 2; // out of memory
    auto base = static_cast<unsigned char*>(m);
    std::memset(base, 0xff, span);
    mprotect(base + span, page, PROT_NONE);
    *p = reinterpret_cast<CUdeviceptr>(base + span - body);
    std::lock_guard<std::mutex> g(lock);
    allocations[*p] = Allocation{base, span, bytes};
    return kSuccess;
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
API CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(lock);
    auto it = allocations.find(p);
    if (it == allocations.end()) {
        complain("cuMemFree of %#llx, which is not an allocation", p);
        return kInvalidValue;
    }
    // Quarantined before it is unmapped, so the next allocations do not take its addresses at once.
    const Allocation a = it->second;
    allocations.erase(it);
    mprotect(a.base, a.span, PROT_NONE);
    madvise(a.base, a.span, MADV_DONTNEED);
    quarantine.push_back(a);
    if (quarantine.size() > kQuarantined) {
        munmap(quarantine.front().base, quarantine.front().span + page_size());
        quarantine.pop_front();
    }
    return kSuccess;
}
API CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
API CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    *free = *total = size_t(141) << 30;
    return kSuccess;
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    if (!fits("cuMemcpyHtoD", dst, n)) return kInvalidValue;
    std::memcpy(reinterpret_cast<void*>(dst), src, n);
    return kSuccess;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) { return cuMemcpyHtoD_v2(dst, src, n); }
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    if (!fits("cuMemcpyDtoH", src, n)) return kInvalidValue;
    std::memcpy(dst, reinterpret_cast<const void*>(src), n);
    return kSuccess;
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoH_v2(dst, src, n); }
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (!fits("cuMemcpyDtoD (source)", src, n) || !fits("cuMemcpyDtoD (destination)", dst, n)) return kInvalidValue;
    std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
    return kSuccess;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) { return cuMemcpyDtoD_v2(dst, src, n); }
API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    if (!fits("cuMemsetD8", dst, n)) return kInvalidValue;
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
                m->functions.push_back(std::unique_ptr<Function>(new Function{name, lib.get(), params, n}));
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
    std::lock_guard<std::mutex> g(lock);
    complain("no host emulation of kernel %s", name);
    return kNotFound;
}
API CUresult cuFuncSetAttribute(void* f, int attribute, int value) {
    if (!f) return kInvalidValue;
    if (attribute == kFuncMaxDynamicShared) {
        if (value < 0 || value > kMaxDynamicShared) return kInvalidValue;
        std::lock_guard<std::mutex> g(lock);
        static_cast<Function*>(f)->max_dynamic_shared = value;
    }
    return kSuccess;
}
API CUresult cuFuncGetAttribute(int* v, int attribute, void* f) {
    if (!f) return kInvalidValue;
    std::lock_guard<std::mutex> g(lock);
    *v = attribute == kFuncMaxDynamicShared     ? static_cast<Function*>(f)->max_dynamic_shared
         : attribute == kFuncMaxThreadsPerBlock ? 1024
                                                : 0;
    return kSuccess;
}

API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned smem, void*, void** params, void** extra) {
    if (!f || extra) return kInvalidValue;
    const Function& fn = *static_cast<Function*>(f);
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    std::lock_guard<std::mutex> g(lock); // the emulation runs one kernel at a time
    log_launch(fn.name);
    // The hardware's limits on a launch's shape, and the function's on its shared memory.
    if (gx == 0 || gy == 0 || gz == 0 || gx > 0x7fffffffu || gy > 65535 || gz > 65535) {
        complain("%s: a grid of (%u, %u, %u) blocks", fn.name.c_str(), gx, gy, gz);
        return kInvalidValue;
    }
    if (bx == 0 || by == 0 || bz == 0 || bx > 1024 || by > 1024 || bz > 64 || bx * by * bz > 1024) {
        complain("%s: a block of (%u, %u, %u) threads", fn.name.c_str(), bx, by, bz);
        return kInvalidValue;
    }
    if (smem > unsigned(fn.max_dynamic_shared)) {
        complain("%s: %u bytes of dynamic shared memory, above the %d its attribute allows "
                 "(cuFuncSetAttribute, MAX_DYNAMIC_SHARED_SIZE_BYTES)",
                 fn.name.c_str(), smem, fn.max_dynamic_shared);
        return kInvalidValue;
    }
    // Every pointer argument is null or in an allocation; those reached only through const
    // pointers are read only for the launch.
    std::map<const Allocation*, bool> reached; // allocation -> written through some pointer
    for (unsigned i = 0; i < fn.n_params; ++i) {
        if (fn.params[i].pointee == 0) continue;
        CUdeviceptr p = *static_cast<CUdeviceptr*>(params[i]);
        if (p == 0) continue;
        const Allocation* a = holding(p, 0);
        if (!a) {
            complain("%s: argument %u (%#llx) points into no allocation", fn.name.c_str(), i, p);
            return kInvalidValue;
        }
        reached[a] |= !fn.params[i].read_only;
    }
    for (auto [a, written] : reached)
        if (!written) mprotect(a->base, a->span, PROT_READ);
    char error[512] = {0};
    const int rc = fn.lib->launch(fn.name.c_str(), grid, block, smem, params, error, sizeof error);
    for (auto [a, written] : reached)
        if (!written) mprotect(a->base, a->span, PROT_READ | PROT_WRITE);
    if (rc != 0) {
        complain("%s: %s", fn.name.c_str(), error);
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
