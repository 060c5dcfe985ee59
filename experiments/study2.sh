#!/usr/bin/env bash
# The second study (docs/study2.md). The first (experiments/study.sh) found SAR indistinguishable from continued
# teacher forcing after 60 steps at gamma 0.01. This one asks whether a larger gamma, a longer post-training
# budget, or SAR from the first step (the paper's Figure 1a) makes a difference. On the toy data and MNIST,
# per dataset:
#   1. a tokenizer, the domain classifier and a teacher-forcing checkpoint P, made with the scripts' default
#      flags (the laptop recipe of train.sh);
#   2. sweep: from P, STEPS steps of continued TF (Table 4's baseline) and of SAR (the official recipe) at each
#      gamma of GAMMAS; then SAR with every transition student-forced (eq. 6/8) at the best gamma;
#   3. budget: the two best settings of the sweep for BUDGET_MULT x STEPS steps, evaluated every EVAL_EVERY
#      steps; TF runs too when it is not among the two, so that every curve has its TF baseline;
#   4. scratch: TF vs SAR at the best gamma from random weights, SCRATCH_STEPS steps, evaluated every
#      SCRATCH_EVERY steps.
# "Best" is the lowest domain FID, averaged over the seeds. Runs and evaluations are those of the first study:
# seeds 0, 1, 2 (they set the data order too), batch 16, post-training at lr 3e-4 constant; at every evaluation
# point 30 samples per class with fixed sampling seeds -> domain FID and class accuracy, and the exposure-bias
# diagnostic on 300 held-out images.
#
#   MNIST=/path/to/mnist bash experiments/study2.sh     # (or: bash train.sh study2)   1 h 58 min on 2 cores
#   SMOKE=1 bash experiments/study2.sh                  # tiny sizes, a few minutes; also checks the chunking
#
# Time, measured on 2 cores (AMD EPYC, bf16), two lanes of one thread: sweep 24 min, budget 32 min, scratch
# 62 min, 1 h 58 min in all when P, tokenizer and classifier exist (train.sh's laptop recipe, about 12 min per
# dataset, otherwise). A step of batch 16 takes about 0.33 s with TF, 0.72 s with SAR, 0.96 s with all
# transitions; an evaluation point about 40 s. To cut:
# SCRATCH_STEPS=400 (about -18 min), SCRATCH_EVERY=200 (-12 min), BUDGET_MULT=4 (about -8 min).
#
# Training runs in chunks: a curve is `--steps 120 --resume`, then `--steps 180 --resume`, ... on one folder,
# and a budget run starts from the sweep run's checkpoint. That equals one uninterrupted run because the LR
# is constant (--lr-end 1; a warm-up of fixed --warmup-steps depends on the step only), every random draw and
# the data order derive from (seed, step), and the checkpoint holds the Adam state. SMOKE=1 checks it: it
# compares the weights of chunked runs with one-shot runs (CHUNK_CHECK=1 does it at any size).
#
# Outputs ($OUT, default out/study2): <dataset>/{tokenizer.pt, clf.pt, P/, best_gamma.txt, budget.txt} and
# <dataset>/<part>/<setting>/s<seed>/at_<step>/{eval.json, diagnose.json, samples.png} for every evaluation
# point, with part sweep | budget | scratch and setting tf | sar_g<gamma> | sar_all_g<gamma>; then
# results.json, results.csv, the tables and plots/*.png (experiments/study2_summary.py).
# Variables: OUT, SEEDS, DATASETS, MNIST, GAMMAS, STEPS, BATCH, BUDGET_MULT, EVAL_EVERY, SCRATCH_STEPS,
# SCRATCH_EVERY, SCRATCH_WARMUP, NUM_SAMPLES, DIAG, DEPTH (unset: the scripts' default), TOK_FLAGS and
# PRE_FLAGS (extra flags of tokenizer.py and of P), LANES (2: the datasets side by side, one thread each),
# CHUNK_CHECK (1: the check above).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
SOUT=${OUT:-$([ "$SMOKE" = 1 ] && echo out/study2_smoke || echo out/study2)}
DATASETS=${DATASETS:-toy mnist}
MNIST=${MNIST:-data/mnist}
die() { echo "error: $*" >&2; exit 2; }
if [ "$SMOKE" = 1 ]; then  # every stage at tiny sizes, one seed, two gammas to choose from
  SEEDS=${SEEDS:-0}; GAMMAS=${GAMMAS:-0.1 1.0}; DEPTH=${DEPTH:-1}; BATCH=${BATCH:-8}; STEPS=${STEPS:-2}
  BUDGET_MULT=${BUDGET_MULT:-2}; SCRATCH_STEPS=${SCRATCH_STEPS:-4}; SCRATCH_EVERY=${SCRATCH_EVERY:-2}
  SCRATCH_WARMUP=${SCRATCH_WARMUP:-3}   # crosses a chunk boundary, so the chunk check covers the warm-up
  NUM_SAMPLES=${NUM_SAMPLES:-2}; DIAG=${DIAG:-16}; CLF_FLAGS="--steps 10"; CHUNK_CHECK=${CHUNK_CHECK:-1}
  TOK_FLAGS=${TOK_FLAGS:---steps 6 --batch-size 8 --ch 16 --eval-images 16}
  PRE_FLAGS=${PRE_FLAGS:---steps 6 --batch-size 8}
