//! The slot plan: which anchor, σ and noise every training sample of an optimizer step gets (spec §2).
//!
//! An optimizer step consumes N = W·b·G *global slots*: W ranks, b samples per micro-batch, G accumulation
//! micro-batches per rank. Everything about a slot is a pure function of (seed, step, global slot index), and
//! the layout below depends on W and G only through their product W·G, so W ranks × G accumulation and one
//! rank × W·G accumulation train on identical samples, and a rank computes its own slots without talking to
//! anyone. docs/acrf-math.md works through an example.
//!
//! - Slot g = m·b + i: m ∈ [0, W·G) is the global micro-batch, i ∈ [0, b) the position in it. Rank r owns the
//!   micro-batches m ≡ r (mod W); its j-th accumulation micro-batch is m = r + W·j.
//! - Stratum q(g) = i·(W·G) + m, a bijection of [0, N) that does not depend on how W·G splits.
//! - Anchor a = (c_s + q) mod K with c_s = (c₀ + s·N) mod K and c₀ drawn from the seed. N consecutive strata
//!   hit every anchor ⌊N/K⌋ or ⌈N/K⌉ times; step s + 1 continues where step s stopped, so with N < K the
//!   anchors are used without replacement; rank r gets {c_s + r + W·t mod K : t < G·b}, a stride-W
//!   progression spread over the σ range.

use crate::config::{AcrfConfig, Jitter, TimestepSampling};
use crate::rng::{self, Key, domain};
use crate::schedule;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("slot plan: `{0}` must be at least 1")]
    Zero(&'static str),
    #[error("slot plan: world_size · batch_size · grad_accum overflows")]
    TooManySlots,
    #[error("slot plan: `{field}` must be {expected}, got {value}")]
    OutOfRange { field: &'static str, expected: &'static str, value: f64 },
}

/// What fixes a run's slots. Anything not here (data order, learning rate, …) cannot change them.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanParams {
    pub seed: u64,
    pub world_size: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub turbo_steps: usize,
    pub shift: f64,
    pub jitter_scale: f64,
    pub jitter: Jitter,
    pub timestep_sampling: TimestepSampling,
}

