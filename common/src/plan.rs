//! What every training sample of a run is: the slot plan (which anchor, σ and noise each sample of an
//! optimizer step gets, spec §2) and the epoch plan (which cached item it is). Both are pure functions of
//! the seed, the step and the run's *global batch* M — the micro-batches of one optimizer step over all
//! ranks, fixed when the run starts — and of nothing about how the ranks share M: any number of ranks, each
//! computing its own share without talking to anyone, trains exactly the samples one rank would.
//!
//! An optimizer step consumes N = M·b *global slots* (b samples per micro-batch). A fresh run takes M = W·G
//! (W ranks, G accumulation micro-batches each); a resumed or re-formed one keeps the M it started with.
//! docs/acrf-math.md works through an example.
//!
//! - Slot g = m·b + i: m ∈ [0, M) is the global micro-batch, i ∈ [0, b) the position in it. Of W ranks, rank
//!   r owns the micro-batches m ≡ r (mod W), ⌊M/W⌋ or ⌈M/W⌉ of them; its j-th is m = r + W·j.
//! - Stratum q(g) = i·M + m, a bijection of [0, N) that does not depend on how M splits.
//! - Anchor a = (c_s + q) mod K with c_s = (c₀ + s·N) mod K and c₀ drawn from the seed. N consecutive strata
//!   hit every anchor ⌊N/K⌋ or ⌈N/K⌉ times; step s + 1 continues where step s stopped, so with N < K the
//!   anchors are used without replacement; rank r gets {c_s + r + W·t mod K}, a stride-W progression spread
//!   over the σ range.

use std::collections::BTreeMap;

use crate::config::{AcrfConfig, Jitter, TimestepSampling};
use crate::rng::{self, Key, domain};
use crate::schedule;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("slot plan: `{0}` must be at least 1")]
    Zero(&'static str),
    #[error("slot plan: micro_batches · batch_size overflows")]
    TooManySlots,
    #[error("slot plan: `{field}` must be {expected}, got {value}")]
    OutOfRange { field: &'static str, expected: &'static str, value: f64 },
    #[error("epoch plan: {0}")]
    Epoch(String),
}

/// What fixes a run's slots. Anything not here (data order, learning rate, …) cannot change them.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanParams {
    pub seed: u64,
    /// M: the global micro-batches of one optimizer step.
    pub micro_batches: usize,
    pub batch_size: usize,
    pub turbo_steps: usize,
    pub shift: f64,
    pub jitter_scale: f64,
    pub jitter: Jitter,
    pub timestep_sampling: TimestepSampling,
}

impl PlanParams {
    pub fn from_config(acrf: &AcrfConfig, seed: u64, micro_batches: usize, batch_size: usize) -> PlanParams {
        PlanParams {
            seed,
            micro_batches,
            batch_size,
            turbo_steps: acrf.turbo_steps,
            shift: acrf.shift,
            jitter_scale: acrf.jitter_scale,
            jitter: acrf.jitter,
            timestep_sampling: acrf.timestep_sampling,
        }
    }
}

/// One training sample of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    /// g: the index among the step's N slots; it keys the jitter and the noise.
    pub global: usize,
    /// m: the global micro-batch, owned by rank m mod W of W ranks.
    pub micro: usize,
    /// i: the position inside the micro-batch.
    pub pos: usize,
    /// Index into the anchors (schedule order, σ descending). Reported under the uniform ablation too.
    pub anchor: usize,
    pub anchor_sigma: f64,
    /// The noise fraction to train at: jittered and clamped anchor, or the uniform ablation's draw.
    pub sigma: f64,
    /// Seeds the slot's noise ε through [`rng::Key::from_raw`].
    pub noise_seed: u64,
}

impl Slot {
    /// The key whose [`rng::fill_normal_f32`] stream is this slot's ε.
    pub fn noise_key(&self) -> Key {
        Key::from_raw(self.noise_seed)
    }
}

#[derive(Debug, Clone)]
pub struct SlotPlan {
    params: PlanParams,
    anchors: Vec<f64>,
    n_global: usize,
    c0: usize,
}

