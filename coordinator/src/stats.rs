//! What an ablation is read by, from a run's `metrics.jsonl`: the loss per epoch as mean ± std over its steps,
//! the spread of the per-step mean loss and of the gradient norm over the last quarter of the run, where the
//! gradient goes by module, and the fixed evaluation loss; and the same across runs that differ only in their
//! seed, as mean ± std over the seeds.
//!
//! The training loss of a step is a mean over its slots at the σ the job sampled, so its level differs between
//! sampling schemes and loss modes; its spread is therefore also given relative to its mean (the coefficient of
//! variation). Only `eval_loss` is on one scale for every job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The part of the run that the window statistics cover: its last quarter of steps, where the curves have
/// settled most.
pub const WINDOW: f64 = 0.25;

/// One line of `metrics.jsonl`, as far as reports read it (a non-finite value is written as null).
#[derive(Debug, Clone, Deserialize)]
pub struct Record {
    pub step: u64,
    #[serde(default)]
    pub epoch: u64,
    pub loss: Option<f64>,
    pub ema_loss: Option<f64>,
    pub lr: Option<f64>,
    pub grad_norm: Option<f64>,
    #[serde(default)]
    pub anchor_sigmas: Vec<f64>,
    #[serde(default)]
    pub sample_losses: Vec<f64>,
    #[serde(default)]
    pub module_grad_norms: BTreeMap<String, f64>,
    #[serde(default)]
    pub eval_loss: Option<f64>,
    #[serde(default)]
    pub turbo_drift: Option<acrf_common::protocol::TurboDrift>,
}

/// Mean and sample standard deviation (n − 1; 0 for a single value), or `None` without values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl MeanStd {
    pub fn of(values: &[f64]) -> Option<MeanStd> {
        let values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        Some(MeanStd { mean, std: var.sqrt(), n })
    }

    pub fn var(&self) -> f64 {
        self.std * self.std
    }
}

/// The statistics of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunStats {
    pub steps: u64,
    /// The step loss of each epoch (0-based), mean ± std over the epoch's steps.
    pub epochs: Vec<(u64, MeanStd)>,
    /// The steps of the window, first and last.
    pub window: (u64, u64),
    /// The per-step mean loss over the window: its mean, variance and coefficient of variation.
    pub loss: Option<MeanStd>,
    pub loss_var: Option<f64>,
    pub loss_cv: Option<f64>,
    /// The per-sample loss over the window, every slot of every step: the spread stratification cannot reduce.
    pub sample_loss: Option<MeanStd>,
    /// The gradient norm before clipping over the window, and its variance.
    pub grad_norm: Option<MeanStd>,
    pub grad_norm_var: Option<f64>,
    /// Each module kind's share of the squared gradient norm, averaged over the window's steps (sums to 1).
    pub module_shares: BTreeMap<String, f64>,
    /// (step, evaluation loss) wherever the run evaluated.
    pub eval: Vec<(u64, f64)>,
    pub final_eval: Option<f64>,
}

impl RunStats {
    pub fn of(records: &[Record]) -> RunStats {
        let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
        let mut by_epoch: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for r in records {
            if let Some(loss) = finite(r.loss) {
                by_epoch.entry(r.epoch).or_default().push(loss);
            }
        }
        let epochs = by_epoch.into_iter().filter_map(|(e, v)| Some((e, MeanStd::of(&v)?))).collect();
        let start = records.len() - ((records.len() as f64 * WINDOW).ceil() as usize).min(records.len());
        let window = &records[start..];
        let values = |f: &dyn Fn(&Record) -> Option<f64>| window.iter().filter_map(f).collect::<Vec<f64>>();
        let loss = MeanStd::of(&values(&|r| finite(r.loss)));
        let samples: Vec<f64> = window.iter().flat_map(|r| r.sample_losses.iter().copied()).collect();
        let grad_norm = MeanStd::of(&values(&|r| finite(r.grad_norm)));
        let eval: Vec<(u64, f64)> = records.iter().filter_map(|r| Some((r.step, finite(r.eval_loss)?))).collect();
        RunStats {
            steps: records.last().map_or(0, |r| r.step),
            epochs,
            window: (window.first().map_or(0, |r| r.step), window.last().map_or(0, |r| r.step)),
            loss_var: loss.map(|l| l.var()),
            loss_cv: loss.map(|l| l.std / l.mean.abs()),
            loss,
            sample_loss: MeanStd::of(&samples),
            grad_norm_var: grad_norm.map(|g| g.var()),
            grad_norm,
            module_shares: module_shares(window),
            final_eval: eval.last().map(|&(_, v)| v),
            eval,
        }
    }

