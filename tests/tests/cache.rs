//! `acrf cache` on real image files with tiny random encoders: what it caches, skips and reports, that a
//! re-run encodes only what changed, that its features are the encoders' own, and that any store holds the
//! same dataset: a directory, memory:// or an S3 bucket, written by one process, by local worker processes or
//! by processes on the hosts of a hosts file, over ssh.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use acrf_common::store::BlockingStore;
use acrf_tests::s3::S3Server;
use acrf_tests::ssh::Sshd;
use acrf_tests::{acrf_command, stderr};
use acrf_worker::cache::bucket::BucketSpec;
use acrf_worker::cache::encode::LatentMode;
use acrf_worker::cache::pipeline::{BatchShape, Cache, CacheOptions, Report, Shard};
use acrf_worker::cache::toy::{self, ToyText, ToyVae};
use acrf_worker::data::{Dataset, Manifest};
use anyhow::Result;
use bytes::Bytes;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::z_image::{text_encoder, vae};
use image::{ImageFormat, RgbImage};

const BIN: &str = env!("CARGO_BIN_EXE_acrf-cli");

/// (path, width, height, caption): PNG and JPEG, upper-case extensions, a sub-folder, a `.caption` file,
/// three aspect ratios. At resolution 128 and step 16 the first and the last two share the 128x128 bucket.
const GOOD: [(&str, u32, u32, &str); 5] = [
    ("square.png", 128, 128, "a red square"),
    ("wide.jpg", 384, 192, "a wide blue field under a sky"),
    ("tall.PNG", 192, 320, "a tall green tree"),
    ("sub/photo.jpeg", 300, 300, "a photo in a folder"),
    ("sub/deeper/round.webp", 256, 256, "a round thing"),
];

fn picture(w: u32, h: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        [(x * 255 / w) as u8, (y * 255 / h) as u8, ((x / 8 + y / 8 + seed) % 2 * 200) as u8].into()
    })
}

struct Fixture {
    _tmp: tempfile::TempDir,
    images: PathBuf,
    model: PathBuf,
    root: PathBuf,
}

/// The images of [`GOOD`] plus a corrupt one, one without a caption and one too small, and tiny encoders
/// whose tokenizer knows the captions' words.
fn fixture() -> Result<Fixture> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().to_path_buf();
    let images = root.join("images");
    for (i, &(rel, w, h, caption)) in GOOD.iter().enumerate() {
        let path = images.join(rel);
        std::fs::create_dir_all(path.parent().unwrap())?;
        let format = ImageFormat::from_path(&path)?;
        picture(w, h, i as u32).save_with_format(&path, format)?;
        let ext = if rel.starts_with("sub/photo") { "caption" } else { "txt" };
        std::fs::write(path.with_extension(ext), format!("{caption}\n"))?;
    }
    std::fs::write(images.join("corrupt.png"), b"\x89PNG\r\n\x1a\nthis is not the rest of a PNG")?;
    std::fs::write(images.join("corrupt.txt"), "a broken file")?;
    picture(128, 160, 9).save(images.join("uncaptioned.png"))?;
    picture(20, 60, 9).save(images.join("tiny.png"))?;
    std::fs::write(images.join("tiny.txt"), "a tiny image")?;
    let model = root.join("model");
    let mut texts: Vec<&str> = GOOD.iter().map(|g| g.3).collect();
    texts.push("sks");
    toy::write_encoders(&model, &ToyVae::default(), &ToyText::default(), &texts, 5)?;
    Ok(Fixture { _tmp: tmp, images, model, root })
}

impl Fixture {
    fn cli(&self, out: &Path, extra: &[&str]) -> std::process::Output {
        self.cli_command(&out.display().to_string(), extra).output().expect("the acrf binary runs")
    }

