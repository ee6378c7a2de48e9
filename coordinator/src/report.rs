//! `acrf report`: a run's or a sweep's metrics and samples as PNG plots and one self-contained `report.html`
//! (the plots and sample thumbnails inlined as base64 PNGs, no script, nothing fetched).
//!
//! Loss by anchor σ uses the per-slot losses that every step reports next to its slots' anchors, grouped by
//! anchor, over the first and the last quarter of the run: how much each noise level learned. The step loss
//! alone could not show it, since it mixes every anchor of the step.
//!
//! For ablations (`stats.rs`) it adds the fixed evaluation loss, the spread of the loss and the gradient norm,
//! and the gradient's share per module, per run and over the runs that differ only in their seed (plots with
//! a ± std band), and writes them as `stats.json` too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use acrf_common::protocol::{PromptDrift, TurboDrift};
use acrf_common::store::{BlockingStore, Location};
use acrf_worker::run::SAMPLE_PROMPTS;
use acrf_worker::sample;
use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use plotters::prelude::*;

use crate::observe::METRICS;
use crate::stats::{GroupStats, MeanStd, Member, Record, RunStats};
use crate::sweep;

/// The font every plot is drawn with, vendored (see `assets/fonts/LICENSE-DejaVu.txt`) so that a report looks
/// the same everywhere and needs no system fonts.
const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
/// Plot size in pixels.
const PLOT: (u32, u32) = (960, 480);
/// The longest side of a sample thumbnail in the page.
const THUMBNAIL: u32 = 192;
/// Tableau 10: distinct on screen and in print.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// (x, y) points of one line.
type Curve = Vec<(f64, f64)>;

/// A run as the report shows it.
struct Run {
    name: String,
    settings: Vec<(String, String)>,
    status: Option<String>,
    records: Vec<Record>,
    prompts: Vec<String>,
    /// PNG bytes by (step, prompt index).
    samples: BTreeMap<(u64, usize), Vec<u8>>,
}

impl Run {
    fn read(folder: &BlockingStore, name: &str) -> Result<Run> {
        let records = match folder.get_if_exists(METRICS)? {
            Some(bytes) => String::from_utf8_lossy(&bytes)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).with_context(|| folder.url_of(METRICS)))
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
        let prompts = match folder.get_if_exists(SAMPLE_PROMPTS)? {
            Some(bytes) => serde_json::from_slice(&bytes).with_context(|| folder.url_of(SAMPLE_PROMPTS))?,
            None => Vec::new(),
        };
        let mut samples = BTreeMap::new();
        for (rel, _) in folder.list("samples")? {
            let key = rel
                .strip_prefix("samples/step")
                .and_then(|r| r.strip_suffix(".png"))
                .and_then(|r| r.split_once('-'))
                .and_then(|(step, i)| Some((step.parse().ok()?, i.parse().ok()?)));
            if let Some(key) = key {
                samples.insert(key, thumbnail(&folder.get(&rel)?)?);
            }
        }
        Ok(Run { name: name.to_string(), settings: Vec::new(), status: None, records, prompts, samples })
    }

    fn series(&self, value: impl Fn(&Record) -> Option<f64>) -> Vec<(f64, f64)> {
        self.records.iter().filter_map(|r| Some((r.step as f64, value(r).filter(|v| v.is_finite())?))).collect()
    }

    /// The mean over prompts of `value` of the trained LoRA's drift at every sample point, and of the
    /// baseline's (the base model without LoRA) as a line over the same steps.
    fn drift(&self, value: fn(&PromptDrift) -> f64) -> (Curve, Curve) {
        let mean = |ds: &[PromptDrift]| {
            (!ds.is_empty()).then(|| ds.iter().map(value).sum::<f64>() / ds.len() as f64).filter(|v| v.is_finite())
        };
        let measured: Vec<(f64, &TurboDrift)> =
            self.records.iter().filter_map(|r| Some((r.step as f64, r.turbo_drift.as_ref()?))).collect();
        let lora = measured.iter().filter_map(|(step, d)| Some((*step, mean(&d.prompts)?))).collect();
        let baseline = measured
            .last()
            .and_then(|(_, d)| mean(&d.baseline))
            .map(|b| {
                let first = self.records.first().map_or(0.0, |r| r.step as f64);
                vec![(first, b), (measured.last().map_or(first, |m| m.0), b)]
            })
            .unwrap_or_default();
        (lora, baseline)
    }

    /// Mean per-slot loss by anchor σ over `records`, σ ascending.
    fn by_anchor(records: &[Record]) -> Vec<(f64, f64)> {
        let mut sums: BTreeMap<u64, (f64, f64, usize)> = BTreeMap::new();
        for r in records {
            for (&anchor, &loss) in r.anchor_sigmas.iter().zip(&r.sample_losses) {
                if loss.is_finite() {
                    let e = sums.entry((anchor * 1e9).round() as u64).or_insert((anchor, 0.0, 0));
                    (e.1, e.2) = (e.1 + loss, e.2 + 1);
                }
            }
        }
        sums.into_values().map(|(anchor, sum, n)| (anchor, sum / n as f64)).collect()
    }

    /// Loss by anchor over the first and the last quarter of the steps.
    fn quarters(&self) -> (Curve, Curve) {
        let n = self.records.len().div_ceil(4);
        (Self::by_anchor(&self.records[..n]), Self::by_anchor(&self.records[self.records.len() - n..]))
    }
}

