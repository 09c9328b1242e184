// cpu.cpp -- the library's exported C functions (CPU side), argument checks, error messages,
// the thread pool, and the run-time choice of the CPU kernel set (baseline, AVX2 or AVX-512).
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fastvae_math.h"
#include "internal.h"

namespace fv {

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

namespace {
thread_local char g_error[512] = "";
}

int set_error(int code, const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, args);
    va_end(args);
    return code;
}

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------

namespace {

struct OpSpec {
    const char* name;
    uint8_t in_required, in_optional;    // bit i: in[i]
    uint8_t out_required, out_optional;  // bit i: out[i]
    int8_t sum_out;                      // index of the (B,)/(N,) sum output, or -1
    bool has_reduce_dim;
};

constexpr OpSpec kSpecs[FV_OP_COUNT] = {
    {"reparameterize_fwd", 0b00011, 0b00100, 0b0001, 0b0000, -1, false},
    {"reparameterize_bwd", 0b00011, 0b00100, 0b0000, 0b0111, -1, false},
    {"gaussian_kl_fwd", 0b00011, 0b01100, 0b0001, 0b0000, 0, true},
    {"gaussian_kl_bwd", 0b00111, 0b11000, 0b0000, 0b1111, -1, true},
    {"bernoulli_nll_fwd", 0b00011, 0b00000, 0b0001, 0b0000, 0, false},
    {"bernoulli_nll_bwd", 0b00111, 0b00000, 0b0000, 0b0011, -1, false},
    {"gaussian_nll_fwd", 0b00011, 0b00100, 0b0001, 0b0000, 0, false},
    {"gaussian_nll_bwd", 0b00111, 0b01000, 0b0000, 0b0111, -1, false},
    {"sample_and_kl_fwd", 0b00011, 0b00000, 0b0011, 0b0000, 1, true},
    {"sample_and_kl_bwd", 0b01111, 0b00000, 0b0000, 0b0011, -1, true},
    {"iwae_fwd", 0b001111, 0b000000, 0b0011, 0b0000, 0, false},
    {"iwae_bwd", 0b111111, 0b000000, 0b0000, 0b1111, -1, false},
};
static_assert(FV_MAX_IN <= 8 && FV_MAX_OUT <= 8, "operand masks are 8 bits");

bool valid_dtype(int32_t d) { return d >= FV_FLOAT32 && d <= FV_BFLOAT16; }

}  // namespace

bool needs_noise(int32_t op, const fv_call& c) {
    switch (op) {
        case FV_OP_REPARAMETERIZE_FWD: return c.in[2].data == nullptr;
        case FV_OP_REPARAMETERIZE_BWD: return c.in[2].data == nullptr && c.out[1].data != nullptr;
        case FV_OP_SAMPLE_AND_KL_FWD: return true;
        case FV_OP_SAMPLE_AND_KL_BWD: return c.out[1].data != nullptr;
        default: return false;
    }
}

