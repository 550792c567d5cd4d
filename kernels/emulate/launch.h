// A module's kernels behind one C entry point, so the emulated driver (driver.cpp) can launch any
// of them by name the way cuLaunchKernel does. crates/kernels/tests/common/emulator.rs writes a
// translation unit per module of the manifest:
//
//     #include "<module>.cu"        // compiled with WHALE_HOST_EMULATION and -I emulate/include
//     #include "emulate/launch.h"
//     WHALE_EMULATE_MODULE(WHALE_KERNEL(kernel_a) WHALE_KERNEL(kernel_b) ...)
//
// and builds it as a shared library. whale_emulate_launch takes the kernel's name, the launch's
// shape and `args`, a pointer to each argument's value, as cuLaunchKernel does; it returns 0, or
// -1 with the reason in `error`. whale_emulate_eager_copies sets when cp.async copies land
// (cuda_host.h: when waited for or, eager, when issued). whale_emulate_signature describes a
// kernel's parameters, so the driver can check pointer arguments before a launch: per
// parameter, its size in bytes, the size of what a pointer points at (0 for a value), and
// whether that is const (read only).
#pragma once

#include <cstring>
#include <exception>
#include <type_traits>
#include <utility>

#include "cuda_host.h"

namespace emu {

struct Param {
    unsigned size, pointee, read_only;
};

template <class A>
constexpr Param param() {
    if constexpr (std::is_pointer_v<A>)
        return {sizeof(A), sizeof(std::remove_pointer_t<A>), std::is_const_v<std::remove_pointer_t<A>>};
    else
        return {sizeof(A), 0, 0};
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
    static constexpr Param params[sizeof...(A) + 1] = {param<A>()..., {0, 0, 0}};
    return {name, [](void** args) { call(K, args, std::index_sequence_for<A...>{}); }, params, sizeof...(A)};
}

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
    extern "C" __attribute__((visibility("default"))) int whale_emulate_signature(                                \
        const char* name, const emu::Param** params, unsigned* n) {                                                  \
        const emu::Kernel* k = whale_find(name);                                                                     \
        if (!k) return -1;                                                                                           \
        *params = k->params;                                                                                         \
        *n = k->n_params;                                                                                            \
        return 0;                                                                                                    \
    }                                                                                                                \
    extern "C" __attribute__((visibility("default"))) void whale_emulate_eager_copies(int eager) {                \
        emu::eager_copies = eager != 0;                                                                              \
    }                                                                                                                \
    extern "C" __attribute__((visibility("default"))) int whale_emulate_launch(                                   \
        const char* name, const unsigned* grid, const unsigned* threads, unsigned smem_bytes, void** args,          \
        char* error, size_t len) {                                                                                   \
        const emu::Kernel* k = whale_find(name);                                                                     \
        if (!k) {                                                                                                    \
            emu::copy_error("no such kernel in this module", error, len);                                            \
            return -1;                                                                                               \
        }                                                                                                            \
        try {                                                                                                        \
            emu::launch(dim3{grid[0], grid[1], grid[2]}, dim3{threads[0], threads[1], threads[2]}, smem_bytes,       \
                        [&] { k->run(args); });                                                                      \
            return 0;                                                                                                \
        } catch (const std::exception& e) {                                                                          \
            emu::copy_error(e.what(), error, len);                                                                   \
            return -1;                                                                                               \
        }                                                                                                            \
    }