impl SlotPlan {
    pub fn new(params: PlanParams) -> Result<SlotPlan, PlanError> {
        for (field, v) in [
            ("micro_batches", params.micro_batches),
            ("batch_size", params.batch_size),
            ("turbo_steps", params.turbo_steps),
        ] {
            if v == 0 {
                return Err(PlanError::Zero(field));
            }
        }
        if !(params.shift.is_finite() && params.shift > 0.0) {
            return Err(PlanError::OutOfRange { field: "shift", expected: "a positive number", value: params.shift });
        }
        if !(params.jitter_scale.is_finite() && params.jitter_scale >= 0.0) {
            return Err(PlanError::OutOfRange {
                field: "jitter_scale",
                expected: "a number ≥ 0",
                value: params.jitter_scale,
            });
        }
        let n_global = params.micro_batches.checked_mul(params.batch_size).ok_or(PlanError::TooManySlots)?;
        let k = params.turbo_steps;
        let c0 = (rng::bits(Key::new(params.seed, domain::ANCHOR_OFFSET, 0, 0), 0) % k as u64) as usize;
        Ok(SlotPlan { anchors: schedule::anchors(k, params.shift), params, n_global, c0 })
    }

    /// M: the global micro-batches of one step.
    pub fn micro_batches(&self) -> usize {
        self.params.micro_batches
    }

    pub fn params(&self) -> &PlanParams {
        &self.params
    }

    /// The anchor sigmas the slots index into, in schedule order.
    pub fn anchors(&self) -> &[f64] {
        &self.anchors
    }

    /// N = M·b: the slots of one optimizer step over all ranks.
    pub fn n_global(&self) -> usize {
        self.n_global
    }

    /// Slot `global` of optimizer step `step`.
    ///
    /// # Panics
    /// If `global >= n_global()`.
    pub fn slot(&self, step: u64, global: usize) -> Slot {
        assert!(global < self.n_global, "slot {global} of a {}-slot step", self.n_global);
        let p = &self.params;
        let k = self.anchors.len();
        let (micro, pos) = (global / p.batch_size, global % p.batch_size);
        let stratum = pos * p.micro_batches + micro;
        let offset = (self.c0 as u128 + step as u128 * self.n_global as u128) % k as u128;
        let anchor = (offset as usize + stratum % k) % k;
        let anchor_sigma = self.anchors[anchor];
        let key = |dom| Key::new(p.seed, dom, step, global as u64);
        let sigma = match p.timestep_sampling {
            TimestepSampling::Anchor => {
                schedule::jittered_sigma(anchor_sigma, p.jitter, p.jitter_scale, key(domain::JITTER))
            }
            TimestepSampling::Uniform => schedule::uniform_sigma(p.shift, key(domain::UNIFORM_SIGMA)),
        };
        Slot { global, micro, pos, anchor, anchor_sigma, sigma, noise_seed: key(domain::NOISE).raw() }
    }

    /// The b slots of global micro-batch `micro`, by position.
    ///
    /// # Panics
    /// If `micro` is not below M.
    pub fn micro_batch(&self, step: u64, micro: usize) -> Vec<Slot> {
        assert!(micro < self.params.micro_batches, "micro-batch {micro} of {}", self.params.micro_batches);
        let b = self.params.batch_size;
        (micro * b..(micro + 1) * b).map(|g| self.slot(step, g)).collect()
    }

    /// The micro-batches of step `step` that rank `rank` of `world` trains, in accumulation order
    /// (micro-batch r + W·j at j): ⌊M/W⌋ or ⌈M/W⌉ of them, so a world that does not divide M accumulates
    /// unevenly and still trains exactly the step's M micro-batches.
    ///
    /// # Panics
    /// If `rank` is not below `world`.
    pub fn rank_micro_batches(&self, step: u64, rank: usize, world: usize) -> Vec<Vec<Slot>> {
        assert!(rank < world, "rank {rank} of a world of {world}");
        (rank..self.params.micro_batches).step_by(world).map(|m| self.micro_batch(step, m)).collect()
    }

    /// All N slots of step `step`, by global index.
    pub fn global_slots(&self, step: u64) -> Vec<Slot> {
        (0..self.n_global).map(|g| self.slot(step, g)).collect()
    }
}

