/*
 * Coverage hooks for atheris's libFuzzer in a process with gcc's ASan runtime preloaded.
 *
 * Why: the sanitizer build of fastnet._frame needs libasan first in the
 * process (LD_PRELOAD), and libasan exports no-op (weak) definitions of the
 * SanitizerCoverage hooks, __sanitizer_cov_*. The dynamic linker binds every
 * call to the first definition it finds, so atheris's libFuzzer, loaded later
 * as a Python extension module, would register its Python coverage counters
 * with libasan's no-ops and fuzz blind ("no interesting inputs were found").
 *
 * Strategy: this library is preloaded before libasan. It defines the hooks
 * atheris uses and forwards each call to the definition inside the library
 * named by FASTNET_LIBFUZZER (atheris's core_with_libfuzzer module), looked up
 * once that module is loaded. Until then a hook does nothing, as libasan's
 * would. ASAN_OPTIONS=verify_asan_link_order=0 lets libasan come second.
 *
 * Built by `make fuzz` with the same compiler as the extension:
 *     cc -shared -fPIC -O2 -o build/fuzz/sancov_forward.so fuzz/sancov_forward.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>

static void *target;

/* The address of `name` in the FASTNET_LIBFUZZER library, or NULL while it is not loaded. */
static void *lookup(const char *name)
{
    if (target == NULL) {
        const char *path = getenv("FASTNET_LIBFUZZER");
        if (path == NULL)
            return NULL;
        target = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
        if (target == NULL)
            return NULL;
    }
    return dlsym(target, name);
}

/* One forwarding hook: resolve once, then call through the cached pointer. */
#define FORWARD(name, params, args)                             \
    void name params                                            \
    {                                                           \
        static void (*fn) params;                               \
        if (fn == NULL) {                                       \
            fn = (void (*) params)lookup(#name);                \
            if (fn == NULL)                                     \
                return;                                         \
        }                                                       \
        fn args;                                                \
    }

FORWARD(__sanitizer_cov_8bit_counters_init, (uint8_t *start, uint8_t *stop), (start, stop))
FORWARD(__sanitizer_cov_pcs_init, (const uintptr_t *beg, const uintptr_t *end), (beg, end))
FORWARD(__sanitizer_cov_trace_cmp1, (uint8_t a, uint8_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp2, (uint16_t a, uint16_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp4, (uint32_t a, uint32_t b), (a, b))
FORWARD(__sanitizer_cov_trace_cmp8, (uint64_t a, uint64_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp1, (uint8_t a, uint8_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp2, (uint16_t a, uint16_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp4, (uint32_t a, uint32_t b), (a, b))
FORWARD(__sanitizer_cov_trace_const_cmp8, (uint64_t a, uint64_t b), (a, b))
FORWARD(__sanitizer_cov_trace_switch, (uint64_t value, uint64_t *cases), (value, cases))
FORWARD(__sanitizer_cov_trace_div4, (uint32_t value), (value))
FORWARD(__sanitizer_cov_trace_div8, (uint64_t value), (value))
FORWARD(__sanitizer_cov_trace_gep, (uintptr_t index), (index))
FORWARD(__sanitizer_cov_trace_pc_indir, (uintptr_t callee), (callee))
