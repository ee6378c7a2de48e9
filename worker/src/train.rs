//! One rank of a training run: per optimizer step it asks the slot plan for its slots and the epoch plan for
//! its items, builds each micro-batch, runs forward + backward with the Min-SNR-weighted loss of the
//! configured mode, sums gradients over its micro-batches and over all ranks, clips, and applies AdamW.
//!
//! The loss of a step is Σᵢ wᵢ·lossᵢ / N over all N global slots, so the all-reduced *sum* of the ranks'
//! gradients is exactly the single-process gradient: W ranks × G micro-batches and 1 rank × W·G micro-batches
//! train the same samples at the same σ with the same noise and end at the same weights.

use std::collections::BTreeMap;
use std::time::Instant;

use acrf_common::config::{Config, ModelDtype};
use acrf_common::plan::{PlanParams, SlotPlan};
pub use acrf_common::protocol::StepReport;
use candle_core::{DType, Device, Tensor};
use tracing::{info, info_span, warn};

use crate::batch::MicroBatch;
use crate::collective::Collective;
use crate::data::{Dataset, EpochPlan, Item};
use crate::flow;
use crate::lora::{Lora, LoraSpec};
use crate::loss::{LossFn, Term};
use crate::model::{ComputeOpts, ModelSource, ZImageTransformer};
use crate::optim::{AdamW, AdamWHyper, LrSchedule, clip_grad_norm};
use crate::timing::{Phase, Stopwatch};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    #[error(transparent)]
    Store(#[from] acrf_common::store::StoreError),
    #[error("slot plan: {0}")]
    Plan(#[from] acrf_common::plan::PlanError),
    #[error("{0}")]
    Setup(String),
    #[error(
        "the loss or gradient was not finite for {0} optimizer steps in a row; stopping (the last good \
         checkpoint is kept). Lower training.learning_rate or check the dataset"
    )]
    NonFinite(u32),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The training state beyond the LoRA and optimizer tensors; everything else is a function of `step`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Non-finite steps skipped in a row up to `step`.
    pub nonfinite_run: u32,
    /// Global micro-batches per step, fixed when the run started whatever the world size since.
    pub micro_batches: usize,
}

pub struct Trainer {
    cfg: Config,
    model: ZImageTransformer,
    pub lora: Lora,
    opt: AdamW,
    schedule: LrSchedule,
    loss: LossFn,
    plan: SlotPlan,
    data: Dataset,
    items: BTreeMap<usize, Item>,
    epoch_plan: Option<(u64, EpochPlan)>,
    collective: Box<dyn Collective>,
    steps_per_epoch: u64,
    total_steps: u64,
    state: TrainState,
    exact_phase_times: bool,
}

/// The dtype the base weights are held and computed in when the job asks for `dtype`.
pub fn compute_dtype(dtype: ModelDtype, gpu: bool) -> DType {
    match dtype.resolve(gpu) {
        ModelDtype::Bf16 => DType::BF16,
        ModelDtype::F16 => DType::F16,
        _ => DType::F32,
    }
}

