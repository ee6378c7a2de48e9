#!/usr/bin/env bash
# Every GPU check of acrf's fused kernels in one go, for a machine lent for a few minutes: the binary is built
# beforehand on a machine without a GPU, and the GPU spends its time measuring.
#
#   deploy/gpu-check.sh build     # on the build machine: target/gpu-check/{acrf,torch_step.py}, ~50 MB
#   deploy/gpu-check.sh run [DIR] # on the GPU machine, from the repository root: results into DIR
#                                 # (default: $OUT if set, else ./gpu-check-out)
#
# `run` does, each step under its own time limit so that a hang costs one step, not the lease:
#   1. acrf doctor: every fused kernel against the composed ops, values and gradients (bf16)
#   2. training parity: the demo job, 5 steps in f32 on the GPU and on the CPU, LoRA relative L2 (and bf16)
#   3. acrf bench --synthetic --profile at Z-Image Turbo's size, 1024² and 512² (the shapes of
#      shared/bench/torch_step.py: dim 3840, 30 heads, 30 + 2 + 2 layers, 256 caption tokens, attention LoRA
#      rank 16, checkpointing, bf16)
#   4. torch_step.py with the same shapes, eager and with --compile (each block under torch.compile)
#   5. a summary with the ratios acrf / PyTorch
# It needs nvidia-smi, python3 with torch, diffusers 0.42 and peft (the reference), and the CUDA 13 libraries
# of PyTorch's wheels (cuBLAS, cuRAND, cudart, NVRTC, NCCL), which it puts on LD_LIBRARY_PATH. At most 8 files
# are written into DIR, so that a device lease can bring them all back.
#
# The build uses NVIDIA's PyPI wheels of CUDA 13.0 (nvcc's PTX must not be newer than the driver that loads
# it: deploy/CUDA.md), compute capability 90 (H100/H200) unless CUDA_COMPUTE_CAP says otherwise, and keeps its
# venv and target dir in ~/.cache/acrf-gpu-check, so a second build only recompiles acrf. A cold build spends
# most of an hour in candle-kernels' nvcc objects on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
stage="$here/target/gpu-check"
# The binary's file name (a variable, so that the deploy test's parser does not take a path for a command).
bin=acrf

build() {
  local cache="${ACRF_GPU_CHECK_CACHE:-$HOME/.cache/acrf-gpu-check}" cap="${CUDA_COMPUTE_CAP:-90}" site nv home
  local venv="$cache/venv"
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-nccl-cu13==2.30.7
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  nv="$site/nvidia"
  home="$nv/cu13"
  # The wheels ship versioned names only; the linker wants the plain ones. libcuda is a stub of the driver's
  # symbols: it satisfies the linker and is never shipped (the GPU machine's driver provides the real one).
  (
    cd "$home/lib"
    for l in cudart cublas cublasLt curand nvrtc; do
      for versioned in "lib$l.so".*; do ln -sf "$versioned" "lib$l.so"; break; done
    done
    ln -sf "$nv/nccl/lib/libnccl.so.2" libnccl.so
  )
  if [ ! -e "$home/lib/stubs/libcuda.so" ]; then
    mkdir -p "$home/lib/stubs"
    cargo fetch --quiet
    grep -ohE '^ +fn cu[A-Za-z0-9_]+\(' ~/.cargo/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs \
      | sed -E 's/ *fn (.*)\(/int \1(void) { return 999; }/' | sort -u > "$cache/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$cache/libcuda_stub.c"
  fi
  CUDA_HOME="$home" PATH="$home/bin:$PATH" LIBRARY_PATH="$home/lib:$home/lib/stubs" CUDARC_CUDA_VERSION=13000 \
    CUDA_COMPUTE_CAP="$cap" ACRF_CUDA_ARCHS="$cap" CUDAFORGE_THREADS="$(nproc)" CARGO_TARGET_DIR="$cache/target" \
    cargo build --release --features cuda -p acrf-coordinator
  mkdir -p "$stage"
  strip -o "$stage/$bin" "$cache/target/release/$bin"
  cp "$here/../shared/bench/torch_step.py" "$stage/torch_step.py"
  du -sh "$stage"
  echo "built for compute capability $cap; on the GPU machine: deploy/gpu-check.sh run (carry target/gpu-check)"
}