else
  SEEDS=${SEEDS:-0 1 2}; GAMMAS=${GAMMAS:-0.01 0.1 0.3 1.0}; BATCH=${BATCH:-16}; STEPS=${STEPS:-60}
  BUDGET_MULT=${BUDGET_MULT:-5}; SCRATCH_STEPS=${SCRATCH_STEPS:-600}; SCRATCH_EVERY=${SCRATCH_EVERY:-100}
  NUM_SAMPLES=${NUM_SAMPLES:-30}; DIAG=${DIAG:-300}; CLF_FLAGS=""; CHUNK_CHECK=${CHUNK_CHECK:-0}
  TOK_FLAGS=${TOK_FLAGS:-}; PRE_FLAGS=${PRE_FLAGS:-}   # empty: the scripts' defaults are the laptop recipe
fi
EVAL_EVERY=${EVAL_EVERY:-$STEPS}
# bad values fail here, in one line, before hours of work
for v in STEPS BATCH BUDGET_MULT EVAL_EVERY SCRATCH_STEPS SCRATCH_EVERY NUM_SAMPLES DIAG ${DEPTH:+DEPTH}; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
SCRATCH_WARMUP=${SCRATCH_WARMUP:-$((SCRATCH_STEPS / 50))}   # the recipe's 2 % warm-up (12 of 600 steps)
[[ $SCRATCH_WARMUP =~ ^[0-9]+$ ]] || die "SCRATCH_WARMUP must be an integer >= 0, got '$SCRATCH_WARMUP'"
[[ " $SEEDS " =~ ^(\ [0-9]+)+\ +$ ]] || die "SEEDS must be integers >= 0 separated by spaces, got '$SEEDS'"
[[ " $GAMMAS " =~ ^(\ [0-9]*\.?[0-9]+)+\ +$ ]] || die "GAMMAS must be numbers separated by spaces, got '$GAMMAS'"
[[ " $DATASETS " =~ ^(\ (toy|mnist))+\ +$ ]] || die "DATASETS takes toy and/or mnist, got '$DATASETS'"
[[ ${LANES:-2} =~ ^[12]$ ]] || die "LANES must be 1 or 2, got '$LANES'"
(( BUDGET_MULT * STEPS % EVAL_EVERY == 0 )) ||
  die "EVAL_EVERY ($EVAL_EVERY) must divide BUDGET_MULT x STEPS ($((BUDGET_MULT * STEPS)))"
(( SCRATCH_STEPS % SCRATCH_EVERY == 0 )) ||
  die "SCRATCH_EVERY ($SCRATCH_EVERY) must divide SCRATCH_STEPS ($SCRATCH_STEPS)"
case " $DATASETS " in *" mnist "*)
  [ -d "$MNIST" ] || die "MNIST not found at $MNIST: download the IDX files (e.g. t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from the MNIST site or a mirror) into a folder and set MNIST=<folder>, or run DATASETS=toy";;
esac
DEPTH_FLAG=${DEPTH:+--depth $DEPTH}
POST="--lr 3e-4 --lr-end 1 --warmup-steps 0"                     # post-training from P: the first study's LR
SCRATCH="--lr 1e-3 --lr-end 1 --warmup-steps $SCRATCH_WARMUP"     # from scratch: the recipe's peak, then constant
mkdir -p "$SOUT"
git describe --always --dirty --abbrev=40 > "$SOUT/commit.txt" 2>/dev/null || true
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

