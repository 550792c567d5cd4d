// A module's kernels behind one C entry point, so a test can launch any of them by name the way
// cuLaunchKernel does (crates/kernels/tests/common/emulator.rs). The test writes a translation
// unit per module of the manifest:
//
//     #include "<module>.cu"        // compiled with WHALE_HOST_EMULATION and -I emulate/include
//     #include "emulate/launch.h"
//     WHALE_EMULATE_MODULE(WHALE_KERNEL(kernel_a) WHALE_KERNEL(kernel_b) ...)
//
// and builds it as a shared library. whale_emulate_launch takes the kernel's name, the launch's
// shape and `args`, a pointer to each argument's value (buffers are host pointers), with each
// buffer's size in `bytes` (-1 for a value) and whether the kernel may write it; it returns 0, or
// -1 with the reason in `error`. The kernel sees a copy of each buffer that ends against an
// inaccessible page, so reading or writing past a buffer's end (to within 16 bytes) faults, and
// the fault is the launch's error; an input's copy is read-only. whale_emulate_signature describes a kernel's parameters, so
// the caller can check its arguments before launching: per parameter, its size in bytes, and for a
// pointer the size of what it points at (0 for a value).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <exception>
#include <memory>
#include <type_traits>
#include <utility>

#include "cuda_host.h"

namespace emu {

struct Param {
    unsigned size, pointee;
};

template <class A>
constexpr Param param() {
    if constexpr (std::is_pointer_v<A>)
        return {sizeof(A), sizeof(std::remove_pointer_t<A>)};
    else
        return {sizeof(A), 0};
}

struct Kernel {
    const char* name;
    void (*run)(void** args);
    const Param* params;
    unsigned n_params;
};

template <class... A, size_t... I>
void call(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <auto K, class... A>
Kernel entry(const char* name, void (*)(A...)) {
    static constexpr Param params[sizeof...(A) + 1] = {param<A>()..., {0, 0}};
    return {name, [](void** args) { call(K, args, std::index_sequence_for<A...>{}); }, params, sizeof...(A)};
}

// A buffer's copy for one launch, 16-byte aligned, its end padded to a multiple of 16 bytes and
// followed by an inaccessible page; written back to the caller's buffer when the kernel may write.
class Guarded {
  public:
    Guarded(void* host, size_t bytes, bool writable) : host_(host), bytes_(bytes), writable_(writable) {
        const size_t page = size_t(sysconf(_SC_PAGESIZE)), body = (bytes + 15) / 16 * 16;
        span_ = (body + page - 1) / page * page;
        if (span_ == 0) span_ = page;
        void* base = mmap(nullptr, span_ + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED) throw std::runtime_error("emulation: mmap failed");
        base_ = static_cast<unsigned char*>(base);
        data_ = base_ + span_ - body;
        std::memset(base_, 0x3b, span_);
        if (bytes) std::memcpy(data_, host, bytes);
        mprotect(base_ + span_, page, PROT_NONE);
        if (!writable) mprotect(base_, span_, PROT_READ);
    }
    Guarded(const Guarded&) = delete;
    Guarded& operator=(const Guarded&) = delete;
    ~Guarded() {
        if (writable_ && bytes_) std::memcpy(host_, data_, bytes_);
        munmap(base_, span_ + size_t(sysconf(_SC_PAGESIZE)));
    }
    void* data() const { return data_; }

  private:
    void* host_;
    size_t bytes_;
    bool writable_;
    size_t span_ = 0;
    unsigned char *base_ = nullptr, *data_ = nullptr;
};

inline void copy_error(const char* what, char* error, size_t len) {
    if (len == 0) return;
    std::strncpy(error, what, len - 1);
    error[len - 1] = 0;
}

} // namespace emu

#define WHALE_KERNEL(k) emu::entry<k>(#k, k),

#define WHALE_EMULATE_MODULE(KERNELS)                                                                              \
    static const emu::Kernel* whale_find(const char* name) {                                                       \
        static const emu::Kernel kernels[] = {KERNELS};                                                              \
        for (const emu::Kernel& k : kernels)                                                                         \
            if (std::strcmp(k.name, name) == 0) return &k;                                                           \
        return nullptr;                                                                                              \
    }                                                                                                                \
    extern "C" __attribute__((visibility("default"))) int whale_emulate_signature(const char* name, const emu::Param** params, unsigned* n) {              \
        const emu::Kernel* k = whale_find(name);                                                                     \
        if (!k) return -1;                                                                                           \
        *params = k->params;                                                                                         \
        *n = k->n_params;                                                                                            \
        return 0;                                                                                                    \
    }                                                                                                                \
    extern "C" __attribute__((visibility("default"))) int whale_emulate_launch(const char* name, const unsigned* grid, const unsigned* threads,            \
                                        unsigned smem_bytes, int eager_copies, void** args, const long long* bytes,  \
                                        const int* writable, char* error, size_t len) {                             \
        const emu::Kernel* k = whale_find(name);                                                                     \
        if (!k) {                                                                                                    \
            emu::copy_error("no such kernel in this module", error, len);                                            \
            return -1;                                                                                               \
        }                                                                                                            \
        try {                                                                                                        \
            std::vector<std::unique_ptr<emu::Guarded>> copies(k->n_params);                                          \
            std::vector<void*> pointers(k->n_params), launch_args(args, args + k->n_params);                         \
            for (unsigned i = 0; i < k->n_params; ++i) {                                                             \
                if (bytes[i] < 0) continue;                                                                          \
                copies[i].reset(new emu::Guarded(*static_cast<void**>(args[i]), size_t(bytes[i]), writable[i] != 0)); \
                pointers[i] = copies[i]->data();                                                                     \
                launch_args[i] = &pointers[i];                                                                       \
            }                                                                                                        \
            emu::eager_copies = eager_copies != 0;                                                                   \
            emu::launch(dim3{grid[0], grid[1], grid[2]}, dim3{threads[0], threads[1], threads[2]}, smem_bytes,       \
                        [&] { k->run(launch_args.data()); });                                                        \
            return 0;                                                                                                \
        } catch (const std::exception& e) {                                                                          \
            emu::copy_error(e.what(), error, len);                                                                   \
            return -1;                                                                                               \
        }                                                                                                            \
    }
