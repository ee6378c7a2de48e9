//! What one optimizer step of a job costs before it runs: peak device memory per rank and FLOPs.
//!
//! A run that does not fit should fail in seconds with the knob to turn, not after loading 12 GB of weights,
//! and a benchmark needs the step's FLOPs to say how well the hardware is used.

use acrf_common::config::Config;
use candle_core::DType;

use crate::lora::LoraSpec;
use crate::model::{ComputeOpts, SEQ_MULTIPLE, T_EMBED_MID, T_FREQ_DIM, ZImageConfig};

/// Everything about one rank's optimizer step that its memory and FLOPs depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub model: ZImageConfig,
    /// The base weights' dtype.
    pub dtype: DType,
    pub lora: LoraSpec,
    /// Samples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step on this rank.
    pub accumulation: usize,
    /// Latent height and width of the largest bucket.
    pub latent: (usize, usize),
    /// Caption tokens of the longest caption, before padding.
    pub caption_tokens: usize,
    pub checkpoint: bool,
    pub compute: ComputeOpts,
    /// What the step's gradients are summed in (`compute.accumulation`).
    pub gradient_sums: DType,
    /// Whether the step runs on a GPU, whose math libraries and allocator need room of their own.
    pub gpu: bool,
    /// Expected preservation micro-batches per data micro-batch (`preservation.ratio`, 0 without). Each costs
    /// a base forward without a graph and one more forward and backward; they run one after another like
    /// accumulation micro-batches, so they add FLOPs but not to the peak.
    pub preservation: f64,
}

/// FLOPs of one optimizer step on one rank: matmuls only, as 2·m·n·k each; elementwise work is a few percent
/// at these widths and is left out.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Flops {
    pub forward: f64,
    /// The block forwards that checkpointing repeats.
    pub recompute: f64,
    pub backward: f64,
}

impl Flops {
    pub fn total(&self) -> f64 {
        self.forward + self.recompute + self.backward
    }
}

/// Token counts of one sample, each stream padded as the model pads it.
#[derive(Debug, Clone, Copy, Default)]
struct Tokens {
    image: usize,
    caption: usize,
}

impl Tokens {
    fn unified(&self) -> usize {
        self.image + self.caption
    }
}

fn pad(n: usize) -> usize {
    n.div_ceil(SEQ_MULTIPLE) * SEQ_MULTIPLE
}

