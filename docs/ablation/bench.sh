#!/usr/bin/env bash
# The cost side of the report's table 9.4: seconds per optimizer step of the four loss modes on one job,
# measured with `acrf bench`, the modes interleaved over ROUNDS rounds so that a change in the machine's load
# hits them alike; prints each mode's median and its ratio to standard. Usage: bench.sh JOB [ROUNDS] [STEPS].
set -euo pipefail
job=${1:?usage: bench.sh JOB.toml [ROUNDS] [STEPS]}
rounds=${2:-3}
steps=${3:-20}
here=$(cd "$(dirname "$0")" && pwd)
acrf=${ACRF:-$here/../../target/release/acrf}
modes=(standard frequency style unified)
out=$(mktemp)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$rounds"); do
  for m in "${modes[@]}"; do
    s=$(nice -n 10 "$acrf" bench "$job" --set "loss.loss_mode=$m" --steps "$steps" --warmup 3 --json 2>/dev/null |
      python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["median_s"])')
    echo "$m $s" | tee -a "$out"
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$out" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m, s = line.split()
    runs.setdefault(m, []).append(float(s))
base = statistics.median(runs["standard"])
print("| mode | report | s/step (median of rounds) | rounds | × standard |")
print("|---|---|---|---|---|")
report = {"standard": "1.0×", "frequency": "1.05×", "style": "1.08×", "unified": "1.10×"}
for m in ["standard", "frequency", "style", "unified"]:
    med = statistics.median(runs[m])
    print(f"| {m} | {report[m]} | {med:.4f} | {', '.join(f'{x:.4f}' for x in runs[m])} | {med / base:.2f}× |")
PY
