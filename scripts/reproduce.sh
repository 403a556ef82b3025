#!/usr/bin/env bash
# Every number in README.md, from a fresh checkout (after the README's setup command), in one go.
# Writes to runs/results/. About 40 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
E=${EMOE:-.venv/bin/emoe}
export PYTHONUNBUFFERED=1
R=runs/results
mkdir -p "$R"
P=emoe/models/emoe-tiny/profile  # the profile shipped with the embedded model
$E analyze --per-task 100 --plot docs/routing-heatmap.png --json $R/analyze.json | tee $R/analyze.txt
$E profile --out $P --per-task 80 --max-tokens 48 | tee $R/profile.txt
$E train-predictor $P --budget 0.4 --p 1,10,40 | tee $R/predictor.txt
$E bench memory --budgets 1.0,0.6,0.4,0.2 --miss-policy reroute,load --json $R/bench_memory.json | tee $R/bench_memory.txt
$E eval --profile $P --budgets 0.8,0.6,0.4,0.2 \
  --policies all,random,popular,task-static,lru,moe-infinity,pregated,emoe-a,emoe-l,emoe-e,emoe-a-hybrid,emoe-a-prompt \
  --p-sweep 1,10,40,80 --adaptive-compare --n 48 --json $R/eval.json --plot docs/eval.png | tee $R/eval.txt
$E bench compare --profile $P --budget 0.4 --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv \
  --num-requests 60 --time-scale 20 --goodput ttft:1500 tpot:150 --json $R/compare.json | tee $R/compare.txt
$E bench compare --profile $P --budget 0.4 --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv \
  --num-requests 80 --time-scale 40 --goodput ttft:1500 tpot:150 --json $R/compare40.json | tee $R/compare40.txt
$E bench capacity --profile $P --budget 0.4 --json $R/capacity.json | tee $R/capacity.txt
