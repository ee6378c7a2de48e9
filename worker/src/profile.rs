//! Where the time of a forward + backward goes, op site by op site (`acrf bench --profile`).
//!
//! The model opens a span around each op site of a block (norms, projections, qk-norm with RoPE, attention, the
//! feed-forward, the LoRA branches) and names the phase it is in (forward, recompute, backward); a hand-written
//! backward runs in a span of the site whose forward made it. Each span records the host's wall time and, on a
//! GPU, a pair of CUDA events, so a table shows beside each other how long the GPU worked on a site and how long
//! the host took to queue that work: GPU time well above host time means the site is GPU-bound; host time near
//! or above GPU time means it is bound by kernel launches. The events are read once per step, after the step's
//! last kernel. Spans nest (a LoRA branch inside its projection): a site is charged its own time, without its
//! children's.
//!
//! Disabled, a span costs one thread-local read. Only the thread that trains records.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Result};

pub use crate::timing::Phase;

/// An op site of a block, or of the model around the blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Site {
    /// RMSNorms with their adaLN scale or gate and the residual add.
    Norm,
    /// adaLN: the modulation linear and its chunks.
    Modulation,
    /// The frozen q, k and v projections.
    Qkv,
    /// qk-norm and the rotary embedding.
    QkNormRope,
    /// softmax(q kᵀ) v.
    Attention,
    /// The frozen output projection.
    OutProj,
    /// The frozen SwiGLU feed-forward: w1, w3, the gate and w2.
    FeedForward,
    /// The LoRA branches of every adapted linear.
    Lora,
    /// Embedding, the final layer and the loss: once per sample, outside the blocks.
    EmbedHead,
}

impl Site {
    pub const ALL: [Site; 9] = [
        Site::Norm,
        Site::Modulation,
        Site::Qkv,
        Site::QkNormRope,
        Site::Attention,
        Site::OutProj,
        Site::FeedForward,
        Site::Lora,
        Site::EmbedHead,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Site::Norm => "norm (+scale, +residual)",
            Site::Modulation => "modulation (adaLN)",
            Site::Qkv => "q/k/v projections",
            Site::QkNormRope => "qk-norm + RoPE",
            Site::Attention => "attention core",
            Site::OutProj => "out projection",
            Site::FeedForward => "feed-forward (SwiGLU)",
            Site::Lora => "LoRA branches",
            Site::EmbedHead => "embed, final layer, loss",
        }
    }

    /// The site of a frozen linear, from its diffusers module name.
    pub fn of_linear(name: &str) -> Site {
        let last = name.rsplit('.').find(|p| p.parse::<usize>().is_err()).unwrap_or(name);
        match last {
            "to_q" | "to_k" | "to_v" => Site::Qkv,
            "to_out" => Site::OutProj,
            "w1" | "w2" | "w3" => Site::FeedForward,
            "adaLN_modulation" => Site::Modulation,
            _ => Site::EmbedHead,
        }
    }
}

/// The passes of a forward + backward that the model names ([`pass`]); spans outside them are not charged.
pub const PASSES: [Phase; 3] = [Phase::Forward, Phase::Recompute, Phase::Backward];

/// Time charged to one (site, pass), summed over the steps recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Cost {
    /// Device time in ms (from CUDA events); `None` on a CPU, where host time is all there is.
    pub gpu_ms: Option<f64>,
    /// Host wall time in ms.
    pub host_ms: f64,
    /// Spans.
    pub calls: u64,
}

impl Cost {
    fn add(&mut self, gpu_ms: Option<f64>, host_ms: f64) {
        self.gpu_ms = match (self.gpu_ms, gpu_ms) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        self.host_ms += host_ms;
        self.calls += 1;
    }

    /// The time that bounds the site: the GPU's where measured, else the host's.
    pub fn ms(&self) -> f64 {
        self.gpu_ms.unwrap_or(self.host_ms)
    }
}

/// What a profile measured: the cost of every (site, pass) and of every pass as a whole, per step.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub steps: u64,
    pub sites: BTreeMap<(Site, Phase), Cost>,
    pub passes: BTreeMap<Phase, Cost>,
}

/// As JSON: the step count and [`Profile::rows`] per step.
impl serde::Serialize for Profile {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = s.serialize_struct("Profile", 2)?;
        out.serialize_field("steps", &self.steps)?;
        out.serialize_field("per_step", &self.per_step().rows())?;
        out.end()
    }
}