/// Which items every micro-batch of one epoch holds.
///
/// Items are grouped by latent size (a micro-batch is one tensor, so its latents must agree); each bucket is
/// shuffled with a key from (seed, epoch, bucket) and cut into micro-batches of b items, dropping the
/// remainder; the epoch's micro-batches are then shuffled with a key from (seed, epoch). Step s takes the
/// M micro-batches s·M … s·M + M − 1 of that list, and the ones left over at the end are dropped. The list
/// itself is a function of the items' buckets (in dataset order), seed, epoch and b only; M decides just how
/// many of its micro-batches an epoch uses.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPlan {
    batch_size: usize,
    per_step: usize,
    /// The items of the epoch's used micro-batches, b at a time, in training order.
    items: Vec<usize>,
    dropped_in_buckets: usize,
    dropped_at_epoch_end: usize,
}

impl EpochPlan {
    /// `item_buckets` holds the latent (height, width) of every item of the dataset, in its order;
    /// `micro_batches_per_step` is M, the global micro-batches of one optimizer step.
    pub fn new(
        item_buckets: &[(usize, usize)],
        seed: u64,
        epoch: u64,
        batch_size: usize,
        micro_batches_per_step: usize,
    ) -> Result<EpochPlan, PlanError> {
        let items: Vec<(usize, (usize, usize))> = item_buckets.iter().copied().enumerate().collect();
        EpochPlan::of_items(&items, seed, epoch, batch_size, micro_batches_per_step)
    }