int validate_call(int32_t op, const fv_call* call) {
    if (op < 0 || op >= FV_OP_COUNT) return set_error(FV_ERR_INVALID, "unknown op code %d", op);
    const OpSpec& s = kSpecs[op];
    if (call == nullptr) return set_error(FV_ERR_INVALID, "%s: call is NULL", s.name);
    const fv_call& c = *call;
    if (c.B < 1 || c.N < 1 || c.K < 1)
        return set_error(FV_ERR_INVALID, "%s: sizes must be >= 1 (B=%lld, N=%lld, K=%lld)",
                         s.name, static_cast<long long>(c.B), static_cast<long long>(c.N),
                         static_cast<long long>(c.K));
    if (c.compute != FV_FLOAT32 && c.compute != FV_FLOAT64)
        return set_error(FV_ERR_INVALID, "%s: compute dtype %d is not float32/float64", s.name,
                         c.compute);
    if (s.has_reduce_dim && c.reduce_dim != 0 && c.reduce_dim != 1)
        return set_error(FV_ERR_INVALID, "%s: reduce_dim must be 0 or 1, got %d", s.name,
                         c.reduce_dim);
    for (int i = 0; i < FV_MAX_IN; ++i) {
        const bool present = c.in[i].data != nullptr;
        if ((s.in_required >> i & 1) && !present)
            return set_error(FV_ERR_INVALID, "%s: input %d is required", s.name, i);
        if (present && !((s.in_required | s.in_optional) >> i & 1))
            return set_error(FV_ERR_INVALID, "%s: input %d is not an operand", s.name, i);
        if (present && !valid_dtype(c.in[i].dtype))
            return set_error(FV_ERR_INVALID, "%s: input %d has unknown dtype code %d", s.name, i,
                             c.in[i].dtype);
    }
    for (int i = 0; i < FV_MAX_OUT; ++i) {
        const bool present = c.out[i].data != nullptr;
        if ((s.out_required >> i & 1) && !present)
            return set_error(FV_ERR_INVALID, "%s: output %d is required", s.name, i);
        if (present && !((s.out_required | s.out_optional) >> i & 1))
            return set_error(FV_ERR_INVALID, "%s: output %d is not an output", s.name, i);
        if (present && !valid_dtype(c.out[i].dtype))
            return set_error(FV_ERR_INVALID, "%s: output %d has unknown dtype code %d", s.name,
                             i, c.out[i].dtype);
    }
    if (s.sum_out >= 0 && c.out[s.sum_out].dtype != c.compute)
        return set_error(FV_ERR_INVALID, "%s: the sums output must have the compute dtype",
                         s.name);
    if (op == FV_OP_IWAE_FWD && c.out[1].dtype != c.compute)
        return set_error(FV_ERR_INVALID, "%s: the log-weights output must have the compute "
                         "dtype", s.name);
    if (op == FV_OP_IWAE_BWD) {
        for (int i = 0; i < 3; ++i)
            if (c.in[i].dtype != c.compute)
                return set_error(FV_ERR_INVALID, "%s: input %d (grad, ll, log_w) must have the "
                                 "compute dtype", s.name, i);
    }
    if (op == FV_OP_GAUSSIAN_KL_FWD || op == FV_OP_GAUSSIAN_KL_BWD) {
        const int pm = op == FV_OP_GAUSSIAN_KL_FWD ? 2 : 3;
        if ((c.in[pm].data == nullptr) != (c.in[pm + 1].data == nullptr))
            return set_error(FV_ERR_INVALID, "%s: give both prior tensors or neither", s.name);
    }
    if (needs_noise(op, c) && c.seed == nullptr)
        return set_error(FV_ERR_INVALID, "%s: the seed is required to draw noise", s.name);
    return FV_OK;
}

}  // namespace fv

// ---------------------------------------------------------------------------------------------
// Thread pool
// ---------------------------------------------------------------------------------------------

namespace fv::cpu {
namespace {

// Work is handed out in grains (a few per thread) from an atomic ticket, so that when the OS
// leaves a thread unscheduled -- the machine is shared -- the others take its grains instead of
// waiting for it. The ticket holds the job's generation in its high half: a worker that wakes
// late never takes a grain of a later job.
class Pool {
  public:
    void run(int n_threads, int64_t n_units, RangeFn fn, void* ctx) {
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        // One job at a time: a concurrent caller (another Python thread) runs on its own thread.
        const int helpers = busy.owns_lock() ? grow(n_threads - 1) : 0;
        if (helpers == 0) {
            fn(ctx, 0, n_units);
            return;
        }
        const int64_t grains = std::min<int64_t>(n_units, int64_t(helpers + 1) * kGrainsPerThread);
        uint32_t generation;
        {
            std::lock_guard<std::mutex> lock(mu_);
            generation = ++generation_;
            job_ = {fn, ctx, n_units, grains};
            helpers_ = helpers;
            finished_.store(0);
            ticket_.store(uint64_t(generation) << 32);
        }
        wake_.notify_all();
        drain(generation, job_);
        for (int spin = 0; spin < 64 && finished_.load() < grains; ++spin)
            std::this_thread::yield();
        std::unique_lock<std::mutex> lock(mu_);
        done_.wait(lock, [&] { return finished_.load() == grains; });
    }

