#!/usr/bin/env bash
# The cost side of the report's table 9.4: the four loss modes on one job with `acrf bench`, interleaved over
# ROUNDS rounds so that changes in the machine's load hit them alike. On a shared machine the wall time per step
# (acrf bench's median) swings with the load, so each mode's CPU time per step is measured too: the user + system
# seconds of a bench of STEPS timed steps minus those of a bench of 1, over STEPS − 1, which the load barely
# moves. Prints both, with each mode's ratio to standard. Usage: bench.sh JOB [ROUNDS] [STEPS].
set -euo pipefail
job=${1:?usage: bench.sh JOB.toml [ROUNDS] [STEPS]}
rounds=${2:-3}
steps=${3:-30}
here=$(cd "$(dirname "$0")" && pwd)
acrf=${ACRF:-$here/../../target/release/acrf}
modes=(standard frequency style unified)
out=$(mktemp)
# CPU seconds (user + system) and acrf bench's median wall seconds of one bench of $2 steps in mode $1.
bench() {
  local t
  t=$(mktemp)
  median=$(/usr/bin/time -f "%U %S" -o "$t" nice -n 10 "$acrf" bench "$job" --set "loss.loss_mode=$1" \
    --steps "$2" --warmup 1 --json 2>/dev/null | tail -n 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["median_s"])')
  echo "$(awk '{print $1 + $2}' "$t") $median"
  rm -f "$t"
}
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  for m in "${modes[@]}"; do
    read -r long wall < <(bench "$m" "$steps")
    read -r short _ < <(bench "$m" 1)
    echo "$m $wall $long $short" | tee -a "$out"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$out" "$steps" <<'PY'
import statistics, sys
steps = int(sys.argv[2])
wall, cpu = {}, {}
for line in open(sys.argv[1]):
    m, w, long, short = line.split()
    wall.setdefault(m, []).append(float(w))
    cpu.setdefault(m, []).append((float(long) - float(short)) / (steps - 1))
report = {"standard": "1.0×", "frequency": "1.05×", "style": "1.08×", "unified": "1.10×"}
wb, cb = statistics.median(wall["standard"]), statistics.median(cpu["standard"])
print("| mode | report | wall s/step (median of rounds) | × standard | CPU s/step (median of rounds) | × standard |")
print("|---|---|---|---|---|---|")
for m in ["standard", "frequency", "style", "unified"]:
    w, c = statistics.median(wall[m]), statistics.median(cpu[m])
    print(f"| {m} | {report[m]} | {w:.3f} | {w / wb:.2f}× | {c:.4f} ({', '.join(f'{x:.4f}' for x in cpu[m])}) | {c / cb:.2f}× |")
PY