    /// As [`EpochPlan::new`] over some of the dataset's items only, each given as (index, bucket) in dataset
    /// order: what is left to train on when items are held out for evaluation.
    pub fn of_items(
        items: &[(usize, (usize, usize))],
        seed: u64,
        epoch: u64,
        batch_size: usize,
        micro_batches_per_step: usize,
    ) -> Result<EpochPlan, PlanError> {
        if batch_size == 0 || micro_batches_per_step == 0 {
            return Err(PlanError::Epoch(format!(
                "batch size ({batch_size}) and micro-batches per step ({micro_batches_per_step}) must be at least 1"
            )));
        }
        let mut buckets: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
        for &(index, bucket) in items {
            buckets.entry(bucket).or_default().push(index);
        }
        for (&(h, w), items) in &mut buckets {
            rng::shuffle(Key::new(seed, domain::EPOCH_BUCKET, epoch, ((h as u64) << 32) | w as u64), items);
        }
        let mut micro_batches: Vec<&[usize]> = Vec::new();
        let mut dropped_in_buckets = 0;
        for items in buckets.values() {
            let chunks = items.chunks_exact(batch_size);
            dropped_in_buckets += chunks.remainder().len();
            micro_batches.extend(chunks);
        }
        rng::shuffle(Key::new(seed, domain::EPOCH_ORDER, epoch, 0), &mut micro_batches);
        let steps = micro_batches.len() / micro_batches_per_step;
        if steps == 0 {
            let counts: Vec<String> =
                buckets.iter().map(|(&(h, w), items)| format!("{h}x{w}: {}", items.len())).collect();
            return Err(PlanError::Epoch(format!(
                "an epoch has no optimizer step: batch size {batch_size} makes {} micro-batch(es) from the buckets \
                 {{{}}}, and a step takes {micro_batches_per_step} (world size · accumulation when the run started)",
                micro_batches.len(),
                counts.join(", ")
            )));
        }
        let used = steps * micro_batches_per_step;
        Ok(EpochPlan {
            batch_size,
            per_step: micro_batches_per_step,
            items: micro_batches[..used].concat(),
            dropped_in_buckets,
            dropped_at_epoch_end: (micro_batches.len() - used) * batch_size,
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.items.len() / (self.batch_size * self.per_step)
    }

    /// The item indices of global micro-batch `m` (owned by rank m mod W of W ranks) of optimizer step
    /// `step_in_epoch`.
    ///
    /// # Panics
    /// If `step_in_epoch >= steps_per_epoch()` or `m >= micro_batches_per_step`.
    pub fn micro_batch(&self, step_in_epoch: usize, m: usize) -> &[usize] {
        assert!(
            step_in_epoch < self.steps_per_epoch(),
            "step {step_in_epoch} of a {}-step epoch",
            self.steps_per_epoch()
        );
        assert!(m < self.per_step, "micro-batch {m} of {} per step", self.per_step);
        let start = (step_in_epoch * self.per_step + m) * self.batch_size;
        &self.items[start..start + self.batch_size]
    }

    /// Items left out because their bucket's size is not a multiple of the batch size.
    pub fn dropped_in_buckets(&self) -> usize {
        self.dropped_in_buckets
    }

    /// Items of the micro-batches left over after the epoch's last full optimizer step.
    pub fn dropped_at_epoch_end(&self) -> usize {
        self.dropped_at_epoch_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The plan of a run that started with `w` ranks of `g` micro-batches of `b` samples: M = w·g.
    fn plan(seed: u64, w: usize, b: usize, g: usize, k: usize) -> SlotPlan {
        let acrf = AcrfConfig { turbo_steps: k, ..AcrfConfig::default() };
        SlotPlan::new(PlanParams::from_config(&acrf, seed, w * g, b)).unwrap()
    }

    fn anchor_counts(p: &SlotPlan, step: u64) -> Vec<usize> {
        let mut counts = vec![0; p.anchors().len()];
        for s in p.global_slots(step) {
            counts[s.anchor] += 1;
        }
        counts
    }

    fn cyclic_distance(a: usize, b: usize, k: usize) -> usize {
        let d = a.abs_diff(b);
        d.min(k - d)
    }

    #[test]
    fn zero_sizes_are_named() {
        let ok = PlanParams::from_config(&AcrfConfig::default(), 1, 4, 2);
        for (field, params) in [
            ("micro_batches", PlanParams { micro_batches: 0, ..ok.clone() }),
            ("batch_size", PlanParams { batch_size: 0, ..ok.clone() }),
            ("turbo_steps", PlanParams { turbo_steps: 0, ..ok.clone() }),
        ] {
            let err = SlotPlan::new(params).unwrap_err();
            assert_eq!(err, PlanError::Zero(field));
            assert!(err.to_string().contains(field));
        }
        let err = SlotPlan::new(PlanParams { shift: -1.0, ..ok.clone() }).unwrap_err();
        assert!(err.to_string().contains("`shift`"), "{err}");
        let huge = PlanParams { micro_batches: usize::MAX, ..ok };
        assert_eq!(SlotPlan::new(huge).unwrap_err(), PlanError::TooManySlots);
    }

    #[test]
    fn a_smaller_world_shares_the_same_slots() {
        let p = plan(5, 4, 2, 1, 10);
        let mut seen: Vec<Slot> = (0..3).flat_map(|r| p.rank_micro_batches(7, r, 3)).flatten().collect();
        seen.sort_by_key(|s| s.global);
        assert_eq!(seen, p.global_slots(7));
        assert_eq!(p.rank_micro_batches(7, 0, 3).len(), 2);
        assert_eq!(p.rank_micro_batches(7, 2, 3).len(), 1);
        // More ranks than micro-batches leave the last ones idle, which is why a group never forms that way.
        assert!(p.rank_micro_batches(7, 4, 5).is_empty());
    }

    /// The example of docs/acrf-math.md: K = 10, W = 2, b = 1, G = 2 (N = 4), relative to c₀.
    #[test]
    fn worked_example() {
        let p = plan(7, 2, 1, 2, 10);
        let c0 = p.slot(0, 0).anchor;
        let rel = |step, rank| -> Vec<usize> {
            p.rank_micro_batches(step, rank, 2).iter().flatten().map(|s| (s.anchor + 10 - c0) % 10).collect()
        };
        assert_eq!(rel(0, 0), [0, 2]);
        assert_eq!(rel(0, 1), [1, 3]);
        assert_eq!(rel(1, 0), [4, 6]);
        assert_eq!(rel(1, 1), [5, 7]);
        assert_eq!(rel(2, 0), [8, 0]);
        assert_eq!(rel(2, 1), [9, 1]);
        let micros: Vec<usize> = p.rank_micro_batches(0, 1, 2).iter().map(|mb| mb[0].micro).collect();
        assert_eq!(micros, [1, 3]);
    }

    #[test]
    fn uniform_ablation_keeps_the_anchor_index() {
        let anchor = plan(3, 2, 2, 2, 10);
        let acrf = AcrfConfig { timestep_sampling: TimestepSampling::Uniform, ..AcrfConfig::default() };
        let uniform = SlotPlan::new(PlanParams::from_config(&acrf, 3, 4, 2)).unwrap();
        for (a, u) in anchor.global_slots(5).iter().zip(uniform.global_slots(5)) {
            assert_eq!((a.anchor, a.anchor_sigma, a.noise_seed), (u.anchor, u.anchor_sigma, u.noise_seed));
            assert!((schedule::SIGMA_MIN..=schedule::SIGMA_MAX).contains(&u.sigma));
        }
        let spread: Vec<f64> = (0..50).flat_map(|s| uniform.global_slots(s)).map(|s| s.sigma).collect();
        let mean = spread.iter().sum::<f64>() / spread.len() as f64;
        // E[s_3(u)] = 3/2 − 3·ln(3)/4 ≈ 0.676 for u ~ U(0, 1).
        assert!((mean - 0.676).abs() < 0.03, "{mean}");
    }

    fn golden_plan() -> SlotPlan {
        plan(42, 2, 2, 3, 10)
    }

    fn describe(s: &Slot) -> String {
        format!("{} {} {} {:016x}", s.global, s.anchor, s.sigma.to_bits(), s.noise_seed)
    }

    /// Values from an independent Python transcription of the layout, rng and schedule: any change to them
    /// changes every run's samples and has to show up here.
    #[test]
    fn golden_slots() {
        let p = golden_plan();
        let got: Vec<(usize, f64, u64)> = [(0, 0), (0, 11), (123_456, 5)]
            .iter()
            .map(|&(step, g)| {
                let s = p.slot(step, g);
                (s.anchor, s.sigma, s.noise_seed)
            })
            .collect();
        let want = [
            (8, 0.27908293023254965, 4352856106407813284),
            (9, 0.010963614469310386, 8668771845809566287),
            (8, 0.264427285206396, 9996351556807921724),
        ];
        assert_eq!(got, want);
    }

    const CHILD_ENV: &str = "ACRF_PLAN_PRINT_SLOTS";

    /// Run again by itself as a child process (with `CHILD_ENV` set), it prints the slots there instead.
    #[test]
    fn same_slots_in_another_process() {
        if std::env::var_os(CHILD_ENV).is_some() {
            for s in golden_plan().global_slots(9) {
                println!("SLOT {}", describe(&s));
            }
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "plan::tests::same_slots_in_another_process", "--nocapture"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let theirs: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("SLOT ")).collect();
        let ours: Vec<String> = golden_plan().global_slots(9).iter().map(describe).collect();
        assert_eq!(theirs, ours);
    }

    fn shape() -> impl Strategy<Value = (usize, usize, usize, usize, u64, u64)> {
        (1..=4usize, 1..=3usize, 1..=4usize, 1..=24usize, any::<u64>(), 0..1_000_000u64)
    }

    proptest! {
        #[test]
        fn balanced_per_step((w, b, g, k, seed, step) in shape()) {
            let p = plan(seed, w, b, g, k);
            let n = p.n_global();
            for c in anchor_counts(&p, step) {
                prop_assert!(c == n / k || c == n.div_ceil(k), "count {c}, N {n}, K {k}");
            }
        }

        #[test]
        fn every_anchor_within_any_window((w, b, g, k, seed, step) in shape()) {
            let p = plan(seed, w, b, g, k);
            let window = k.div_ceil(p.n_global()) as u64;
            let mut seen = vec![false; k];
            for s in step..step + window {
                for slot in p.global_slots(s) {
                    seen[slot.anchor] = true;
                }
            }
            prop_assert!(seen.iter().all(|&x| x));
        }

        #[test]
        fn invariant_to_world_size(b in 1..=3usize, m in 1..=12usize, k in 1..=24usize, seed: u64, step in 0..1_000_000u64) {
            let reference = plan(seed, 1, b, m, k).global_slots(step);
            for w in (1..=m).filter(|w| m % w == 0) {
                prop_assert_eq!(&plan(seed, w, b, m / w, k).global_slots(step), &reference);
            }
            // Any world up to M shares the same slots, unevenly where it does not divide M.
            let p = plan(seed, 1, b, m, k);
            for w in 1..=m {
                let mut union = Vec::new();
                for r in 0..w {
                    let mine = p.rank_micro_batches(step, r, w);
                    prop_assert!(mine.len() == m / w || mine.len() == m.div_ceil(w), "{} of {m} over {w}", mine.len());
                    for (j, mb) in mine.into_iter().enumerate() {
                        prop_assert_eq!(mb.len(), b);
                        for (i, s) in mb.iter().enumerate() {
                            prop_assert_eq!((s.micro, s.pos), (r + w * j, i));
                        }
                        union.extend(mb);
                    }
                }
                union.sort_by_key(|s| s.global);
                prop_assert_eq!(&union, &reference);
            }
        }

        #[test]
        fn ranks_get_strided_anchors((w, b, g, k, seed, step) in shape()) {
            let p = plan(seed, w, b, g, k);
            for r in 0..w {
                let mine: BTreeSet<usize> =
                    p.rank_micro_batches(step, r, w).iter().flatten().map(|s| s.anchor).collect();
                // Holding at most K/W slots, a rank's anchors are ≥ W apart: never a contiguous block.
                if w >= 2 && w * g * b <= k {
                    for (x, y) in mine.iter().zip(mine.iter().skip(1)) {
                        prop_assert!(cyclic_distance(*x, *y, k) >= w, "{mine:?}, W {w}, K {k}");
                    }
                }
                // In general they are the progression c + r + W·t of one stride.
                let c = p.slot(step, 0).anchor;
                let want: BTreeSet<usize> = (0..g * b).map(|t| (c + r + w * t) % k).collect();
                prop_assert_eq!(mine, want);
            }
        }

        #[test]
        fn sigmas_stay_near_their_anchor((w, b, g, k, seed, step) in shape()) {
            let p = plan(seed, w, b, g, k);
            let eta = p.params().jitter_scale;
            let slots = p.global_slots(step);
            for s in &slots {
                prop_assert_eq!(s.anchor_sigma, p.anchors()[s.anchor]);
                let lo = schedule::clamp_sigma(s.anchor_sigma - eta);
                let hi = schedule::clamp_sigma(s.anchor_sigma + eta);
                prop_assert!((lo..=hi).contains(&s.sigma), "{s:?}");
                prop_assert_eq!(*s, p.slot(step, s.global));
            }
            let seeds: BTreeSet<u64> = slots.iter().map(|s| s.noise_seed).collect();
            prop_assert_eq!(seeds.len(), slots.len());
        }
    }

    /// The buckets of a dataset with `n` items of each latent size `(h, w)`, interleaved in dataset order.
    fn meta(buckets: &[((usize, usize), usize)]) -> Vec<(usize, usize)> {
        let longest = buckets.iter().map(|b| b.1).max().unwrap_or(0);
        (0..longest).flat_map(|i| buckets.iter().filter(move |b| b.1 > i).map(|&(hw, _)| hw)).collect()
    }

    fn all_micro_batches(plan: &EpochPlan, per_step: usize) -> Vec<Vec<usize>> {
        (0..plan.steps_per_epoch())
            .flat_map(|s| (0..per_step).map(move |m| (s, m)))
            .map(|(s, m)| plan.micro_batch(s, m).to_vec())
            .collect()
    }

    #[test]
    fn epoch_order_is_deterministic_and_single_bucket() {
        let m = meta(&[((64, 64), 23), ((32, 48), 17), ((48, 32), 9)]);
        let plan = EpochPlan::new(&m, 7, 3, 2, 4).unwrap();
        assert_eq!(plan, EpochPlan::new(&m, 7, 3, 2, 4).unwrap());
        assert_ne!(plan, EpochPlan::new(&m, 7, 4, 2, 4).unwrap(), "another epoch, another order");
        assert_ne!(plan, EpochPlan::new(&m, 8, 3, 2, 4).unwrap(), "another seed, another order");

        let batches = all_micro_batches(&plan, 4);
        let mut seen = BTreeSet::new();
        for mb in &batches {
            let buckets: BTreeSet<_> = mb.iter().map(|&i| m[i]).collect();
            assert_eq!(buckets.len(), 1, "{mb:?}");
            assert!(mb.iter().all(|&i| seen.insert(i)), "an item twice in one epoch");
        }
        // Shuffled: neither manifest order nor grouped by bucket.
        let flat: Vec<usize> = batches.concat();
        assert!(flat.windows(2).any(|w| w[0] > w[1]));
        let bucket_runs = batches.windows(2).filter(|w| m[w[0][0]] != m[w[1][0]]).count();
        assert!(bucket_runs > 2, "{bucket_runs}");
    }

    #[test]
    fn a_plan_of_some_items_trains_only_those() {
        let m = meta(&[((64, 64), 23), ((32, 48), 17)]);
        let all: Vec<(usize, (usize, usize))> = m.iter().copied().enumerate().collect();
        assert_eq!(EpochPlan::of_items(&all, 7, 3, 2, 2).unwrap(), EpochPlan::new(&m, 7, 3, 2, 2).unwrap());
        let held_out = [0, 5, 23, 39];
        let kept: Vec<(usize, (usize, usize))> = all.into_iter().filter(|(i, _)| !held_out.contains(i)).collect();
        for epoch in 0..4 {
            let plan = EpochPlan::of_items(&kept, 7, epoch, 2, 2).unwrap();
            let trained: BTreeSet<usize> = all_micro_batches(&plan, 2).concat().into_iter().collect();
            assert!(trained.iter().all(|i| !held_out.contains(i)), "epoch {epoch} trains a held-out item");
            let dropped = plan.dropped_in_buckets() + plan.dropped_at_epoch_end();
            assert_eq!(trained.len() + dropped, kept.len(), "epoch {epoch} trains every other item");
        }
    }

    #[test]
    fn drop_counts() {
        // Buckets of 5, 3 and 1 items with b = 2: 2 + 1 + 0 micro-batches, one item left in each bucket.
        let m = meta(&[((8, 8), 5), ((8, 16), 3), ((16, 8), 1)]);
        let plan = EpochPlan::new(&m, 1, 0, 2, 1).unwrap();
        assert_eq!((plan.steps_per_epoch(), plan.dropped_in_buckets(), plan.dropped_at_epoch_end()), (3, 3, 0));
        // Two micro-batches a step: one step, the third micro-batch is dropped.
        let plan = EpochPlan::new(&m, 1, 0, 2, 2).unwrap();
        assert_eq!((plan.steps_per_epoch(), plan.dropped_in_buckets(), plan.dropped_at_epoch_end()), (1, 3, 2));
        let used: usize = all_micro_batches(&plan, 2).iter().map(Vec::len).sum();
        assert_eq!(used + 3 + 2, m.len());
        // b = 1 drops nothing.
        let plan = EpochPlan::new(&m, 1, 0, 1, 9).unwrap();
        assert_eq!((plan.steps_per_epoch(), plan.dropped_in_buckets(), plan.dropped_at_epoch_end()), (1, 0, 0));
    }

    #[test]
    fn zero_steps_is_an_error_that_explains() {
        let m = meta(&[((8, 8), 5), ((8, 16), 3)]);
        let err = EpochPlan::new(&m, 1, 0, 4, 2).unwrap_err().to_string();
        assert!(err.contains("batch size 4 makes 1 micro-batch(es)"), "{err}");
        assert!(err.contains("{8x8: 5, 8x16: 3}") && err.contains("a step takes 2"), "{err}");
        assert!(EpochPlan::new(&m, 1, 0, 0, 2).is_err());
        assert!(EpochPlan::new(&m, 1, 0, 2, 0).is_err());
    }

    /// The epoch's list of micro-batches does not depend on M: step s, micro-batch m is entry s·M + m of one
    /// list, so any split of M over ranks trains on the same micro-batches, and so does any other M up to
    /// where its epoch ends.
    #[test]
    fn invariant_to_how_micro_batches_are_split() {
        let m = meta(&[((64, 64), 31), ((32, 48), 20), ((48, 32), 14)]);
        let (seed, epoch, b) = (11, 2, 3);
        let reference = all_micro_batches(&EpochPlan::new(&m, seed, epoch, b, 1).unwrap(), 1);
        assert_eq!(reference.len(), 10 + 6 + 4);
        for per_step in 1..=8 {
            let plan = EpochPlan::new(&m, seed, epoch, b, per_step).unwrap();
            let batches = all_micro_batches(&plan, per_step);
            assert_eq!(batches.len(), reference.len() / per_step * per_step);
            assert_eq!(batches[..], reference[..batches.len()], "M = {per_step}");
            assert_eq!(plan.dropped_at_epoch_end(), (reference.len() - batches.len()) * b);
        }
    }
}