/// The three block stacks in execution order: (name, blocks, tokens per sample).
fn stacks(w: &Workload, t: Tokens) -> [(&'static str, usize, usize); 3] {
    let r = w.model.n_refiner_layers;
    [("noise_refiner", r, t.image), ("context_refiner", r, t.caption), ("layers", w.model.n_layers, t.unified())]
}

impl Workload {
    fn tokens(&self) -> Tokens {
        let p = self.model.patch();
        Tokens { image: pad((self.latent.0 / p) * (self.latent.1 / p)), caption: pad(self.caption_tokens) }
    }

    /// Image and caption tokens of one sample, padded, as the joint stream sees them.
    pub fn tokens_per_sample(&self) -> usize {
        self.tokens().unified()
    }

    /// Whether attention runs in tiles (`ops::attention`'s tiled kernels): f32 on a CPU, bf16 with a head size
    /// of 32, 64 or 128 on a GPU.
    pub fn tiled_attention(&self) -> bool {
        let a = self.compute.attention;
        a.fused
            && a.tiled
            && if self.gpu {
                self.dtype == DType::BF16 && matches!(self.model.head_dim(), 32 | 64 | 128)
            } else {
                self.dtype == DType::F32
            }
    }

    /// Whether any block of `stack` carries an adapter.
    fn adapted(&self, stack: &str) -> bool {
        !self.lora.targets.is_empty() && self.lora.blocks.iter().any(|b| b == stack)
    }

    /// The (in, out) features of the adapted linears of one block.
    fn adapted_linears(&self) -> Vec<(usize, usize)> {
        let (d, h) = (self.model.dim, self.model.ffn_dim());
        let shape = |leaf: &str| match leaf {
            "w1" | "w3" => (d, h),
            "w2" => (h, d),
            _ => (d, d),
        };
        self.lora.targets.iter().map(|t| shape(t)).collect()
    }

    /// Whether gradients flow through `stack`: it or a stack that feeds it carries an adapter. The refiners
    /// feed the joint layers and nothing else.
    fn backpropagated(&self, stack: &str) -> bool {
        match stack {
            "layers" => stacks(self, Tokens::default()).iter().any(|(s, ..)| self.adapted(s)),
            refiner => self.adapted(refiner),
        }
    }

    pub fn flops(&self) -> Flops {
        let t = self.tokens();
        let m = &self.model;
        let (d, f, a, r) = (m.dim as f64, m.ffn_dim() as f64, m.adaln_dim() as f64, self.lora.rank as f64);
        let samples = (self.batch * self.accumulation) as f64;
        let embed = 2.0 * (T_FREQ_DIM * T_EMBED_MID + T_EMBED_MID * m.adaln_dim()) as f64
            + 2.0 * t.image as f64 * m.patch_dim() as f64 * d
            + 2.0 * t.caption as f64 * m.cap_feat_dim as f64 * d
            + 2.0 * (a * d + t.unified() as f64 * d * m.patch_dim() as f64);
        let lora_fwd: f64 = self.adapted_linears().iter().map(|&(i, o)| 2.0 * r * (i + o) as f64).sum();
        // Attention's backward is twice its forward, plus the logits the fused op recomputes; the GPU's tiled
        // backward computes dQ apart from dK and dV (deterministically, without atomics), which recomputes the
        // logits and dP once more.
        let attention_bwd = match (self.tiled_attention() && self.gpu, self.compute.attention.fused) {
            (true, _) => 3.5,
            (false, true) => 2.5,
            (false, false) => 2.0,
        };
        let mut flops = Flops { forward: embed * samples, ..Flops::default() };
        for (stack, n, s) in stacks(self, t) {
            let s = s as f64;
            let linears = 2.0 * s * (4.0 * d * d + 3.0 * d * f) + 2.0 * a * 4.0 * d;
            let attention = 4.0 * s * s * d;
            let lora = if self.adapted(stack) { s * lora_fwd } else { 0.0 };
            let block = linears + attention + lora;
            flops.forward += samples * n as f64 * block;
            if self.backpropagated(stack) {
                // Frozen linears return only dL/dx (one matmul each), adapters also dA and dB.
                let backward = 2.0 * s * (4.0 * d * d + 3.0 * d * f) + attention_bwd * attention + 2.0 * lora;
                flops.backward += samples * n as f64 * backward;
                if self.checkpoint {
                    flops.recompute += samples * n as f64 * block;
                }
            }
        }
        // The head's dL/dx.
        flops.backward += samples * 2.0 * t.unified() as f64 * d * m.patch_dim() as f64;
        let p = self.preservation;
        Flops {
            forward: flops.forward * (1.0 + 2.0 * p),
            recompute: flops.recompute * (1.0 + p),
            backward: flops.backward * (1.0 + p),
        }
    }
}

/// One line of a memory plan.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryItem {
    pub name: &'static str,
    pub bytes: u64,
    /// How the size comes about, for the table.
    pub detail: String,
}

/// The predicted peak of one rank's device memory, item by item, and the step's FLOPs.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub memory: Vec<MemoryItem>,
    pub flops: Flops,
}

impl Estimate {
    pub fn new(w: &Workload) -> Estimate {
        Estimate { memory: w.memory(), flops: w.flops() }
    }

    /// The predicted peak in bytes: every item is alive at once at the peak.
    pub fn peak(&self) -> u64 {
        self.memory.iter().map(|i| i.bytes).sum()
    }
}

impl Workload {
    fn lora_parameters(&self) -> usize {
        let per_block: usize = self.adapted_linears().iter().map(|&(i, o)| self.lora.rank * (i + o)).sum();
        stacks(self, Tokens::default()).iter().filter(|(s, ..)| self.adapted(s)).map(|(_, n, _)| n * per_block).sum()
    }

