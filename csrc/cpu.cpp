// cpu.cpp -- the library's exported C functions (CPU side), the op table's exports, the
// argument checks of every call (against the op's line of FV_OPS in fastvae.h), error messages,
// the thread pool, and the run-time choice of the CPU kernel set (baseline, AVX2 or AVX-512).
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <chrono>
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

bool valid_dtype(int32_t d) { return d >= FV_FLOAT32 && d <= FV_BFLOAT16; }

// Bit i: operand i is present.
unsigned present(const fv_tensor* t, int n) {
    unsigned mask = 0;
    for (int i = 0; i < n; ++i)
        if (t[i].data != nullptr) mask |= 1u << i;
    return mask;
}

// The inputs (or the outputs) of a call against the marks of their operand list.
int check_operands(const OpSpec& s, bool outputs, const fv_tensor* t, int32_t compute) {
    const Slots& slots = outputs ? s.out : s.in;
    const char* list = outputs ? s.outputs : s.inputs;
    const char* kind = outputs ? "output" : "input";
    const int n = outputs ? FV_MAX_OUT : FV_MAX_IN;
    for (int i = 0; i < n; ++i) {
        const int len = i < slots.count ? slots.name_len[i] : 0;
        const char* name = list + slots.name_at[i];
        if (t[i].data == nullptr) {
            if (bit(slots.required, i))
                return set_error(FV_ERR_INVALID, "%s: %s %d (%.*s) is required", s.name, kind, i,
                                 len, name);
            continue;
        }
        if (i >= slots.count)
            return set_error(FV_ERR_INVALID, "%s: %s %d is given, the op has %d %ss", s.name,
                             kind, i, slots.count, kind);
        if (!valid_dtype(t[i].dtype) && !(i < slots.count && t[i].dtype == FV_INT64))
            return set_error(FV_ERR_INVALID, "%s: %s %d (%.*s) has unknown dtype code %d",
                             s.name, kind, i, len, name, t[i].dtype);
        if (i < slots.count && bit(slots.index, i) != (t[i].dtype == FV_INT64))
            return set_error(FV_ERR_INVALID, "%s: %s %d (%.*s) has dtype code %d, %s", s.name,
                             kind, i, len, name, t[i].dtype,
                             bit(slots.index, i) ? "not int64 (4)" : "not a float dtype");
        if (bit(slots.compute, i) && t[i].dtype != compute)
            return set_error(FV_ERR_INVALID, "%s: %s %d (%.*s) has dtype code %d, not the "
                             "compute dtype %d", s.name, kind, i, len, name, t[i].dtype, compute);
    }
    const unsigned given = present(t, n) & slots.together;
    if (given != 0 && given != slots.together) {
        const int first = __builtin_ctz(slots.together), last = 31 - __builtin_clz(slots.together);
        const int from = slots.name_at[first], to = slots.name_at[last] + slots.name_len[last];
        return set_error(FV_ERR_INVALID, "%s: give the %ss %.*s all or none", s.name, kind,
                         to - from, list + from);
    }
    return FV_OK;
}

}  // namespace

bool needs_noise(int32_t op, const fv_call& c) {
    const OpSpec& s = kOps[op];
    return (present(c.out, FV_MAX_OUT) & s.out.noise) && !(present(c.in, FV_MAX_IN) & s.in.noise);
}