impl PlanParams {
    pub fn from_config(
        acrf: &AcrfConfig,
        seed: u64,
        world_size: usize,
        batch_size: usize,
        grad_accum: usize,
    ) -> PlanParams {
        PlanParams {
            seed,
            world_size,
            batch_size,
            grad_accum,
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
    /// m: the global micro-batch, owned by rank m mod W.
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
    micro_batches: usize,
    /// The ranks sharing the micro-batches now; `params.world_size` until a re-formation.
    world: usize,
    c0: usize,
}

impl SlotPlan {
    pub fn new(params: PlanParams) -> Result<SlotPlan, PlanError> {
        for (field, v) in [
            ("world_size", params.world_size),
            ("batch_size", params.batch_size),
            ("grad_accum", params.grad_accum),
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
        let micro_batches = params.world_size.checked_mul(params.grad_accum).ok_or(PlanError::TooManySlots)?;
        let n_global = micro_batches.checked_mul(params.batch_size).ok_or(PlanError::TooManySlots)?;
        let k = params.turbo_steps;
        let c0 = (rng::bits(Key::new(params.seed, domain::ANCHOR_OFFSET, 0, 0), 0) % k as u64) as usize;
        let world = params.world_size;
        Ok(SlotPlan { anchors: schedule::anchors(k, params.shift), params, n_global, micro_batches, world, c0 })
    }

    /// The same slots shared by `world` ranks instead: every slot keeps its anchor, σ and noise, and rank r
    /// takes the micro-batches m ≡ r (mod world), ⌊M/world⌋ or ⌈M/world⌉ of them. This is how a group that
    /// lost or gained workers keeps training the exact global batch.
    pub fn for_world(&self, world: usize) -> Result<SlotPlan, PlanError> {
        if world == 0 {
            return Err(PlanError::Zero("world_size"));
        }
        if world > self.micro_batches {
            return Err(PlanError::OutOfRange {
                field: "world_size",
                expected: "at most the global micro-batches per step",
                value: world as f64,
            });
        }
        Ok(SlotPlan { world, ..self.clone() })
    }

    /// M = W·G: the global micro-batches of one step.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    pub fn params(&self) -> &PlanParams {
        &self.params
    }

    /// The anchor sigmas the slots index into, in schedule order.
    pub fn anchors(&self) -> &[f64] {
        &self.anchors
    }

    /// N = W·b·G: the slots of one optimizer step over all ranks.
    pub fn n_global(&self) -> usize {
        self.n_global
    }

    pub fn rank_of_micro(&self, micro: usize) -> usize {
        micro % self.world
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
        let stratum = pos * self.micro_batches + micro;
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
    /// If `micro` is not below W·G.
    pub fn micro_batch(&self, step: u64, micro: usize) -> Vec<Slot> {
        assert!(micro < self.micro_batches, "micro-batch {micro} of {}", self.micro_batches);
        let b = self.params.batch_size;
        (micro * b..(micro + 1) * b).map(|g| self.slot(step, g)).collect()
    }

    /// Rank `rank`'s micro-batches of step `step`, in accumulation order (micro-batch r + W·j at j): G of
    /// them, or ⌊M/W⌋ to ⌈M/W⌉ after [`SlotPlan::for_world`].
    ///
    /// # Panics
    /// If `rank` is not below the world size.
    pub fn rank_micro_batches(&self, step: u64, rank: usize) -> Vec<Vec<Slot>> {
        let w = self.world;
        assert!(rank < w, "rank {rank} of a world of {w}");
        (rank..self.micro_batches).step_by(w).map(|m| self.micro_batch(step, m)).collect()
    }

    /// All N slots of step `step`, by global index.
    pub fn global_slots(&self, step: u64) -> Vec<Slot> {
        (0..self.n_global).map(|g| self.slot(step, g)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn plan(seed: u64, w: usize, b: usize, g: usize, k: usize) -> SlotPlan {
        let acrf = AcrfConfig { turbo_steps: k, ..AcrfConfig::default() };
        SlotPlan::new(PlanParams::from_config(&acrf, seed, w, b, g)).unwrap()
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
        let ok = PlanParams::from_config(&AcrfConfig::default(), 1, 2, 1, 2);
        for (field, params) in [
            ("world_size", PlanParams { world_size: 0, ..ok.clone() }),
            ("batch_size", PlanParams { batch_size: 0, ..ok.clone() }),
            ("grad_accum", PlanParams { grad_accum: 0, ..ok.clone() }),
            ("turbo_steps", PlanParams { turbo_steps: 0, ..ok.clone() }),
        ] {
            let err = SlotPlan::new(params).unwrap_err();
            assert_eq!(err, PlanError::Zero(field));
            assert!(err.to_string().contains(field));
        }
        let err = SlotPlan::new(PlanParams { shift: -1.0, ..ok.clone() }).unwrap_err();
        assert!(err.to_string().contains("`shift`"), "{err}");
        let huge = PlanParams { world_size: usize::MAX, ..ok };
        assert_eq!(SlotPlan::new(huge).unwrap_err(), PlanError::TooManySlots);
    }

    #[test]
    fn a_smaller_world_shares_the_same_slots() {
        let p = plan(5, 4, 2, 1, 10);
        let three = p.for_world(3).unwrap();
        let mut seen: Vec<Slot> = (0..3).flat_map(|r| three.rank_micro_batches(7, r)).flatten().collect();
        seen.sort_by_key(|s| s.global);
        assert_eq!(seen, p.global_slots(7));
        assert_eq!(three.rank_micro_batches(7, 0).len(), 2);
        assert_eq!(three.rank_micro_batches(7, 2).len(), 1);
        assert!(p.for_world(5).is_err() && p.for_world(0).is_err());
    }

    /// The example of docs/acrf-math.md: K = 10, W = 2, b = 1, G = 2 (N = 4), relative to c₀.
    #[test]
    fn worked_example() {
        let p = plan(7, 2, 1, 2, 10);
        let c0 = p.slot(0, 0).anchor;
        let rel = |step, rank| -> Vec<usize> {
            p.rank_micro_batches(step, rank).iter().flatten().map(|s| (s.anchor + 10 - c0) % 10).collect()
        };
        assert_eq!(rel(0, 0), [0, 2]);
        assert_eq!(rel(0, 1), [1, 3]);
        assert_eq!(rel(1, 0), [4, 6]);
        assert_eq!(rel(1, 1), [5, 7]);
        assert_eq!(rel(2, 0), [8, 0]);
        assert_eq!(rel(2, 1), [9, 1]);
        let micros: Vec<usize> = p.rank_micro_batches(0, 1).iter().map(|mb| mb[0].micro).collect();
        assert_eq!(micros, [1, 3]);
    }

    #[test]
    fn uniform_ablation_keeps_the_anchor_index() {
        let anchor = plan(3, 2, 2, 2, 10);
        let acrf = AcrfConfig { timestep_sampling: TimestepSampling::Uniform, ..AcrfConfig::default() };
        let uniform = SlotPlan::new(PlanParams::from_config(&acrf, 3, 2, 2, 2)).unwrap();
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

    /// The child half of `same_slots_in_another_process`; does nothing unless that test spawned it.
    #[test]
    fn print_slots_for_parent() {
        if std::env::var_os(CHILD_ENV).is_some() {
            for s in golden_plan().global_slots(9) {
                println!("SLOT {}", describe(&s));
            }
        }
    }

    #[test]
    fn same_slots_in_another_process() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "plan::tests::print_slots_for_parent", "--nocapture"])
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
                let p = plan(seed, w, b, m / w, k);
                prop_assert_eq!(&p.global_slots(step), &reference);
                let mut union = Vec::new();
                for r in 0..w {
                    for (j, mb) in p.rank_micro_batches(step, r).into_iter().enumerate() {
                        prop_assert_eq!(mb.len(), b);
                        for (i, s) in mb.iter().enumerate() {
                            prop_assert_eq!((s.micro, s.pos), (r + w * j, i));
                            prop_assert_eq!(p.rank_of_micro(s.micro), r);
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
                    p.rank_micro_batches(step, r).iter().flatten().map(|s| s.anchor).collect();
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
}