    fn memory(&self) -> Vec<MemoryItem> {
        let e = self.dtype.size_in_bytes() as u64;
        let t = self.tokens();
        let m = &self.model;
        let (b, d, f, r) = (self.batch as u64, m.dim as u64, m.ffn_dim() as u64, self.lora.rank as u64);
        let (heads, hd) = (m.n_heads as u64, m.head_dim() as u64);
        let lean = self.compute.attention.fused && self.compute.fused_norm;
        let item = |name, bytes, detail: String| MemoryItem { name, bytes, detail };
        let lora = self.lora_parameters() as u64;
        let sum = self.gradient_sums.size_in_bytes() as u64;
        let mut items = vec![
            item("base weights", m.parameter_count() as u64 * e, format!("{} parameters × {e} B", m.parameter_count())),
            item(
                "LoRA weights and AdamW moments",
                lora * 4 * 3,
                format!("{lora} parameters × 4 B × (weight, 2 moments)"),
            ),
            item(
                "LoRA gradients",
                lora * (4 + 2 * sum),
                format!("a micro-batch's in f32, and the running sum and its next value (the flat buffer) in {sum} B"),
            ),
        ];
        let all = stacks(self, t);
        let (xs, cs, us) = (t.image as u64, t.caption as u64, t.unified() as u64);
        items.push(item(
            "batch: embeddings, RoPE tables",
            b * (xs + cs) * d * e + b * (xs + cs + us) * hd * 4,
            format!("{xs} image + {cs} caption tokens"),
        ));

        // Adapted linears of a block and their widths, for the x·Aᵀ each keeps.
        let adapters = |stack: &str| if self.adapted(stack) { self.lora.targets.len() as u64 } else { 0 };
        // What a block's graph keeps for its backward, per token: the lean ops keep 12 model-wide tensors
        // (input, the first two norms, q/k/v, qk after norm and RoPE, attention output, projections, the
        // residual sum) and 3 feed-forward-wide ones (w1, w3, the gate); the composed ops also keep the outputs
        // of the two norms that feed the residual adds, the f32 temporaries of six norms and the attention
        // probabilities.
        let kept = |stack: &str, s: u64| {
            let per_token = 12 * d * e + 3 * f * e + adapters(stack) * r * 4 + heads * 4;
            let plain = if lean { 0 } else { 2 * d * e + 20 * d * 4 + 5 * heads * s * 4 };
            b * s * (per_token + plain)
        };
        // What one block's backward allocates on top: the feed-forward's gradients and temporaries, or
        // attention's (the chunk's scores, the per-head slices and the assembled q/k/v gradients; composed, a
        // dozen score-sized gradients and temporaries), whichever is larger, plus the gradients flowing between
        // the pieces.
        let a = self.compute.attention;
        let chunk = |c: usize, n: u64| if c == 0 { n } else { (c as u64).min(n) };
        let tiled = self.tiled_attention();
        // Tiled, what attention holds beside its inputs and outputs: on a GPU the log-sum-exp and rowsum(dO ∘ O)
        // of every row; on a CPU each thread's packed head (q, k, v, o, dO and the three gradients in f32).
        let tiles = |s: u64| match self.gpu {
            true => 2 * b * heads * s * 4,
            false => (rayon::current_num_threads() as u64).min(b * heads) * 8 * s.next_multiple_of(128) * hd * 4,
        };
        let scores = |s: u64| match (tiled, lean) {
            (true, _) => tiles(s),
            (false, true) => b * chunk(a.head_chunk, heads) * chunk(a.query_chunk, s) * s * 4,
            (false, false) => b * heads * s * s * 4,
        };
        let backward = |s: u64| {
            let ffn = 5 * b * s * f * 4;
            let attention = match (tiled, lean) {
                (true, _) => 6 * b * s * d * e + tiles(s),
                (false, true) => 6 * b * s * d * e + 4 * scores(s) + 5 * b * chunk(a.head_chunk, heads) * s * hd * e,
                (false, false) => 12 * scores(s) + 12 * b * s * d * 4,
            };
            ffn.max(attention) + 3 * b * s * d * e
        };
        if self.checkpoint {
            let inputs: u64 = all
                .iter()
                .filter(|(stack, ..)| *stack == "layers" || self.backpropagated(stack))
                .map(|&(_, n, s)| n as u64 * b * s as u64 * d * e)
                .sum();
            items.push(item("checkpointed block inputs", inputs, "every backpropagated block's input".into()));
            items.push(item(
                "one block's recompute graph",
                kept("layers", us) + b * us * d * e,
                format!("{us} joint tokens, with the input's trainable copy"),
            ));
        } else {
            let graphs: u64 = all.iter().map(|&(stack, n, s)| n as u64 * kept(stack, s as u64)).sum();
            items.push(item("every block's graph", graphs, "no checkpointing".into()));
            items.push(item("final layer's graph", 6 * b * us * d * 4, "LayerNorm temporaries in f32".into()));
        }
        items.push(item("one block's backward", backward(us), format!("{us} joint tokens")));
        if self.gpu {
            let activations: u64 = items.iter().skip(3).map(|i| i.bytes).sum();
            items.push(item("CUDA context, kernels, cuBLAS workspace", 768 << 20, "fixed".into()));
            items.push(item("allocator slack", activations / 10, "10% of the activations".into()));
        } else {
            // glibc returns a freed block to the system only above its mmap threshold, which rises to the
            // largest block freed (up to 32 MiB), and trims the heap only past twice that: up to about three
            // such blocks stay resident. Fitted on the runs of docs/memory.md.
            // (A tiled attention's buffers are a head's rows each, too small for that retention.)
            let largest = if tiled { 0 } else { scores(us) }.max(b * us * f * 4).min(32 << 20);
            items.push(item("allocator slack", 3 * largest, "3 × the largest temporary, glibc's retention".into()));
            // What a process touches once it computes, whatever the model: the matmul threads' packing buffers
            // and stacks, and the allocator's own bookkeeping. Fitted on the smallest run of docs/memory.md,
            // where it was most of the error (2.0–2.4 MiB).
            items.push(item("matmul threads, allocator", 2 << 20, "fixed".into()));
        }
        items
    }
}

