#!/usr/bin/env bash
# The GPU check: the CUDA test modules and the GPU benchmarks on one GPU, in <= 8 minutes, into ONE JSON file.
#
#     bash benchmarks/gpu_check.sh                 # writes gpu_check.json in the current folder
#     bash benchmarks/gpu_check.sh out/gpu.json
#
# Steps (each with its own time limit; a failing step is recorded and the others still run):
#   tests      tests/test_cuda.py (inference: fixtures on CUDA fp32, bf16/fp16 forward+backward, CUDA vs CPU
#              evaluation, NCCL torchrun, pinned loader) + tests/test_cuda_train.py (training steps, GradScaler)
#   model      benchmarks/bench_model.py: encode_image and a training step, fp32 / bf16 / fp16, peak memory per dtype
#   eval       benchmarks/bench_eval.py: our evaluation vs the 2022-style loop (fp32), and ours in bf16
#   train      benchmarks/bench_train.py: fp32 and bf16 steps, then the largest batch that fits (doubling)
# The JSON holds, per step: exit status, seconds, and the step's own JSON (or the tail of its output).
set -u
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu_check.json}")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export PYTHONWARNINGS=ignore

step() {   # name limit_s command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$TMP/$name.log" 2>&1
    echo "$? $((SECONDS - t0))" >"$TMP/$name.rc"
    echo "[$name] exit $(cut -d' ' -f1 "$TMP/$name.rc") in $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$TMP/gpu.txt" 2>&1 || true
TRAIN_TESTS=tests/test_cuda_train.py
[ -f "$TRAIN_TESTS" ] || TRAIN_TESTS=
step tests 200 python -m pytest -q -rs tests/test_cuda.py $TRAIN_TESTS --junitxml "$TMP/tests.xml"
step model 60 python benchmarks/bench_model.py --device cuda --dtypes fp32,bf16,fp16 --repeats 5 --json "$TMP/model.json"
step eval 70 python benchmarks/bench_eval.py --device cuda --images 100 --repeat 2 --json "$TMP/eval.json"
step eval_bf16 30 python benchmarks/bench_eval.py --device cuda --images 100 --repeat 2 --precision bf16 \
    --skip_reference --json "$TMP/eval_bf16.json"
step train 110 python benchmarks/bench_train.py --device cuda --precisions fp32,bf16 --steps 3 --find_max_batch \
    --max_batch 1024 --json "$TMP/train.json"

python - "$TMP" "$OUT" <<'PY'
import json, os, sys, time
tmp, out = sys.argv[1], sys.argv[2]
report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": open(os.path.join(tmp, "gpu.txt")).read().strip()}
for name in ("tests", "model", "eval", "eval_bf16", "train"):
    rc, seconds = open(os.path.join(tmp, name + ".rc")).read().split()
    entry = {"exit": int(rc), "seconds": int(seconds)}
    result = os.path.join(tmp, name + ".json")
    if os.path.exists(result):
        entry["result"] = json.load(open(result))
    log = open(os.path.join(tmp, name + ".log"), errors="replace").read()
    entry["output_tail"] = log[-4000:]
    if name == "tests" and os.path.exists(os.path.join(tmp, "tests.xml")):
        import xml.etree.ElementTree as ET
        suite = ET.parse(os.path.join(tmp, "tests.xml")).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        entry["summary"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        entry["cases"] = {f'{c.get("classname")}::{c.get("name")}':
                          ("failed" if c.find("failure") is not None or c.find("error") is not None
                           else "skipped" if c.find("skipped") is not None else "passed") for c in suite.iter("testcase")}
    report[name] = entry
report["ok"] = all(report[n]["exit"] == 0 for n in ("tests", "model", "eval", "eval_bf16", "train"))
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
with open(out + ".part", "w") as f:
    json.dump(report, f, indent=1)
os.replace(out + ".part", out)
print(f"wrote {out} (ok: {report['ok']})")
PY
