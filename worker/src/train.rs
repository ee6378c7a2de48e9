//! One rank of a training run: per optimizer step it asks the slot plan for its slots and the epoch plan for
//! their items, builds each micro-batch, runs forward + backward with the Min-SNR-weighted loss of the
//! configured mode, sums gradients over its micro-batches and over all ranks, clips, and applies AdamW.
//!
//! The loss of a step is Σᵢ wᵢ·lossᵢ / N over all N global slots, so the all-reduced *sum* of the ranks'
//! gradients is exactly the single-process gradient: any number of ranks sharing the run's M micro-batches
//! trains the same samples at the same σ with the same noise. Summed in f64 (`compute.accumulation`), the
//! order of that sum stops mattering and every layout ends at the same weights, bit for bit.

use std::collections::BTreeMap;
use std::time::Instant;

use acrf_common::config::{Accumulation, Config, ModelDtype};
use acrf_common::plan::{EpochPlan, PlanParams, Slot, SlotPlan};
pub use acrf_common::protocol::StepReport;
use acrf_common::rng;
use candle_core::{DType, Device, Tensor};
use tracing::{info, info_span, warn};

use crate::adapters::{AdapterError, Merged};
use crate::batch::MicroBatch;
use crate::checkpoint::error::{ResumeError, SaveError};
use crate::collective::Collective;
use crate::collective::flat::{self, Layout};
use crate::data::{Dataset, Item};
use crate::eval::Evaluator;
use crate::lora::{Lora, LoraSpec};
use crate::loss::{LossFn, StepLoss, Term};
use crate::model::{ComputeOpts, ModelSource, ZImageTransformer};
use crate::optim::{AdamW, AdamWHyper, GradNorm, LrSchedule, clip_grad_norm};
use crate::preservation::{Preservation, PreservationError};
use crate::sample::SampleError;
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
    #[error(transparent)]
    Plan(#[from] acrf_common::plan::PlanError),
    #[error(transparent)]
    Preservation(Box<PreservationError>),
    #[error("model.adapters: {0}")]
    Adapter(#[from] AdapterError),
    #[error(
        "dataset {dataset} has latents with {channels} channels and captions of width {cap_dim}, the model takes \
         {model_channels} and {model_cap_dim}"
    )]
    DatasetMismatch { dataset: String, channels: usize, cap_dim: usize, model_channels: usize, model_cap_dim: usize },
    #[error("{world} ranks cannot share the run's {micro_batches} micro-batches per step")]
    TooManyRanks { world: usize, micro_batches: usize },
    #[error(transparent)]
    Resume(Box<ResumeError>),
    #[error(transparent)]
    Save(Box<SaveError>),
    #[error(
        "sample.prompts: {0} (samples need model.path to be a diffusers Z-Image folder with vae/, text_encoder/ \
         and tokenizer/)"
    )]
    Sampler(#[source] Box<SampleError>),
    #[error("after step {step}, rank {rank}'s LoRA weights differ from rank 0's: the replicas diverged; stopping")]
    Diverged { step: u64, rank: usize },
    #[error(
        "the loss or gradient was not finite for {0} optimizer steps in a row; stopping (the last good \
         checkpoint is kept). Lower training.learning_rate or check the dataset"
    )]
    NonFinite(u32),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

// The large errors travel boxed, so that every step's `Result` stays small.
impl From<ResumeError> for TrainError {
    fn from(e: ResumeError) -> Self {
        TrainError::Resume(Box::new(e))
    }
}

impl From<PreservationError> for TrainError {
    fn from(e: PreservationError) -> Self {
        TrainError::Preservation(Box::new(e))
    }
}

impl From<SaveError> for TrainError {
    fn from(e: SaveError) -> Self {
        TrainError::Save(Box::new(e))
    }
}

/// The training state beyond the LoRA and optimizer tensors; everything else is a function of `step` and of
/// the run's global batch, which the checkpoint's manifest carries.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Non-finite steps skipped in a row up to `step`.
    pub nonfinite_run: u32,
}