/// The device's memory, where it can be asked: a GPU's; `None` for a CPU, whose memory is the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub total: u64,
    pub free: u64,
}

pub fn device_memory(device: &candle_core::Device) -> candle_core::Result<Option<DeviceMemory>> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            let (free, total) =
                d.cuda_stream().context().mem_get_info().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Ok(Some(DeviceMemory { total: total as u64, free: free as u64 }))
        }
        _ => Ok(None),
    }
}

impl Workload {
    /// The workload of `cfg` on a model of shape `model`, for latents of `latent` (height, width) and
    /// captions of `caption_tokens`.
    pub fn new(cfg: &Config, model: ZImageConfig, gpu: bool, latent: (usize, usize), caption_tokens: usize) -> Self {
        Workload {
            model,
            dtype: crate::train::compute_dtype(cfg.model.dtype, gpu),
            lora: LoraSpec::from_config(&cfg.lora),
            batch: cfg.training.batch_size,
            accumulation: cfg.training.gradient_accumulation,
            latent,
            caption_tokens,
            checkpoint: cfg.training.gradient_checkpointing,
            compute: ComputeOpts::from_config(&cfg.compute),
            gradient_sums: crate::train::sum_dtype(cfg.compute.accumulation),
            gpu,
            preservation: cfg.preservation.as_ref().map_or(0.0, |p| p.ratio),
        }
    }
}

/// The workload of a job: the model config from its model folder or file, the largest bucket and the longest
/// caption from its dataset's manifest, unless `latent` or `caption_tokens` say otherwise.
pub fn job_workload(
    cfg: &Config,
    gpu: bool,
    latent: Option<(usize, usize)>,
    caption_tokens: Option<usize>,
) -> Result<Workload, crate::train::TrainError> {
    let source = crate::model::ModelSource::locate(
        std::path::Path::new(&cfg.model.path),
        cfg.model.config.as_deref().map(std::path::Path::new),
    )?;
    let (latent, caption_tokens) = match (latent, caption_tokens) {
        (Some(l), Some(c)) => (l, c),
        _ => {
            let data =
                crate::data::Dataset::open(acrf_common::store::BlockingStore::for_job(&cfg.data.path, &cfg.storage)?)?;
            let m = data.manifest();
            let largest = m.items.iter().map(|i| (i.latent_shape[1], i.latent_shape[2])).max_by_key(|&(h, w)| h * w);
            let longest = m.items.iter().map(|i| i.caption_len).max();
            (latent.or(largest).unwrap_or((0, 0)), caption_tokens.or(longest).unwrap_or(0))
        }
    };
    Ok(Workload::new(cfg, source.config, gpu, latent, caption_tokens))
}

