//! Bit-exact Rust port of Pillow's antialiased (convolution) resampler for
//! 8-bit RGB images, as found in Pillow 13 `src/libImaging/Resample.c`.
//!
//! [`resize_rgb8`] produces exactly the bytes of
//! `img.crop((x, y, x + w, y + h)).resize((dst_w, dst_h), filter)` for an
//! `"RGB"` image. The port keeps every numeric decision that can change a
//! byte of output:
//!
//! * Filter weights are computed in `f64`, per output pixel, normalised by
//!   their (sequentially accumulated) sum, exactly like `precompute_coeffs`.
//!   Box coordinates are `f32` in Pillow (`float box[4]`), so the input
//!   extent is formed in `f32` before widening.
//! * Weights are converted to fixed point with `PRECISION_BITS = 22` using
//!   Pillow's sign-dependent rounding-by-truncation (`normalize_coeffs_8bpc`).
//! * Sums are `i32`, start at `1 << 21` (the rounding half), and the result
//!   is `clamp(sum >> 22, 0, 255)` with an *arithmetic* shift (`clip8`).
//! * Two separable passes through an 8-bit intermediate image, in Pillow
//!   13's order: horizontal first, unless the height shrinks by more than
//!   twice as many pixels as the width (see [`horizontal_first`]); the order
//!   changes bytes because the intermediate is rounded and clipped. In
//!   horizontal-first order the horizontal pass only produces the rows the
//!   vertical pass reads (`ybox_first..ybox_last`).
//! * A pass is skipped when its axis keeps its size (`need_horizontal` /
//!   `need_vertical` in `ImagingResampleInner`). This matters for exactness:
//!   a same-size LANCZOS pass is not a bit-exact identity in general.
//!
//! Crop-then-resize (what [`resize_rgb8`] models) is different from Pillow's
//! `resize(size, filter, box=...)`: after `crop()` the image ends at the crop
//! edges, so the filter support is clipped (and the weights renormalised)
//! there, while `box=` lets the filter read pixels outside the box.

/// Resampling filters of Pillow's convolution resampler that this port
/// supports (`Image.Resampling.BOX`, `BILINEAR`, `BICUBIC`, `LANCZOS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PillowFilter {
    Box,
    Bilinear,
    Bicubic,
    Lanczos,
}

/// Fixed-point fraction bits of the coefficients: 8 bits are left for the
/// pixel value and 2 for the overshoot of filters with negative lobes, so that
/// an `i32` sum never overflows (comment above `PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The initial value of every accumulator: adding one half before the final
/// arithmetic shift turns the shift's floor into round-half-up.
const ROUNDING_HALF: i32 = 1 << (PRECISION_BITS - 1);

impl PillowFilter {
    /// Radius of the filter at scale 1 (`struct filter.support`).
    fn support(self) -> f64 {
        match self {
            PillowFilter::Box => 0.5,
            PillowFilter::Bilinear => 1.0,
            PillowFilter::Bicubic => 2.0,
            PillowFilter::Lanczos => 3.0,
        }
    }

