//! Preservation (regularisation against the base model, as ai-toolkit's "differential output preservation"
//! and OneTrainer's "prior prediction"): micro-batches of a second cached dataset trained toward the frozen
//! base model's own prediction at the same noisy input and σ, so the LoRA learns its subject without moving
//! what the base does elsewhere.
//!
//! Which global micro-batches of a step are joined by a preservation micro-batch, and which one, is a pure
//! function of (seed, step, micro-batch): a draw below `preservation.ratio` adds one. It takes the slots'
//! σ (so the anchors stay stratified), noise of its own key, and its items from a fixed list of the dataset's
//! micro-batches (one bucket each). The rank that trains micro-batch m trains its companion too, so the
//! step's sum — and the trained LoRA — does not depend on the world size. The preservation loss enters the
//! step as Σ wᵢ·weight·lossᵢ / N beside the data loss; with weight 0 it adds exact zeros.

use std::collections::BTreeMap;

use acrf_common::config::PreservationConfig;
use acrf_common::plan::{EpochPlan, Slot};
use acrf_common::rng::{self, Key, domain};
use acrf_common::store::BlockingStore;
use candle_core::{DType, Device, Tensor};

use crate::batch::MicroBatch;
use crate::data::{DataError, Dataset, Item};
use crate::flow;
use crate::lora::LoraView;
use crate::model::ZImageTransformer;

pub struct Preservation {
    seed: u64,
    ratio: f64,
    weight: f64,
    data: Dataset,
    /// The dataset's micro-batches (item indices, one bucket each), fixed for the run.
    micro_batches: Vec<Vec<usize>>,
    items: BTreeMap<usize, Item>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreservationError {
    #[error("preservation.data: {0}")]
    Data(#[from] DataError),
    #[error("preservation.data: {0}")]
    Plan(#[from] acrf_common::plan::PlanError),
    #[error(transparent)]
    Store(#[from] acrf_common::store::StoreError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Preservation {
    pub fn open(
        cfg: &PreservationConfig,
        storage: &acrf_common::config::StorageConfig,
        seed: u64,
        batch_size: usize,
    ) -> Result<Preservation, PreservationError> {
        let data = Dataset::open(BlockingStore::for_job(&cfg.data, storage)?)?;
        let plan = EpochPlan::new(&data.manifest().item_buckets(), seed, 0, batch_size, 1)?;
        let micro_batches = (0..plan.steps_per_epoch()).map(|k| plan.micro_batch(k, 0).to_vec()).collect();
        Ok(Preservation { seed, ratio: cfg.ratio, weight: cfg.weight, data, micro_batches, items: BTreeMap::new() })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.data
    }

    /// The preservation micro-batch (an index into the fixed list) that joins global micro-batch `micro` of
    /// `step`, if any.
    pub fn companion(&self, step: u64, micro: usize) -> Option<usize> {
        let key = Key::new(self.seed, domain::PRESERVATION, step, micro as u64);
        (rng::uniform01(key, 0) < self.ratio).then(|| (rng::bits(key, 1) % self.micro_batches.len() as u64) as usize)
    }

    /// Preservation micro-batch `which` at the σ of `slots`, with its own noise, trained toward `model`'s own
    /// prediction without LoRA.
    pub fn micro_batch(
        &mut self,
        step: u64,
        which: usize,
        slots: &[Slot],
        model: &ZImageTransformer,
        snr_gamma: f64,
    ) -> Result<MicroBatch, PreservationError> {
        let mut items = Vec::with_capacity(slots.len());
        for &index in &self.micro_batches[which] {
            if !self.items.contains_key(&index) {
                self.items.insert(index, self.data.load_item(index, &Device::Cpu)?);
            }
            items.push(self.items[&index].clone());
        }
        let slots: Vec<Slot> = slots
            .iter()
            .map(|s| Slot {
                noise_seed: Key::new(self.seed, domain::PRESERVATION_NOISE, step, s.global as u64).raw(),
                ..*s
            })
            .collect();
        let mb = MicroBatch::new(&slots, &items, snr_gamma, model.dtype(), model.device())?;
        let outs = model.forward(&mb.x_t, &mb.t, &mb.captions, &LoraView::none())?;
        let outs: Vec<Tensor> =
            outs.iter().map(|o| o.squeeze(1)?.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
        let v_base = flow::velocity_from_model(&Tensor::stack(&outs, 0)?)?;
        Ok(mb.toward(&v_base, self.weight)?)
    }
}