/// A job whose predicted peak exceeds the device's memory.
#[derive(Debug, thiserror::Error)]
#[error(
    "the step needs about {} per rank but the device has {} (compute.device_memory or --device-memory). {advice} \
     (`acrf plan` shows the breakdown)",
    human_bytes(*.needed),
    human_bytes(*.available)
)]
pub struct DoesNotFit {
    pub needed: u64,
    pub available: u64,
    /// Which knobs to turn, each with the peak it gives.
    pub advice: String,
}

/// `1.23 GiB`, `456.0 MiB`, `12.0 KiB`.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        _ if b >= (1u64 << 30) as f64 => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        _ if b >= (1u64 << 20) as f64 => format!("{:.1} MiB", b / (1u64 << 20) as f64),
        _ => format!("{:.1} KiB", b / 1024.0),
    }
}

impl Workload {
    /// Checks the predicted peak against `available` bytes; when it does not fit, the error names each knob
    /// that would make it fit on its own, with the value to set, or, when none would, what each achieves.
    pub fn check_fits(&self, available: u64) -> Result<(), DoesNotFit> {
        let needed = Estimate::new(self).peak();
        if needed <= available {
            return Ok(());
        }
        let peak = |w: &Workload| Estimate::new(w).peak();
        // Each knob's least drastic setting that fits, else its most drastic one.
        let mut options: Vec<(String, u64)> = Vec::new();
        let mut consider = |candidates: Vec<(String, Workload)>| {
            let mut best: Option<(String, u64)> = None;
            for (what, w) in candidates {
                let p = peak(&w);
                let fits = p <= available;
                best = Some((what, p));
                if fits {
                    break;
                }
            }
            options.extend(best);
        };
        let with = |edit: &dyn Fn(&mut Workload)| {
            let mut w = self.clone();
            edit(&mut w);
            w
        };
        if !self.checkpoint {
            consider(vec![("training.gradient_checkpointing = true".into(), with(&|w| w.checkpoint = true))]);
        }
        if !self.compute.attention.fused || !self.compute.fused_norm {
            let lean = ComputeOpts::lean();
            consider(vec![("compute.mode = \"lean\"".into(), with(&|w| w.compute = lean))]);
        } else if !self.tiled_attention() {
            let rows = self.tokens().unified();
            let current = match self.compute.attention.query_chunk {
                0 => rows,
                q => q,
            };
            let chunks: Vec<(String, Workload)> = [4096, 2048, 1024, 512, 256]
                .into_iter()
                .filter(|&q| q < current)
                .map(|q| {
                    (format!("compute.attention_query_chunk = {q}"), with(&|w| w.compute.attention.query_chunk = q))
                })
                .collect();
            consider(chunks);
        }
        if self.gpu && self.dtype == DType::F32 {
            consider(vec![("model.dtype = \"bf16\"".into(), with(&|w| w.dtype = DType::BF16))]);
        }
        let halvings =
            |from: usize| std::iter::successors(Some(from / 2), |&x| (x > 1).then_some(x / 2)).filter(|&x| x >= 1);
        consider(
            halvings(self.batch).map(|b| (format!("training.batch_size = {b}"), with(&|w| w.batch = b))).collect(),
        );
        consider(
            halvings(self.lora.rank).map(|r| (format!("lora.network_dim = {r}"), with(&|w| w.lora.rank = r))).collect(),
        );
        let (h, wd) = self.latent;
        consider(
            [7, 6, 5, 4]
                .into_iter()
                .map(|eighths| {
                    let p = 2 * self.model.patch();
                    let side = |x: usize| (x * eighths / 8 / p * p).max(p);
                    let latent = (side(h), side(wd));
                    let what = format!(
                        "a lower resolution: largest bucket {}x{} px instead of {}x{} (re-cache or leave those \
                         items out)",
                        8 * latent.1,
                        8 * latent.0,
                        8 * wd,
                        8 * h
                    );
                    (what, with(&|w| w.latent = latent))
                })
                .collect(),
        );
        let (fit, short): (Vec<_>, Vec<_>) = options.into_iter().partition(|(_, p)| *p <= available);
        let list = |o: &[(String, u64)]| {
            o.iter().map(|(what, p)| format!("{what} ({})", human_bytes(*p))).collect::<Vec<_>>().join("; ")
        };
        let advice = if fit.is_empty() {
            format!("No single knob is enough; combine them: {}", list(&short))
        } else {
            format!("Any one of these fits: {}", list(&fit))
        };
        Err(DoesNotFit { needed, available, advice })
    }
}