  private:
    static constexpr int64_t kGrainsPerThread = 4;

    struct Job {
        RangeFn fn;
        void* ctx;
        int64_t n_units, grains;
    };

    // Runs grains of job `generation` until none is left.
    void drain(uint32_t generation, const Job& job) {
        for (;;) {
            uint64_t ticket = ticket_.load();
            if (uint32_t(ticket >> 32) != generation) return;
            const int64_t grain = int64_t(ticket & 0xFFFFFFFFu);
            if (grain >= job.grains) return;
            if (!ticket_.compare_exchange_weak(ticket, ticket + 1)) continue;
            job.fn(job.ctx, job.n_units * grain / job.grains,
                   job.n_units * (grain + 1) / job.grains);
            if (finished_.fetch_add(1) + 1 == job.grains) {
                { std::lock_guard<std::mutex> lock(mu_); }
                done_.notify_one();
            }
        }
    }

    // Makes sure `n` workers exist; returns how many do (thread creation may fail).
    int grow(int n) {
        while (int(workers_.size()) < n) {
            try {
                const int index = int(workers_.size());
                workers_.emplace_back([this, index] { work(index); });
            } catch (...) {
                break;
            }
        }
        return std::max(0, std::min(n, int(workers_.size())));
    }

    void work(int index) {
        uint32_t seen = 0;
        std::unique_lock<std::mutex> lock(mu_);
        for (;;) {
            wake_.wait(lock, [&] { return generation_ != seen; });
            seen = generation_;
            if (index >= helpers_) continue;
            const Job job = job_;
            lock.unlock();
            drain(seen, job);
            lock.lock();
        }
    }

    std::mutex busy_;
    std::mutex mu_;
    std::condition_variable wake_, done_;
    std::vector<std::thread> workers_;
    Job job_{};
    int helpers_ = 0;
    uint32_t generation_ = 0;
    std::atomic<uint64_t> ticket_{0};
    std::atomic<int64_t> finished_{0};
};

// Never destroyed (workers may still wait at exit). After fork() the child has none of the
// parent's threads: it drops the pool (leaked) and makes a new one on first use.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;

Pool& pool() {
    std::call_once(g_atfork_once, [] {
        pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
    });
    Pool* p = g_pool.load();
    if (p == nullptr) {
        Pool* fresh = new Pool();
        if (g_pool.compare_exchange_strong(p, fresh)) p = fresh;
        else delete fresh;
    }
    return *p;
}

}  // namespace

void parallel_for(int64_t n_units, int n_threads, RangeFn fn, void* ctx) {
    if (n_units <= 0) return;
    if (n_threads > n_units) n_threads = int(n_units);
    if (n_threads <= 1) {
        fn(ctx, 0, n_units);
        return;
    }
    pool().run(n_threads, n_units, fn, ctx);
}

// ---------------------------------------------------------------------------------------------
// Kernel set: the best this CPU runs (FASTVAE_CPU_ISA=baseline|avx2|avx512|auto overrides)
// ---------------------------------------------------------------------------------------------

namespace {

struct Isa {
    const char* name;
    const KernelTable* table;
    RandnFn randn;
    int level;  // x86-64 micro-architecture level the kernels need (1 = any)
};

// The x86-64 level of this CPU, OS support for the vector registers included.
int cpu_level() {
#if defined(FV_HAVE_AVX2) || defined(FV_HAVE_AVX512)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return 4;
    if (__builtin_cpu_supports("x86-64-v3")) return 3;
#endif
    return 1;
}

const Isa kIsas[] = {
#if defined(FV_HAVE_AVX512)
    {"avx512", &kernels_avx512, randn_avx512, 4},
#endif
#if defined(FV_HAVE_AVX2)
    {"avx2", &kernels_avx2, randn_avx2, 3},
#endif
    {"baseline", &kernels_baseline, randn_baseline, 1},
};

// The named kernel set, or the best one for "auto" (or nullptr, empty): nullptr for a name this
// build or this CPU cannot run.
const Isa* find_isa(const char* name) {
    const bool best = name == nullptr || *name == '\0' || strcmp(name, "auto") == 0;
    const int level = cpu_level();
    for (const Isa& isa : kIsas)
        if ((best || strcmp(name, isa.name) == 0) && isa.level <= level) return &isa;
    return nullptr;
}

std::atomic<const Isa*> g_isa{nullptr};

const Isa& isa() {
    const Isa* p = g_isa.load();
    if (p == nullptr) {
        p = find_isa(getenv("FASTVAE_CPU_ISA"));
        if (p == nullptr) p = find_isa("auto");
        g_isa.store(p);
    }
    return *p;
}

}  // namespace
}  // namespace fv::cpu

