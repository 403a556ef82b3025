#!/usr/bin/env bash
# lm-evaluation-harness against `emoe serve` (its local-completions model: loglikelihood requests with echo
# and logprobs): 4-way sentiment choice on the first 40 sentiment prompts of the embedded test split.
#   emoe serve --port 8777 [--budget 0.4 --policy emoe-a-q48]   # in another shell
#   pip install "lm_eval[api]==0.4.13"                           # not a dependency of emoe
#   bash scripts/lm_eval_sentiment.sh http://127.0.0.1:8777 [N]
set -eu
URL=${1:?usage: lm_eval_sentiment.sh SERVER_URL [N]}; N=${2:-40}
D=$(mktemp -d)
python3 - "$D" "$N" <<'PY'
import json, sys
from pathlib import Path
d, n = Path(sys.argv[1]), int(sys.argv[2])
labels = ["positive", "negative", "neutral", "ambivalent"]
rows = [json.loads(l) for l in open(Path("emoe/data/tasks/test.jsonl"))]
rows = [r for r in rows if r["task"] == "sentiment" and r["answer"].strip().lower() in labels][:n]
(d / "sentiment.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "label": labels.index(
    r["answer"].strip().lower())}) + "\n" for r in rows))
(d / "emoe_sentiment.yaml").write_text(f"""task: emoe_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d}/sentiment.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: [" positive", " negative", " neutral", " ambivalent"]
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
PY
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model local-completions \
  --model_args "model=emoe-tiny,base_url=$URL/v1/completions,tokenizer=$PWD/emoe/models/emoe-tiny,num_concurrent=1,max_retries=1" \
  --tasks emoe_sentiment --include_path "$D" --batch_size 1
