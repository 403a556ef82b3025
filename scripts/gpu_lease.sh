#!/usr/bin/env bash
# One device-tool call's worth of scripts/gpu_check.sh, packed to fit a short lease and the tool's 8-file return:
#   bash scripts/gpu_lease.sh OUTDIR [SECONDS]
# MAKE_STEPS / GPU_STEPS: gpu_check.sh's steps for each phase; PYTEST_ARGS / PYTEST_K narrow the tests; AB_OLD=TREE (with
# AB_CONFIGS, AB_ROUNDS) ends with scripts/ab_profile.sh of that older tree against this one.
# The tests run beside the CPU-only steps that write the random models (they do not touch the GPU), then the
# GPU steps run alone so that their tokens/s are not shared with pytest. A GPU step named in MAKE_STEPS runs beside
# the tests: calibrate and generate ran past their limits there (alone: 25 and 21 s). Every step's log lands in one
# OUTDIR/gpu.tgz, written even when the time (default 540 s) runs out.
set -u
OUT=${1:?usage: gpu_lease.sh OUTDIR [SECONDS]}; BUDGET=${2:-540}; T0=$SECONDS
W=$(mktemp -d); mkdir -p "$OUT"
pack() { tar czf "$OUT/gpu.tgz" -C "$W" . ; [ -d .whl.installed ] && mv .whl.installed .whl; }
trap pack EXIT
if ls .whl/*.whl >/dev/null 2>&1; then   # installed once here: two gpu_check.sh installing at once would race
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site; mv .whl .whl.installed
fi
left() { echo $((BUDGET - (SECONDS - T0))); }
STEPS=pytest timeout "$(left)" bash scripts/gpu_check.sh "$W/tests" > "$W/pytest.log" 2>&1 &
STEPS="${MAKE_STEPS:-random_model gguf_pair random_gpt_oss random_ds_fp8}" \
  timeout "$(left)" bash scripts/gpu_check.sh "$W/make" > "$W/make.log" 2>&1
wait; cat "$W/pytest.log"; grep "^== " "$W/make.log"
for s in ${GPU_STEPS:-auto_vs_load host_kq eval_layers profile_gguf profile_gpt_oss profile_ds_fp8 interleave}; do
  [ "$(left)" -gt 5 ] || break   # one call each, so that they run in this order (gpu_check.sh keeps its own)
  STEPS=$s timeout "$(left)" bash scripts/gpu_check.sh "$W/gpu" 2>&1 | grep -v "^torch \|^NVIDIA" | tee -a "$W/gpu.log"
done
if [ -n "${AB_OLD:-}" ] && [ "$(left)" -gt 30 ]; then  # an older tree (scripts/ab_profile.sh) on the random model
  AB_RANDOM=/tmp/random-2g AB_EMBEDDED=0 timeout "$(left)" bash scripts/ab_profile.sh "$AB_OLD" "${AB_ROUNDS:-2}" 2>&1 \
    | tee "$W/ab.log"
fi