    fn cli_command(&self, out: &str, extra: &[&str]) -> Command {
        let (images, model) = (self.images.display().to_string(), self.model.display().to_string());
        let mut args = vec!["cache", "--images", &images, "--model", &model, "--out", out];
        args.extend_from_slice(&["--resolution", "128", "--bucket-step", "16", "--batch-size", "2"]);
        args.extend_from_slice(extra);
        acrf_command(BIN, &args)
    }

    fn options(&self, out: &str) -> CacheOptions {
        CacheOptions {
            images: self.images.clone(),
            model: self.model.clone(),
            out: out.to_string(),
            buckets: BucketSpec::new(128, Some(16), None).unwrap(),
            latent: LatentMode::Mean,
            seed: 0,
            max_sequence_length: 512,
            caption_dropout: 0.0,
            class_token: None,
            allow_empty_captions: false,
            threads: 2,
            device: Device::Cpu,
        }
    }
}

/// Runs a whole cache in this process.
fn cache_here(opts: CacheOptions) -> Result<Report> {
    let cache = Cache::open(opts)?;
    let outcome = cache.run(Shard::WHOLE, &|| {})?;
    Ok(cache.commit(vec![outcome], BatchShape { batch_size: 1, world_size: 1 })?)
}

fn report(out: &Path) -> Result<Report> {
    Ok(serde_json::from_slice(&std::fs::read(out.join("cache_report.json"))?)?)
}

fn manifest(out: &Path) -> Result<Manifest> {
    Ok(Dataset::open(BlockingStore::from_url(&out.display().to_string())?)?.manifest().clone())
}

/// Every file under `dir` (but the report) with its bytes and modification time.
fn snapshot(dir: &Path) -> Result<BTreeMap<String, (Vec<u8>, SystemTime)>> {
    let mut out = BTreeMap::new();
    for sub in ["", "items"] {
        for entry in std::fs::read_dir(dir.join(sub))? {
            let path = entry?.path();
            if path.is_file() && !path.ends_with("cache_report.json") {
                let name = path.strip_prefix(dir)?.display().to_string();
                out.insert(name, (std::fs::read(&path)?, std::fs::metadata(&path)?.modified()?));
            }
        }
    }
    Ok(out)
}

