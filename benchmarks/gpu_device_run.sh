#!/bin/bash
# One prepared GPU session for issue 12: run from the repository root on an offline CUDA machine
# (Python 3.12 + torch with CUDA; prefect, pydantic, openpyxl from .whl/):
#
#   bash benchmarks/gpu_device_run.sh            # results under $OUT (else /tmp/gpu_out)
#
# Sections, each under `timeout` and a shared deadline (TOTAL_S, default 530 s), so one failure or overrun
# never loses the others' results:
#   1. install .whl/*.whl into /tmp/site (see ../shared/tools/offline-gpu-wheels.sh; add pytest + iniconfig
#      wheels to .whl/ for step 5: pip download --only-binary=:all: --python-version 3.12 --no-deps -d .whl
#      pytest iniconfig)
#   2. the demo's 53-patient phantom (flows.phantom, no Prefect server needed)
#   3. benchmarks/gpu_bench.py: matmul peak, Pix2Pix and CRGAN train_step img/s at batch 1/8/32 (bf16, fp32),
#      Pix2Pix batch 1 cuda_graphs on/off, checkpoint write seconds per model
#   4. `python3 -m flows.cli run SOUL RUN --preset full --config short.json`: the whole flow at 256 px with
#      schedules cut to fit (SHORT_CONFIG below), then `flows.cli inspect --deep` of its augmented.h5 and
#      the flow's per-step timings (gpu_bench.py --sections flow)
#   4b. benchmarks/batch_size_check.py on step 4's soul.h5: Pix2Pix (full preset) at batch 1 vs batch 8 (same lr,
#      and lr x sqrt 8) for BATCH_CHECK_EPOCHS (default 5) epochs each, seeds 0 and 1: held-out test Dice at equal
#      epochs, paired by seed (issue 12: a larger batch must not lower it)
#   5. pytest -m gpu (tests/test_gpu.py: the full preset end to end on CUDA, small phantom)
#   6. if time is left: gpu_bench.py --sections eval on the run of step 4, evaluate_pix2pix / evaluate_crgan
#      timed alone (the flow's own evaluation seconds, overlapping the other model's training, are already in
#      step 4's report.json and gpu_bench_flow.json)
# Copied to $OUT: every log, gpu_bench*.json, and the run's report.json, report.md, run.json, DATASET_CARD.md,
# .steps/*.json and the top-level figures (not the per-patient timelines). Exit status: 0 when every section passed, else 1 (see summary.txt).
#
# SECTIONS (default "bench full_run batch_check pytest_gpu bench_eval") picks the optional sections, e.g. a rerun of
# SECTIONS="full_run pytest_gpu" after a fix. A device machine returns only a few files, so everything is also
# packed into $OUT/results.tgz (unpack with tar xzf).
#
# SMOKE=1 checks the script itself on a CPU in a few minutes: an 8-patient phantom, the tiny preset with one
# epoch each, the bench's --tiny sizes at batch 1 (pytest -m gpu then skips: no CUDA).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
SECTIONS=" ${SECTIONS:-bench full_run batch_check pytest_gpu bench_eval} "
# BENCH_SECTIONS: gpu_bench.py's sections for step 3 (e.g. "checkpoint" alone when the rest is already measured)
BENCH_SECTIONS=${BENCH_SECTIONS:-peak,pix2pix,crgan,graphs,checkpoint}
wanted() { [[ "$SECTIONS" == *" $1 "* ]]; }
WORK=${WORK:-/tmp/brvo_gpu_work}
TOTAL_S=${TOTAL_S:-530}
PY=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then PATIENTS=8 PRESET=tiny BENCH_SIZE="--tiny --batches 1 --window 0.2"
else PATIENTS=53 PRESET=full BENCH_SIZE=; fi
START=$(date +%s)
rm -rf "$WORK" && mkdir -p "$WORK"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
# a busy machine can take over Prefect's default 20 s to start the temporary server
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="$WORK/prefect_home" \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90

elapsed() { echo $(( $(date +%s) - START )); }
# seconds a section may take: its wish, capped by what is left of TOTAL_S (minus 15 s to copy results)
allow() { local left=$(( TOTAL_S - $(elapsed) - 15 )); (( left < $1 )) && echo "$left" || echo "$1"; }
# section NAME WISH_S COMMAND...: run under timeout (its process group is killed on expiry), log to $OUT/NAME.log
section() {
    local name=$1 wish=$2; shift 2
    local limit; limit=$(allow "$wish")
    if (( limit < 20 )); then
        echo "SKIP $name (only ${limit}s left of ${TOTAL_S}s)" | tee -a "$SUMMARY"; return 1
    fi
    echo "=== [$(elapsed)s] $name (limit ${limit}s): $*"
    local t0; t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    local line="$( ((rc == 0)) && echo PASS || echo FAIL) $name rc=$rc $(( $(date +%s) - t0 ))s$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
    echo "$line" | tee -a "$SUMMARY"
    return $rc
}

