//! The order samples are seen in: SplitMix64 driving Fisher-Yates, the eval split taken after
//! the shuffle, a fresh shuffle per epoch, micro-batches and accumulation windows.

use crate::config::TrainConfig;

/// SplitMix64 (Steele, Lea, Flood), the shuffle's generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// `items` shuffled by Fisher-Yates: for i = n-1 down to 1, j = next() % (i+1), swap.
pub fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut out = items.to_vec();
    let mut rng = SplitMix64::new(seed);
    for i in (1..out.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        out.swap(i, j);
    }
    out
}

/// Sample indices held out for evaluation and trained on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The first `eval_split` samples of the shuffled order.
    pub eval: Vec<usize>,
    /// The rest, in the shuffled order.
    pub train: Vec<usize>,
}

/// Splits `0..n`: shuffled by `seed` (unless `shuffle: false`), eval = the first k.
pub fn split(n: usize, cfg: &TrainConfig) -> Split {
    let all: Vec<usize> = (0..n).collect();
    let mut order = if cfg.shuffle { shuffled(&all, cfg.seed) } else { all };
    let train = order.split_off(cfg.eval_split.count(n));
    Split { eval: order, train }
}

/// Epoch `epoch` (0-based): the train list shuffled with seed + epoch + 1.
pub fn epoch_order(train: &[usize], cfg: &TrainConfig, epoch: usize) -> Vec<usize> {
    if cfg.shuffle {
        shuffled(train, cfg.seed.wrapping_add(epoch as u64 + 1))
    } else {
        train.to_vec()
    }
}

/// An epoch's order as windows (optimizer steps) of up to `accumulation` micro-batches of up to
/// `batch` samples; the last of each may be short.
pub fn windows(order: &[usize], batch: usize, accumulation: usize) -> Vec<Vec<Vec<usize>>> {
    let micro: Vec<Vec<usize>> = order.chunks(batch.max(1)).map(<[usize]>::to_vec).collect();
    micro.chunks(accumulation.max(1)).map(<[Vec<usize>]>::to_vec).collect()
}

/// Optimizer steps per epoch: ceil(ceil(n / batch) / accumulation).
pub fn steps_per_epoch(n: usize, batch: usize, accumulation: usize) -> usize {
    n.div_ceil(batch.max(1)).div_ceil(accumulation.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published SplitMix64 outputs for seed 0 (Vigna's splitmix64.c).
    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn windows_and_steps_agree() {
        let order: Vec<usize> = (0..7).collect();
        let w = windows(&order, 2, 3);
        assert_eq!(w, vec![vec![vec![0, 1], vec![2, 3], vec![4, 5]], vec![vec![6]]]);
        assert_eq!(steps_per_epoch(7, 2, 3), w.len());
    }
}