// ---------------------------------------------------------------------------------------------
// Exported functions
// ---------------------------------------------------------------------------------------------

#ifndef FV_CUDA_ARCHS
#define FV_CUDA_ARCHS ""
#endif

extern "C" {

FV_API int32_t fv_abi_version(void) { return FV_ABI_VERSION; }

FV_API int32_t fv_has_cuda(void) {
#if defined(FV_WITH_CUDA)
    return 1;
#else
    return 0;
#endif
}

FV_API const char* fv_build_info(void) {
    static const std::string info = [] {
        std::string s = "compiler: ";
#if defined(__clang__)
        s += "clang " __clang_version__;
#elif defined(__GNUC__)
        s += "gcc " __VERSION__;
#endif
        s += "; cpu kernels: baseline";
#if defined(FV_HAVE_AVX2)
        s += ", avx2";
#endif
#if defined(FV_HAVE_AVX512)
        s += ", avx512";
#endif
#if defined(FV_WITH_CUDA)
        s += "; cuda architectures: " FV_CUDA_ARCHS;
#else
        s += "; cuda: not built";
#endif
        return s;
    }();
    return info.c_str();
}

FV_API const char* fv_last_error(void) { return fv::g_error; }

FV_API const char* fv_cpu_isa(void) { return fv::cpu::isa().name; }

FV_API const char* fv_cpu_isas(void) {
    static const std::string names = [] {
        std::string s;
        const int level = fv::cpu::cpu_level();
        for (const fv::cpu::Isa& isa : fv::cpu::kIsas) {
            if (isa.level > level) continue;
            if (!s.empty()) s += ",";
            s += isa.name;
        }
        return s;
    }();
    return names.c_str();
}

FV_API int32_t fv_cpu_set_isa(const char* name) {
    const fv::cpu::Isa* p = fv::cpu::find_isa(name);
    if (p == nullptr) return -1;
    fv::cpu::g_isa.store(p);
    return 0;
}

FV_API int32_t fv_cpu_run(int32_t op, const fv_call* call) {
    try {
        const int status = fv::validate_call(op, call);
        if (status != FV_OK) return status;
        const fv::cpu::KernelFn fn = (*fv::cpu::isa().table)[op][call->compute == FV_FLOAT64];
        return fn(*call);
    } catch (const std::exception& e) {
        return fv::set_error(FV_ERR_INTERNAL, "internal error: %s", e.what());
    } catch (...) {
        return fv::set_error(FV_ERR_INTERNAL, "internal error");
    }
}

#if !defined(FV_WITH_CUDA)
FV_API int64_t fv_cuda_workspace_bytes(int32_t, const fv_call*) { return 0; }

FV_API int32_t fv_cuda_run(int32_t, const fv_call*) {
    return fv::set_error(FV_ERR_NOT_BUILT, "the library was built without CUDA");
}
#endif

FV_API void fv_randn_host(uint64_t seed, uint64_t offset, int64_t n, float* out) {
    fv::cpu::isa().randn(seed, offset, n, out);
}

FV_API void fv_philox_host(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out) {
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t o = offset + uint64_t(i);
        fv::philox_2(uint32_t(seed), uint32_t(seed >> 32), uint32_t(o), uint32_t(o >> 32),
                     out[2 * i], out[2 * i + 1]);
    }
}

}  // extern "C"