    /// The continuous filter kernel (`box_filter`, `bilinear_filter`,
    /// `bicubic_filter`, `lanczos_filter`). The arithmetic is written in the
    /// same order as the C so that every `f64` intermediate rounds the same.
    fn kernel(self, x: f64) -> f64 {
        match self {
            // Half-open on the left: a sample exactly half-way between two
            // source pixels belongs to the left one.
            PillowFilter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            PillowFilter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            // Keys' cubic convolution with a = -0.5 (Catmull-Rom).
            PillowFilter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            // Truncated sinc, windowed by a 3x wider sinc; note the window is
            // half-open ([-3, 3)) in Pillow.
            PillowFilter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// `sinc_filter`: sin(pi x) / (pi x), computed as Pillow does (multiply by
/// pi first, then divide by the product), using the platform libm `sin`.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Floating-point filter weights for one axis, as `precompute_coeffs` returns
/// them: for output index `i`, source pixels `start..start + len` (relative
/// to the axis' origin) are weighted by `weights[i * ksize..][..len]`.
struct FloatCoeffs {
    ksize: usize,
    /// `(start, len)` per output pixel (`bounds[2i]`, `bounds[2i+1]` in C).
    bounds: Vec<(usize, usize)>,
    weights: Vec<f64>,
}

/// Fixed-point weights for one axis (the result of `normalize_coeffs_8bpc`).
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl Coeffs {
    /// Source range and fixed-point weights of output pixel `i`.
    #[inline]
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, len) = self.bounds[i];
        let base = i * self.ksize;
        (start, &self.weights[base..base + len])
    }
}

/// Port of `precompute_coeffs`: the filter window of each output pixel over
/// an input axis of `in_size` pixels, of which the box `in0..in1` is mapped
/// onto `out_size` output pixels.
fn precompute_coeffs(
    in_size: usize,
    in0: f32,
    in1: f32,
    out_size: usize,
    filter: PillowFilter,
) -> FloatCoeffs {
    // Pillow's box is `float`; the subtraction happens in single precision and
    // only the result is widened.
    let scale = f64::from(in1 - in0) / out_size as f64;
    // When upscaling, the kernel keeps its natural width (filterscale 1);
    // when downscaling it is stretched by the scale, which is what
    // antialiases.
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support() * filterscale;
    // Upper bound of taps per output pixel; also the row stride of `weights`.
    let ksize = support.ceil() as usize * 2 + 1;
    // Pillow multiplies by the reciprocal (hoisted out of the loop) rather than
    // dividing by `filterscale`: keep it, the two differ in the last bit.
    let inv_filterscale = 1.0 / filterscale;

    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0.0f64; out_size * ksize];
    for (xx, k) in weights.chunks_exact_mut(ksize).enumerate() {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // `(int)` in C truncates toward zero; `as i64` does the same, and the
        // clamp to the axis makes the truncation of negatives harmless.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let len = (xmax - xmin).max(0) as usize;
        let xmin = xmin as usize;

        // The sum is accumulated in index order, as in C, because
        // floating-point addition order changes the normalised weights.
        let mut ww = 0.0f64;
        for (x, w) in k[..len].iter_mut().enumerate() {
            *w = filter.kernel(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            ww += *w;
        }
        // Divide (not multiply by 1/ww) like Pillow; an all-zero window is
        // left as zeros.
        if ww != 0.0 {
            for w in &mut k[..len] {
                *w /= ww;
            }
        }
        bounds.push((xmin, len));
    }
    FloatCoeffs {
        ksize,
        bounds,
        weights,
    }
}

/// Port of `normalize_coeffs_8bpc`: fixed point with 22 fraction bits,
/// rounding half away from zero by adding +-0.5 and truncating toward zero
/// (which is what both C's `(int)` and Rust's `as i32` do).
fn to_fixed_point(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (-0.5 + scaled) as i32
    } else {
        (0.5 + scaled) as i32
    }
}

fn normalize_coeffs_8bpc(c: FloatCoeffs) -> Coeffs {
    Coeffs {
        ksize: c.ksize,
        bounds: c.bounds,
        weights: c.weights.into_iter().map(to_fixed_point).collect(),
    }
}

/// `clip8`: arithmetic shift (floor for negative sums), then saturate.
/// Pillow uses a lookup table covering -640..=639 after the shift; a clamp is
/// equivalent on that range, and the coefficient bounds keep sums inside it.
#[inline]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// A read-only view of RGB8 rows: row `y` is `row_bytes` bytes starting at
/// `first + y * stride`. Lets both passes read the caller's source at the crop
/// offset without copying the crop.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [u8],
    first: usize,
    stride: usize,
    row_bytes: usize,
}

impl<'a> Rows<'a> {
    /// A tightly packed image `width` pixels wide.
    fn packed(data: &'a [u8], width: usize) -> Self {
        Rows {
            data,
            first: 0,
            stride: width * 3,
            row_bytes: width * 3,
        }
    }

    #[inline]
    fn row(&self, y: usize) -> &'a [u8] {
        let start = self.first + y * self.stride;
        &self.data[start..start + self.row_bytes]
    }
}