impl Profile {
    /// The same profile per step.
    pub fn per_step(&self) -> Profile {
        let n = self.steps.max(1) as f64;
        let scale =
            |c: &Cost| Cost { gpu_ms: c.gpu_ms.map(|g| g / n), host_ms: c.host_ms / n, calls: c.calls / n as u64 };
        Profile {
            steps: 1,
            sites: self.sites.iter().map(|(k, c)| (*k, scale(c))).collect(),
            passes: self.passes.iter().map(|(k, c)| (*k, scale(c))).collect(),
        }
    }

    /// A pass's time that no site claims: candle's autograd (graph walk, gradient accumulation) and the glue
    /// between sites.
    pub fn unclaimed(&self, pass: Phase) -> Cost {
        let whole = self.passes.get(&pass).copied().unwrap_or_default();
        let claimed: Vec<&Cost> = self.sites.iter().filter(|((_, p), _)| *p == pass).map(|(_, c)| c).collect();
        let host = claimed.iter().map(|c| c.host_ms).sum::<f64>();
        let gpu = claimed.iter().map(|c| c.gpu_ms.unwrap_or(0.0)).sum::<f64>();
        Cost { gpu_ms: whole.gpu_ms.map(|w| (w - gpu).max(0.0)), host_ms: (whole.host_ms - host).max(0.0), calls: 0 }
    }
}

/// One (site, pass) of a profile, for JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub site: String,
    pub pass: Phase,
    #[serde(flatten)]
    pub cost: Cost,
}

impl Profile {
    /// Every (site, pass) with its cost, then per pass the time no site claims ("other") and the whole.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .sites
            .iter()
            .map(|((site, pass), cost)| Row { site: site.label().into(), pass: *pass, cost: *cost })
            .collect();
        for pass in PASSES {
            if let Some(whole) = self.passes.get(&pass) {
                rows.push(Row { site: "other (autograd, glue)".into(), pass, cost: self.unclaimed(pass) });
                rows.push(Row { site: "whole pass".into(), pass, cost: *whole });
            }
        }
        rows
    }

    /// A table of milliseconds per step: a row per site, a column per pass (on a GPU two: the device's time and
    /// the host's), then the site's share of the whole forward + backward.
    pub fn to_text(&self) -> String {
        let p = self.per_step();
        let gpu = p.passes.values().any(|c| c.gpu_ms.is_some());
        let mut head = format!("{:<26}", "ms per step");
        for pass in ["forward", "recompute", "backward"] {
            head +=
                &if gpu { format!(" {:>10} {:>10}", format!("{pass} GPU"), "host") } else { format!(" {pass:>10}") };
        }
        let total = PASSES.iter().filter_map(|q| p.passes.get(q)).map(Cost::ms).sum::<f64>().max(f64::MIN_POSITIVE);
        let line = |label: &str, costs: [Option<Cost>; 3]| {
            let mut l = format!("{label:<26}");
            for c in &costs {
                l += &match (c, gpu) {
                    (None, true) => format!(" {:>10} {:>10}", "-", "-"),
                    (None, false) => format!(" {:>10}", "-"),
                    (Some(c), true) => format!(" {:>10.2} {:>10.2}", c.gpu_ms.unwrap_or(0.0), c.host_ms),
                    (Some(c), false) => format!(" {:>10.2}", c.host_ms),
                };
            }
            let ms: f64 = costs.iter().flatten().map(Cost::ms).sum();
            l + &format!(" {:>8.1}%\n", 100.0 * ms / total)
        };
        let mut out = head + "    share\n";
        for site in Site::ALL {
            let costs = PASSES.map(|pass| p.sites.get(&(site, pass)).copied());
            if costs.iter().any(Option::is_some) {
                out += &line(site.label(), costs);
            }
        }
        out += &line("other (autograd, glue)", PASSES.map(|pass| p.passes.get(&pass).map(|_| p.unclaimed(pass))));
        out + &line("whole pass", PASSES.map(|pass| p.passes.get(&pass).copied()))
    }
}

/// A span that has closed but whose GPU time is not read yet.
struct Closed {
    site: Site,
    pass: Phase,
    host_ms: f64,
    /// The start and end events, and the indices of the spans nested directly inside.
    events: Option<(usize, usize)>,
    children: Vec<usize>,
}

struct Open {
    site: Site,
    pass: Phase,
    started: Instant,
    start_event: Option<usize>,
    child_host_ms: f64,
    children: Vec<usize>,
}