/// A sample shrunk for the page (and re-encoded deterministically).
fn thumbnail(png: &[u8]) -> Result<Vec<u8>> {
    let image = image::load_from_memory(png)?.to_rgb8();
    if image.width().max(image.height()) <= THUMBNAIL {
        return Ok(png.to_vec());
    }
    let scale = f64::from(THUMBNAIL) / f64::from(image.width().max(image.height()));
    let (w, h) =
        ((f64::from(image.width()) * scale).round() as u32, (f64::from(image.height()) * scale).round() as u32);
    let small = image::imageops::resize(&image, w.max(1), h.max(1), image::imageops::FilterType::Triangle);
    Ok(sample::png(&small)?)
}

/// One line of a plot, with an optional band (x, low, high) drawn faintly under it.
struct Line {
    label: Option<String>,
    points: Vec<(f64, f64)>,
    colour: RGBAColor,
    width: u32,
    band: Vec<(f64, f64, f64)>,
}

/// A line plot as PNG bytes; empty lines are left out, and a plot with no points at all says so.
fn plot(title: &str, x_desc: &str, y_desc: &str, lines: &[Line]) -> Result<Vec<u8>> {
    static FONT_LOADED: OnceLock<bool> = OnceLock::new();
    if !*FONT_LOADED.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        bail!("the vendored font does not load");
    }
    let (w, h) = PLOT;
    let mut pixels = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let bands = lines.iter().flat_map(|l| l.band.iter().flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]));
        let all: Vec<(f64, f64)> = lines.iter().flat_map(|l| l.points.iter().copied()).chain(bands).collect();
        if all.is_empty() {
            root.draw(&Text::new(format!("{title}: no data"), (20, 20), (FAMILY, 20)))?;
        } else {
            let range = |values: &mut dyn Iterator<Item = f64>| {
                let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
                let pad = if hi > lo { 0.05 * (hi - lo) } else { lo.abs().max(1e-3) * 0.5 };
                (lo - pad)..(hi + pad)
            };
            let mut chart = ChartBuilder::on(&root)
                .caption(title, (FAMILY, 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(72)
                .build_cartesian_2d(range(&mut all.iter().map(|p| p.0)), range(&mut all.iter().map(|p| p.1)))?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .label_style((FAMILY, 13))
                .y_label_formatter(&|v| format!("{v:.3e}"))
                .draw()?;
            for line in lines.iter().filter(|l| l.band.len() > 1) {
                let outline = line
                    .band
                    .iter()
                    .map(|&(x, _, hi)| (x, hi))
                    .chain(line.band.iter().rev().map(|&(x, lo, _)| (x, lo)));
                chart.draw_series(std::iter::once(Polygon::new(
                    outline.collect::<Vec<_>>(),
                    line.colour.mix(0.18).filled(),
                )))?;
            }
            for line in lines.iter().filter(|l| !l.points.is_empty()) {
                let style = line.colour.stroke_width(line.width);
                let drawn = chart.draw_series(LineSeries::new(line.points.iter().copied(), style))?;
                if let Some(label) = &line.label {
                    drawn
                        .label(label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                }
            }
            if lines.iter().any(|l| l.label.is_some()) {
                chart
                    .configure_series_labels()
                    .label_font((FAMILY, 13))
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.4))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()?;
            }
        }
        root.present()?;
    }
    let image = image::RgbImage::from_raw(w, h, pixels).ok_or_else(|| anyhow!("plot buffer of the wrong size"))?;
    Ok(sample::png(&image)?)
}

