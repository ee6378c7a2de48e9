//! `acrf sweep` and `acrf report` with real processes: four loss modes as concurrent 2-worker groups, each
//! ending at the LoRA of the same job trained alone; a re-run that skips what is finished and continues what
//! is not; a failed job that does not stop the others; and the report of it all.

use std::path::Path;

use acrf_common::config::Config;
use acrf_coordinator::sweep::{Manifest, Status};
use acrf_tests::{acrf, assert_lora_close, final_lora, small_job, stderr, stdout};
use anyhow::Result;

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");
const MODES: [&str; 4] = ["standard", "frequency", "style", "unified"];

fn job(dir: &Path, name: &str) -> (std::path::PathBuf, Config) {
    small_job(dir, name, |c| {
        c.training.max_steps = 4;
        c.training.gradient_accumulation = 1;
        c.training.save_every_n_steps = 2;
        acrf_tests::fast_heartbeats(c);
        c.sample.prompts = vec!["a red disc".into()];
        c.sample.every_n_steps = 2;
        c.sample.steps = 2;
        c.sample.width = 32;
        c.sample.height = 32;
    })
}

fn manifest(cfg: &Config, sweep: &str) -> Result<Manifest> {
    let path = Path::new(&cfg.output).join("runs").join(sweep).join("sweep.json");
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

/// The config of one job of sweep `sweep`.
fn job_cfg(cfg: &Config, sweep: &str, job: &str) -> Config {
    Config { run_name: format!("{sweep}/{job}"), ..cfg.clone() }
}

#[test]
fn four_modes_train_as_concurrent_groups_like_alone_and_the_report_shows_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job_file, cfg) = job(dir.path(), "modes");
    let job_arg = job_file.display().to_string();
    let sweep = ["sweep", &job_arg, "--loss-modes", &MODES.join(","), "--workers", "4", "--workers-per-job", "2"];
    let sweep: Vec<&str> = sweep.into_iter().chain(["--sweep-id", "s1"]).collect();
    let out = acrf(BIN, &sweep);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("4 job(s), 4 to run, 2 at a time on 2 worker(s) each"), "{text}");
    for mode in MODES {
        assert!(text.contains(&format!("status of s1/{mode}: http://127.0.0.1:")), "{text}");
    }
    let m = manifest(&cfg, "s1")?;
    assert_eq!(m.jobs.iter().map(|j| j.name.as_str()).collect::<Vec<_>>(), MODES);
    for j in &m.jobs {
        assert_eq!((j.status, j.steps_done), (Status::Finished, Some(4)), "{j:?}");
        assert_eq!(j.settings, [("loss.loss_mode".to_string(), j.name.clone())]);
        assert_eq!(j.prefix, format!("runs/s1/{}", j.name));
        assert!(j.lora.as_deref().is_some_and(|l| l.ends_with(&format!("s1/{}.safetensors", j.name))), "{j:?}");
    }

    // Each job alone, with the same two workers: the same LoRA.
    for mode in MODES {
        let alone = ["--set", &format!("loss.loss_mode={mode}"), "--set", &format!("run_name=alone-{mode}")];
        let out = acrf(BIN, &[&["train", job_arg.as_str(), "--workers", "2"], &alone[..]].concat());
        assert!(out.status.success(), "{mode} alone: {}", stderr(&out));
        let (step, a) = final_lora(&job_cfg(&cfg, "s1", mode))?;
        let (_, b) = final_lora(&Config { run_name: format!("alone-{mode}"), ..cfg.clone() })?;
        assert_eq!(step, 4);
        assert_lora_close(&b, &a, 1e-5, mode)?;
    }

    // A re-run skips the finished jobs; with one job's last checkpoint gone, it continues that one from step 2
    // and ends at the same LoRA.
    let style = job_cfg(&cfg, "s1", "style");
    let (_, before) = final_lora(&style)?;
    std::fs::remove_dir_all(Path::new(&cfg.output).join("runs/s1/style/ckpt/0000000004"))?;
    let out = acrf(BIN, &sweep);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("4 job(s), 1 to run"), "{}", stdout(&out));
    let (step, after) = final_lora(&style)?;
    assert_eq!(step, 4);
    assert_lora_close(&before, &after, 1e-6, "resumed style")?;
    assert!(manifest(&cfg, "s1")?.jobs.iter().all(|j| j.status == Status::Finished));

    // The report names every job, plots them together and shows their samples.
    let report_dir = dir.path().join("report");
    let root = Path::new(&cfg.output).join("runs/s1").display().to_string();
    let out = acrf(BIN, &["report", &root, "--out", &report_dir.display().to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let html = std::fs::read_to_string(report_dir.join("report.html"))?;
    for mode in MODES {
        assert!(html.contains(&format!("<td>{mode}</td>")), "{mode} missing from the table");
        assert!(html.contains(&format!("<h3>{mode}</h3>")), "{mode} has no sample grid");
        assert!(html.contains(&format!("alt=\"{mode} step 4, prompt 0\"")), "{mode} has no final sample");
    }
    let all = MODES.join(", ");
    for (file, caption) in [
        ("loss.png", format!("EMA loss per step: {all}")),
        ("lr.png", format!("Learning rate: {all}")),
        ("grad_norm.png", format!("Gradient norm before clipping: {all}")),
        ("loss_by_sigma.png", format!("anchor σ, first and last quarter of the steps: {all}")),
    ] {
        let png = std::fs::read(report_dir.join(file))?;
        let image = image::load_from_memory(&png)?;
        assert_eq!((image.width(), image.height()), (960, 480), "{file}");
        let embedded = format!("<img src=\"data:image/png;base64,{}", base64_of(&png));
        assert!(html.contains(&embedded), "{file} is not embedded");
        assert!(html.contains(&caption), "{file}: no caption naming every job");
    }
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<script"), "not self-contained");
    page_opens_in_chromium(&report_dir, dir.path())?;
    Ok(())
}

/// The browser the report is opened in: Debian's `chromium` (installed by `.ci/run`), or `ACRF_CHROMIUM`.
fn chromium() -> String {
    std::env::var("ACRF_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// Runs headless Chromium on `page` with `extra` flags and a fresh profile under `scratch`, with nothing it
/// could reach over the network; returns what the page wrote to its console.
fn chromium_console(page: &Path, scratch: &Path, extra: &[&str]) -> Result<Vec<String>> {
    let profile = tempfile::tempdir_in(scratch)?;
    let out = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "running {} (run the tests with .ci/test, which installs Debian's chromium): {e}",
                chromium()
            )
        })?;
    assert!(out.status.success(), "chromium: {}", stderr(&out));
    // Chromium logs every console message as `…:CONSOLE:<line>] "<message>", source: …`.
    Ok(stderr(&out).lines().filter(|l| l.contains(":CONSOLE")).map(str::to_string).collect())
}

