//! The engine allocates nothing per training step after the first: a counting global allocator
//! sees every allocation on every thread during steps 2..6. The `gemm` crate allocates its
//! packing buffers inside each call; those are counted apart (the engine marks its gemm calls)
//! and reported, not hidden.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use codeclm_model::engine::{cpu, Capacity, Cpu, Model};
use codeclm_model::train::{train_step, TrainConfig};
use codeclm_model::LlamaConfig;

struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static OURS: AtomicU64 = AtomicU64::new(0);
static IN_GEMM: AtomicU64 = AtomicU64::new(0);

fn count() {
    if ON.load(Ordering::Relaxed) {
        if cpu::in_gemm() {
            IN_GEMM.fetch_add(1, Ordering::Relaxed);
        } else {
            OURS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        count();
        System.realloc(ptr, layout, new)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn no_allocation_per_step_after_the_first() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let mut cfg = LlamaConfig::preset("tiny", 320).unwrap();
        cfg.max_position_embeddings = 256;
        let (b, t) = (4, 200);
        let mut model = Model::new(
            Cpu::new(),
            cfg,
            Capacity {
                batch: b,
                context: t,
            },
            true,
            false,
        )
        .unwrap();
        model.init(1);
        let x: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7) % 320).collect();
        let y: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 13 + 1) % 320).collect();
        let micro = [(x.as_slice(), y.as_slice()), (y.as_slice(), x.as_slice())];
        let tc = TrainConfig::preset("tiny").unwrap();
        let one = codeclm_model::dist::Dist::single();
        ON.store(true, Ordering::SeqCst);
        train_step(&mut model, &micro, &tc, 1, 1e-3, &one).unwrap();
        ON.store(false, Ordering::SeqCst);
        // The counter sees the engine: its first step grows the kernels' scratch space.
        let first = OURS.swap(0, Ordering::SeqCst);
        assert!(first > 0, "the first step's scratch allocations were not seen");
        IN_GEMM.store(0, Ordering::SeqCst);
        let steps = 5;
        ON.store(true, Ordering::SeqCst);
        for s in 0..steps {
            train_step(&mut model, &micro, &tc, 2 + s, 1e-3, &one).unwrap();
        }
        ON.store(false, Ordering::SeqCst);
        let (ours, gemm) = (OURS.load(Ordering::SeqCst), IN_GEMM.load(Ordering::SeqCst));
        eprintln!(
            "allocations per step after the first: engine {}, inside gemm {} ({} over {steps} steps)",
            ours as f64 / steps as f64,
            gemm as f64 / steps as f64,
            gemm
        );
        assert_eq!(ours, 0, "the engine allocated {ours} times in {steps} steps");
    });
}