/// A group's name: the settings it shares, or "all" when the runs differ in their seed only.
fn group_name(g: &GroupStats) -> String {
    if g.settings.is_empty() {
        return "all".into();
    }
    g.settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// One line per group: the mean over its seeds, with a ± std band.
fn group_lines(groups: &[GroupStats], series: impl Fn(&GroupStats) -> &[(u64, MeanStd)]) -> Vec<Line> {
    groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let s = series(g);
            let colour = COLOURS[i % COLOURS.len()];
            Line {
                label: Some(format!("{} (n={})", group_name(g), g.runs.len())),
                points: s.iter().map(|&(x, m)| (x as f64, m.mean)).collect(),
                colour: colour.to_rgba(),
                width: 2,
                band: s.iter().map(|&(x, m)| (x as f64, m.mean - m.std, m.mean + m.std)).collect(),
            }
        })
        .collect()
}

/// The Turbo drift plots as (file name, caption, PNG): none when no run measured drift.
fn drift_plots(runs: &[Run]) -> Result<Vec<(&'static str, String, Vec<u8>)>> {
    if !runs.iter().any(|r| r.records.iter().any(|x| x.turbo_drift.is_some())) {
        return Ok(Vec::new());
    }
    let lines = |value: fn(&PromptDrift) -> f64| -> Vec<Line> {
        let mut lines = Vec::new();
        for (i, r) in runs.iter().enumerate() {
            let (lora, baseline) = r.drift(value);
            let colour = COLOURS[i % COLOURS.len()];
            lines.push(Line {
                label: Some(r.name.clone()),
                points: lora,
                colour: colour.to_rgba(),
                width: 2,
                band: Vec::new(),
            });
            lines.push(Line {
                label: Some(format!("{} base model (no LoRA)", r.name)),
                points: baseline,
                colour: colour.mix(0.4),
                width: 1,
                band: Vec::new(),
            });
        }
        lines
    };
    let of = runs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ");
    Ok(vec![
        (
            "turbo_drift.png",
            format!(
                "Turbo drift: mean absolute latent difference between the Turbo render and the many-step reference, \
                 mean over the sample prompts (lower: closer), the base model as a thin line: {of}"
            ),
            plot("turbo drift", "step", "latent MAD, turbo vs reference", &lines(|d| d.latent_mad))?,
        ),
        (
            "turbo_sharpness.png",
            format!(
                "Sharpness ratio: high-frequency energy of the Turbo render over the reference's, mean over the \
                 sample prompts (below 1: blurrier), the base model as a thin line: {of}"
            ),
            plot("turbo sharpness", "step", "sharpness ratio", &lines(|d| d.sharpness))?,
        ),
    ])
}

/// The last drift of every run that measured one, per prompt, against the baseline.
fn drift_table(runs: &[Run]) -> String {
    let mut html = String::from(
        "<table><thead><tr><th>run</th><th>step</th><th>prompt</th><th>latent MAD</th><th>PSNR dB</th>\
         <th>sharpness</th><th>base MAD</th><th>base PSNR dB</th><th>base sharpness</th></tr></thead><tbody>",
    );
    for r in runs {
        let Some((step, d)) = r.records.iter().rev().find_map(|x| Some((x.step, x.turbo_drift.as_ref()?))) else {
            continue;
        };
        for (i, p) in d.prompts.iter().enumerate() {
            let b = d.baseline.get(i);
            let prompt = r.prompts.get(i).cloned().unwrap_or_else(|| format!("prompt {i}"));
            html.push_str(&format!(
                "<tr><td>{}</td><td>{step}</td><td>{}</td><td>{:.4}</td><td>{:.1}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&r.name),
                escape(&prompt),
                p.latent_mad,
                p.psnr,
                p.sharpness,
                b.map_or("–".into(), |b| format!("{:.4}", b.latent_mad)),
                b.map_or("–".into(), |b| format!("{:.1}", b.psnr)),
                b.map_or("–".into(), |b| format!("{:.3}", b.sharpness)),
            ));
        }
    }
    html.push_str("</tbody></table>");
    html
}