#[test]
fn caches_skips_reports_and_reruns_incrementally() -> Result<()> {
    let f = fixture()?;
    let out = f.root.join("data");

    // Three images are bad: the run keeps the good ones, lists the bad ones and fails without --skip-bad.
    let run = f.cli(&out, &[]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("3 image(s) skipped") && stderr(&run).contains("--skip-bad"), "{}", stderr(&run));
    let r = report(&out)?;
    assert_eq!((r.images, r.cached, r.encoded, r.reused), (8, 5, 5, 0));
    let skipped: Vec<(&str, &str)> = r.skipped.iter().map(|n| (n.source.as_str(), n.message.as_str())).collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped[0].0 == "corrupt.png" && skipped[0].1.contains("image"), "{skipped:?}");
    assert!(skipped[1].0 == "tiny.png" && skipped[1].1.contains("too small: 20x60 px"), "{skipped:?}");
    assert!(skipped[2].0 == "uncaptioned.png" && skipped[2].1.contains("no caption"), "{skipped:?}");

    let m = manifest(&out)?;
    let sources: Vec<&str> = m.items.iter().map(|i| i.source.as_str()).collect();
    assert_eq!(sources, ["square.png", "sub/deeper/round.webp", "sub/photo.jpeg", "tall.PNG", "wide.jpg"]);
    // Latent sizes are the pixel buckets over 8: 128x128 (three), 96x160 (tall) and 176x80 (wide).
    let buckets: Vec<(&str, usize)> = m.buckets.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(buckets, [("10x22", 1), ("16x16", 3), ("20x12", 1)]);
    assert_eq!((m.latent_channels, m.cap_dim), (16, 64));
    assert!(m.items.iter().all(|i| i.input_hash.starts_with("sha256:") && i.file.contains(&i.input_hash[7..23])));
    assert_eq!(m.encoder["conditioning"]["template"], "<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n");
    let sizes: Vec<(usize, usize, usize)> = r.buckets.iter().map(|b| (b.width, b.height, b.items)).collect();
    assert_eq!(sizes, [(96, 160, 1), (128, 128, 3), (176, 80, 1)]);
    // --batch-size 2: the two one-image buckets are never trained on, and the report names their images.
    assert_eq!(r.buckets[0].never_trained, ["tall.PNG"]);
    assert!(r.buckets[2].warning.as_deref().unwrap().contains("never trained on: wide.jpg"));
    assert!(r.buckets[1].warning.is_none());

    // Nothing changed: nothing is encoded and no file is touched; with --skip-bad the run succeeds.
    let before = snapshot(&out)?;
    let run = f.cli(&out, &["--skip-bad"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let r = report(&out)?;
    assert_eq!((r.cached, r.encoded, r.reused, r.skipped.len()), (5, 0, 5, 3));
    assert!(snapshot(&out)? == before, "a run with nothing to do changed files");

    // One caption edited: exactly that item is encoded again, into a new file; the old one is removed.
    std::fs::write(f.images.join("wide.txt"), "a wide blue field")?;
    let run = f.cli(&out, &["--skip-bad"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!((report(&out)?.encoded, report(&out)?.reused), (1, 4));
    let after = snapshot(&out)?;
    let changed: BTreeSet<&str> =
        after.keys().chain(before.keys()).filter(|k| after.get(*k) != before.get(*k)).map(String::as_str).collect();
    let (old_wide, new_wide) = (m.items[4].file.clone(), manifest(&out)?.items[4].file.clone());
    assert_ne!(old_wide, new_wide);
    assert_eq!(changed, BTreeSet::from(["manifest.json", &new_wide, &old_wide]));
    assert!(!after.contains_key(&old_wide));
    assert_eq!(manifest(&out)?.items[4].caption_len, m.items[4].caption_len - 3);

    // --allow-empty-captions takes the uncaptioned image in with the empty caption.
    let run = f.cli(&out, &["--allow-empty-captions"]);
    assert!(!run.status.success(), "two images are still bad");
    let r = report(&out)?;
    assert_eq!((r.cached, r.encoded, r.reused, r.skipped.len()), (6, 1, 5, 2));
    assert_eq!(manifest(&out)?.items.iter().find(|i| i.source == "uncaptioned.png").unwrap().caption_len, 5);
    Ok(())
}

/// The same images spread over two worker processes give the same dataset, byte for byte.
#[test]
fn worker_processes_give_the_same_dataset() -> Result<()> {
    let f = fixture()?;
    let (one, two) = (f.root.join("one"), f.root.join("two"));
    assert!(f.cli(&one, &["--skip-bad"]).status.success());
    let run = f.cli(&two, &["--skip-bad", "--workers", "2"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let strip_times = |s: BTreeMap<String, (Vec<u8>, SystemTime)>| -> BTreeMap<String, Vec<u8>> {
        s.into_iter().map(|(k, (bytes, _))| (k, bytes)).collect()
    };
    assert!(strip_times(snapshot(&one)?) == strip_times(snapshot(&two)?));
    assert_eq!(report(&one)?.skipped, report(&two)?.skipped);
    let run = f.cli(&two, &["--skip-bad", "--workers", "3"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!((report(&two)?.encoded, report(&two)?.reused), (0, 5));
    Ok(())
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2()?)
}

/// Caption features equal Qwen3's `hidden_states[-2]` on the templated caption, token for token and row for
/// row, with a class token, when dropped, and when cut to max_sequence_length; the latent of an image that
/// needs no resize equals the VAE encoder's mean, normalised with the config's factors.
#[test]
fn features_are_the_encoders_own() -> Result<()> {
    let f = fixture()?;
    let tokenizer = tokenizers::Tokenizer::from_file(f.model.join("tokenizer/tokenizer.json")).unwrap();
    let cfg: text_encoder::TextEncoderConfig =
        serde_json::from_slice(&std::fs::read(f.model.join("text_encoder/config.json"))?)?;
    let files = [f.model.join("text_encoder/model.safetensors")];
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu)? };
    let qwen = text_encoder::ZImageTextEncoder::new(&cfg, vb)?;
    // The hidden states of the first `limit` tokens of the templated caption.
    let direct_cut = |caption: &str, limit: usize| -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
        let text = format!("<|im_start|>user\n{caption}<|im_end|>\n<|im_start|>assistant\n");
        let mut ids = tokenizer.encode(text, true).unwrap().get_ids().to_vec();
        assert!(!ids.contains(&0), "`{caption}` has a word the tokenizer does not know");
        ids.truncate(limit);
        let hidden = qwen.forward(&Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?)?;
        Ok((ids, rows(&hidden.squeeze(0)?)?))
    };
    let direct = |caption: &str| direct_cut(caption, usize::MAX);
    let cached = |opts: CacheOptions| -> Result<(Dataset, Report)> {
        let out = opts.out.clone();
        let report = cache_here(opts)?;
        Ok((Dataset::open(BlockingStore::from_url(&out)?)?, report))
    };
    let caption_rows =
        |d: &Dataset, i: usize| -> Result<Vec<Vec<f32>>> { rows(&d.load_item(i, &Device::Cpu)?.caption) };

    let (plain, _) = cached(f.options(&f.root.join("plain").display().to_string()))?;
    for (i, item) in plain.manifest().items.iter().enumerate() {
        let caption = GOOD.iter().find(|g| g.0 == item.source).unwrap().3;
        let (ids, want) = direct(caption)?;
        assert_eq!(ids.len(), 5 + caption.split_whitespace().count(), "one token per word plus the template's");
        assert_eq!(item.caption_len, ids.len());
        assert!(caption_rows(&plain, i)? == want, "{}: features differ from the encoder's", item.source);
    }

    let mut opts = f.options(&f.root.join("sks").display().to_string());
    opts.class_token = Some("sks".into());
    let (sks, _) = cached(opts)?;
    assert!(caption_rows(&sks, 0)? == direct("sks a red square")?.1);
    assert_eq!(sks.manifest().encoder["conditioning"]["class_token"], "sks");

    let mut opts = f.options(&f.root.join("dropped").display().to_string());
    opts.caption_dropout = 1.0;
    let (dropped, _) = cached(opts)?;
    assert!(caption_rows(&dropped, 3)? == direct("")?.1);
    assert_eq!(dropped.manifest().encoder["conditioning"]["caption_dropout"], 1.0);

    // Latent samples: drawn per image from the seed, so two runs draw the same; not the mean.
    let sampled = |name: &str| -> Result<Dataset> {
        let mut opts = f.options(&f.root.join(name).display().to_string());
        opts.latent = LatentMode::Sample;
        opts.seed = 3;
        Ok(cached(opts)?.0)
    };
    let (a, b) = (sampled("sampled-a")?, sampled("sampled-b")?);
    let latent =
        |d: &Dataset| -> Result<Vec<f32>> { Ok(d.load_item(1, &Device::Cpu)?.latent.flatten_all()?.to_vec1()?) };
    assert!(latent(&a)? == latent(&b)? && latent(&a)? != latent(&plain)?);
    assert_eq!(
        (&a.manifest().encoder["image"]["latent"], &a.manifest().encoder["seed"]),
        (&"sample".into(), &3.into())
    );
    assert!(plain.manifest().encoder["seed"].is_null(), "the seed changes nothing here, so it is not recorded");

    // A cut caption is the encoding of its first tokens; the causal encoder makes those the first rows of
    // the whole caption's (up to rounding: the matrix products have other sizes).
    let mut opts = f.options(&f.root.join("cut").display().to_string());
    opts.max_sequence_length = 6;
    let (cut, report) = cached(opts)?;
    let wide = cut.manifest().items.iter().position(|i| i.source == "wide.jpg").unwrap();
    let got = caption_rows(&cut, wide)?;
    assert!(got == direct_cut(GOOD[1].3, 6)?.1);
    let whole = direct(GOOD[1].3)?.1;
    let diff = got.iter().flatten().zip(whole.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "{diff}");
    let warning = report.warnings.iter().find(|n| n.source == "wide.jpg").unwrap();
    assert!(warning.message.contains("wide.txt") && warning.message.contains("truncated to max_sequence_length 6"));

    // square.png is 128x128, its own bucket: no resize, so the VAE sees its exact pixels.
    let vae_cfg: vae::VaeConfig = serde_json::from_slice(&std::fs::read(f.model.join("vae/config.json"))?)?;
    let vae_files = [f.model.join("vae/diffusion_pytorch_model.safetensors")];
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&vae_files, DType::F32, &Device::Cpu)? };
    let encoder = vae::Encoder::new(&vae_cfg, vb.pp("encoder"))?;
    let pixels: Vec<f32> =
        picture(128, 128, 0).pixels().flat_map(|p| p.0).map(|v| f32::from(v) / 127.5 - 1.0).collect();
    let x = Tensor::from_vec(pixels, (1, 128, 128, 3), &Device::Cpu)?.permute((0, 3, 1, 2))?.contiguous()?;
    let mean = encoder.forward(&x)?.narrow(1, 0, 16)?.squeeze(0)?;
    let want = ((mean - 0.1159)? * 0.3611)?;
    let got = plain.load_item(0, &Device::Cpu)?.latent;
    assert_eq!(got.dims(), [16, 16, 16]);
    let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-6, "latent differs from the VAE's mean by {diff}");
    Ok(())
}

