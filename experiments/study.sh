#!/usr/bin/env bash
# The reproduction study (docs/study.md): SAR vs continued teacher forcing vs naive student forcing, on the toy
# data and MNIST. For each dataset: a tokenizer, a teacher-forcing checkpoint P, then from P the same number of
# extra steps for each variant and seed, each evaluated with fixed sampling seeds (domain FID, class accuracy),
# the exposure-bias diagnostic and s/step. Resumable: finished runs are skipped.
#
#   MNIST=/path/to/mnist bash experiments/study.sh      # (or: bash train.sh study)   about 90 min on 2 cores
#   SMOKE=1 bash experiments/study.sh                   # tiny sizes, a few minutes
#
# MNIST is the folder with the IDX files (t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]; with only the
# test split it is split 8,000 / 2,000). Variables: OUT, SEEDS, DATASETS, VARIANTS, PRE_STEPS, STEPS, BATCH,
# NUM_SAMPLES, DIAG, DEPTH, LANES (2: the datasets side by side, one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SMOKE=${SMOKE:-0}
SOUT=${OUT:-$([ "$SMOKE" = 1 ] && echo out/study_smoke || echo out/study)}
SEEDS=${SEEDS:-0 1 2}
DATASETS=${DATASETS:-toy mnist}
MNIST=${MNIST:-data/mnist}
case " $DATASETS " in *" mnist "*)
  if [ ! -d "$MNIST" ]; then
    echo "error: MNIST not found at $MNIST: download the IDX files (e.g. t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from the MNIST site or a mirror) into a folder and set MNIST=<folder>, or run DATASETS=toy" >&2
    exit 2
  fi;;
esac
if [ "$SMOKE" = 1 ]; then
  PRE_STEPS=${PRE_STEPS:-6}; STEPS=${STEPS:-2}; BATCH=${BATCH:-8}; NUM_SAMPLES=${NUM_SAMPLES:-2}; DIAG=${DIAG:-16}
  DEPTH=${DEPTH:-1}; TOK_FLAGS="--steps 6 --batch-size 8 --ch 16 --eval-images 16"; CLF_FLAGS="--steps 10"
else
  PRE_STEPS=${PRE_STEPS:-500}; STEPS=${STEPS:-60}; BATCH=${BATCH:-16}; NUM_SAMPLES=${NUM_SAMPLES:-30}; DIAG=${DIAG:-300}
  DEPTH=${DEPTH:-4}; TOK_FLAGS=""; CLF_FLAGS=""
fi
# each variant's flags; all post-train from P with the same LR (3e-4, constant), steps, batch and seeds
VARIANTS=${VARIANTS:-"tf sar sar_all sar_gt sar_argmax sar_sample sf_full sf_hybrid"}
declare -A FLAGS=(
  [tf]="sar.py --mode tf"                            # continued teacher forcing: the baseline of Table 4
  [sar]="sar.py --mode sar"                          # the official recipe: last transition, teacher target, CFG SF
  [sar_all]="sar.py --mode sar --sf-transitions all" # eq. 6/8: every scale student-forced
  [sar_gt]="sar.py --mode sar --csf-target gt"       # Algorithm 1 line 24: GT as the CSF target
  [sar_argmax]="sar.py --mode sar --sf-input argmax" # Table 5: no sampling
  [sar_sample]="sar.py --mode sar --sf-input sample" # Table 5: sampling without CFG
  [sf_full]="experiments/naive_sf.py --schedule full"                 # Table 3: naive student forcing, eq. 3
  [sf_hybrid]="experiments/naive_sf.py --schedule hybrid --hybrid-k 4" # Table 3: hybrid@4
)
mkdir -p "$SOUT"
git rev-parse HEAD > "$SOUT/commit.txt" 2>/dev/null || true
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }
study_dataset() {   # one dataset, start to end; resumable (finished runs are skipped)
  local ds=$1 data d r seed v
  data=$([ "$ds" = mnist ] && echo "$MNIST" || echo "$ds")
  d=$SOUT/$ds
  mkdir -p "$d"
  [ -f "$d/tokenizer.pt" ] || { stamp "$ds: tokenizer"; $PY tokenizer.py --data "$data" --out "$d/tokenizer.pt" $TOK_FLAGS > "$d/tokenizer.log" 2>&1; }
  [ -f "$d/clf.pt" ] || { stamp "$ds: domain classifier"; $PY fid.py --train-classifier "$data" --out "$d/clf.pt" $CLF_FLAGS > "$d/clf.log" 2>&1; }
  COMMON="--data $data --vae $d/tokenizer.pt --depth $DEPTH --batch-size $BATCH --quiet --log-every 10 --workers 0"
  stamp "$ds: teacher-forcing checkpoint P ($PRE_STEPS steps)"
  $PY sar.py --mode tf $COMMON --steps "$PRE_STEPS" --out-dir "$d/P" --resume > "$d/P.log" 2>&1
  for seed in $SEEDS; do
    for v in $VARIANTS; do
      r=$d/$v/s$seed
      [ -f "$r/eval.json" ] && continue
      stamp "$ds: $v, seed $seed ($STEPS steps from P)"
      mkdir -p "$r"
      $PY ${FLAGS[$v]} $COMMON --init "$d/P/ckpt.pt" --steps "$STEPS" --lr 3e-4 --lr-end 1 --warmup-steps 0 \
        --seed "$seed" --out-dir "$r" --resume > "$r/run.log" 2>&1
      $PY sar.py --sample --ckpt "$r/ckpt.pt" --num-samples "$NUM_SAMPLES" --cfg 1.5 --seed 0 --save-npz "$r/samples.npz" \
        --out-dir "$r" --quiet >> "$r/run.log" 2>&1
      $PY experiments/diagnose.py --ckpt "$r/ckpt.pt" --data "$data" --images "$DIAG" --cfg 1.5 --seed 0 --quiet >> "$r/run.log" 2>&1
      $PY fid.py "$r/samples.npz" "$data" --features "$d/clf.pt" --ref-split val --json "$r/eval.json" >> "$r/run.log" 2>&1
    done
  done
}
if [ "${LANES:-2}" = 2 ]; then   # the datasets side by side, one CPU thread each (2 cores)
  pids=()
  for ds in $DATASETS; do OMP_NUM_THREADS=1 study_dataset "$ds" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done   # a failed lane fails the study
else
  for ds in $DATASETS; do study_dataset "$ds"; done
fi
stamp "study done; results in $SOUT/results.json and $SOUT/results.csv"
$PY experiments/study_summary.py "$SOUT" "$BATCH"
