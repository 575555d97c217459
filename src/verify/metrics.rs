//! Agreement between two sets of logits (reference vs converted): max |diff|, KL divergence,
//! top-1 agreement, top-5 overlap, and where two greedy continuations part. Pure arithmetic on
//! row-major `[positions, vocab]` float32 slices; sums in f64 so a KL of 1e-9 is still meaningful.

use serde::Serialize;

/// How two `[n, vocab]` logit matrices agree.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Agreement {
    /// Positions compared.
    pub positions: usize,
    /// Largest |reference - converted| over every logit.
    pub max_abs_diff: f32,
    /// Mean over positions of KL(reference || converted) of the softmax distributions, in nats.
    pub mean_kl: f64,
    /// The largest per-position KL.
    pub max_kl: f64,
    /// Fraction of positions whose argmax agrees.
    pub top1: f64,
    /// Mean fraction of the reference's 5 most likely tokens that are also among the converted's 5.
    pub top5: f64,
}

/// `log_softmax` of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = max
        + row
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// Indices of the `k` largest values, ties broken by the lower index (as `argmax` does).
pub fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// The argmax of a row (first maximum; NaN never wins).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] || row[best].is_nan() && !x.is_nan() {
            best = i;
        }
    }
    best
}

/// Compares `converted` with `reference`, both `[n, vocab]` row-major. A NaN anywhere in the
/// converted logits makes every figure the worst possible (a NaN must never pass a threshold).
pub fn compare(reference: &[f32], converted: &[f32], vocab: usize) -> Agreement {
    assert!(
        vocab > 0 && reference.len() == converted.len() && reference.len().is_multiple_of(vocab),
        "logit matrices must have the same [n, vocab] shape"
    );
    let n = reference.len() / vocab;
    let mut max_abs_diff = 0.0f32;
    let (mut kl_sum, mut max_kl, mut top1, mut top5) = (0.0f64, 0.0f64, 0usize, 0usize);
    for (r, c) in reference
        .chunks_exact(vocab)
        .zip(converted.chunks_exact(vocab))
    {
        for (a, b) in r.iter().zip(c) {
            let d = (a - b).abs();
            max_abs_diff = if d.is_nan() {
                f32::INFINITY
            } else {
                max_abs_diff.max(d)
            };
        }
        let (lr, lc) = (log_softmax(r), log_softmax(c));
        let kl: f64 = lr
            .iter()
            .zip(&lc)
            .map(|(p, q)| {
                if p.is_finite() {
                    p.exp() * (p - q)
                } else {
                    0.0
                }
            })
            .sum();
        let kl = if kl.is_nan() {
            f64::INFINITY
        } else {
            kl.max(0.0)
        };
        kl_sum += kl;
        max_kl = max_kl.max(kl);
        top1 += usize::from(argmax(r) == argmax(c) && !c.iter().any(|x| x.is_nan()));
        let (tr, tc) = (top_k(r, 5), top_k(c, 5));
        top5 += tr.iter().filter(|i| tc.contains(i)).count();
    }
    let k = 5.min(vocab);
    Agreement {
        positions: n,
        max_abs_diff,
        mean_kl: if n == 0 { 0.0 } else { kl_sum / n as f64 },
        max_kl,
        top1: if n == 0 { 1.0 } else { top1 as f64 / n as f64 },
        top5: if n == 0 {
            1.0
        } else {
            top5 as f64 / (n * k) as f64
        },
    }
}

/// The first index where two token sequences differ (`None` when one is a prefix of the other).
pub fn first_divergence(a: &[i32], b: &[i32]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Max |a - b| (infinity if either holds a NaN where the other does not).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_logits_agree_perfectly() {
        let r = [1.0, 2.0, 3.0, 0.5, 0.0, -1.0, 4.0, 4.5, 0.0, 1.0, 1.0, 2.0];
        let a = compare(&r, &r, 6);
        assert_eq!(a.positions, 2);
        assert_eq!(a.max_abs_diff, 0.0);
        assert!(a.mean_kl.abs() < 1e-15);
        assert_eq!(a.top1, 1.0);
        assert_eq!(a.top5, 1.0);
    }

    #[test]
    fn kl_matches_a_hand_computation() {
        // p = softmax([0, ln 3]) = [1/4, 3/4], q = softmax([0, 0]) = [1/2, 1/2].
        let r = [0.0, 3f32.ln()];
        let c = [0.0, 0.0];
        let a = compare(&r, &c, 2);
        let want = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((a.mean_kl - want).abs() < 1e-7, "{} vs {want}", a.mean_kl);
        assert_eq!(a.top1, 0.0); // argmax 1 vs 0 (the first of a tie)
    }

    #[test]
    fn shifted_logits_have_no_divergence_but_a_diff() {
        // Softmax is shift-invariant: KL 0 and same ranking, yet max |diff| sees the shift.
        let r = [0.1, 0.7, 0.3, 0.9];
        let c: Vec<f32> = r.iter().map(|x| x + 2.0).collect();
        let a = compare(&r, &c, 4);
        assert!(a.mean_kl < 1e-12);
        assert_eq!(a.top1, 1.0);
        assert!((a.max_abs_diff - 2.0).abs() < 1e-6);
    }

    #[test]
    fn swapped_ranking_is_seen() {
        let r = [5.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let c = [1.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let a = compare(&r, &c, 7);
        assert_eq!(a.top1, 0.0);
        assert!(a.mean_kl > 1.0);
        // Both top-5 sets are {0, 1} plus the three lowest-index zeros: identical.
        assert_eq!(a.top5, 1.0);
    }

    #[test]
    fn nan_never_passes() {
        let r = [1.0, 2.0, 3.0];
        let c = [1.0, f32::NAN, 3.0];
        let a = compare(&r, &c, 3);
        assert_eq!(a.max_abs_diff, f32::INFINITY);
        assert_eq!(a.mean_kl, f64::INFINITY);
        assert_eq!(a.top1, 0.0);
    }

    #[test]
    fn top_k_and_argmax_break_ties_by_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.0]), 1);
    }

    #[test]
    fn divergence_points_at_the_first_difference() {
        assert_eq!(first_divergence(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_divergence(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_divergence(&[1, 2], &[1, 2, 3]), None);
    }
}
