#!/usr/bin/env bash
# The ablations of docs/ablation.md: one `acrf sweep` per claim, three seeds per arm, on the demo's model and
# data with a quarter of the items held out for the fixed evaluation loss. Each sweep is one command; re-running
# skips finished jobs. Usage: docs/ablation/run.sh DIR [SWEEP...] (default: every sweep), with the release
# binary built (`cargo build --release`) or ACRF pointing at one.
set -euo pipefail
dir=${1:?usage: run.sh DIR [sampling|jitter|k|gamma|modes ...]}
shift
sweeps=("$@")
[ ${#sweeps[@]} -gt 0 ] || sweeps=(sampling jitter k gamma modes)
here=$(cd "$(dirname "$0")" && pwd)
acrf=${ACRF:-$here/../../target/release/acrf}
run() { echo "+ acrf $*" >&2; /usr/bin/time -f "%e s wall" nice -n 10 "$acrf" "$@"; }

if [ ! -f "$dir/base.toml" ]; then
  nice -n 10 "$acrf" demo --dir "$dir" >/dev/null
  # The demo's job trained 400 steps instead of 160, with 8 of its 32 items held out and scored every 25
  # steps at the ten anchors of K = 10, shift 3 (fixed here, so the K sweep keeps one yardstick); checkpoints
  # only at the end.
  "$acrf" train "$dir/job.toml" --print-config --set training.max_steps=400 \
    --set eval.holdout=8 --set eval.every_n_steps=25 --set eval.turbo_steps=10 --set eval.shift=3 \
    --set training.save_every_n_steps=0 --set training.save_every_n_epochs=0 \
    --set checkpoint.keep_last=1 --set 'status.listen=""' >"$dir/base.toml"
fi
# The base job (anchor sampling, N = 8, η = 0.02, K = 10, γ = 5, standard loss) is trained once, in the
# sampling sweep: a job is a pure function of its settings, so the other sweeps would repeat it bit for bit;
# they train their other arms only, and tables.py sets the base job's row beside them. Three jobs at a time.
seeds=seed=1,2,3
par=(--workers 3 --workers-per-job 1)
for s in "${sweeps[@]}"; do
  case $s in
    # Uniform σ vs the anchors, with N = 8 slots a step (< K = 10) and N = 10 = K.
    sampling) run sweep "$dir/base.toml" "${par[@]}" --sweep-id sampling --set "$seeds" \
                --set acrf.timestep_sampling=anchor,uniform --set training.gradient_accumulation=4,5 ;;
    jitter) run sweep "$dir/base.toml" "${par[@]}" --sweep-id jitter --set "$seeds" --set acrf.jitter_scale=0 ;;
    k) run sweep "$dir/base.toml" "${par[@]}" --sweep-id k --set "$seeds" --set acrf.turbo_steps=4,20 ;;
    gamma) run sweep "$dir/base.toml" "${par[@]}" --sweep-id gamma --set "$seeds" --set acrf.snr_gamma=0,1,20 ;;
    modes) run sweep "$dir/base.toml" "${par[@]}" --sweep-id modes --set "$seeds" --loss-modes frequency,style,unified ;;
    *) echo "unknown sweep $s" >&2; exit 2 ;;
  esac
  run report "$dir/output/runs/$s" --out "$dir/report-$s"
done
