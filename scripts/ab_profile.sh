#!/usr/bin/env bash
# Tokens/s of an older revision against the working tree, alternated on one machine in one run (same models,
# prompts and budgets), with new/old ratios at the end. Made for a GPU lease, where decode is sync-bound:
#   git archive REV emoe scripts | tar -x -C .old --exclude=emoe/models --exclude=emoe/data   # then carry .old
#   bash scripts/ab_profile.sh .old [ROUNDS]
# AB_CONFIGS: the random model's configs (default all:1.0,reroute:0.4,host:0.4,load:0.4); AB_EMBEDDED=0 skips the
# embedded model's.
set -u
OLD=${1:?usage: ab_profile.sh OLD_TREE [ROUNDS]}; ROUNDS=${2:-2}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
M=$PWD/emoe/models/emoe-tiny R=${AB_RANDOM:-/tmp/ab-random} NEW=$PWD LOG=$(mktemp)  # AB_RANDOM: a random model made earlier
[ -f $R/config.json ] || PYTHONPATH=$NEW python3 scripts/make_random_model.py --out $R --experts 16 \
  --hidden 1024 --inter 2816 --layers 8
cp scripts/gpu_profile.py "$OLD/scripts/"  # the same harness for both trees
for round in $(seq "$ROUNDS"); do for tree in "$OLD" "$NEW"; do
  echo "## round $round, $([ "$tree" = "$NEW" ] && echo new || echo old) code"
  (cd "$tree" && export PYTHONPATH=$PWD
   timeout 90 python3 scripts/gpu_profile.py --model $R --configs ${AB_CONFIGS:-all:1.0,reroute:0.4,host:0.4,load:0.4} | sed 's/^/random /'
   [ "${AB_EMBEDDED:-1}" = 0 ] && exit
   timeout 60 python3 scripts/gpu_profile.py --model $M --configs all:1.0,reroute:0.4,host:0.4 | sed 's/^/embedded /'
   timeout 60 python3 scripts/gpu_profile.py --model $M --configs reroute:0.4 --trace | sed 's/^/embedded /')
done; done 2>&1 | grep -v -i warn | tee "$LOG"
python3 - "$LOG" <<'PY'
import collections, re, sys
d, tree = collections.defaultdict(list), None
for line in open(sys.argv[1]):
    if m := re.match(r"## round \d+, (\w+) code", line):
        tree = m.group(1)
    elif m := re.match(r"(\w+) (\S+)\s+([\d.]+) on .*warm ([\d.]+) ([\d.]+)", line):
        d[m.group(1, 2, 3)].append((tree, float(m.group(4)), float(m.group(5))))
print("model     config        budget  old tok/s  new tok/s  new/old (mean of warm runs)")
for k, rows in d.items():
    mean = lambda t: sum(a + b for w, a, b in rows if w == t) / (2 * sum(w == t for w, *_ in rows) or 1)
    print(f"{k[0]:9} {k[1]:13} {k[2]:6} {mean('old'):10.1f} {mean('new'):10.1f}  {mean('new') / mean('old'):.2f}x")
PY