/// Every file of a dataset but the report, which holds timings (it is compared by its counts instead).
fn files(store: &BlockingStore) -> Result<BTreeMap<String, Bytes>> {
    let names = store.list("")?.into_iter().map(|(name, _)| name).filter(|name| name != "cache_report.json");
    names.map(|name| Ok((name.clone(), store.get(&name)?))).collect()
}

/// A cache written to a memory:// store reads back as the one written to a directory.
#[test]
fn memory_store_holds_the_same_dataset() -> Result<()> {
    let f = fixture()?;
    let local = f.root.join("local").display().to_string();
    let r_local = cache_here(f.options(&local))?;
    let r_memory = cache_here(f.options("memory://cache-test/data"))?;
    assert_eq!(
        (r_memory.cached, r_memory.encoded, r_memory.skipped),
        (r_local.cached, r_local.encoded, r_local.skipped)
    );
    let (a, b) = (
        Dataset::open(BlockingStore::from_url(&local)?)?,
        Dataset::open(BlockingStore::from_url("memory://cache-test/data")?)?,
    );
    assert_eq!(a.manifest(), b.manifest());
    for i in 0..a.len() {
        let (x, y) = (a.load_item(i, &Device::Cpu)?, b.load_item(i, &Device::Cpu)?);
        assert!(rows(&x.caption)? == rows(&y.caption)?);
        assert!(x.latent.flatten_all()?.to_vec1::<f32>()? == y.latent.flatten_all()?.to_vec1::<f32>()?);
    }
    // Incremental on the memory store too.
    let again = cache_here(f.options("memory://cache-test/data"))?;
    assert_eq!((again.encoded, again.reused), (0, 5));
    Ok(())
}

