//! The memory-lean compute path (fused RMSNorm, the fused chunked attention op) against the plain path on the
//! fixture model (`ACRF_ZIMAGE_FIXTURE`, default `fixtures/zimage-tiny`): each piece alone and all together
//! give the same outputs and the same LoRA gradients, with and without checkpointing.

use acrf_tests::zimage;
use acrf_worker::lora::{Lora, LoraSpec};
use acrf_worker::model::{AttentionOpts, Block, ComputeOpts, ModelSource, Pos, Rope, ZImageTransformer};
use acrf_worker::timing::Stopwatch;
use anyhow::{Context, Result};
use candle_core::{D, DType, Device, Tensor, Var};

fn model(compute: ComputeOpts) -> Result<ZImageTransformer> {
    let mut model = zimage::model()?;
    model.compute = compute;
    Ok(model)
}

fn fixture_lora() -> Result<Lora> {
    Ok(zimage::lora()?.0)
}

/// Latents, model times, captions and loss targets.
struct Batch {
    x: Vec<Tensor>,
    t: Tensor,
    cap: Vec<Tensor>,
    targets: Vec<Tensor>,
}

/// The fixture's LoRA case, and a batch of two lengths built from it: the second sample is the first latent
/// twice side by side, so its image and unified streams are longer than the first's and attention is masked,
/// whatever the shapes of the fixture's samples.
fn batches() -> Result<Vec<(&'static str, Batch)>> {
    let fx = zimage::tensors("lora_case.safetensors")?;
    let (x, cap, t) = zimage::batch(&fx)?;
    let fixture = Batch { x, t, cap, targets: zimage::samples(&fx, "target")? };
    let wide = Tensor::cat(&[&fixture.x[0], &fixture.x[0]], D::Minus1)?;
    let masked = Batch {
        x: vec![fixture.x[0].clone(), wide.clone()],
        t: fixture.t.narrow(0, 0, 2)?,
        cap: fixture.cap[..2].to_vec(),
        targets: vec![fixture.targets[0].clone(), (wide * 0.5)?],
    };
    Ok(vec![("fixture LoRA case", fixture), ("masked batch", masked)])
}

fn loss(outs: &[Tensor], targets: &[Tensor]) -> candle_core::Result<Tensor> {
    let per_sample =
        outs.iter().zip(targets).map(|(o, t)| (o - t)?.sqr()?.mean_all()).collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&per_sample, 0)?.mean(D::Minus1)
}

/// Every lean piece alone and together, and the plain path chunked (its chunking must not change values).
fn variants() -> Vec<(&'static str, ComputeOpts)> {
    let attention = |head_chunk, query_chunk, fused| ComputeOpts {
        attention: AttentionOpts { head_chunk, query_chunk, fused, tiled: false },
        fused_norm: false,
    };
    vec![
        ("fused norm", ComputeOpts { fused_norm: true, ..ComputeOpts::default() }),
        ("fused attention, whole", attention(0, 0, true)),
        ("fused attention by heads", attention(1, 0, true)),
        ("fused attention by query blocks", attention(0, 24, true)),
        ("fused attention by heads and query blocks", attention(1, 24, true)),
        ("plain attention by heads and query blocks", attention(1, 24, false)),
        ("all lean pieces", ComputeOpts { fused_norm: true, ..attention(1, 24, true) }),
        ("ComputeOpts::lean()", ComputeOpts::lean()),
    ]
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    max_abs(&(a - b)?)
}

#[test]
fn lean_forward_matches_plain() -> Result<()> {
    let lora = fixture_lora()?;
    let view = lora.view(false, 1.0);
    let plain = model(ComputeOpts::default())?;
    for (batch_name, b) in batches()? {
        let reference = plain.forward(&b.x, &b.t, &b.cap, &view)?;
        for (name, opts) in variants() {
            let out = model(opts)?.forward(&b.x, &b.t, &b.cap, &view)?;
            let mut err = 0f64;
            for (o, r) in out.iter().zip(&reference) {
                err = err.max(max_abs_diff(o, r)?);
            }
            println!("{batch_name}, {name}: max |out − plain| = {err:.2e}");
            assert!(err <= 1e-5, "{batch_name}, {name}: outputs differ by {err:e}");
        }
    }
    Ok(())
}