/// The report's plots as (file name, caption, PNG).
fn plots(runs: &[Run], groups: &[GroupStats]) -> Result<Vec<(&'static str, String, Vec<u8>)>> {
    let colour = |i: usize| COLOURS[i % COLOURS.len()];
    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    let per_run = |value: fn(&Record) -> Option<f64>| -> Vec<Line> {
        runs.iter()
            .enumerate()
            .map(|(i, r)| Line {
                label: Some(r.name.clone()),
                points: r.series(value),
                colour: colour(i).to_rgba(),
                width: 2,
                band: Vec::new(),
            })
            .collect()
    };
    let mut loss = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        loss.push(Line {
            label: None,
            points: r.series(|x| x.loss),
            colour: colour(i).mix(0.3),
            width: 1,
            band: Vec::new(),
        });
        loss.push(Line {
            label: Some(r.name.clone()),
            points: r.series(|x| x.ema_loss),
            colour: colour(i).to_rgba(),
            width: 2,
            band: Vec::new(),
        });
    }
    let mut sigma = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let (first, last) = r.quarters();
        sigma.push(Line {
            label: Some(format!("{} (first 25%)", r.name)),
            points: first,
            colour: colour(i).mix(0.4),
            width: 1,
            band: Vec::new(),
        });
        sigma.push(Line {
            label: Some(format!("{} (last 25%)", r.name)),
            points: last,
            colour: colour(i).to_rgba(),
            width: 3,
            band: Vec::new(),
        });
    }
    let of = names.join(", ");
    let mut seeds = Vec::new();
    if groups.iter().any(|g| !g.eval.is_empty()) {
        seeds.push((
            "eval_loss.png",
            "Fixed evaluation loss (held-out items, the same σ grid and noise for every job), mean ± std over seeds"
                .to_string(),
            plot("evaluation loss", "step", "velocity MSE", &group_lines(groups, |g| &g.eval))?,
        ));
    }
    if groups.len() < runs.len() {
        seeds.push((
            "ema_loss_seeds.png",
            "EMA training loss, mean ± std over seeds".to_string(),
            plot("EMA loss over seeds", "step", "loss", &group_lines(groups, |g| &g.ema_loss))?,
        ));
    }
    let mut all = vec![
        ("loss.png", format!("Loss (faint) and EMA loss per step: {of}"), plot("loss", "step", "loss", &loss)?),
        ("lr.png", format!("Learning rate: {of}"), plot("learning rate", "step", "lr", &per_run(|x| x.lr))?),
        (
            "grad_norm.png",
            format!("Gradient norm before clipping: {of}"),
            plot("gradient norm", "step", "L2 norm", &per_run(|x| x.grad_norm))?,
        ),
        (
            "loss_by_sigma.png",
            format!("Mean per-sample loss by anchor σ, first and last quarter of the steps: {of}"),
            plot("loss by anchor σ", "anchor σ", "loss", &sigma)?,
        ),
    ];
    all.extend(seeds);
    Ok(all)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn data_url(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
}

fn number(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite()).map_or("–".into(), |v| format!("{v:.4e}"))
}

