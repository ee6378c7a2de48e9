//! The AC-RF anchors and the Turbo inference sigmas against diffusers' own lists (spec §2, §6).
//!
//! Every K and shift comes from the fixture, so a regenerated `schedule.json` with other keys is checked
//! the same way.

use std::path::PathBuf;

use acrf_common::schedule::{anchors, inference_sigmas, shift_sigma};

fn fixture_dir() -> PathBuf {
    std::env::var_os("ACRF_ZIMAGE_FIXTURE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/zimage-tiny"))
}

/// "shift=3.0,K=10" → (3.0, 10).
fn parse_key(key: &str) -> (f64, usize) {
    let mut shift = None;
    let mut k = None;
    for part in key.split(',') {
        match part.trim().split_once('=') {
            Some(("shift", v)) => shift = Some(v.parse().expect(key)),
            Some(("K", v)) => k = Some(v.parse().expect(key)),
            _ => panic!("unexpected part `{part}` in schedule key `{key}`"),
        }
    }
    (shift.unwrap_or_else(|| panic!("no shift in `{key}`")), k.unwrap_or_else(|| panic!("no K in `{key}`")))
}

#[test]
fn anchors_match_diffusers() {
    let path = fixture_dir().join("schedule.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lists: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(!lists.is_empty(), "{} holds no schedules", path.display());
    for (key, list) in &lists {
        let (shift, k) = parse_key(key);
        let want: Vec<f64> = list
            .as_array()
            .unwrap_or_else(|| panic!("`{key}` is not a list"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut got = anchors(k, shift);
        got.push(0.0);
        assert_eq!(got.len(), want.len(), "{key}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6, "{key}[{i}]: {g} vs diffusers {w}");
        }
    }
}

#[test]
fn inference_sigmas_match_the_pipeline() {
    let path = fixture_dir().join("sample_case.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor("sigmas").unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    let want: Vec<f64> =
        view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect();
    let n = want.len() - 1;
    assert!(n >= 3, "too few sigmas to recover the shift and check it");
    // The file does not record the shift: recover it from the second sigma, which is s_k(1 − 1/n), and
    // check the remaining sigmas against it.
    let (x, y) = (1.0 - 1.0 / n as f64, want[1]);
    let shift = y * (1.0 - x) / (x * (1.0 - y));
    assert!((shift_sigma(x, shift) - y).abs() < 1e-12);
    let got = inference_sigmas(n, shift);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6, "sigma {i}: {g} vs pipeline {w} (shift {shift})");
    }
}