/// Port of `ImagingResampleHorizontal_8bpc` (3-band branch): output row `yy`
/// is computed from input row `yy + offset`; `out` has `rows` rows of
/// `coeffs.bounds.len()` RGB pixels.
fn resample_horizontal(
    input: Rows<'_>,
    offset: usize,
    rows: usize,
    coeffs: &Coeffs,
    out: &mut [u8],
) {
    let out_row_bytes = coeffs.bounds.len() * 3;
    if out_row_bytes == 0 {
        return;
    }
    for (yy, line_out) in out.chunks_exact_mut(out_row_bytes).take(rows).enumerate() {
        let line_in = input.row(yy + offset);
        for (xx, px_out) in line_out.chunks_exact_mut(3).enumerate() {
            let (xmin, k) = coeffs.taps(xx);
            let px_in = &line_in[xmin * 3..(xmin + k.len()) * 3];
            let (mut s0, mut s1, mut s2) = (ROUNDING_HALF, ROUNDING_HALF, ROUNDING_HALF);
            for (p, &w) in px_in.chunks_exact(3).zip(k) {
                s0 += i32::from(p[0]) * w;
                s1 += i32::from(p[1]) * w;
                s2 += i32::from(p[2]) * w;
            }
            px_out[0] = clip8(s0);
            px_out[1] = clip8(s1);
            px_out[2] = clip8(s2);
        }
    }
}