#[test]
fn lean_lora_gradients_match_plain() -> Result<()> {
    let lora = fixture_lora()?;
    let vars = lora.vars();
    let plain = model(ComputeOpts::default())?;
    for (batch_name, b) in batches()? {
        for checkpoint in [false, true] {
            let mut loss_fn = |o: &[Tensor]| loss(o, &b.targets);
            let reference =
                plain.forward_backward(&b.x, &b.t, &b.cap, &lora, checkpoint, &mut loss_fn, &mut Stopwatch::new())?;
            let ref_loss = reference.loss.to_scalar::<f32>()?;
            for (name, opts) in variants() {
                let g = model(opts)?.forward_backward(
                    &b.x,
                    &b.t,
                    &b.cap,
                    &lora,
                    checkpoint,
                    &mut loss_fn,
                    &mut Stopwatch::new(),
                )?;
                let l = g.loss.to_scalar::<f32>()?;
                assert!(((l - ref_loss) / ref_loss).abs() <= 1e-6, "{batch_name}, {name}: loss {l} vs {ref_loss}");
                let mut worst = 0f64;
                for ((var, a), r) in vars.iter().zip(&g.grads).zip(&reference.grads) {
                    let rel = max_abs_diff(a, r)? / max_abs(r)?.max(f64::MIN_POSITIVE);
                    worst = worst.max(rel);
                    assert!(rel <= 1e-5, "{batch_name}, {name}, checkpoint {checkpoint}: {} differs by {rel:e}", var.0);
                }
                println!("{batch_name}, {name}, checkpoint {checkpoint}: worst relative gradient error {worst:.2e}");
            }
        }
    }
    Ok(())
}

/// One modulated block of `src` with a LoRA on each of its linears, and inputs for `h × w` image tokens.
struct BlockCase {
    block: Block,
    lora: Lora,
    rope: Rope,
    adaln: Tensor,
    x: Tensor,
}

impl BlockCase {
    fn new(src: &ModelSource, rank: usize, (h, w): (usize, usize)) -> Result<Self> {
        let cfg = &src.config;
        let block = Block::new(&mut src.open(DType::F32, &Device::Cpu)?, "layers.0", cfg, true)?;
        let spec = LoraSpec {
            rank,
            alpha: rank as f64,
            targets: ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"].map(String::from).to_vec(),
            blocks: vec!["layers".into()],
        };
        let mut lora = Lora::init(cfg, &spec, 5, &Device::Cpu)?;
        lora.modules.retain(|name, _| name.starts_with("layers.0."));
        for m in lora.modules.values() {
            m.b.set(&(Tensor::randn(0f32, 1.0, m.b.shape(), &Device::Cpu)? * 0.02)?)?;
        }
        let positions: Vec<Pos> = (0..h * w).map(|k| [1, k / w, k % w]).collect();
        Ok(BlockCase {
            block,
            lora,
            rope: Rope::new(cfg, &[positions], h * w, &Device::Cpu)?,
            adaln: (Tensor::randn(0f32, 1.0, (1, cfg.adaln_dim()), &Device::Cpu)? * 0.1)?,
            x: Tensor::randn(0f32, 1.0, (1, h * w, cfg.dim), &Device::Cpu)?,
        })
    }

    /// Forward with a graph from a trainable input, then backward of Σ y: the store and the input.
    fn backward(&self, opts: ComputeOpts) -> Result<(candle_core::backprop::GradStore, Var)> {
        let x = Var::from_tensor(&self.x)?;
        let view = self.lora.view(true, 1.0);
        let y = self.block.forward(x.as_tensor(), None, &self.rope, &self.adaln, &view, opts)?;
        Ok((y.sum_all()?.backward()?, x))
    }

    /// Shapes of the gradients that are neither the input's nor a LoRA tensor's: gradients of constants,
    /// computed and kept although nothing reads them.
    fn unread_gradients(&self, opts: ComputeOpts) -> Result<Vec<Vec<usize>>> {
        let (store, x) = self.backward(opts)?;
        let mut wanted = vec![x.as_tensor().id()];
        wanted.extend(self.lora.vars().iter().map(|(_, v)| v.as_tensor().id()));
        let mut shapes: Vec<Vec<usize>> = store
            .get_ids()
            .filter(|id| !wanted.contains(id))
            .filter_map(|&id| store.get_id(id).map(|g| g.dims().to_vec()))
            .collect();
        shapes.sort();
        Ok(shapes)
    }
}

/// candle stores the gradient of a frozen norm weight under the id of its broadcast view, never under the
/// weight's own, so the test compares the stores: the fused norm drops exactly one unread, input-sized
/// gradient per norm (four in the block, two for the qk-norm) and nothing else.
#[test]
fn fused_norm_computes_no_norm_weight_gradients() -> Result<()> {
    let src = zimage::source()?;
    let cfg = src.config.clone();
    let case = BlockCase::new(&src, 4, (4, 6))?;
    let mut plain = case.unread_gradients(ComputeOpts::default())?;
    let fused = case.unread_gradients(ComputeOpts { fused_norm: true, ..ComputeOpts::default() })?;
    for shape in &fused {
        let i =
            plain.iter().position(|s| s == shape).context("the fused norm stores a gradient the plain one does not")?;
        plain.remove(i);
    }
    let s = 4 * 6;
    let mut expected = vec![vec![1, s, cfg.dim]; 4];
    if cfg.qk_norm {
        expected.extend([vec![1, s, cfg.n_heads, cfg.head_dim()], vec![1, s, cfg.n_heads, cfg.head_dim()]]);
    }
    expected.sort();
    assert_eq!(plain, expected, "the gradients only the plain path stores: one per norm weight");
    Ok(())
}