impl Trainer {
    /// Loads the model and dataset, and creates the LoRA and the optimizer. `micro_batches` is the run's
    /// global micro-batches per step (W·G when it started); this rank takes its share of them.
    pub fn new(
        cfg: &Config,
        collective: Box<dyn Collective>,
        device: &Device,
        micro_batches: usize,
    ) -> Result<Trainer, TrainError> {
        let (rank, world) = (collective.rank(), collective.world_size());
        let span = info_span!("setup", rank);
        let _enter = span.enter();
        let source = ModelSource::locate(
            std::path::Path::new(&cfg.model.path),
            cfg.model.config.as_deref().map(std::path::Path::new),
        )?;
        let mut model = ZImageTransformer::load(&source, compute_dtype(cfg.model.dtype, device.is_cuda()), device)?;
        model.compute = ComputeOpts::from_config(&cfg.compute);
        let data = Dataset::open(acrf_common::store::BlockingStore::for_job(&cfg.data.path, &cfg.storage)?)?;
        let manifest = data.manifest();
        if manifest.latent_channels != model.config().in_channels || manifest.cap_dim != model.config().cap_feat_dim {
            return Err(TrainError::Setup(format!(
                "dataset {} has latents with {} channels and captions of width {}, the model takes {} and {}",
                cfg.data.path,
                manifest.latent_channels,
                manifest.cap_dim,
                model.config().in_channels,
                model.config().cap_feat_dim
            )));
        }
        let t = &cfg.training;
        let micro_per_step = micro_batches;
        let first_epoch = EpochPlan::new(manifest, cfg.seed, 0, t.batch_size, micro_per_step)?;
        let steps_per_epoch = first_epoch.steps_per_epoch() as u64;
        let total_steps = t.total_steps(steps_per_epoch);
        if first_epoch.dropped_in_buckets() + first_epoch.dropped_at_epoch_end() > 0 {
            warn!(
                "each epoch leaves out {} item(s) whose bucket is not a multiple of the batch size and {} that do \
                 not fill a last step of world size × accumulation = {micro_per_step} micro-batches",
                first_epoch.dropped_in_buckets(),
                first_epoch.dropped_at_epoch_end()
            );
        }

        let lora = Lora::init(model.config(), &LoraSpec::from_config(&cfg.lora), cfg.seed, device)?;
        if let Some(note) = t.optimizer.substitution_note() {
            info!("{note}");
        }
        let opt = AdamW::new(lora.vars(), AdamWHyper::from(t))?;
        let plan =
            SlotPlan::new(PlanParams::from_config(&cfg.acrf, cfg.seed, world, t.batch_size, t.gradient_accumulation))?;
        info!(
            rank,
            world,
            lora_parameters = lora.parameter_count(),
            steps_per_epoch,
            total_steps,
            "ready: {} items in {} buckets",
            data.len(),
            manifest.buckets.len()
        );
        Ok(Trainer {
            schedule: LrSchedule::new(t, total_steps),
            loss: LossFn::new(cfg.loss.clone()),
            cfg: cfg.clone(),
            model,
            lora,
            opt,
            plan,
            data,
            items: BTreeMap::new(),
            epoch_plan: Some((0, first_epoch)),
            collective,
            steps_per_epoch,
            total_steps,
            state: TrainState { step: 0, nonfinite_run: 0, micro_batches },
            exact_phase_times: false,
        })
    }

    /// Makes every step wait for the device at each phase boundary, so [`StepReport::phases`] is exact on a
    /// GPU too; it costs the overlap between phases, so it is for benchmarks.
    pub fn set_exact_phase_times(&mut self, exact: bool) {
        self.exact_phase_times = exact;
    }