# The functions below run inside study_dataset and read its $ds, $data and $d (bash scoping is dynamic).
run() {   # run LOG CMD...: the command, its output appended to LOG; a failure stops the lane with one line
  local log=$1; shift
  "$@" >> "$log" 2>&1 || { echo "error: $ds: '$*' failed: $(tail -n 1 "$log") (all of it in $log)" >&2; exit 1; }
}
flags_of() {   # a setting's name -> its sar.py flags
  case $1 in
    tf) echo "--mode tf";;                                                     # continued teacher forcing
    sar_all_g*) echo "--mode sar --sf-transitions all --gamma ${1#sar_all_g}";;   # eq. 6/8, every scale
    sar_g*) echo "--mode sar --gamma ${1#sar_g}";;                             # the official recipe
  esac
}
train() {   # train RUN STEPS FLAGS...: train (or resume) the run in folder RUN up to STEPS steps
  local r=$1 steps=$2; shift 2
  mkdir -p "$r"
  run "$r/run.log" $PY sar.py "$@" --data "$data" --vae "$d/tokenizer.pt" $DEPTH_FLAG --batch-size "$BATCH" \
    --steps "$steps" --out-dir "$r" --resume --quiet --log-every 10 --workers 0
  # a checkpoint already past STEPS (EVAL_EVERY changed since) would be evaluated at the wrong step
  tail -n 1 "$r/run.log" | grep -q "^done: $steps steps" ||
    { echo "error: $r is not at step $steps ($(tail -n 1 "$r/run.log")): delete the folder to redo it" >&2; exit 1; }
}
at() { printf '%s/at_%04d' "$1" "$2"; }   # the evaluation folder of run $1 at step $2
evaluate() {   # evaluate RUN STEP: the run's checkpoint, now at STEP, evaluated exactly as in the first study
  local r=$1 e; e=$(at "$1" "$2")
  mkdir -p "$e"
  run "$r/run.log" $PY sar.py --sample --ckpt "$r/ckpt.pt" --num-samples "$NUM_SAMPLES" --cfg 1.5 --seed 0 \
    --save-npz "$e/samples.npz" --out-dir "$e" --quiet
  run "$r/run.log" $PY experiments/diagnose.py --ckpt "$r/ckpt.pt" --data "$data" --images "$DIAG" --cfg 1.5 \
    --seed 0 --out-dir "$e" --quiet
  run "$r/run.log" $PY fid.py "$e/samples.npz" "$data" --features "$d/clf.pt" --ref-split val --json "$e/eval.json"
  rm "$e/samples.npz"   # samples.png shows them; eval.json, written last, marks the point done
}
curve() {   # curve RUN LAST EVERY FLAGS...: train RUN in chunks of EVERY steps up to LAST, evaluating each
  local r=$1 last=$2 every=$3 k; shift 3
  for (( k = every; k <= last; k += every )); do
    [ -f "$(at "$r" "$k")/eval.json" ] && continue
    stamp "$ds: ${r#"$d/"}, step $k of $last"
    train "$r" "$k" "$@"
    evaluate "$r" "$k"
  done
}
from_sweep() {   # from_sweep SETTING SEED: start the budget run from the sweep run, its first STEPS steps
  local src=$d/sweep/$1/s$2 r=$d/budget/$1/s$2 e
  [ -f "$r/ckpt.pt" ] && return
  e=$(at "$r" "$STEPS")
  mkdir -p "$e"
  cp "$(at "$src" "$STEPS")"/{eval.json,diagnose.json,samples.png} "$e/"
  cp "$src/log.jsonl" "$r/"
  cp "$src/ckpt.pt" "$r/ckpt.pt.tmp" && mv "$r/ckpt.pt.tmp" "$r/ckpt.pt"   # last: a copy cut short is redone
}
same_weights() {   # same_weights CHUNKED ONE_SHOT: the chunked run must equal the one-shot run, bit for bit
  run "$d/chunk_check.log" $PY experiments/study2_summary.py --same-weights "$1/ckpt.pt" "$2/ckpt.pt"
  stamp "$ds: $(tail -n 1 "$d/chunk_check.log")"
}