/// `acrf cache` into an S3 bucket (the test server, through the `AWS_*` environment) writes the files it
/// writes into a directory, byte for byte, and a re-run against the bucket is incremental too.
#[test]
fn s3_bucket_holds_the_same_dataset() -> Result<()> {
    let f = fixture()?;
    let server = S3Server::start();
    server.create_bucket("datasets");
    let (local, url) = (f.root.join("local"), "s3://datasets/cache/v1");
    let run = f.cli(&local, &["--skip-bad"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let run = server.configure(&mut f.cli_command(url, &["--skip-bad"])).output()?;
    assert!(run.status.success(), "{}", stderr(&run));

    let (disk, bucket) = (BlockingStore::from_url(&local.display().to_string())?, server.store(url)?);
    let on_disk = files(&disk)?;
    // The manifest, the items and the empty prompt's embedding (for caption dropout).
    let empty = on_disk.keys().filter(|k| k.starts_with("items/empty_caption.")).count();
    assert!(on_disk.contains_key("manifest.json") && empty == 1, "{:?}", on_disk.keys());
    assert_eq!(on_disk.len(), 2 + GOOD.len(), "{:?}", on_disk.keys());
    assert!(files(&bucket)? == on_disk, "the bucket holds other files than the directory");
    let (a, b) = (Dataset::open(disk)?, Dataset::open(bucket.clone())?);
    assert_eq!(a.manifest(), b.manifest());

    let run = server.configure(&mut f.cli_command(url, &["--skip-bad"])).output()?;
    assert!(run.status.success(), "{}", stderr(&run));
    let r: Report = serde_json::from_slice(&bucket.get("cache_report.json")?)?;
    assert_eq!((r.cached, r.encoded, r.reused, r.skipped.len()), (5, 0, 5, 3));
    Ok(())
}

/// `--hosts`: the shards run in ssh sessions (an sshd of the test's own on loopback), one per device of the
/// hosts file as the workers of `acrf launch` do, and write into an S3 bucket with the credentials of the
/// file's `env` alone (an ssh session inherits nothing from the test): the bucket holds the files that one
/// local process writes into a directory. A host that cannot run its shard fails the run, naming it, and
/// nothing is committed.
#[test]
fn shards_over_the_hosts_of_a_hosts_file_give_the_same_dataset() -> Result<()> {
    let f = fixture()?;
    let sshd = Sshd::start()?;
    let server = S3Server::start();
    server.create_bucket("datasets");
    let (local, url) = (f.root.join("local"), "s3://datasets/hosts");
    let run = f.cli(&local, &["--skip-bad"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let env: Vec<String> = server.env().iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
    let env = env.join(", ");
    let hosts = f.root.join("hosts.toml");
    let hosts_arg = hosts.display().to_string();
    std::fs::write(&hosts, sshd.host(&["cpu", "cpu"], BIN, &env, "")?)?;
    let run = server.configure(&mut f.cli_command(url, &["--skip-bad", "--hosts", &hosts_arg])).output()?;
    assert!(run.status.success(), "{}\nsshd:\n{}", stderr(&run), sshd.log());
    let bucket = server.store(url)?;
    assert!(files(&bucket)? == files(&BlockingStore::from_url(&local.display().to_string())?)?);
    let r: Report = serde_json::from_slice(&bucket.get("cache_report.json")?)?;
    assert_eq!((r.cached, r.encoded, r.skipped.len()), (5, 5, 3));

    std::fs::write(f.images.join("square.txt"), "a red field")?;
    let missing = f.root.join("no-acrf-here").display().to_string();
    let file = [sshd.host(&["cpu"], BIN, &env, "")?, sshd.host(&["cpu"], &missing, &env, "")?];
    std::fs::write(&hosts, file.concat())?;
    let before = bucket.get("manifest.json")?;
    let run = server.configure(&mut f.cli_command(url, &["--skip-bad", "--hosts", &hosts_arg])).output()?;
    let err = stderr(&run);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("worker 1/2 (127.0.0.1 cpu)") && err.contains("nothing was committed"), "{err}");
    assert_eq!(bucket.get("manifest.json")?, before);
    Ok(())
}