run() {
  local out="${1:-${OUT:-$here/gpu-check-out}}" site work
  ACRF="$stage/$bin"
  mkdir -p "$out"
  work="$(mktemp -d)"
  [ -x "$stage/$bin" ] || { echo "no $stage/$bin: run 'deploy/gpu-check.sh build' first" >&2; exit 2; }
  site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  LD_LIBRARY_PATH="$(find "$site/nvidia" -maxdepth 2 -name lib -type d -printf '%p:')${LD_LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH PYTHONUNBUFFERED=1 RUST_LOG=warn
  exec > >(tee "$out/log.txt") 2>&1

  echo "== GPU"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  echo "== 1. doctor"
  timeout 300 "$ACRF" doctor --device cuda:0 | tee "$out/doctor.txt" || echo "doctor FAILED or timed out"

  echo "== 2. training parity, the demo job, 5 steps"
  (
    cd "$work"
    timeout 300 "$ACRF" demo --dir demo > demo.txt
    # A --set path is taken as given, here relative to $work.
    timeout 300 "$ACRF" train demo/job.toml --device cpu --set training.max_steps=5 --set model.dtype=f32 \
      --set output=cpu-f32 > train-cpu-f32.txt 2>&1 || echo "train on the CPU FAILED"
    timeout 300 "$ACRF" train demo/job.toml --device cuda:0 --set training.max_steps=5 --set model.dtype=f32 \
      --set output=gpu-f32 > train-gpu-f32.txt 2>&1 || echo "train on the GPU in f32 FAILED"
    timeout 300 "$ACRF" train demo/job.toml --device cuda:0 --set training.max_steps=5 --set model.dtype=bf16 \
      --set output=gpu-bf16 > train-gpu-bf16.txt 2>&1 || echo "train on the GPU in bf16 FAILED"
    python3 - "$work" <<'PY' | tee "$out/parity.txt"
import glob, sys, torch
from safetensors.torch import load_file
work = sys.argv[1]
def lora(run):
    files = [f for f in glob.glob(f"{work}/{run}/*.safetensors") if "-step" not in f]
    return load_file(files[0]) if files else None
ref = lora("cpu-f32")
for run in ["gpu-f32", "gpu-bf16"]:
    got = lora(run)
    if ref is None or got is None:
        print(f"{run}: no LoRA file"); continue
    num = sum(float(((got[k].double() - ref[k].double()) ** 2).sum()) for k in ref)
    den = sum(float((ref[k].double() ** 2).sum()) for k in ref)
    print(f"{run} vs cpu-f32 after 5 steps: LoRA relative L2 {(num / den) ** 0.5:.2e} ({len(ref)} tensors)")
PY
  ) || echo "parity FAILED"

  echo "== 3. the step of this build at full size, 1024² (latent 128²) and 512² (latent 64²)"
  timeout 420 "$ACRF" bench --synthetic --dim 3840 --heads 30 --layers 30 --refiners 2 --cap 256 --ckpt --bf16 \
    --hw 128 --device cuda:0 --steps 5 --warmup 2 --profile | tee "$work/acrf-128.txt" || echo "bench 1024² FAILED"
  timeout 420 "$ACRF" bench --synthetic --dim 3840 --heads 30 --layers 30 --refiners 2 --cap 256 --ckpt --bf16 \
    --hw 64 --device cuda:0 --steps 5 --warmup 2 --profile | tee "$work/acrf-64.txt" || echo "bench 512² FAILED"
  cat "$work"/acrf-*.txt > "$out/acrf-bench.txt" 2>/dev/null || true

  echo "== 4. PyTorch + diffusers + peft, same shapes"
  local torch_full=(--dim 3840 --heads 30 --layers 30 --refiners 2 --cap 256 --ckpt --bf16 --device cuda --threads 16)
  local hw mode
  for mode in eager compile; do
    for hw in 128 64; do
      local extra=()
      [ "$mode" = compile ] && extra=(--compile)
      timeout 420 python3 "$stage/torch_step.py" "${torch_full[@]}" --hw "$hw" --steps 5 "${extra[@]}" \
        | tail -n 1 > "$work/torch-$hw-$mode.json" || echo "torch $mode at hw $hw FAILED or timed out"
    done
  done
  cat "$work"/torch-*.json > "$out/torch.jsonl" 2>/dev/null || true

  echo "== 5. summary"
  python3 - "$work" <<'PY' | tee "$out/summary.txt"
import json, re, sys
work = sys.argv[1]
def ours(hw):
    try:
        m = re.search(r"^step time\s+median ([0-9.]+) s", open(f"{work}/acrf-{hw}.txt").read(), re.M)
        return float(m.group(1)) if m else None
    except OSError:
        return None
def torch(hw, mode):
    try:
        return json.loads(open(f"{work}/torch-{hw}-{mode}.json").read())["step_s"]
    except (OSError, ValueError, KeyError):
        return None
print(f"{'size':<6} {'acrf s':>8} {'torch s':>8} {'compiled':>8} {'acrf/torch':>10} {'acrf/compiled':>13}")
for hw, px in [(128, "1024²"), (64, "512²")]:
    a, t, c = ours(hw), torch(hw, "eager"), torch(hw, "compile")
    r = lambda x, y: f"{x / y:.2f}" if x and y else "-"
    f = lambda x: f"{x:.3f}" if x else "-"
    print(f"{px:<6} {f(a):>8} {f(t):>8} {f(c):>8} {r(a, t):>10} {r(a, c):>13}")
PY
  rm -rf "$work"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 build | run [DIR]" >&2; exit 2 ;;
esac
