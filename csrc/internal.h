// internal.h -- pieces shared by the CPU and CUDA parts of the library (not exported).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "fastvae.h"

namespace fv {

// Records this thread's error message (printf-style) and returns `code`.
int set_error(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// ---------------------------------------------------------------------------------------------
// The op table: FV_OPS (fastvae.h) parsed at compile time into kOps[op]. A malformed line is a
// compile error whose "throw" names the fault. Only cpu.cpp and cuda.cu use kOps: the kernels of
// cpu_kernels.inc, compiled once per instruction set, take FV_OPS alone (an inline function
// used there could reach the others as its AVX-512 copy).
// ---------------------------------------------------------------------------------------------

// The operands of one side (inputs or outputs) of an op, as its marks say. Bit i: slot i.
struct Slots {
    int count = 0;                   // slots named in the list
    uint8_t required = 0;            // not `?`
    uint8_t optional = 0;            // `?`: may be absent
    uint8_t compute = 0;             // `#`: compute dtype
    uint8_t any = 0;                 // `~`: any float dtype
    uint8_t noise = 0;               // `!`
    uint8_t index = 0;               // `%`: int64 indices (FV_INT64)
    uint8_t together = 0;            // a `( )` group: all present or none
    int main = -1;                   // `*`: the main input
    uint8_t name_at[8] = {}, name_len[8] = {};  // where slot i's name is in the list
};
static_assert(FV_MAX_IN <= 8 && FV_MAX_OUT <= 8, "operand masks are 8 bits");

struct OpSpec {
    const char* name;
    const char* inputs;   // the operand lists of FV_OPS, marks included
    const char* outputs;
    int32_t flags;        // FV_USES_* bits, and FV_DRAWS_NOISE when there are ! marks
    Slots in, out;
};

constexpr bool bit(unsigned mask, int i) { return (mask >> i) & 1u; }

namespace table {

constexpr bool name_char(char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_';
}

// The slots of one operand list of FV_OPS (its grammar: fastvae.h).
constexpr Slots parse(const char* list, int max_slots) {
    Slots r;
    int group = -1;  // the first slot of an open "("
    int i = 0;
    while (list[i] != '\0') {
        int first = r.count, last = r.count;  // the slots that the marks after this token mark
        if (list[i] == ' ') {
            ++i;
            continue;
        } else if (list[i] == '(') {
            if (group >= 0 || r.together) throw "FV_OPS: one ( ) group per operand list";
            group = r.count;
            ++i;
            continue;
        } else if (list[i] == ')') {
            if (group < 0 || r.count - group < 2) throw "FV_OPS: a ( ) group needs 2+ operands";
            for (int k = group; k < r.count; ++k) r.together |= uint8_t(1u << k);
            first = group;
            group = -1;
            ++i;
        } else if (name_char(list[i])) {
            if (r.count == max_slots) throw "FV_OPS: more operands than FV_MAX_IN / FV_MAX_OUT";
            const int start = i;
            while (name_char(list[i])) ++i;
            if (i > 255) throw "FV_OPS: operand list too long";
            r.name_at[r.count] = uint8_t(start);
            r.name_len[r.count] = uint8_t(i - start);
            last = ++r.count;
        } else {
            throw "FV_OPS: operand names are [a-z0-9_], marks ? * # ~ ! %, groups ( )";
        }
        for (; list[i] == '?' || list[i] == '*' || list[i] == '#' || list[i] == '~' ||
               list[i] == '!' || list[i] == '%';
             ++i) {
            for (int k = first; k < last; ++k) {
                const uint8_t b = uint8_t(1u << k);
                switch (list[i]) {
                    case '?': r.optional |= b; break;
                    case '#': r.compute |= b; break;
                    case '~': r.any |= b; break;
                    case '!': r.noise |= b; break;
                    case '%': r.index |= b; break;
                    default:
                        if (r.main >= 0 || last - first != 1) throw "FV_OPS: one * operand";
                        r.main = k;
                }
            }
        }
    }
    if (group >= 0) throw "FV_OPS: ( without )";
    r.required = uint8_t(((1u << r.count) - 1) & ~r.optional);
    if (r.compute & r.any) throw "FV_OPS: an operand marked both # and ~";
    if (r.index & (r.compute | r.any | r.noise)) throw "FV_OPS: an index % is only an index";
    if (r.together & ~r.optional) throw "FV_OPS: a ( ) group must be optional: ( )?";
    return r;
}

constexpr OpSpec op(const char* name, const char* inputs, const char* outputs, int32_t uses) {
    OpSpec s{name, inputs, outputs, uses, parse(inputs, FV_MAX_IN), parse(outputs, FV_MAX_OUT)};
    if (uses & ~(FV_USES_K | FV_USES_REDUCE_DIM | FV_USES_SCALAR)) throw "FV_OPS: unknown uses";
    if (s.in.main < 0 || bit(s.in.optional | s.in.compute | s.in.any | s.in.index, s.in.main))
        throw "FV_OPS: exactly one input is the main input *, required, of the storage dtype";
    if (s.out.main >= 0) throw "FV_OPS: the main input * is an input";
    if (s.in.noise & (s.in.noise - 1)) throw "FV_OPS: at most one noise input !";
    if (s.in.noise & ~s.in.optional) throw "FV_OPS: the noise input ! is optional ?";
    if (s.in.noise && !s.out.noise) throw "FV_OPS: a noise input ! needs an output made from it";
    if (s.in.noise || s.out.noise) s.flags |= FV_DRAWS_NOISE;
    return s;
}

}  // namespace table

// kOps[op]: the spec of op code `op`, in the order of FV_OPS (that of the enum).
inline constexpr OpSpec kOps[] = {
#define FV_OP_SPEC_(CODE, name, inputs, outputs, uses) table::op(#name, inputs, outputs, uses),
    FV_OPS(FV_OP_SPEC_)
#undef FV_OP_SPEC_
};
static_assert(sizeof kOps / sizeof kOps[0] == FV_OP_COUNT, "one spec per op");

// Checks one call against the contract of fastvae.h and the op's line of FV_OPS: op known,
// sizes positive (K = 1 unless the op uses K), compute dtype, reduce_dim, every operand present
// or absent as its marks say, with a known dtype code, `#` operands in the compute dtype,
// groups, the seed present when noise is drawn. Returns FV_OK, or an error code with the
// message set.
int validate_call(int32_t op, const fv_call* call);

// Whether the op draws Philox noise in this call: it wants an output made from the noise (!)
// and does not give the noise input.
bool needs_noise(int32_t op, const fv_call& call);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline size_t dtype_size(int32_t dtype) {
    return dtype == FV_FLOAT64 ? 8 : dtype == FV_FLOAT32 ? 4 : 2;
}

// The dtype a call computes in, for a storage dtype: float64 for float64, float32 otherwise.
inline int32_t compute_dtype(int32_t storage) {
    return storage == FV_FLOAT64 ? FV_FLOAT64 : FV_FLOAT32;
}

}  // namespace fv

namespace fv::cpu {

// Runs fn(ctx, begin, end) over [0, n_units) on up to n_threads threads of a persistent pool
// (the caller among them), in contiguous ranges handed out a few per thread. Which thread runs
// which unit never changes a result: the kernels give every output a fixed summation order.
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
void parallel_for(int64_t n_units, int n_threads, RangeFn fn, void* ctx);

// One kernel per (op, compute dtype: 0 float, 1 double).
using KernelFn = int (*)(const fv_call& call);
using KernelTable = KernelFn[FV_OP_COUNT][2];

// The noise of the kernels: out[i] = tl.randn(seed, offset + i), i < n (for tests).
using RandnFn = void (*)(uint64_t seed, uint64_t offset, int64_t n, float* out);

extern const KernelTable kernels_baseline;
void randn_baseline(uint64_t seed, uint64_t offset, int64_t n, float* out);
#if defined(FV_HAVE_AVX2)
extern const KernelTable kernels_avx2;
void randn_avx2(uint64_t seed, uint64_t offset, int64_t n, float* out);
#endif
#if defined(FV_HAVE_AVX512)
extern const KernelTable kernels_avx512;
void randn_avx512(uint64_t seed, uint64_t offset, int64_t n, float* out);
#endif

}  // namespace fv::cpu