/// A pass that has ended but whose GPU time is not read yet.
struct PassRecord {
    pass: Phase,
    host_ms: f64,
    events: Option<(usize, usize)>,
}

struct Recorder {
    gpu: Option<gpu::Events>,
    pass: Option<(Phase, Instant, Option<usize>)>,
    open: Vec<Open>,
    closed: Vec<Closed>,
    passes: Vec<PassRecord>,
    profile: Profile,
}

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

/// Starts recording on this thread, with CUDA events if `device` is a GPU.
pub fn start(device: &Device) -> Result<()> {
    let gpu = gpu::Events::new(device)?;
    RECORDER.with(|r| {
        *r.borrow_mut() = Some(Recorder {
            gpu,
            pass: None,
            open: Vec::new(),
            closed: Vec::new(),
            passes: Vec::new(),
            profile: Profile::default(),
        })
    });
    Ok(())
}

/// Stops recording and returns what was recorded: spans since the last [`step_done`] are added, but not
/// counted as a step.
pub fn finish() -> Result<Profile> {
    with(|r| {
        r.end_pass();
        r.flush()
    })
    .transpose()?;
    let recorder = RECORDER.with(|r| r.borrow_mut().take());
    Ok(recorder.map(|r| r.profile).unwrap_or_default())
}

fn with<R>(f: impl FnOnce(&mut Recorder) -> R) -> Option<R> {
    RECORDER.with(|r| r.borrow_mut().as_mut().map(f))
}

/// Enters `pass`, ending the one before.
pub fn pass(pass: Phase) {
    with(|r| {
        r.end_pass();
        let event = r.gpu.as_mut().and_then(|g| g.record());
        r.pass = Some((pass, Instant::now(), event));
    });
}

/// Ends the current pass: what follows belongs to no pass (the loss's bookkeeping, the optimizer).
pub fn end_pass() {
    with(Recorder::end_pass);
}

/// Counts one step: reads the GPU times of its spans (waiting for its last kernel) and adds them up.
pub fn step_done() -> Result<()> {
    with(|r| {
        r.end_pass();
        let out = r.flush();
        r.profile.steps += 1;
        out
    })
    .unwrap_or(Ok(()))
}

/// A span of `site` until the guard drops; nothing when not recording.
#[must_use = "the span ends when the guard drops"]
pub struct Span(bool);

pub fn span(site: Site) -> Span {
    Span(
        with(|r| {
            let Some((pass, _, _)) = r.pass else { return false };
            let start_event = r.gpu.as_mut().and_then(|g| g.record());
            r.open.push(Open {
                site,
                pass,
                started: Instant::now(),
                start_event,
                child_host_ms: 0.0,
                children: Vec::new(),
            });
            true
        })
        .unwrap_or(false),
    )
}

/// The site of the innermost open span: a backward made in a site's forward is charged to that site.
pub fn current_site() -> Option<Site> {
    with(|r| r.open.last().map(|o| o.site)).flatten()
}

impl Drop for Span {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        with(|r| {
            let Some(open) = r.open.pop() else { return };
            let host_ms = open.started.elapsed().as_secs_f64() * 1e3;
            let end = r.gpu.as_mut().and_then(|g| g.record());
            let index = r.closed.len();
            r.closed.push(Closed {
                site: open.site,
                pass: open.pass,
                host_ms: host_ms - open.child_host_ms,
                events: open.start_event.zip(end),
                children: open.children,
            });
            if let Some(parent) = r.open.last_mut() {
                parent.child_host_ms += host_ms;
                parent.children.push(index);
            }
        });
    }
}

impl Recorder {
    fn end_pass(&mut self) {
        let Some((pass, started, start)) = self.pass.take() else { return };
        let end = self.gpu.as_mut().and_then(|g| g.record());
        self.passes.push(PassRecord { pass, host_ms: started.elapsed().as_secs_f64() * 1e3, events: start.zip(end) });
    }