/// Port of `ImagingResampleVertical_8bpc` (3-band branch).
///
/// Pillow walks each output pixel down its column. Here a whole output row is
/// accumulated at once, one weighted input row at a time: contiguous and
/// vectorisable. The result is bit-identical because each sum is the same
/// multiset of exact `i32` products (the coefficient bounds keep every partial
/// sum in range, and two's-complement addition is associative anyway).
fn resample_vertical(input: Rows<'_>, coeffs: &Coeffs, out: &mut [u8]) {
    let row_bytes = input.row_bytes;
    if row_bytes == 0 {
        return;
    }
    let mut acc = vec![0i32; row_bytes];
    for (yy, line_out) in out.chunks_exact_mut(row_bytes).enumerate() {
        let (ymin, k) = coeffs.taps(yy);
        acc.fill(ROUNDING_HALF);
        for (y, &w) in k.iter().enumerate() {
            for (a, &p) in acc.iter_mut().zip(input.row(ymin + y)) {
                *a += i32::from(p) * w;
            }
        }
        for (o, &a) in line_out.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

/// Pass order of `ImagingResampleInner` in Pillow 13: horizontal then
/// vertical, unless the height shrinks (in pixels) by more than twice as much
/// as the width does, in which case the vertical pass runs first so that the
/// horizontal pass has fewer rows. Because the intermediate image is rounded
/// to 8 bits, the order changes output bytes. (Pillow <= 12.x always ran the
/// horizontal pass first; this rule is new in 13.0.0.) The differences are
/// signed: a widened image (`in_w - out_w < 0`) goes vertical-first as soon
/// as its height shrinks at all.
fn horizontal_first((in_w, in_h): (usize, usize), (out_w, out_h): (usize, usize)) -> bool {
    let dy = in_h as i64 - out_h as i64;
    let dx = in_w as i64 - out_w as i64;
    !(dy > 0 && dy > dx * 2)
}

/// Resamples the `crop` rectangle (x, y, w, h) of an RGB8 image (`src` is
/// `src_width * src_height * 3` bytes, row-major) to `dst_width x dst_height`,
/// exactly like Pillow's
/// `img.crop((x, y, x+w, y+h)).resize((dst_width, dst_height), filter)`.
///
/// Crop-then-resize: the filter support is clipped at the crop's edges (no
/// pixel outside the crop is read), and the crop is not copied.
///
/// Returns `dst_width * dst_height * 3` bytes.
///
/// # Panics
/// If `dst_width` or `dst_height` is 0 (Pillow raises `ValueError`), if the
/// crop does not lie inside the image (Pillow would pad with black instead),
/// or if `src` is shorter than `src_width * src_height * 3`.
/// An empty crop (w or h of 0) yields black, as Pillow does.
pub fn resize_rgb8(
    src: &[u8],
    src_width: u32,
    src_height: u32,
    crop: (u32, u32, u32, u32),
    dst_width: u32,
    dst_height: u32,
    filter: PillowFilter,
) -> Vec<u8> {
    let (cx, cy, cw, ch) = (
        crop.0 as usize,
        crop.1 as usize,
        crop.2 as usize,
        crop.3 as usize,
    );
    let (sw, sh) = (src_width as usize, src_height as usize);
    let (dw, dh) = (dst_width as usize, dst_height as usize);
    assert!(dw > 0 && dh > 0, "destination size must be > 0");
    assert!(
        cx.checked_add(cw).is_some_and(|r| r <= sw) && cy.checked_add(ch).is_some_and(|b| b <= sh),
        "crop {crop:?} exceeds the {src_width}x{src_height} image"
    );
    assert!(
        src.len() >= sw * sh * 3,
        "src holds fewer than {src_width}x{src_height} RGB pixels"
    );

    let crop_rows = Rows {
        data: src,
        first: (cy * sw + cx) * 3,
        stride: sw * 3,
        row_bytes: cw * 3,
    };
    let mut out = vec![0u8; dw * dh * 3];

    // `ImagingResampleInner` with box = (0, 0, w, h), since the resize runs on
    // the cropped image: an axis whose size does not change is not resampled
    // at all. (With both unchanged, `Image.resize` returns a copy.)
    let need_horizontal = dw != cw;
    let need_vertical = dh != ch;

    if !need_horizontal && !need_vertical {
        for (y, line_out) in out.chunks_exact_mut(dw * 3).enumerate() {
            line_out.copy_from_slice(crop_rows.row(y));
        }
        return out;
    }

    let coeffs = |n_in: usize, n_out: usize| {
        normalize_coeffs_8bpc(precompute_coeffs(n_in, 0.0, n_in as f32, n_out, filter))
    };

    if horizontal_first((cw, ch), (dw, dh)) {
        // The vertical coefficients are needed first, to know which input
        // rows the vertical pass reads.
        let mut vert = coeffs(ch, dh);
        if !need_horizontal {
            resample_vertical(crop_rows, &vert, &mut out);
            return out;
        }
        let horiz = coeffs(cw, dw);
        // Only rows ybox_first..ybox_last feed the vertical pass (the bounds
        // are monotonic, so the first and last output rows delimit them).
        // When the height is unchanged this range is all rows.
        let ybox_first = vert.bounds[0].0;
        let ybox_last = vert.bounds.last().map_or(0, |&(s, l)| s + l);
        let temp_rows = ybox_last.saturating_sub(ybox_first);
        if !need_vertical {
            // The horizontal result is the output (`imOut = imTemp`).
            resample_horizontal(crop_rows, ybox_first, temp_rows, &horiz, &mut out);
            return out;
        }
        let mut temp = vec![0u8; dw * temp_rows * 3];
        resample_horizontal(crop_rows, ybox_first, temp_rows, &horiz, &mut temp);
        // Rebase the vertical bounds onto the intermediate image.
        for b in &mut vert.bounds {
            b.0 -= ybox_first;
        }
        resample_vertical(Rows::packed(&temp, dw), &vert, &mut out);
    } else {
        // Vertical first (this branch always has need_vertical): an
        // intermediate image of the crop's width and the output's height.
        let vert = coeffs(ch, dh);
        if !need_horizontal {
            resample_vertical(crop_rows, &vert, &mut out);
            return out;
        }
        let mut temp = vec![0u8; cw * dh * 3];
        resample_vertical(crop_rows, &vert, &mut temp);
        resample_horizontal(Rows::packed(&temp, cw), 0, dh, &coeffs(cw, dw), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [PillowFilter; 4] = [
        PillowFilter::Box,
        PillowFilter::Bilinear,
        PillowFilter::Bicubic,
        PillowFilter::Lanczos,
    ];

    /// Deterministic pseudo-random RGB image.
    fn noise(w: usize, h: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..w * h * 3)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn same_size_is_identity() {
        let img = noise(37, 23, 1);
        for f in ALL {
            assert_eq!(resize_rgb8(&img, 37, 23, (0, 0, 37, 23), 37, 23, f), img);
            // With a crop: equals the cropped bytes.
            let got = resize_rgb8(&img, 37, 23, (5, 3, 10, 7), 10, 7, f);
            let want: Vec<u8> = (3..10)
                .flat_map(|y| img[(y * 37 + 5) * 3..(y * 37 + 15) * 3].to_vec())
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        for &v in &[0u8, 1, 17, 128, 254, 255] {
            let img = vec![v; 53 * 41 * 3];
            for f in ALL {
                for &(dw, dh) in &[
                    (1, 1),
                    (7, 5),
                    (26, 20),
                    (53, 41),
                    (100, 3),
                    (211, 160),
                    (53, 90),
                ] {
                    let out = resize_rgb8(&img, 53, 41, (2, 1, 50, 39), dw, dh, f);
                    assert!(out.iter().all(|&p| p == v), "{f:?} {v} -> {dw}x{dh}");
                }
            }
        }
    }

    #[test]
    fn fixed_point_coefficients_sum_to_one() {
        for f in ALL {
            for &(n_in, n_out) in &[
                (1, 1),
                (1, 9),
                (10, 3),
                (427, 256),
                (100, 256),
                (640, 1),
                (3, 2),
                (999, 17),
            ] {
                let c = normalize_coeffs_8bpc(precompute_coeffs(n_in, 0.0, n_in as f32, n_out, f));
                for i in 0..n_out {
                    let (start, k) = c.taps(i);
                    assert!(start + k.len() <= n_in && !k.is_empty());
                    let sum: i64 = k.iter().map(|&w| i64::from(w)).sum();
                    // Each weight is rounded by at most 1/2.
                    let tol = (k.len() as i64 + 1) / 2;
                    assert!(
                        (sum - (1 << PRECISION_BITS)).abs() <= tol,
                        "{f:?} {n_in}->{n_out} #{i}: {sum}"
                    );
                    // The i32 accumulator cannot overflow for any 8-bit input.
                    let pos: i64 = k.iter().filter(|&&w| w > 0).map(|&w| i64::from(w)).sum();
                    let neg: i64 = k.iter().filter(|&&w| w < 0).map(|&w| i64::from(w)).sum();
                    assert!(pos * 255 + i64::from(ROUNDING_HALF) <= i64::from(i32::MAX));
                    assert!(neg * 255 + i64::from(ROUNDING_HALF) >= i64::from(i32::MIN));
                }
            }
        }
    }

    #[test]
    fn upscaling_one_pixel() {
        let img = [12u8, 200, 77];
        for f in ALL {
            let out = resize_rgb8(&img, 1, 1, (0, 0, 1, 1), 9, 4, f);
            assert_eq!(out, [12, 200, 77].repeat(36));
        }
    }

    #[test]
    fn never_reads_outside_the_crop() {
        // Crop interior is constant 90; everything around it is 255 - 90.
        let (w, h) = (40, 30);
        let mut img = vec![165u8; w * h * 3];
        for y in 4..20 {
            for x in 6..31 {
                img[(y * w + x) * 3..][..3].fill(90);
            }
        }
        for f in ALL {
            for &(dw, dh) in &[(5, 4), (25, 16), (60, 50), (1, 16), (25, 1)] {
                let out = resize_rgb8(&img, 40, 30, (6, 4, 25, 16), dw, dh, f);
                assert!(out.iter().all(|&p| p == 90), "{f:?} {dw}x{dh}");
            }
        }
    }

    #[test]
    fn one_pixel_wide_and_tall() {
        let img = noise(1, 30, 7);
        for f in ALL {
            // Width unchanged: only the vertical pass runs, per channel.
            let out = resize_rgb8(&img, 1, 30, (0, 0, 1, 30), 1, 12, f);
            assert_eq!(out.len(), 36);
            // Widening a 1-pixel column replicates it.
            let wide = resize_rgb8(&img, 1, 30, (0, 0, 1, 30), 4, 12, f);
            for (row, px) in wide.chunks_exact(12).zip(out.chunks_exact(3)) {
                assert_eq!(row, px.repeat(4).as_slice());
            }
        }
    }

    #[test]
    fn empty_crop_is_black() {
        let img = noise(8, 8, 3);
        for f in ALL {
            assert!(resize_rgb8(&img, 8, 8, (2, 2, 0, 5), 3, 3, f)
                .iter()
                .all(|&p| p == 0));
        }
    }

    /// The 7x5 image of `matches_pillow_reference_bytes`.
    #[rustfmt::skip]
    const REF_IMG: [u8; 105] = [0, 159, 168, 148, 28, 120, 188, 119, 112, 120, 176, 144, 200, 199, 216, 172, 188, 72, 36, 143, 224, 182, 176, 20, 13, 75, 93, 248, 196, 206, 119, 27, 103, 138, 80, 40, 49, 99, 17, 108, 84, 34, 108, 193, 128, 134, 122, 66, 52, 17, 44, 118, 134, 62, 76, 217, 120, 182, 10, 218, 180, 25, 100, 34, 210, 236, 255, 169, 39, 112, 94, 138, 117, 241, 21, 14, 98, 200, 59, 177, 163, 252, 222, 166, 216, 227, 88, 120, 216, 12, 172, 171, 232, 116, 92, 236, 208, 235, 24, 192, 88, 108, 68, 163, 232];

    /// The horizontal-first result, forced, for comparison with Pillow 13.
    fn horizontal_then_vertical(
        img: &[u8],
        w: usize,
        h: usize,
        dw: usize,
        dh: usize,
        f: PillowFilter,
    ) -> Vec<u8> {
        let c = |n_in: usize, n_out: usize| {
            normalize_coeffs_8bpc(precompute_coeffs(n_in, 0.0, n_in as f32, n_out, f))
        };
        let mut temp = vec![0u8; dw * h * 3];
        resample_horizontal(Rows::packed(img, w), 0, h, &c(w, dw), &mut temp);
        let mut out = vec![0u8; dw * dh * 3];
        resample_vertical(Rows::packed(&temp, dw), &c(h, dh), &mut out);
        out
    }

    /// Pillow 13 runs the vertical pass first when the height shrinks by more
    /// than twice as many pixels as the width; bytes from Pillow 13.0.0.
    #[test]
    fn vertical_first_pass_order() {
        assert!(horizontal_first((7, 5), (6, 4)));
        assert!(!horizontal_first((7, 5), (6, 2)));
        assert!(!horizontal_first((7, 5), (9, 4)));
        assert!(horizontal_first((7, 5), (9, 5)));
        #[rustfmt::skip]
        let cases: [(PillowFilter, &[u8], &[u8]); 4] = [
            (PillowFilter::Box,
             &[97, 176, 105, 98, 75, 93, 141, 112, 112, 138, 165, 125, 134, 99, 102, 108, 84, 119, 125, 219, 162, 188, 193, 26, 130, 150, 157, 111, 167, 112, 126, 133, 136, 160, 193, 199],
             &[97, 176, 105, 98, 75, 93, 98, 75, 93, 163, 111, 121, 119, 112, 103, 138, 165, 125, 134, 99, 102, 134, 99, 102, 108, 84, 119, 125, 219, 162, 188, 193, 26, 188, 193, 26, 142, 133, 185, 117, 167, 129, 111, 167, 112, 126, 133, 136, 126, 133, 136, 160, 193, 199]),
            (PillowFilter::Bilinear,
             &[100, 157, 100, 120, 91, 106, 152, 118, 122, 130, 132, 113, 125, 123, 98, 110, 99, 110, 126, 202, 133, 158, 149, 74, 121, 130, 129, 105, 165, 112, 118, 126, 141, 163, 144, 163],
             &[101, 176, 101, 96, 109, 96, 131, 98, 112, 165, 122, 129, 119, 108, 103, 134, 141, 117, 127, 128, 102, 115, 106, 96, 108, 96, 115, 115, 210, 155, 154, 183, 78, 152, 141, 88, 122, 118, 139, 117, 160, 102, 100, 166, 115, 114, 134, 137, 143, 122, 156, 171, 152, 166]),
            (PillowFilter::Bicubic,
             &[93, 159, 99, 118, 80, 108, 158, 118, 120, 128, 134, 115, 126, 124, 97, 107, 93, 108, 129, 210, 136, 162, 154, 64, 117, 122, 137, 101, 173, 105, 119, 120, 146, 169, 144, 167],
             &[96, 179, 101, 88, 98, 96, 133, 86, 114, 174, 124, 128, 119, 109, 101, 136, 145, 123, 130, 131, 102, 113, 102, 92, 105, 91, 114, 117, 214, 161, 161, 193, 65, 155, 140, 79, 116, 109, 150, 117, 159, 104, 95, 174, 109, 111, 130, 138, 147, 115, 162, 175, 155, 168]),
            (PillowFilter::Lanczos,
             &[85, 155, 101, 122, 77, 109, 158, 119, 112, 122, 134, 116, 126, 126, 102, 109, 91, 104, 135, 214, 128, 160, 153, 64, 116, 116, 144, 101, 178, 95, 116, 115, 146, 173, 138, 166],
             &[92, 181, 105, 83, 98, 96, 138, 76, 114, 172, 126, 122, 119, 112, 96, 130, 144, 127, 130, 135, 108, 113, 100, 91, 109, 90, 113, 121, 214, 162, 162, 200, 62, 156, 135, 74, 114, 106, 158, 117, 156, 103, 94, 179, 101, 104, 123, 137, 151, 109, 164, 178, 155, 163]),
        ];
        let mut order_mattered = 0;
        for (f, shrink, widen) in cases {
            // img.resize((6, 2), f) and img.resize((9, 2), f)
            assert_eq!(
                resize_rgb8(&REF_IMG, 7, 5, (0, 0, 7, 5), 6, 2, f),
                shrink,
                "{f:?} 6x2"
            );
            assert_eq!(
                resize_rgb8(&REF_IMG, 7, 5, (0, 0, 7, 5), 9, 2, f),
                widen,
                "{f:?} 9x2"
            );
            order_mattered +=
                usize::from(horizontal_then_vertical(&REF_IMG, 7, 5, 6, 2, f) != shrink);
            order_mattered +=
                usize::from(horizontal_then_vertical(&REF_IMG, 7, 5, 9, 2, f) != widen);
        }
        // The fixture is only meaningful if the other order gives other bytes.
        assert!(order_mattered > 0);
    }

    /// Reference bytes produced once by Pillow 13.0.0 (see
    /// scripts/make_cases.py in the harness) for a 7x5 image.
    #[test]
    fn matches_pillow_reference_bytes() {
        let img = REF_IMG;
        #[rustfmt::skip]
        let cases: [(PillowFilter, &[u8], &[u8]); 4] = [
            (PillowFilter::Box,
             &[112, 103, 103, 119, 81, 83, 112, 102, 99, 165, 163, 106, 117, 167, 129, 119, 150, 124],
             &[148, 28, 120, 148, 28, 120, 188, 119, 112, 120, 176, 144, 120, 176, 144, 13, 75, 93, 13, 75, 93, 248, 196, 206, 119, 27, 103, 119, 27, 103, 13, 75, 93, 13, 75, 93, 248, 196, 206, 119, 27, 103, 119, 27, 103, 134, 122, 66, 134, 122, 66, 52, 17, 44, 118, 134, 62, 118, 134, 62]),
            (PillowFilter::Bilinear,
             &[119, 107, 96, 119, 112, 91, 102, 102, 113, 158, 154, 88, 117, 154, 128, 122, 140, 133],
             &[148, 28, 120, 164, 64, 117, 188, 119, 112, 147, 153, 131, 120, 176, 144, 64, 57, 103, 128, 101, 130, 226, 167, 171, 162, 117, 139, 119, 83, 118, 58, 93, 83, 105, 107, 108, 175, 129, 145, 141, 92, 111, 119, 67, 88, 134, 122, 66, 101, 80, 57, 52, 17, 44, 92, 87, 55, 118, 134, 62]),
            (PillowFilter::Bicubic,
             &[116, 101, 97, 120, 111, 87, 99, 99, 111, 163, 157, 87, 113, 158, 134, 122, 144, 134],
             &[153, 19, 123, 168, 53, 115, 185, 115, 107, 144, 164, 131, 115, 189, 149, 44, 45, 99, 125, 103, 135, 239, 180, 182, 170, 118, 146, 110, 67, 116, 42, 93, 75, 97, 113, 109, 179, 135, 152, 146, 86, 112, 114, 51, 79, 147, 133, 67, 102, 78, 53, 42, 8, 36, 87, 88, 50, 124, 150, 61]),
            (PillowFilter::Lanczos,
             &[119, 97, 97, 119, 113, 84, 92, 99, 113, 165, 153, 86, 108, 160, 136, 125, 148, 135],
             &[154, 19, 125, 173, 45, 110, 179, 109, 102, 141, 172, 130, 113, 195, 152, 38, 30, 97, 130, 107, 142, 250, 189, 190, 183, 126, 155, 98, 57, 116, 40, 95, 67, 93, 120, 110, 175, 132, 152, 151, 81, 111, 108, 41, 70, 158, 142, 69, 101, 69, 50, 37, 3, 30, 80, 86, 47, 131, 164, 65]),
        ];
        for (f, down, up) in cases {
            // img.crop((1, 1, 6, 5)).resize((3, 2), f)
            assert_eq!(
                resize_rgb8(&img, 7, 5, (1, 1, 5, 4), 3, 2, f),
                down,
                "{f:?} down"
            );
            // img.crop((1, 0, 4, 3)).resize((5, 4), f)
            assert_eq!(
                resize_rgb8(&img, 7, 5, (1, 0, 3, 3), 5, 4, f),
                up,
                "{f:?} up"
            );
        }
    }
}