# ---------------------------------------------------------------- 1. packages
if ls .whl/*.whl > /dev/null 2>&1; then
    section install 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt" 2>&1
$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for mod in ("prefect", "pydantic", "openpyxl", "pytest", "h5py", "skimage"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:
        print(mod, "MISSING", type(exc).__name__)
EOF

# ---------------------------------------------------------------- 2. phantom
SOUL=$WORK/SOUL
section phantom 60 $PY -c "
import os
from pathlib import Path
from flows.phantom import generate_phantom
print(generate_phantom(Path('$SOUL'), n_patients=$PATIENTS, workers=min(16, os.cpu_count() or 1)))"

# ---------------------------------------------------------------- 3. training-step benchmark
wanted bench && section bench 120 $PY benchmarks/gpu_bench.py --sections "$BENCH_SECTIONS" --window 1.0 \
    --section-timeout 60 --json "$OUT/gpu_bench.json" $BENCH_SIZE

# ---------------------------------------------------------------- 4. the full preset, schedules cut
# Pix2Pix: 2 epochs at batch 1 (594 train images, ~12-15 s an epoch on an H200 per issue 12); CRGAN: 25 epochs
# (3 steps each; ~2.4 s an epoch); usefulness cut to one seed, segmenter 200 steps. Everything else is the full preset (256 px, widths).
RUN=$WORK/run
cat > "$WORK/short.json" <<EOF
{"pix2pix": {"epochs": 2}, "crgan": {"epochs": 25}, "samples_per_missing": 2,
 "usefulness": {"seeds": 1, "segmenter": {"steps": 200}${USEFULNESS_EXTRA:-}}, "workers": 8}
EOF
[ "${SMOKE:-0}" = 1 ] && echo '{"pix2pix": {"epochs": 1}, "crgan": {"epochs": 1}, "usefulness": {"segmenter": {"steps": 5}}}' > "$WORK/short.json"
cp "$WORK/short.json" "$OUT/full_run_config.json"
wanted full_run && section full_run ${FULL_RUN_S:-320} $PY -m flows.cli run "$SOUL" "$RUN" --preset $PRESET --config "$WORK/short.json"
wanted full_run && [ -f "$RUN/augmented.h5" ] && section inspect 40 $PY -m flows.cli inspect "$RUN/augmented.h5" --deep
wanted full_run && section flow_timings 30 $PY benchmarks/gpu_bench.py $BENCH_SIZE --sections flow --full-run "$RUN" \
    --json "$OUT/gpu_bench_flow.json"
mkdir -p "$OUT/run"
for f in report.json report.md run.json DATASET_CARD.md; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/run/"; done
[ -d "$RUN/.steps" ] && cp -r "$RUN/.steps" "$OUT/run/steps"
[ -d "$RUN/figures" ] && mkdir -p "$OUT/run/figures" && cp "$RUN"/figures/*.png "$OUT/run/figures/" 2>/dev/null

# ---------------------------------------------------------------- 4b. batch 1 vs batch 8 at equal epochs
if wanted batch_check && [ -f "$RUN/soul.h5" ]; then
    BC_LIMIT=$(allow "${BATCH_CHECK_S:-170}")
    BC_EPOCHS=${BATCH_CHECK_EPOCHS:-5}; [ "${SMOKE:-0}" = 1 ] && BC_EPOCHS=1
    # the script starts no run its last duration says would overrun: leave it 20 s to print and write
    section batch_check "$BC_LIMIT" $PY benchmarks/batch_size_check.py "$RUN" --preset $PRESET --epochs "$BC_EPOCHS" \
        --seeds 0 1 --variants b1 b8 b8_sqrt_lr --deadline-s $(( BC_LIMIT - 20 )) --json "$OUT/batch_size_check.json"
fi

# ---------------------------------------------------------------- 5. the CUDA integration test
if ! wanted pytest_gpu; then :
elif $PY -c "import pytest" 2>/dev/null; then
    section pytest_gpu 130 $PY -m pytest -m gpu -x -p no:cacheprovider --durations=10 tests/test_gpu.py
else
    echo "SKIP pytest_gpu (pytest not installed: add its wheels to .whl/, see the header)" | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------- 6. evaluation seconds per model
wanted bench_eval && [ -f "$RUN/checkpoints/crgan/best.pt" ] && section bench_eval 90 $PY benchmarks/gpu_bench.py $BENCH_SIZE --sections eval \
    --full-run "$RUN" --section-timeout 85 --json "$OUT/gpu_bench_eval.json"

echo "=== [$(elapsed)s] done"
cat "$SUMMARY"
[ -f "$OUT/gpu_bench.json" ] && $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("gpu_bench.json", "gpu_bench_flow.json", "gpu_bench_eval.json"):
    p = out / name
    if p.exists():
        d = json.loads(p.read_text())
        for key in ("pix2pix", "crgan", "graphs"):
            for r in d.get(key) or []:
                print(f"{r['name']:<34}", "ERROR " + r["error"] if "error" in r else
                      f"{r['img_per_s']:8.1f} img/s {100 * (r.get('fraction_of_bf16_peak') or 0):5.1f}% peak")
        if d.get("peak"):
            print("bf16 peak TFLOP/s", round(d["peak"]["tflops"], 1))
        if d.get("flow"):
            print("flow timings_s", d["flow"].get("timings_s"))
        if d.get("eval"):
            print("eval", d["eval"])
EOF
tar czf /tmp/results.tgz -C "$OUT" . && mv /tmp/results.tgz "$OUT/results.tgz"
grep -q FAIL "$SUMMARY" && exit 1 || exit 0