    fn flush(&mut self) -> Result<()> {
        let elapsed = |gpu: &Option<gpu::Events>, ev: Option<(usize, usize)>| -> Result<Option<f64>> {
            match (gpu, ev) {
                (Some(g), Some((a, b))) => g.elapsed_ms(a, b).map(Some),
                _ => Ok(None),
            }
        };
        let mut inclusive = Vec::with_capacity(self.closed.len());
        for c in &self.closed {
            inclusive.push(elapsed(&self.gpu, c.events)?);
        }
        for (c, total) in self.closed.iter().zip(&inclusive) {
            let own = total.map(|t| t - c.children.iter().filter_map(|&i| inclusive[i]).sum::<f64>());
            self.profile.sites.entry((c.site, c.pass)).or_default().add(own.map(|t| t.max(0.0)), c.host_ms);
        }
        for p in &self.passes {
            let gpu = elapsed(&self.gpu, p.events)?;
            self.profile.passes.entry(p.pass).or_default().add(gpu, p.host_ms);
        }
        self.closed.clear();
        self.passes.clear();
        if let Some(g) = self.gpu.as_mut() {
            g.recycle();
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{Device, Result};
    use cudarc::driver::sys::CUevent_flags;
    use cudarc::driver::{CudaEvent, CudaStream};

    /// Timing events on the device's stream, reused from step to step.
    pub struct Events {
        stream: std::sync::Arc<CudaStream>,
        events: Vec<CudaEvent>,
        used: usize,
    }

    impl Events {
        pub fn new(device: &Device) -> Result<Option<Events>> {
            let Device::Cuda(dev) = device else { return Ok(None) };
            Ok(Some(Events { stream: dev.cuda_stream(), events: Vec::new(), used: 0 }))
        }

        /// Records an event now on the stream; `None` if that failed (the span then has host time only).
        pub fn record(&mut self) -> Option<usize> {
            if self.used == self.events.len() {
                self.events.push(self.stream.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).ok()?);
            }
            self.events[self.used].record(&self.stream).ok()?;
            self.used += 1;
            Some(self.used - 1)
        }

        pub fn elapsed_ms(&self, start: usize, end: usize) -> Result<f64> {
            Ok(self.events[start].elapsed_ms(&self.events[end]).w()? as f64)
        }

        pub fn recycle(&mut self) {
            self.used = 0;
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use candle_core::{Device, Result};

    /// Without CUDA there are no device events: every span has host time only.
    pub enum Events {}

    impl Events {
        pub fn new(_: &Device) -> Result<Option<Events>> {
            Ok(None)
        }

        pub fn record(&mut self) -> Option<usize> {
            match *self {}
        }

        pub fn elapsed_ms(&self, _: usize, _: usize) -> Result<f64> {
            match *self {}
        }

        pub fn recycle(&mut self) {
            match *self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_spans_charge_their_own_time_and_passes_their_whole_time() -> Result<()> {
        let sleep = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
        {
            let _outside = span(Site::Norm);
        }
        start(&Device::Cpu)?;
        {
            // Outside a pass nothing is charged to a site.
            let _s = span(Site::Norm);
            sleep(5);
        }
        pass(Phase::Forward);
        {
            let _q = span(Site::Qkv);
            sleep(20);
            let _l = span(Site::Lora);
            assert_eq!(current_site(), Some(Site::Lora));
            sleep(10);
        }
        pass(Phase::Backward);
        sleep(5);
        step_done()?;
        let p = finish()?;
        assert_eq!(p.steps, 1);
        let q = p.sites[&(Site::Qkv, Phase::Forward)];
        let l = p.sites[&(Site::Lora, Phase::Forward)];
        assert!((20.0..29.0).contains(&q.host_ms), "the projection's own time: {q:?}");
        assert!((10.0..19.0).contains(&l.host_ms), "{l:?}");
        assert!(!p.sites.contains_key(&(Site::Norm, Phase::Forward)));
        let fwd = p.passes[&Phase::Forward];
        assert!(fwd.host_ms >= q.host_ms + l.host_ms);
        assert!(p.unclaimed(Phase::Forward).host_ms < 5.0, "{:?}", p.unclaimed(Phase::Forward));
        assert!(p.passes[&Phase::Backward].host_ms >= 5.0);
        assert_eq!(current_site(), None);
        Ok(())
    }

    #[test]
    fn linear_sites_follow_the_module_names() {
        assert_eq!(Site::of_linear("layers.3.attention.to_q"), Site::Qkv);
        assert_eq!(Site::of_linear("layers.3.attention.to_out.0"), Site::OutProj);
        assert_eq!(Site::of_linear("noise_refiner.0.feed_forward.w2"), Site::FeedForward);
        assert_eq!(Site::of_linear("layers.0.adaLN_modulation.0"), Site::Modulation);
        assert_eq!(Site::of_linear("all_x_embedder.2-1"), Site::EmbedHead);
    }
}