study_dataset() {   # one dataset, start to end (resumable)
  local ds=$1 data d seed s best settings first POST_P
  data=$([ "$ds" = mnist ] && echo "$MNIST" || echo "$ds")
  d=$SOUT/$ds
  mkdir -p "$d"
  if [ ! -f "$d/tokenizer.pt" ]; then
    stamp "$ds: tokenizer"
    run "$d/tokenizer.log" $PY tokenizer.py --data "$data" --out "$d/tokenizer.pt" $TOK_FLAGS
  fi
  if [ ! -f "$d/clf.pt" ]; then
    stamp "$ds: domain classifier"
    run "$d/clf.log" $PY fid.py --train-classifier "$data" --out "$d/clf.pt" $CLF_FLAGS
  fi
  stamp "$ds: teacher-forcing checkpoint P"
  run "$d/P.log" $PY sar.py --mode tf --data "$data" --vae "$d/tokenizer.pt" --out-dir "$d/P" --resume --quiet \
    --workers 0 --log-every 10 $DEPTH_FLAG $PRE_FLAGS
  POST_P="--init $d/P/ckpt.pt $POST"

  # 2. sweep: TF and SAR at every gamma, then all transitions at the best gamma
  for seed in $SEEDS; do
    for s in tf $(printf 'sar_g%s ' $GAMMAS); do
      curve "$d/sweep/$s/s$seed" "$STEPS" "$STEPS" $(flags_of "$s") $POST_P --seed "$seed"
    done
  done
  best=$($PY experiments/study2_summary.py --best-gamma "$d" $GAMMAS)
  echo "$best" > "$d/best_gamma.txt"
  for seed in $SEEDS; do
    curve "$d/sweep/sar_all_g$best/s$seed" "$STEPS" "$STEPS" $(flags_of "sar_all_g$best") $POST_P --seed "$seed"
  done

  # 3. budget: the two best settings, and TF whatever its rank (the baseline of every curve)
  settings=$($PY experiments/study2_summary.py --best 2 "$d" tf $(printf 'sar_g%s ' $GAMMAS) "sar_all_g$best")
  case " $settings " in *" tf "*) ;; *) settings="$settings tf";; esac
  echo "$settings" > "$d/budget.txt"
  for seed in $SEEDS; do
    for s in $settings; do
      [ "$EVAL_EVERY" = "$STEPS" ] && from_sweep "$s" "$seed"
      curve "$d/budget/$s/s$seed" $((BUDGET_MULT * STEPS)) "$EVAL_EVERY" $(flags_of "$s") $POST_P --seed "$seed"
    done
  done

  # 4. from scratch (Figure 1a): TF vs SAR at the best gamma, random initial weights (no --init)
  for seed in $SEEDS; do
    for s in tf "sar_g$best"; do
      curve "$d/scratch/$s/s$seed" "$SCRATCH_STEPS" "$SCRATCH_EVERY" $(flags_of "$s") $SCRATCH --seed "$seed"
    done
  done

  if [ "$CHUNK_CHECK" = 1 ]; then   # the chunked runs above against one-shot runs of the same flags
    seed=${SEEDS%% *}; first=${settings%% *}
    stamp "$ds: chunk check: $first (budget, from P) and sar_g$best (scratch, with its warm-up), seed $seed"
    train "$d/chunk_check/budget_$first" $((BUDGET_MULT * STEPS)) $(flags_of "$first") $POST_P --seed "$seed"
    same_weights "$d/budget/$first/s$seed" "$d/chunk_check/budget_$first"
    train "$d/chunk_check/scratch_sar" "$SCRATCH_STEPS" $(flags_of "sar_g$best") $SCRATCH --seed "$seed"
    same_weights "$d/scratch/sar_g$best/s$seed" "$d/chunk_check/scratch_sar"
  fi
}

if [ "${LANES:-2}" = 2 ]; then   # the datasets side by side, one CPU thread each (2 cores)
  pids=()
  for ds in $DATASETS; do OMP_NUM_THREADS=1 study_dataset "$ds" & pids+=($!); done
  failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done   # a failed lane fails the study, after the other ends
  [ "$failed" = 0 ] || { echo "error: a lane failed (see above); run again to resume" >&2; exit 1; }
else
  for ds in $DATASETS; do study_dataset "$ds"; done
fi
stamp "study done; results in $SOUT/results.json, $SOUT/results.csv and $SOUT/plots/"
$PY experiments/study2_summary.py "$SOUT" "$BATCH"
