//! SIMD for the CPU kernels that are not matmuls: each hot loop is compiled three times (AVX-512,
//! AVX2 + FMA, baseline x86-64 or the target's own) and the widest the CPU has is picked once
//! at run time, so one binary runs everywhere and uses AVX-512 where it exists. The loops are
//! plain Rust that the compiler vectorises; [`exp`] is a polynomial so that it vectorises too.

use std::sync::atomic::{AtomicU8, Ordering};

/// 4: AVX-512 (x86-64-v4), 3: AVX2 + FMA (v3), 1: baseline.
pub fn level() -> u8 {
    static LEVEL: AtomicU8 = AtomicU8::new(0);
    let l = LEVEL.load(Ordering::Relaxed);
    if l != 0 {
        return l;
    }
    let l = detect();
    LEVEL.store(l, Ordering::Relaxed);
    l
}

fn detect() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if std::env::var_os("CODECLM_NO_AVX512").is_none()
            && has!("avx512f")
            && has!("avx512vl")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("fma")
        {
            return 4;
        }
        if has!("avx2") && has!("fma") {
            return 3;
        }
    }
    1
}

pub fn level_name() -> &'static str {
    match level() {
        4 => "avx512",
        3 => "avx2",
        _ => "baseline",
    }
}

/// Defines `fn name(args)` whose body is compiled for each SIMD level and dispatched at run
/// time. The body must be safe code; arguments are passed through unchanged.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                match $crate::simd::level() {
                    // Safety: the CPU has the features (checked at run time).
                    4 => return unsafe { v4($($arg),*) },
                    3 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            imp($($arg),*)
        }
    };
    ($(#[$meta:meta])* $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            unsafe fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                match $crate::simd::level() {
                    4 => return v4($($arg),*),
                    3 => return v3($($arg),*),
                    _ => {}
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// e^x to about 2 ulp, as straight-line arithmetic that vectorises (Cephes' `expf`: x = n ln2 +
/// r with |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n from the exponent bits); 0 below
/// -87 (where e^x leaves the normal range).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // Safety: n is an integer in [-126, 128] (x was clamped), so the conversion is exact.
    let n: i32 = unsafe { n.to_int_unchecked() };
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

/// Lanes of the reductions below: sixteen independent accumulators (one AVX-512 register, two
/// AVX2 ones), combined in a fixed order, so the loops vectorise without reassociating floats
/// behind the compiler's back, and the result is the same on every run.
const LANES: usize = 16;

#[inline(always)]
fn reduce(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut r = init;
    for &v in it.remainder() {
        r = f(r, v);
    }
    for a in acc {
        r = f(r, a);
    }
    r
}

#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    reduce(x, 0.0, |a, v| a + v)
}

#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    reduce(x, f32::NEG_INFINITY, |a, v| if v > a { v } else { a })
}

#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (mut ia, mut ib) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ia).zip(&mut ib) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut r = 0f32;
    for (x, y) in ia.remainder().iter().zip(ib.remainder()) {
        r += x * y;
    }
    for v in acc {
        r += v;
    }
    r
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(super::exp(-1e30), 0.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
    }

    #[test]
    fn reductions() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 20.0) * 0.5).collect();
        assert_eq!(super::sum(&x), x.iter().sum::<f32>());
        assert_eq!(super::max(&x), 8.0);
        assert_eq!(super::dot(&x, &x), x.iter().map(|v| v * v).sum::<f32>());
        assert_eq!(super::max(&[]), f32::NEG_INFINITY);
    }
}