    /// The loss of epoch `epoch`, when the run reached it.
    pub fn epoch(&self, epoch: u64) -> Option<MeanStd> {
        self.epochs.iter().find(|(e, _)| *e == epoch).map(|&(_, m)| m)
    }
}

/// Each module kind's share of Σ norm², averaged over `records` that report module norms.
fn module_shares(records: &[Record]) -> BTreeMap<String, f64> {
    let mut shares: BTreeMap<String, f64> = BTreeMap::new();
    let mut steps = 0;
    for r in records {
        let total: f64 = r.module_grad_norms.values().map(|n| n * n).sum();
        if !(total.is_finite() && total > 0.0) {
            continue;
        }
        steps += 1;
        for (module, n) in &r.module_grad_norms {
            *shares.entry(module.clone()).or_default() += n * n / total;
        }
    }
    shares.values_mut().for_each(|s| *s /= steps.max(1) as f64);
    shares
}

/// Runs that differ only in their seed, and their statistics as mean ± std over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupStats {
    /// The settings the runs share (the swept ones, but the seed).
    pub settings: Vec<(String, String)>,
    pub runs: Vec<String>,
    pub final_eval: Option<MeanStd>,
    /// The epoch-mean step loss at each epoch every run reached, over the seeds.
    pub epochs: Vec<(u64, MeanStd)>,
    pub loss: Option<MeanStd>,
    pub loss_var: Option<MeanStd>,
    pub loss_cv: Option<MeanStd>,
    pub sample_loss_var: Option<MeanStd>,
    pub grad_norm_var: Option<MeanStd>,
    pub module_shares: BTreeMap<String, MeanStd>,
    /// (step, evaluation loss over the seeds) at the steps every run evaluated.
    pub eval: Vec<(u64, MeanStd)>,
    /// (step, EMA loss over the seeds) at the steps every run reached.
    pub ema_loss: Vec<(u64, MeanStd)>,
}

/// The setting that tells seeds apart.
pub const SEED: &str = "seed";

/// A run as [`groups`] sees it.
pub struct Member<'a> {
    pub name: &'a str,
    /// The swept settings.
    pub settings: &'a [(String, String)],
    pub records: &'a [Record],
    pub stats: &'a RunStats,
}