/// A checkpoint as read back.
pub struct Restored {
    pub lora: Lora,
    pub optimizer: crate::optim::AdamWState,
    pub state: TrainState,
    /// Where it was read from, for messages.
    pub origin: String,
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
    /// The epoch plan of the epoch being trained, with its number.
    epoch_plan: (u64, EpochPlan),
    /// The items trained on, as (index, bucket): all but those `[eval]` holds out.
    training_items: Vec<(usize, (usize, usize))>,
    eval: Option<Evaluator>,
    collective: Box<dyn Collective>,
    steps_per_epoch: u64,
    total_steps: u64,
    state: TrainState,
    /// What gradients are summed in, over micro-batches and ranks.
    accumulation: DType,
    /// The empty prompt's embedding, when `data.caption_dropout` > 0.
    empty_caption: Option<Tensor>,
    preservation: Option<Preservation>,
    /// The frozen adapters merged into `model`, kept to render samples without them.
    adapters: Merged,
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

/// The dtype a step's gradients are summed in under `compute.accumulation`.
pub fn sum_dtype(accumulation: Accumulation) -> DType {
    match accumulation {
        Accumulation::F64 => DType::F64,
        Accumulation::F32 => DType::F32,
    }
}

impl Trainer {
    /// Loads the model and dataset, and creates the LoRA and the optimizer. `micro_batches` is the run's
    /// global batch M, fixed when it started; this rank takes its share of it.
    pub fn new(
        cfg: &Config,
        collective: Box<dyn Collective>,
        device: &Device,
        micro_batches: usize,
    ) -> Result<Trainer, TrainError> {
        let (rank, world) = (collective.rank(), collective.world_size());
        if world > micro_batches {
            return Err(TrainError::TooManyRanks { world, micro_batches });
        }
        let span = info_span!("setup", rank);
        let _enter = span.enter();
        let source = ModelSource::locate(
            std::path::Path::new(&cfg.model.path),
            cfg.model.config.as_deref().map(std::path::Path::new),
        )?;
        let adapters = Merged::load(&cfg.model.adapters, &source.config, device)?;
        let dtype = compute_dtype(cfg.model.dtype, device.is_cuda());
        let mut model = ZImageTransformer::load_merged(&source, dtype, device, adapters.deltas()?)?;
        model.compute = ComputeOpts::from_config(&cfg.compute);
        let data = Dataset::open(acrf_common::store::BlockingStore::for_job(&cfg.data.path, &cfg.storage)?)?;
        let manifest = data.manifest();
        if manifest.latent_channels != model.config().in_channels || manifest.cap_dim != model.config().cap_feat_dim {
            return Err(TrainError::DatasetMismatch {
                dataset: cfg.data.path.clone(),
                channels: manifest.latent_channels,
                cap_dim: manifest.cap_dim,
                model_channels: model.config().in_channels,
                model_cap_dim: model.config().cap_feat_dim,
            });
        }
        let t = &cfg.training;
        let eval = Evaluator::new(&cfg.eval, &cfg.acrf, data.len());
        let held_out = eval.as_ref().map_or(&[][..], Evaluator::held_out);
        let training_items: Vec<(usize, (usize, usize))> =
            manifest.item_buckets().into_iter().enumerate().filter(|(i, _)| !held_out.contains(i)).collect();
        let first_epoch = EpochPlan::of_items(&training_items, cfg.seed, 0, t.batch_size, micro_batches)?;
        let steps_per_epoch = first_epoch.steps_per_epoch() as u64;
        let total_steps = t.total_steps(steps_per_epoch);
        if first_epoch.dropped_in_buckets() + first_epoch.dropped_at_epoch_end() > 0 {
            warn!(
                "each epoch leaves out {} item(s) whose bucket is not a multiple of the batch size and {} that do \
                 not fill a last step of {micro_batches} micro-batches",
                first_epoch.dropped_in_buckets(),
                first_epoch.dropped_at_epoch_end()
            );
        }

        let empty_caption = (cfg.data.caption_dropout > 0.0).then(|| data.empty_caption()).transpose()?;
        let preservation = match &cfg.preservation {
            Some(p) => {
                let preservation = Preservation::open(p, &cfg.storage, cfg.seed, t.batch_size)?;
                let m = preservation.dataset().manifest();
                if m.latent_channels != manifest.latent_channels || m.cap_dim != manifest.cap_dim {
                    return Err(TrainError::DatasetMismatch {
                        dataset: p.data.clone(),
                        channels: m.latent_channels,
                        cap_dim: m.cap_dim,
                        model_channels: manifest.latent_channels,
                        model_cap_dim: manifest.cap_dim,
                    });
                }
                Some(preservation)
            }
            None => None,
        };

        let lora = Lora::init(model.config(), &LoraSpec::from_config(&cfg.lora), cfg.seed, device)?;
        if let Some(note) = t.optimizer.substitution_note() {
            info!("{note}");
        }
        let opt = AdamW::new(lora.vars(), AdamWHyper::from(t))?;
        let plan = SlotPlan::new(PlanParams::from_config(&cfg.acrf, cfg.seed, micro_batches, t.batch_size))?;
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
            accumulation: sum_dtype(cfg.compute.accumulation),
            cfg: cfg.clone(),
            model,
            lora,
            opt,
            plan,
            data,
            items: BTreeMap::new(),
            epoch_plan: (0, first_epoch),
            training_items,
            eval,
            collective,
            steps_per_epoch,
            total_steps,
            state: TrainState { step: 0, nonfinite_run: 0 },
            exact_phase_times: false,
            empty_caption,
            preservation,
            adapters,
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

    /// M: the run's global micro-batches per step.
    pub fn micro_batches(&self) -> usize {
        self.plan.micro_batches()
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

    pub fn adapters(&self) -> &Merged {
        &self.adapters
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Restores the state of a checkpoint: LoRA values, optimizer moments and the step counter.
    pub fn restore(&mut self, r: &Restored) -> Result<(), TrainError> {
        let does_not_fit = |message: String| ResumeError::DoesNotFit { origin: r.origin.clone(), message };
        if r.lora.modules.len() != self.lora.modules.len() {
            return Err(does_not_fit(format!(
                "its LoRA has {} modules, this config makes {}",
                r.lora.modules.len(),
                self.lora.modules.len()
            ))
            .into());
        }
        for ((name, dst), (_, src)) in self.lora.vars().iter().zip(r.lora.vars()) {
            if dst.dims() != src.dims() {
                return Err(does_not_fit(format!(
                    "tensor {name} has shape {:?}, this config makes {:?}",
                    src.dims(),
                    dst.dims()
                ))
                .into());
            }
            dst.set(&src.as_tensor().to_device(dst.device())?)?;
        }
        self.opt.load_state(&r.optimizer)?;
        self.state = r.state;
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
        let header = self.collective.broadcast(&Tensor::new(&header, &Device::Cpu)?, 0)?.to_vec1::<f64>()?;
        opt.step = header[0] as u64;
        self.opt.load_state(&opt)?;
        self.state.step = header[1] as u64;
        self.state.nonfinite_run = header[2] as u32;
        Ok(())
    }

    /// Runs optimizer step `state.step` on this rank and advances the state. `stop_vote` is this rank's wish
    /// to stop after the step; it travels in the step's all-reduce, so every rank sees the same decision in
    /// `StepReport::stop`.
    pub fn step(&mut self, stop_vote: bool) -> Result<StepReport, TrainError> {
        let (step, rank, world) = (self.state.step, self.collective.rank(), self.collective.world_size());
        let span = info_span!("step", step, rank);
        let _enter = span.enter();
        let started = Instant::now();
        let mut watch = if self.exact_phase_times { Stopwatch::synced(self.model.device()) } else { Stopwatch::new() };
        let mut sums = StepSums::new(self.plan.n_global(), self.preservation.is_some());
        for slots in self.plan.rank_micro_batches(step, rank, world) {
            let mb = self.micro_batch(step, &slots)?;
            watch.lap(Phase::Other)?;
            let (grads, part) = self.forward_backward(&mb, &mut watch)?;
            sums.add(grads, part, &slots, &mb, self.accumulation)?;
            watch.lap(Phase::Backward)?;
            if let Some(which) = self.preservation.as_ref().and_then(|p| p.companion(step, slots[0].micro)) {
                let preservation = self.preservation.as_mut().expect("checked above");
                let mb = preservation.micro_batch(step, which, &slots, &self.model, self.cfg.acrf.snr_gamma)?;
                let (grads, part) = self.forward_backward(&mb, &mut watch)?;
                sums.add_preservation(grads, part, self.accumulation)?;
                watch.lap(Phase::Backward)?;
            }
        }
        let (flat, layout) = sums.pack(&self.lora, stop_vote, self.accumulation, self.model.device())?;
        watch.lap(Phase::Other)?;
        let reduced = self.collective.all_reduce_sum(&flat)?;
        watch.lap(Phase::AllReduce)?;
        let mut totals = Totals::unpack(&layout, &reduced, &self.lora, self.preservation.is_some())?;
        let grad_norm = clip_grad_norm(&mut totals.grads, self.cfg.training.max_grad_norm)?;
        let lr = self.schedule.lr(step);
        let skipped = !(totals.loss.is_finite() && grad_norm.norm.is_finite());
        if skipped {
            self.state.nonfinite_run += 1;
            warn!(step, loss = totals.loss, grad_norm = grad_norm.norm, "non-finite loss or gradient: step skipped");
        } else {
            self.state.nonfinite_run = 0;
            self.opt.step(&totals.grads, lr)?;
        }
        watch.lap(Phase::Optimizer)?;
        self.state.step += 1;
        let every = self.cfg.distributed.consistency_check_steps;
        if every > 0 && world > 1 && self.state.step.is_multiple_of(every) {
            self.check_consistency()?;
        }
        let eval_loss = self.evaluate()?;
        watch.lap(Phase::Other)?;
        let phases = (started, watch);
        Ok(self.report(step, &sums, totals, (lr, grad_norm, skipped), eval_loss, phases))
    }

    /// The fixed evaluation loss of the current weights, on the steps `[eval]` asks for it.
    fn evaluate(&mut self) -> Result<Option<f64>, TrainError> {
        let Some(eval) = self.eval.as_ref().filter(|e| e.due(self.state.step, self.total_steps)) else {
            return Ok(None);
        };
        let (items, data) = (&mut self.items, &self.data);
        let item = |index| cached_item(items, data, index).map_err(candle_core::Error::wrap);
        Ok(Some(eval.evaluate(&self.model, &self.lora, self.collective.as_mut(), item)?))
    }

    /// The micro-batch of `slots` in step `step`: their items, from the epoch plan, noised as the slots say.
    fn micro_batch(&mut self, step: u64, slots: &[Slot]) -> Result<MicroBatch, TrainError> {
        let (epoch, in_epoch) = (step / self.steps_per_epoch, (step % self.steps_per_epoch) as usize);
        if self.epoch_plan.0 != epoch {
            let (t, m) = (&self.cfg.training, self.micro_batches());
            self.epoch_plan =
                (epoch, EpochPlan::of_items(&self.training_items, self.cfg.seed, epoch, t.batch_size, m)?);
        }
        let indices = self.epoch_plan.1.micro_batch(in_epoch, slots[0].micro).to_vec();
        let mut items = indices.into_iter().map(|i| self.item(i)).collect::<Result<Vec<_>, _>>()?;
        if let Some(empty) = &self.empty_caption {
            let p = self.cfg.data.caption_dropout;
            for (slot, item) in slots.iter().zip(&mut items) {
                let key = rng::Key::new(self.cfg.seed, rng::domain::TRAIN_CAPTION_DROPOUT, step, slot.global as u64);
                if rng::uniform01(key, 0) < p {
                    item.caption = empty.clone();
                }
            }
        }
        let (dtype, device) = (self.model.dtype(), self.model.device());
        Ok(MicroBatch::new(slots, &items, self.cfg.acrf.snr_gamma, dtype, device)?)
    }

    fn item(&mut self, index: usize) -> Result<Item, TrainError> {
        Ok(cached_item(&mut self.items, &self.data, index)?)
    }

    /// Forward and backward of one micro-batch: the LoRA gradients of its part of the step's loss.
    fn forward_backward(&self, mb: &MicroBatch, watch: &mut Stopwatch) -> Result<(Vec<Tensor>, StepLoss), TrainError> {
        let n_global = self.plan.n_global();
        let mut part = None;
        let g = self.model.forward_backward(
            &mb.x_t,
            &mb.t,
            &mb.captions,
            &self.lora,
            self.cfg.training.gradient_checkpointing,
            &mut |outs| {
                let loss = self.loss.step_loss(outs, mb, n_global)?;
                let value = loss.loss.clone();
                part = Some(loss);
                Ok(value)
            },
            watch,
        )?;
        let part = part.ok_or_else(|| candle_core::Error::msg("the model never called the loss"))?;
        Ok((g.grads, part))
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
            return Err(TrainError::Diverged { step: self.state.step, rank: self.collective.rank() });
        }
        Ok(())
    }

    /// What step `step` did, from every rank's totals and this rank's own sums.
    fn report(
        &self,
        step: u64,
        sums: &StepSums,
        totals: Totals,
        (lr, grad_norm, skipped): (f64, GradNorm, bool),
        eval_loss: Option<f64>,
        (started, watch): (Instant, Stopwatch),
    ) -> StepReport {
        let n_global = self.plan.n_global();
        let slots = self.plan.global_slots(step);
        let mut terms: BTreeMap<String, f64> = Term::ALL
            .iter()
            .zip(&totals.terms)
            .filter(|(t, _)| sums.terms.contains_key(t))
            .map(|(t, v)| (t.name().to_string(), v / n_global as f64))
            .collect();
        if let Some(p) = totals.preservation {
            terms.insert(PRESERVATION.to_string(), p);
        }
        StepReport {
            step: self.state.step,
            epoch: step / self.steps_per_epoch,
            loss: totals.loss,
            terms,
            mean_weight: totals.weight / n_global as f64,
            lr,
            grad_norm: grad_norm.norm,
            module_grad_norms: module_norms(&self.lora, &grad_norm.squares),
            eval_loss,
            sigmas: slots.iter().map(|s| s.sigma).collect(),
            anchor_sigmas: slots.iter().map(|s| s.anchor_sigma).collect(),
            sample_losses: totals.slot_losses,
            rank: self.collective.rank(),
            rank_sigmas: sums.rank_sigmas.clone(),
            samples: n_global,
            seconds: started.elapsed().as_secs_f64(),
            phases: watch.times(),
            skipped,
            stop: totals.stop,
            drift: None,
        }
    }
}

/// Item `index`, read once per process: a rank trains and evaluates the same few items over and over.
fn cached_item(
    items: &mut BTreeMap<usize, Item>,
    data: &Dataset,
    index: usize,
) -> Result<Item, crate::data::DataError> {
    if let Some(item) = items.get(&index) {
        return Ok(item.clone());
    }
    let item = data.load_item(index, &Device::Cpu)?;
    items.insert(index, item.clone());
    Ok(item)
}

/// The gradient norm of each kind of adapted module over every block, from the squared norms of the LoRA
/// tensors in [`Lora::vars`] order: `layers.3.attention.to_q.lora_A.weight` counts towards `attention.to_q`.
fn module_norms(lora: &Lora, squares: &[f64]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    for ((name, _), sq) in lora.vars().iter().zip(squares) {
        let module = name.rsplitn(3, '.').nth(2).unwrap_or(name);
        let kind = module.splitn(3, '.').nth(2).unwrap_or(module);
        *sums.entry(kind.to_string()).or_default() += sq;
    }
    sums.into_iter().map(|(k, v)| (k, v.sqrt())).collect()
}

/// What one rank has summed of a step over its micro-batches: the LoRA gradients in the accumulation dtype,
/// and the statistics that ride the same all-reduce. Each slot's loss is non-zero on the one rank that
/// computed it, so the all-reduced sum gathers them all.
struct StepSums {
    grads: Option<Vec<Tensor>>,
    loss: f64,
    weight: f64,
    terms: BTreeMap<Term, f64>,
    slot_losses: Vec<f64>,
    rank_sigmas: Vec<f64>,
    /// The weighted preservation loss, Σ wᵢ·weight·lossᵢ / N over this rank's preservation slots; `None`
    /// without `[preservation]`, whose step buffers stay as they were.
    preservation: Option<f64>,
}

/// The names of the statistics in the step's flat buffer, after the gradients (named by their LoRA tensor).
const LOSS: &str = "loss";
const WEIGHT: &str = "weight";
const STOP: &str = "stop";
const TERMS: &str = "terms";
const SLOT_LOSSES: &str = "slot_losses";
const PRESERVATION: &str = "preservation";

impl StepSums {
    fn new(n_global: usize, preservation: bool) -> StepSums {
        StepSums {
            grads: None,
            loss: 0.0,
            weight: 0.0,
            terms: BTreeMap::new(),
            slot_losses: vec![0.0; n_global],
            rank_sigmas: Vec::new(),
            preservation: preservation.then_some(0.0),
        }
    }

    fn add_grads(&mut self, grads: Vec<Tensor>, dtype: DType) -> candle_core::Result<()> {
        let grads = grads.iter().map(|g| g.to_dtype(dtype)).collect::<candle_core::Result<Vec<_>>>()?;
        self.grads = Some(match self.grads.take() {
            None => grads,
            Some(acc) => acc.iter().zip(&grads).map(|(a, b)| a + b).collect::<candle_core::Result<_>>()?,
        });
        Ok(())
    }

    /// Adds a preservation micro-batch: its gradients and its part of the loss, none of the data statistics.
    fn add_preservation(&mut self, grads: Vec<Tensor>, part: StepLoss, dtype: DType) -> candle_core::Result<()> {
        self.add_grads(grads, dtype)?;
        let loss = part.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        self.loss += loss;
        *self.preservation.get_or_insert(0.0) += loss;
        Ok(())
    }

    /// Adds one micro-batch: its gradients, converted once to `dtype`, and its statistics.
    fn add(
        &mut self,
        grads: Vec<Tensor>,
        part: StepLoss,
        slots: &[Slot],
        mb: &MicroBatch,
        dtype: DType,
    ) -> candle_core::Result<()> {
        self.add_grads(grads, dtype)?;
        self.loss += part.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        self.weight += mb.weight.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        for (term, v) in part.terms.iter() {
            *self.terms.entry(term).or_default() += v.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        }
        for (slot, loss) in slots.iter().zip(part.per_sample) {
            self.slot_losses[slot.global] = loss as f64;
        }
        self.rank_sigmas.extend(&mb.sigmas);
        Ok(())
    }

    /// The one buffer the ranks sum: every gradient, by its LoRA tensor's name, then the statistics.
    fn pack(
        &self,
        lora: &Lora,
        stop_vote: bool,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Layout)> {
        let grads = self.grads.as_ref().expect("Trainer::new admits no rank without micro-batches");
        let terms: Vec<f64> = Term::ALL.iter().map(|t| self.terms.get(t).copied().unwrap_or(0.0)).collect();
        let stat = |values: &[f64]| Tensor::new(values, device);
        let mut pieces: Vec<(String, Tensor)> =
            lora.vars().into_iter().map(|(n, _)| n).zip(grads.iter().cloned()).collect();
        pieces.extend([
            (LOSS.to_string(), stat(&[self.loss])?),
            (WEIGHT.to_string(), stat(&[self.weight])?),
            (STOP.to_string(), stat(&[if stop_vote { 1.0 } else { 0.0 }])?),
            (TERMS.to_string(), stat(&terms)?),
            (SLOT_LOSSES.to_string(), stat(&self.slot_losses)?),
        ]);
        if let Some(p) = self.preservation {
            pieces.push((PRESERVATION.to_string(), stat(&[p])?));
        }
        flat::pack(&pieces, dtype)
    }
}

/// A step's sums over every rank, read back from the all-reduced buffer: the gradients cast once to f32.
struct Totals {
    grads: Vec<Tensor>,
    loss: f64,
    weight: f64,
    stop: bool,
    terms: Vec<f64>,
    slot_losses: Vec<f64>,
    preservation: Option<f64>,
}

impl Totals {
    fn unpack(layout: &Layout, reduced: &Tensor, lora: &Lora, preservation: bool) -> candle_core::Result<Totals> {
        let mut pieces = layout.unpack(reduced)?;
        let grads = lora
            .vars()
            .iter()
            .map(|(name, _)| pieces.take(name)?.to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        Ok(Totals {
            grads,
            loss: pieces.values(LOSS)?[0],
            weight: pieces.values(WEIGHT)?[0],
            stop: pieces.values(STOP)?[0] > 0.0,
            terms: pieces.values(TERMS)?,
            slot_losses: pieces.values(SLOT_LOSSES)?,
            preservation: if preservation { Some(pieces.values(PRESERVATION)?[0]) } else { None },
        })
    }
}