    pub fn state(&self) -> TrainState {
        self.state
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn model(&self) -> &ZImageTransformer {
        &self.model
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Restores the state of a checkpoint: LoRA values, optimizer moments and the step counter.
    pub fn restore(
        &mut self,
        lora: &Lora,
        opt: &crate::optim::AdamWState,
        state: TrainState,
    ) -> Result<(), TrainError> {
        if lora.modules.len() != self.lora.modules.len() {
            return Err(TrainError::Setup(format!(
                "the checkpoint's LoRA has {} modules, this config makes {}",
                lora.modules.len(),
                self.lora.modules.len()
            )));
        }
        for ((name, dst), (_, src)) in self.lora.vars().iter().zip(lora.vars()) {
            if dst.dims() != src.dims() {
                return Err(TrainError::Setup(format!(
                    "checkpoint tensor {name} has shape {:?}, expected {:?}",
                    src.dims(),
                    dst.dims()
                )));
            }
            dst.set(&src.as_tensor().to_device(dst.device())?)?;
        }
        if state.micro_batches != self.state.micro_batches {
            return Err(TrainError::Setup(format!(
                "the checkpoint was trained with {} micro-batches per step, this trainer was built for {}",
                state.micro_batches, self.state.micro_batches
            )));
        }
        self.opt.load_state(opt)?;
        self.state = state;
        Ok(())
    }

    /// Makes every rank hold rank 0's LoRA, optimizer state and step, so a group starts (or restarts from a
    /// checkpoint only rank 0 may be able to read) from one state.
    pub fn sync_from_rank0(&mut self) -> Result<(), TrainError> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        for (_, v) in self.lora.vars() {
            let t = self.collective.broadcast(v.as_tensor(), 0)?;
            v.set(&t.copy()?)?;
        }
        let mut opt = self.opt.state();
        for (_, t) in opt.tensors.iter_mut() {
            *t = self.collective.broadcast(t, 0)?;
        }
        let s = self.state;
        let header = [opt.step as f64, s.step as f64, s.nonfinite_run as f64];
        let header: Vec<f32> = header.iter().map(|&v| v as f32).collect();
        let header = self.collective.broadcast(&Tensor::new(header.as_slice(), &Device::Cpu)?, 0)?.to_vec1::<f32>()?;
        opt.step = header[0] as u64;
        self.opt.load_state(&opt)?;
        self.state.step = header[1] as u64;
        self.state.nonfinite_run = header[2] as u32;
        Ok(())
    }

    /// Compares a hash of this rank's LoRA weights with rank 0's. Identical gradients and updates keep the
    /// replicas bit-identical; a mismatch means a rank computed something else (a bad GPU, a diverged
    /// build), and training on would silently average unrelated models.
    fn check_consistency(&mut self) -> Result<(), TrainError> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for (_, v) in self.lora.vars() {
            for x in v.as_tensor().flatten_all()?.to_vec1::<f32>()? {
                h.update(x.to_bits().to_le_bytes());
            }
        }
        // Four 16-bit pieces travel exactly as f32 through a collective that carries f32.
        let digest = h.finalize();
        let pieces: Vec<f32> = digest[..8].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as f32).collect();
        let mine = Tensor::new(pieces.as_slice(), &Device::Cpu)?;
        let rank0 = self.collective.broadcast(&mine, 0)?.to_vec1::<f32>()?;
        if rank0 != pieces {
            return Err(TrainError::Setup(format!(
                "after step {}, rank {}'s LoRA weights differ from rank 0's: the replicas diverged; stopping",
                self.state.step,
                self.collective.rank()
            )));
        }
        Ok(())
    }

    /// The epoch plan of `epoch`, built once per epoch.
    fn epoch_plan(&mut self, epoch: u64) -> Result<&EpochPlan, TrainError> {
        if self.epoch_plan.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let t = &self.cfg.training;
            let micro = self.collective.world_size() * t.gradient_accumulation;
            self.epoch_plan =
                Some((epoch, EpochPlan::new(self.data.manifest(), self.cfg.seed, epoch, t.batch_size, micro)?));
        }
        Ok(&self.epoch_plan.as_ref().expect("set above").1)
    }

    fn item(&mut self, index: usize) -> Result<Item, TrainError> {
        if let Some(item) = self.items.get(&index) {
            return Ok(item.clone());
        }
        let item = self.data.load_item(index, &Device::Cpu)?;
        self.items.insert(index, item.clone());
        Ok(item)
    }

    /// Runs optimizer step `state.step` on this rank and advances the state. `stop_vote` is this rank's wish
    /// to stop after the step; it travels in the step's all-reduce, so every rank sees the same decision in
    /// `StepReport::stop`.
    pub fn step(&mut self, stop_vote: bool) -> Result<StepReport, TrainError> {
        let step = self.state.step;
        let rank = self.collective.rank();
        let span = info_span!("step", step, rank);
        let _enter = span.enter();
        let started = Instant::now();
        let mut watch = if self.exact_phase_times { Stopwatch::synced(self.model.device()) } else { Stopwatch::new() };
        let (epoch, in_epoch) = (step / self.steps_per_epoch, (step % self.steps_per_epoch) as usize);
        let n_global = self.plan.n_global();
        let device = self.model.device().clone();
        let dtype = self.model.dtype();

        let mut grads: Option<Vec<Tensor>> = None;
        let mut sums: BTreeMap<Term, f64> = BTreeMap::new();
        let (mut loss_sum, mut weight_sum) = (0f64, 0f64);
        let (mut rank_sigmas, mut sigmas, mut anchor_sigmas) = (Vec::new(), vec![0f64; n_global], vec![0f64; n_global]);
        let mut slot_losses = vec![0f32; n_global];
        for s in self.plan.global_slots(step) {
            sigmas[s.global] = s.sigma;
            anchor_sigmas[s.global] = s.anchor_sigma;
        }
        for slots in self.plan.rank_micro_batches(step, rank) {
            let indices = self.epoch_plan(epoch)?.micro_batch(in_epoch, slots[0].micro).to_vec();
            let items = indices.into_iter().map(|i| self.item(i)).collect::<Result<Vec<_>, _>>()?;
            let mb = MicroBatch::new(&slots, &items, self.cfg.acrf.snr_gamma, dtype, &device)?;
            rank_sigmas.extend(&mb.sigmas);
            let mut stash = None;
            let loss_fn = &self.loss;
            watch.lap(Phase::Other)?;
            let g = self.model.forward_backward(
                &mb.x_t,
                &mb.t,
                &mb.captions,
                &self.lora,
                self.cfg.training.gradient_checkpointing,
                &mut |outs| {
                    let v_pred = flow::velocity_from_model(&Tensor::stack(
                        &outs
                            .iter()
                            .map(|o| o.squeeze(1)?.to_dtype(DType::F32))
                            .collect::<candle_core::Result<Vec<_>>>()?,
                        0,
                    )?)?;
                    let per_sample = loss_fn.per_sample_loss(&v_pred, &mb.x0, &mb.noise, &mb.sigma)?;
                    let weighted = (&per_sample.loss * &mb.weight)?.sum_all()?;
                    stash = Some((per_sample.terms.detach(), per_sample.loss.to_vec1::<f32>()?));
                    weighted / n_global as f64
                },
                &mut watch,
            )?;
            loss_sum += g.loss.to_scalar::<f32>()? as f64;
            weight_sum += mb.weight.sum_all()?.to_scalar::<f32>()? as f64;
            if let Some((terms, losses)) = stash {
                for (term, v) in terms.iter() {
                    *sums.entry(term).or_default() += v.sum_all()?.to_scalar::<f32>()? as f64;
                }
                for (slot, loss) in slots.iter().zip(losses) {
                    slot_losses[slot.global] = loss;
                }
            }
            grads = Some(match grads {
                None => g.grads,
                Some(acc) => acc.iter().zip(&g.grads).map(|(a, b)| a + b).collect::<candle_core::Result<_>>()?,
            });
            watch.lap(Phase::Backward)?;
        }
        let local = grads.ok_or_else(|| TrainError::Setup("this rank has no micro-batches".into()))?;

        // One all-reduce for the gradient and the step's statistics: [grads…, loss, weight, stop, terms…, slot
        // losses…]. Each slot's loss is non-zero on the one rank that computed it, so the sum gathers them all.
        let mut stats = vec![loss_sum as f32, weight_sum as f32, if stop_vote { 1.0 } else { 0.0 }];
        stats.extend(Term::ALL.iter().map(|t| sums.get(t).copied().unwrap_or(0.0) as f32));
        stats.extend(&slot_losses);
        let flat = Tensor::cat(
            &local
                .iter()
                .map(|g| g.flatten_all())
                .chain(std::iter::once(Tensor::new(stats.as_slice(), &device)))
                .collect::<candle_core::Result<Vec<_>>>()?,
            0,
        )?;
        watch.lap(Phase::Other)?;
        let reduced = self.collective.all_reduce_sum(&flat)?;
        watch.lap(Phase::AllReduce)?;
        let mut offset = 0;
        let mut grads = Vec::with_capacity(local.len());
        for g in &local {
            grads.push(reduced.narrow(0, offset, g.elem_count())?.reshape(g.shape())?);
            offset += g.elem_count();
        }
        let stats: Vec<f32> = reduced.narrow(0, offset, stats.len())?.to_vec1()?;
        let loss = stats[0] as f64;
        let computed: std::collections::BTreeSet<Term> = sums.keys().copied().collect();
        let (term_sums, slot_losses) = stats[3..].split_at(Term::ALL.len());
        let terms = Term::ALL
            .iter()
            .zip(term_sums)
            .filter(|(t, _)| computed.contains(t))
            .map(|(t, v)| (t.name().to_string(), *v as f64 / n_global as f64))
            .collect();

        let grad_norm = clip_grad_norm(&mut grads, self.cfg.training.max_grad_norm)?;
        let lr = self.schedule.lr(step);
        let skipped = !(loss.is_finite() && grad_norm.is_finite());
        if skipped {
            self.state.nonfinite_run += 1;
            warn!(step, loss, grad_norm, "non-finite loss or gradient: step skipped");
        } else {
            self.state.nonfinite_run = 0;
            self.opt.step(&grads, lr)?;
        }
        watch.lap(Phase::Optimizer)?;
        self.state.step += 1;
        let every = self.cfg.distributed.consistency_check_steps;
        if every > 0 && self.collective.world_size() > 1 && self.state.step.is_multiple_of(every) {
            self.check_consistency()?;
        }
        Ok(StepReport {
            step: self.state.step,
            epoch,
            loss,
            terms,
            mean_weight: stats[1] as f64 / n_global as f64,
            lr,
            grad_norm,
            sigmas,
            anchor_sigmas,
            sample_losses: slot_losses.iter().map(|&l| l as f64).collect(),
            rank,
            rank_sigmas,
            samples: n_global,
            seconds: started.elapsed().as_secs_f64(),
            phases: watch.times(),
            skipped,
            stop: stats[2] > 0.0,
        })
    }
}