int validate_call(int32_t op, const fv_call* call) {
    if (op < 0 || op >= FV_OP_COUNT) return set_error(FV_ERR_INVALID, "unknown op code %d", op);
    const OpSpec& s = kOps[op];
    if (call == nullptr) return set_error(FV_ERR_INVALID, "%s: call is NULL", s.name);
    const fv_call& c = *call;
    if (c.B < 1 || c.N < 1 || c.K < 1)
        return set_error(FV_ERR_INVALID, "%s: sizes must be >= 1 (B=%lld, N=%lld, K=%lld)",
                         s.name, static_cast<long long>(c.B), static_cast<long long>(c.N),
                         static_cast<long long>(c.K));
    if (c.K != 1 && !(s.flags & FV_USES_K))
        return set_error(FV_ERR_INVALID, "%s: K must be 1 (the op takes no samples), got %lld",
                         s.name, static_cast<long long>(c.K));
    if (c.compute != FV_FLOAT32 && c.compute != FV_FLOAT64)
        return set_error(FV_ERR_INVALID, "%s: compute dtype %d is not float32/float64", s.name,
                         c.compute);
    if ((s.flags & FV_USES_REDUCE_DIM) && c.reduce_dim != 0 && c.reduce_dim != 1)
        return set_error(FV_ERR_INVALID, "%s: reduce_dim must be 0 or 1, got %d", s.name,
                         c.reduce_dim);
    int status = check_operands(s, false, c.in, c.compute);
    if (status == FV_OK) status = check_operands(s, true, c.out, c.compute);
    if (status != FV_OK) return status;
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
//
// Between jobs a worker spins for 200 us (FASTVAE_POOL_SPIN_US) before it sleeps on the condition variable (as
// OpenMP's threads do): in a training step the calls come back to back, tens of microseconds
// apart, and a futex wake-up of a sleeping worker costs more than the kernels of a small batch
// (64 x 784: ~150 us per forward + backward on the 2-core machine).
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
            posted_.store(generation, std::memory_order_release);
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
    // FASTVAE_POOL_SPIN_US overrides (0: sleep at once)
    const int64_t spin_micros_ = [] {
        const char* v = getenv("FASTVAE_POOL_SPIN_US");
        return v != nullptr && *v != '\0' ? int64_t(atoll(v)) : int64_t(200);
    }();

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

    // Spins until a job after `seen` is posted or spin_micros_ pass.
    void spin(uint32_t seen) const {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_micros_);
        for (int i = 1; posted_.load(std::memory_order_acquire) == seen; ++i) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            if (i % 256 == 0 && std::chrono::steady_clock::now() > until) return;
        }
    }

    void work(int index) {
        uint32_t seen = 0;
        std::unique_lock<std::mutex> lock(mu_);
        for (;;) {
            if (generation_ == seen) {
                lock.unlock();
                spin(seen);
                lock.lock();
            }
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
    std::atomic<uint32_t> posted_{0};  // generation_, readable without the lock (spinning)
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

FV_API int32_t fv_op_count(void) { return FV_OP_COUNT; }

FV_API const char* fv_op_name(int32_t op) {
    return op >= 0 && op < FV_OP_COUNT ? fv::kOps[op].name : nullptr;
}

FV_API const char* fv_op_inputs(int32_t op) {
    return op >= 0 && op < FV_OP_COUNT ? fv::kOps[op].inputs : nullptr;
}

FV_API const char* fv_op_outputs(int32_t op) {
    return op >= 0 && op < FV_OP_COUNT ? fv::kOps[op].outputs : nullptr;
}

FV_API int32_t fv_op_flags(int32_t op) {
    return op >= 0 && op < FV_OP_COUNT ? fv::kOps[op].flags : -1;
}

FV_API int64_t fv_layout(const char* name) {
    struct Entry {
        const char* name;
        int64_t value;
    };
#define FV_FIELD(type, field) {#type "." #field, int64_t(offsetof(type, field))}
    static const Entry kLayout[] = {
        {"fv_call", sizeof(fv_call)},   {"fv_tensor", sizeof(fv_tensor)},
        {"FV_MAX_IN", FV_MAX_IN},       {"FV_MAX_OUT", FV_MAX_OUT},
        FV_FIELD(fv_tensor, data),      FV_FIELD(fv_tensor, stride),
        FV_FIELD(fv_tensor, dtype),     FV_FIELD(fv_tensor, reserved),
        FV_FIELD(fv_call, B),           FV_FIELD(fv_call, N),
        FV_FIELD(fv_call, K),           FV_FIELD(fv_call, in),
        FV_FIELD(fv_call, out),         FV_FIELD(fv_call, seed),
        FV_FIELD(fv_call, scalar),      FV_FIELD(fv_call, reduce_dim),
        FV_FIELD(fv_call, compute),     FV_FIELD(fv_call, n_threads),
        FV_FIELD(fv_call, device),      FV_FIELD(fv_call, stream),
        FV_FIELD(fv_call, workspace),   FV_FIELD(fv_call, workspace_bytes),
    };
#undef FV_FIELD
    if (name == nullptr) return -1;
    for (const Entry& e : kLayout)
        if (strcmp(e.name, name) == 0) return e.value;
    return -1;
}

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