/// The final metrics of every run, one row each.
fn table(runs: &[Run]) -> String {
    let keys: Vec<&str> =
        runs.first().map(|r| r.settings.iter().map(|(k, _)| k.as_str()).collect()).unwrap_or_default();
    let mut html = String::from("<table><thead><tr><th>run</th>");
    for k in &keys {
        html.push_str(&format!("<th>{}</th>", escape(k)));
    }
    html.push_str("<th>status</th><th>steps</th><th>final loss</th><th>final EMA loss</th><th>best EMA loss</th><th>final lr</th><th>final grad norm</th><th>final eval loss</th></tr></thead><tbody>");
    for r in runs {
        let last = r.records.last();
        let best = r
            .records
            .iter()
            .filter_map(|x| Some((x.step, x.ema_loss.filter(|v| v.is_finite())?)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        html.push_str(&format!("<tr><td>{}</td>", escape(&r.name)));
        for (_, v) in &r.settings {
            html.push_str(&format!("<td>{}</td>", escape(v)));
        }
        html.push_str(&format!(
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(r.status.as_deref().unwrap_or("–")),
            last.map_or("0".into(), |x| x.step.to_string()),
            number(last.and_then(|x| x.loss)),
            number(last.and_then(|x| x.ema_loss)),
            best.map_or("–".into(), |(step, v)| format!("{v:.4e} (step {step})")),
            number(last.and_then(|x| x.lr)),
            number(last.and_then(|x| x.grad_norm)),
            number(r.records.iter().rev().find_map(|x| x.eval_loss)),
        ));
    }
    html.push_str("</tbody></table>");
    html
}

fn mean_std(m: Option<MeanStd>, scale: f64) -> String {
    match m {
        Some(m) if m.n > 1 => format!("{:.4} ± {:.4}", m.mean * scale, m.std * scale),
        Some(m) => format!("{:.4}", m.mean * scale),
        None => "–".into(),
    }
}

/// The ablation statistics, one row per group of runs that differ only in their seed (mean ± std over seeds):
/// the yardstick, the spread of the loss and the gradient, and the gradient's share per module.
fn stats_table(groups: &[GroupStats]) -> String {
    let modules: Vec<&String> = {
        let mut m: Vec<&String> = groups.iter().flat_map(|g| g.module_shares.keys()).collect();
        m.sort();
        m.dedup();
        m
    };
    let mut html = String::from(
        "<table><thead><tr><th>settings</th><th>seeds</th><th>final eval loss</th><th>loss (last 25%)</th>\
         <th>var of the step loss</th><th>its CV (std/mean)</th><th>var of the per-sample loss</th>\
         <th>var of the grad norm</th>",
    );
    for m in &modules {
        html.push_str(&format!("<th>{} %</th>", escape(m)));
    }
    html.push_str("</tr></thead><tbody>");
    for g in groups {
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            escape(&group_name(g)),
            g.runs.len(),
            mean_std(g.final_eval, 1.0),
            mean_std(g.loss, 1.0),
            mean_std(g.loss_var, 1.0),
            mean_std(g.loss_cv, 1.0),
            mean_std(g.sample_loss_var, 1.0),
            mean_std(g.grad_norm_var, 1.0),
        ));
        for m in &modules {
            html.push_str(&format!("<td>{}</td>", mean_std(g.module_shares.get(*m).copied(), 100.0)));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    html
}

/// The step loss per epoch (the report's table format): a few epochs — the first, the 10th, the quarters and the
/// last that every group reached — each as the mean ± std over the seeds of the epoch's mean step loss.
fn epoch_table(groups: &[GroupStats]) -> String {
    let Some(last) = groups.iter().map(|g| g.epochs.last().map_or(0, |&(e, _)| e)).min() else {
        return String::new();
    };
    let mut epochs: Vec<u64> = vec![0, 9, last / 4, last / 2, 3 * last / 4, last];
    epochs.retain(|&e| e <= last);
    epochs.sort_unstable();
    epochs.dedup();
    let mut html = String::from("<table><thead><tr><th>settings</th>");
    for e in &epochs {
        html.push_str(&format!("<th>epoch {}</th>", e + 1));
    }
    html.push_str("</tr></thead><tbody>");
    for g in groups {
        html.push_str(&format!("<tr><td>{}</td>", escape(&group_name(g))));
        for e in &epochs {
            let m = g.epochs.iter().find(|(x, _)| x == e).map(|&(_, m)| m);
            html.push_str(&format!("<td>{}</td>", mean_std(m, 1.0)));
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    html
}

/// A run's samples: a row per prompt, a column per step.
fn sample_grid(r: &Run) -> String {
    let steps: Vec<u64> = {
        let mut s: Vec<u64> = r.samples.keys().map(|(step, _)| *step).collect();
        s.dedup();
        s
    };
    let prompts = r.samples.keys().map(|(_, i)| i + 1).max().unwrap_or(0);
    if steps.is_empty() {
        return format!("<h3>{}</h3><p class=\"muted\">no samples</p>", escape(&r.name));
    }
    let mut html = format!("<h3>{}</h3><table class=\"grid\"><thead><tr><th>prompt</th>", escape(&r.name));
    for s in &steps {
        html.push_str(&format!("<th>step {s}</th>"));
    }
    html.push_str("</tr></thead><tbody>");
    for i in 0..prompts {
        let prompt = r.prompts.get(i).map_or_else(|| format!("prompt {i}"), |p| p.clone());
        html.push_str(&format!("<tr><td class=\"prompt\">{}</td>", escape(&prompt)));
        for s in &steps {
            match r.samples.get(&(*s, i)) {
                Some(png) => html.push_str(&format!(
                    "<td><img src=\"{}\" alt=\"{} step {s}, prompt {i}\"></td>",
                    data_url(png),
                    escape(&r.name)
                )),
                None => html.push_str("<td></td>"),
            }
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    html
}

const STYLE: &str = "body{font:14px/1.45 sans-serif;margin:24px;color:#222;max-width:1280px}\
h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:15px}.muted{color:#666}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}\
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555}\
.grid img{display:block;width:160px;height:auto}.prompt{max-width:220px}";

type Plots = [(&'static str, String, Vec<u8>)];

fn figures(html: &mut String, plots: &Plots) {
    for (file, caption, png) in plots {
        html.push_str(&format!(
            "<figure><img src=\"{}\" alt=\"{c}\" title=\"{file}\"><figcaption>{c}</figcaption></figure>",
            data_url(png),
            c = escape(caption)
        ));
    }
}

fn page(title: &str, source: &str, runs: &[Run], groups: &[GroupStats], plots: &Plots, drift: &Plots) -> String {
    let mut html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>{STYLE}</style></head>\
         <body><h1>{t}</h1><p class=\"muted\">from {}</p><h2>Final metrics</h2>{}<h2>Statistics</h2>\
         <p class=\"muted\">Over the runs that differ only in their seed, mean ± std over the seeds. Spreads are over \
         the last 25% of each run's steps; module shares are of the squared gradient norm.</p>{}\
         <h3>Loss per epoch</h3><p class=\"muted\">The mean step loss of each epoch, mean ± std over the seeds.</p>{}\
         <h2>Curves</h2>",
        escape(source),
        table(runs),
        stats_table(groups),
        epoch_table(groups),
        t = escape(title),
    );
    figures(&mut html, plots);
    if !drift.is_empty() {
        html.push_str(
            "<section id=\"turbo-drift\"><h2>Turbo drift</h2><p class=\"muted\">At every sample point each prompt is \
             rendered from the same noise at the Turbo setting and at a many-step reference. A LoRA that kept \
             Turbo's few-step sampling stays near the base model's line; one that broke it drifts away and its \
             sharpness ratio falls below the base's.</p>",
        );
        figures(&mut html, drift);
        html.push_str(&drift_table(runs));
        html.push_str("</section>");
    }
    html.push_str("<h2>Samples</h2>");
    for r in runs {
        html.push_str(&sample_grid(r));
    }
    html.push_str("</body></html>\n");
    html
}

/// Writes `report.html` and the plots of the run or sweep at `url` into `out` (default: that folder, when it
/// is local); returns the page's path.
pub fn write(url: &str, out: Option<&Path>) -> Result<PathBuf> {
    let out = match (out, Location::parse(url)?) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Location::Local(dir)) => dir,
        (None, _) => bail!("{url} is not a local folder: say where to write the report with --out DIR"),
    };
    let folder = BlockingStore::from_url(url)?;
    let (title, runs) = match sweep::read_manifest(&folder)? {
        Some(m) => {
            let runs = m
                .jobs
                .iter()
                .map(|job| {
                    let mut run = Run::read(&folder.child(&job.name)?, &job.name)?;
                    run.settings = job.settings.clone();
                    run.status = Some(job.status.name().to_string());
                    Ok(run)
                })
                .collect::<Result<Vec<_>>>()?;
            (format!("acrf sweep {}", m.sweep), runs)
        }
        None => {
            if !folder.exists(METRICS)? {
                bail!("{url} holds neither a sweep ({}) nor a run ({METRICS})", sweep::MANIFEST);
            }
            let name = url.trim_end_matches('/').rsplit('/').next().unwrap_or(url).to_string();
            (format!("acrf run {name}"), vec![Run::read(&folder, &name)?])
        }
    };
    std::fs::create_dir_all(&out).with_context(|| out.display().to_string())?;
    let stats: Vec<RunStats> = runs.iter().map(|r| RunStats::of(&r.records)).collect();
    let members: Vec<_> = runs
        .iter()
        .zip(&stats)
        .map(|(r, stats)| Member { name: &r.name, settings: &r.settings, records: &r.records, stats })
        .collect();
    let groups = crate::stats::groups(&members);
    let json = serde_json::json!({
        "runs": runs.iter().zip(&stats).map(|(r, s)| serde_json::json!({"name": r.name, "settings": r.settings, "stats": s})).collect::<Vec<_>>(),
        "groups": groups,
    });
    let stats_path = out.join("stats.json");
    std::fs::write(&stats_path, serde_json::to_vec_pretty(&json)?).with_context(|| stats_path.display().to_string())?;
    let (plots, drift) = (plots(&runs, &groups)?, drift_plots(&runs)?);
    for (file, _, png) in plots.iter().chain(&drift) {
        std::fs::write(out.join(file), png).with_context(|| out.join(file).display().to_string())?;
    }
    let path = out.join("report.html");
    std::fs::write(&path, page(&title, folder.url(), &runs, &groups, &plots, &drift))
        .with_context(|| path.display().to_string())?;
    Ok(path)
}