/// Groups `runs` by their settings without the seed, in first-seen order.
pub fn groups(runs: &[Member]) -> Vec<GroupStats> {
    let mut order: Vec<Vec<(String, String)>> = Vec::new();
    let mut members: BTreeMap<Vec<(String, String)>, Vec<usize>> = BTreeMap::new();
    for (i, run) in runs.iter().enumerate() {
        let key: Vec<(String, String)> = run.settings.iter().filter(|(k, _)| k != SEED).cloned().collect();
        if !members.contains_key(&key) {
            order.push(key.clone());
        }
        members.entry(key).or_default().push(i);
    }
    order
        .into_iter()
        .map(|key| {
            let idx = &members[&key];
            let stats: Vec<&RunStats> = idx.iter().map(|&i| runs[i].stats).collect();
            let over = |f: &dyn Fn(&RunStats) -> Option<f64>| {
                MeanStd::of(&stats.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
            };
            let modules: Vec<String> = {
                let mut m: Vec<String> = stats.iter().flat_map(|s| s.module_shares.keys().cloned()).collect();
                m.sort();
                m.dedup();
                m
            };
            GroupStats {
                settings: key,
                runs: idx.iter().map(|&i| runs[i].name.to_string()).collect(),
                final_eval: over(&|s| s.final_eval),
                epochs: aligned(stats.iter().map(|s| s.epochs.iter().map(|&(e, m)| (e, m.mean)).collect())),
                loss: over(&|s| s.loss.map(|l| l.mean)),
                loss_var: over(&|s| s.loss_var),
                loss_cv: over(&|s| s.loss_cv),
                sample_loss_var: over(&|s| s.sample_loss.map(|l| l.var())),
                grad_norm_var: over(&|s| s.grad_norm_var),
                module_shares: modules
                    .into_iter()
                    .filter_map(|m| Some((m.clone(), over(&|s| s.module_shares.get(&m).copied())?)))
                    .collect(),
                eval: aligned(stats.iter().map(|s| s.eval.iter().copied().collect())),
                ema_loss: aligned(
                    idx.iter().map(|&i| runs[i].records.iter().filter_map(|r| Some((r.step, r.ema_loss?))).collect()),
                ),
            }
        })
        .collect()
}

/// Mean ± std over the series at each x that every series has.
fn aligned(series: impl Iterator<Item = BTreeMap<u64, f64>>) -> Vec<(u64, MeanStd)> {
    let all: Vec<BTreeMap<u64, f64>> = series.collect();
    let Some(first) = all.first() else { return Vec::new() };
    first
        .keys()
        .filter_map(|x| {
            let v: Vec<f64> = all.iter().filter_map(|m| m.get(x).copied()).collect();
            if v.len() == all.len() { Some((*x, MeanStd::of(&v)?)) } else { None }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, epoch: u64, loss: f64, norms: &[(&str, f64)], eval: Option<f64>) -> Record {
        Record {
            step,
            epoch,
            loss: Some(loss),
            ema_loss: Some(loss),
            lr: Some(1e-4),
            grad_norm: Some(loss * 10.0),
            anchor_sigmas: vec![0.9, 0.1],
            sample_losses: vec![loss + 1.0, loss - 1.0],
            module_grad_norms: norms.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            eval_loss: eval,
            turbo_drift: None,
        }
    }

    #[test]
    fn epochs_window_shares_and_seed_groups() {
        let norms = [("attention.to_q", 3.0), ("attention.to_k", 4.0)];
        let records: Vec<Record> = (1..=8)
            .map(|s| record(s, (s - 1) / 4, s as f64, &norms, (s % 4 == 0).then_some(10.0 - s as f64)))
            .collect();
        let stats = RunStats::of(&records);
        assert_eq!(stats.steps, 8);
        let e0 = stats.epoch(0).unwrap();
        assert_eq!((e0.mean, e0.n), (2.5, 4));
        assert!((e0.std - (5.0f64 / 3.0).sqrt()).abs() < 1e-12, "{e0:?}");
        // The last quarter: steps 7 and 8.
        assert_eq!(stats.window, (7, 8));
        assert_eq!(stats.loss.unwrap().mean, 7.5);
        assert!((stats.loss_var.unwrap() - 0.5).abs() < 1e-12);
        assert!((stats.grad_norm_var.unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(stats.sample_loss.unwrap().n, 4);
        assert!((stats.module_shares["attention.to_q"] - 0.36).abs() < 1e-12);
        assert!((stats.module_shares["attention.to_k"] - 0.64).abs() < 1e-12);
        assert_eq!(stats.eval, [(4, 6.0), (8, 2.0)]);
        assert_eq!(stats.final_eval, Some(2.0));

        let other: Vec<Record> =
            records.iter().map(|r| Record { eval_loss: r.eval_loss.map(|v| v + 2.0), ..r.clone() }).collect();
        let other_stats = RunStats::of(&other);
        let (a, b, c) = (
            vec![("k".to_string(), "4".to_string()), (SEED.to_string(), "1".to_string())],
            vec![("k".to_string(), "4".to_string()), (SEED.to_string(), "2".to_string())],
            vec![("k".to_string(), "10".to_string()), (SEED.to_string(), "1".to_string())],
        );
        let runs = [
            Member { name: "a", settings: &a, records: &records, stats: &stats },
            Member { name: "c", settings: &c, records: &records, stats: &stats },
            Member { name: "b", settings: &b, records: &other, stats: &other_stats },
        ];
        let groups = groups(&runs);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].settings, [("k".to_string(), "4".to_string())]);
        assert_eq!(groups[0].runs, ["a", "b"]);
        let eval = groups[0].final_eval.unwrap();
        assert_eq!((eval.mean, eval.n), (3.0, 2));
        assert!((eval.std - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(groups[0].eval.iter().map(|(s, m)| (*s, m.mean)).collect::<Vec<_>>(), [(4, 7.0), (8, 3.0)]);
        assert_eq!(groups[1].runs, ["c"]);
        assert_eq!(groups[1].final_eval.unwrap().std, 0.0);
    }
}