/// The report loads in a real browser with an empty console, every image of it decodes, and it renders.
fn page_opens_in_chromium(report_dir: &Path, scratch: &Path) -> Result<()> {
    let page = report_dir.join("report.html");
    let shot = report_dir.join("screenshot.png");
    let console =
        chromium_console(&page, scratch, &[&format!("--screenshot={}", shot.display()), "--window-size=1280,2000"])?;
    assert!(console.is_empty(), "the report logged to the console: {console:#?}");
    let shot = image::load_from_memory(&std::fs::read(&shot)?)?;
    assert_eq!((shot.width(), shot.height()), (1280, 2000));
    // The same page with a probe that counts the images the browser could not decode.
    let probe = report_dir.join("probe.html");
    let html = std::fs::read_to_string(&page)?;
    let script = "<script>addEventListener(\"load\", () => { const all = [...document.images]; \
                  const broken = all.filter(i => !i.complete || i.naturalWidth === 0).length; \
                  console.log(`probe: ${all.length} images, ${broken} broken`); });</script></body>";
    std::fs::write(&probe, html.replacen("</body>", script, 1))?;
    let console = chromium_console(&probe, scratch, &["--dump-dom"])?;
    let images = html.matches("<img ").count();
    assert!(images >= 4 + MODES.len(), "{images} images");
    assert_eq!(console.len(), 1, "{console:#?}");
    assert!(console[0].contains(&format!("\"probe: {images} images, 0 broken\"")), "{}", console[0]);
    Ok(())
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn a_failed_job_is_reported_and_the_others_finish() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (job_file, cfg) = job(dir.path(), "failing");
    let data = cfg.data.path.clone();
    let out = acrf(
        BIN,
        &[
            "sweep",
            &job_file.display().to_string(),
            "--set",
            &format!("data.path=/nonexistent/data,{data}"),
            "--set",
            "training.max_steps=2",
            "--workers",
            "2",
            "--sweep-id",
            "broken",
        ],
    );
    assert!(!out.status.success(), "a sweep with a failed job must fail");
    assert!(stderr(&out).contains("1 of 2 job(s) failed"), "{}", stderr(&out));
    let m = manifest(&cfg, "broken")?;
    let status: Vec<Status> = m.jobs.iter().map(|j| j.status).collect();
    assert_eq!(status, [Status::Failed, Status::Finished], "{m:?}");
    assert!(m.jobs[0].error.as_deref().is_some_and(|e| e.contains("/nonexistent/data")), "{:?}", m.jobs[0]);
    assert!(stdout(&out).contains("failed") && stdout(&out).contains("finished"), "{}", stdout(&out));
    Ok(())
}
