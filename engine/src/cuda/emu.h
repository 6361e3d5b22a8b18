// A CUDA emulator for kernels.cu on the CPU (CODECLM_CUDA_EMULATE=1; engine/src/cuda/emu.rs):
// the kernel source is compiled as C++ with this prelude, and every launch runs its blocks one
// after another, each block's threads as fibers on one OS thread (made with makecontext, switched
// with _setjmp/_longjmp, which unlike swapcontext make no system call). __syncthreads is a
// barrier of the block's live threads, __shfl_xor_sync one of the warp's, so kernels that rely on
// either are emulated faithfully, and a barrier some threads never reach is reported as a
// deadlock instead of hanging. Memory is host memory: a "device pointer" is a host address.
// What it cannot show: timing, the memory model of real concurrent threads, and the device's
// float rounding in its fast paths (fused multiply-adds are contracted as the host compiler
// chooses).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <csetjmp>
#include <ucontext.h>

struct dim3 {
    unsigned x, y, z;
};

namespace emu {

struct Fiber {
    ucontext_t ctx;
    jmp_buf jb;
    unsigned tid;
    bool started;
    bool done;
};

struct Barrier {
    unsigned arrived = 0;
    unsigned long long gen = 0;
};

struct State {
    ucontext_t sched;
    jmp_buf sched_jb;
    ucontext_t blank;
    bool have_blank = false;
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>> stacks;
    Fiber* cur = nullptr;
    unsigned block_dim = 1, grid_dim = 1, block_idx = 0;
    unsigned live = 0;
    std::vector<unsigned> warp_live;
    Barrier block_bar;
    std::vector<Barrier> warp_bar;
    std::vector<float> slot;
    unsigned long long events = 0;
    std::function<void()> body;
    std::string error;
};

inline State& st() {
    static State s;
    return s;
}

inline void yield() {
    if (!_setjmp(st().cur->jb)) _longjmp(st().sched_jb, 1);
}

// Waits until `expected()` threads have arrived (the live ones: exited threads count as arrived).
template <class F>
inline void arrive(Barrier& b, F expected) {
    State& s = st();
    s.events++;
    unsigned long long g = b.gen;
    if (++b.arrived >= expected()) {
        b.arrived = 0;
        b.gen++;
        return;
    }
    while (b.gen == g) yield();
}

inline void sync_block() {
    arrive(st().block_bar, [] { return st().live; });
}

inline void sync_warp() {
    State& s = st();
    unsigned w = s.cur->tid >> 5;
    arrive(s.warp_bar[w], [w] { return st().warp_live[w]; });
}

// A fiber's whole life: run the block's body, report, and wait to be resumed for the next
// block (fibers persist across blocks and launches: only their first start needs makecontext).
inline void entry() {
    for (;;) {
        State& s = st();
        s.body();
        s.cur->done = true;
        s.events++;
        s.live--;
        unsigned w = s.cur->tid >> 5;
        s.warp_live[w]--;
        // Threads waiting for this one at a barrier are released by its exit.
        if (s.block_bar.arrived > 0 && s.block_bar.arrived >= s.live) {
            s.block_bar.arrived = 0;
            s.block_bar.gen++;
        }
        if (s.warp_bar[w].arrived > 0 && s.warp_bar[w].arrived >= s.warp_live[w]) {
            s.warp_bar[w].arrived = 0;
            s.warp_bar[w].gen++;
        }
        yield();
    }
}

// Runs `body` as `grid` blocks of `block` threads; 0 on success, else a deadlock (message in
// st().error).
inline int launch(const char* name, unsigned grid, unsigned block, std::function<void()> body) {
    State& s = st();
    if (block == 0 || block > 1024 || grid == 0) {
        s.error = std::string(name) + ": launch of " + std::to_string(grid) + " x " + std::to_string(block) + " threads";
        return 1;
    }
    s.body = std::move(body);
    s.grid_dim = grid;
    s.block_dim = block;
    const size_t stack = 256 * 1024;
    if (!s.have_blank) {
        getcontext(&s.blank);  // a template for every fiber's first start
        s.have_blank = true;
    }
    while (s.fibers.size() < block) {
        s.fibers.emplace_back();
        s.stacks.emplace_back(stack);
        Fiber& f = s.fibers.back();
        f.tid = (unsigned)s.fibers.size() - 1;
        f.started = false;
        f.ctx = s.blank;
        f.ctx.uc_stack.ss_sp = s.stacks.back().data();
        f.ctx.uc_stack.ss_size = stack;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, entry, 0);
    }
    unsigned warps = (block + 31) / 32;
    s.slot.assign(block, 0.0f);
    for (unsigned b = 0; b < grid; b++) {
        s.block_idx = b;
        s.live = block;
        s.warp_live.assign(warps, 0);
        for (unsigned t = 0; t < block; t++) s.warp_live[t >> 5]++;
        s.block_bar = Barrier{};
        s.warp_bar.assign(warps, Barrier{});
        for (unsigned t = 0; t < block; t++) s.fibers[t].done = false;
        while (s.live > 0) {
            unsigned long long before = s.events;
            for (unsigned t = 0; t < block; t++) {
                Fiber& f = s.fibers[t];
                if (f.done) continue;
                s.cur = &f;
                if (!_setjmp(s.sched_jb)) {
                    if (!f.started) {
                        f.started = true;
                        swapcontext(&s.sched, &f.ctx);  // never returns here: fibers leave by _longjmp
                    } else {
                        _longjmp(f.jb, 1);
                    }
                }
            }
            if (s.events == before) {
                s.error = std::string(name) + ": block " + std::to_string(b) + ": " + std::to_string(s.live) +
                          " threads wait at a barrier (__syncthreads or a warp shuffle) that the others never reach";
                return 2;
            }
        }
    }
    return 0;
}

template <class T>
using arg_t = std::remove_cv_t<std::remove_reference_t<T>>;

template <class... A, size_t... I>
inline void call(void (*k)(A...), void** a, std::index_sequence<I...>) {
    k(*static_cast<arg_t<A>*>(a[I])...);
}

template <class... A>
inline void invoke(void (*k)(A...), void** a) {
    call(k, a, std::index_sequence_for<A...>{});
}

}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define threadIdx (dim3{emu::st().cur->tid, 0, 0})
#define blockIdx (dim3{emu::st().block_idx, 0, 0})
#define blockDim (dim3{emu::st().block_dim, 1, 1})
#define gridDim (dim3{emu::st().grid_dim, 1, 1})

inline void __syncthreads() { emu::sync_block(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    emu::State& s = emu::st();
    unsigned t = s.cur->tid;
    s.slot[t] = v;
    emu::sync_warp();
    unsigned src = (t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask);
    float r = src < s.block_dim ? s.slot[src] : v;
    emu::sync_warp();
    return r;
}

// One OS thread runs every CUDA thread, and a fiber switches only at a barrier: a plain add is
// atomic here.
inline float atomicAdd(float* p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, sizeof f);
    return f;
}

#define EMU_KERNEL(name)                                                                 \
    extern "C" int emu_##name(unsigned grid, unsigned block, void** args) {              \
        return emu::launch(#name, grid, block, [args] { emu::invoke(name, args); });     \
    }

extern "C" const char* emu_last_error() { return emu::st().error.c_str(); }
