//! Data parallelism: the ranks of one job split every global batch, exchange their LoRA
//! gradients (a few MB at most: only A and B), and take the same optimizer step.
//!
//! The transport is the caller's (the binary implements [`Collective`] over MPI behind its
//! `mpi` feature); this module is what the trainer needs of it. Sums run over a gather, in
//! rank order, on every rank: every rank gets bitwise the same gradients, so the optimizer
//! states never drift apart (an all-reduce leaves the order of its additions open).

/// How the ranks of a job talk. A job of one rank needs none.
pub trait Collective {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `mine` (the same length on every rank), concatenated in rank order.
    fn all_gather_f32(&self, mine: &[f32]) -> Vec<f32>;
    /// Every rank's `mine` (the same length on every rank), concatenated in rank order.
    fn all_gather_u64(&self, mine: &[u64]) -> Vec<u64>;
}

/// Element-wise sum over the ranks of `mine` (f32), added in rank order.
pub fn sum_f32(c: &dyn Collective, mine: &[f32]) -> Vec<f32> {
    let all = c.all_gather_f32(mine);
    let n = mine.len();
    let mut out = all[..n].to_vec();
    for r in 1..c.size() {
        for (o, x) in out.iter_mut().zip(&all[r * n..(r + 1) * n]) {
            *o += x;
        }
    }
    out
}

/// Element-wise sum over the ranks of `mine` (f64, sent as its bits), in rank order.
pub fn sum_f64(c: &dyn Collective, mine: &[f64]) -> Vec<f64> {
    let bits: Vec<u64> = mine.iter().map(|x| x.to_bits()).collect();
    let all = c.all_gather_u64(&bits);
    let n = mine.len();
    (0..n)
        .map(|i| (0..c.size()).map(|r| f64::from_bits(all[r * n + i])).sum())
        .collect()
}

/// Rank `rank`'s share of a micro-batch of a job of `size` ranks: every `size`-th sequence,
/// so shares differ by at most one sequence.
pub fn share(batch: &[usize], rank: usize, size: usize) -> Vec<usize> {
    batch
        .iter()
        .copied()
        .skip(rank)
        .step_by(size.max(1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `size` ranks in one process: each gather returns what the other ranks would send
    /// (here: `f(rank)`), for testing the arithmetic.
    struct Fake {
        rank: usize,
        size: usize,
    }
    impl Collective for Fake {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_gather_f32(&self, mine: &[f32]) -> Vec<f32> {
            (0..self.size)
                .flat_map(|r| mine.iter().map(move |x| x * (r as f32 + 1.0)))
                .collect()
        }
        fn all_gather_u64(&self, mine: &[u64]) -> Vec<u64> {
            (0..self.size)
                .flat_map(|r| {
                    mine.iter()
                        .map(move |x| (f64::from_bits(*x) * (r as f64 + 1.0)).to_bits())
                })
                .collect()
        }
    }

    #[test]
    fn sums_and_shares() {
        let c = Fake { rank: 1, size: 3 };
        assert_eq!(sum_f32(&c, &[1.0, 2.0]), [6.0, 12.0]);
        assert_eq!(sum_f64(&c, &[0.5]), [3.0]);
        assert_eq!(share(&[10, 11, 12, 13, 14], 0, 2), [10, 12, 14]);
        assert_eq!(share(&[10, 11, 12, 13, 14], 1, 2), [11, 13]);
        assert_eq!(share(&[10], 1, 2), Vec::<usize>::new());
    }
}
