#!/usr/bin/env bash
# The whole SAR recipe: tokenizer -> teacher-forcing pretraining -> SAR post-training -> sampling -> FID.
#
#   bash train.sh                      # the laptop pipeline on the built-in `toy` data (13 min on 2 CPU cores)
#   bash train.sh study                # the reproduction study: toy + MNIST, 8 variants x 3 seeds (README)
#   SMOKE=1 bash train.sh              # the same stages with tiny sizes (< 2 min; CI runs it)
#   DATA=/path/imagenet/train VAE=FlexVAE.pth INIT=FlexVARd16-epo179.pth DEPTH=16 NPROC=8 bash train.sh
#                                      # SAR post-training of the official FlexVAR-d16 with the official recipe,
#                                      # then the 50,000-sample evaluation (add FID_REF=VIRTUAL_imagenet256_labeled.npz)
#
# Variables (all optional):
#   DATA     toy | ImageFolder dir | .npz | MNIST IDX dir          (default toy)
#   VAE      tokenizer checkpoint; if unset one is trained on DATA   (official: FlexVAE.pth)
#   INIT     transformer to post-train; if unset, TF pretraining runs first (official: FlexVARd16-epo179.pth)
#   DEPTH    transformer depth (4 on the laptop; official 16/20/24)
#   NPROC    processes per node for torchrun (default 1)
#   OUT      output folder (default out, or out/smoke with SMOKE=1)
#   TF_STEPS, SAR_STEPS, BATCH, IMAGE_SIZE, SCALES, CFG, NUM_SAMPLES (per class), FID_REF, FID_WEIGHTS
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python}
# ---- install what is missing (the CPU wheel of torch on a machine without CUDA packages) ----
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0 || $PY -m pip install -q torch
$PY -c "import numpy, PIL, tqdm, scipy" 2>/dev/null || $PY -m pip install -q -r requirements.txt

SMOKE=${SMOKE:-0}

# =========================================================================================================
# bash train.sh study: the reproduction study (README "Reproduction study"). On toy and MNIST: a tokenizer, a
# teacher-forcing checkpoint P, then from P the same number of extra steps for each variant and seed, each
# evaluated with fixed sampling seeds (domain FID, class accuracy), the exposure-bias diagnostic and s/step.
# =========================================================================================================
if [ "${1:-}" = study ]; then
  SOUT=${OUT:-$([ "$SMOKE" = 1 ] && echo out/study_smoke || echo out/study)}
  SEEDS=${SEEDS:-0 1 2}
  DATASETS=${DATASETS:-toy mnist}
  MNIST=${MNIST:-../shared/data/mnist}
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
    [tf]="--mode tf"                                   # continued teacher forcing: the baseline of Table 4
    [sar]="--mode sar"                                 # the official recipe: last transition, teacher target, CFG-sampled SF
    [sar_all]="--mode sar --sf-transitions all"        # eq. 6/8: every scale student-forced
    [sar_gt]="--mode sar --csf-target gt"              # Algorithm 1 line 24: GT as the CSF target
    [sar_argmax]="--mode sar --sf-input argmax"        # Table 5: no sampling
    [sar_sample]="--mode sar --sf-input sample"        # Table 5: sampling without CFG
    [sf_full]="--mode sf --sf-schedule full"           # Table 3: naive student forcing, eq. 3
    [sf_hybrid]="--mode sf --sf-schedule hybrid --sf-hybrid-k 4"   # Table 3: hybrid@4
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
        $PY sar.py ${FLAGS[$v]} $COMMON --init "$d/P/ckpt.pt" --steps "$STEPS" --lr 3e-4 --lr-end 1 --warmup-steps 0 \
          --seed "$seed" --data-seed "$seed" --out-dir "$r" --resume > "$r/run.log" 2>&1
        $PY sar.py --sample --ckpt "$r/ckpt.pt" --num-samples "$NUM_SAMPLES" --cfg 1.5 --seed 0 --save-npz "$r/samples.npz" \
          --out-dir "$r" --quiet >> "$r/run.log" 2>&1
        $PY sar.py --diagnose --ckpt "$r/ckpt.pt" --data "$data" --diag-images "$DIAG" --cfg 1.5 --seed 0 --quiet >> "$r/run.log" 2>&1
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
  $PY - "$SOUT" "$BATCH" <<'PYEOF'
import csv, glob, json, os, statistics, sys
out, batch = sys.argv[1], int(sys.argv[2])
rows = []
for ev in sorted(glob.glob(os.path.join(out, '*', '*', 's*', 'eval.json'))):
    run = os.path.dirname(ev)
    ds, variant, seed = run.split(os.sep)[-3:]
    e, dg = json.load(open(ev)), json.load(open(os.path.join(run, 'diagnose.json')))
    logs = [json.loads(line) for line in open(os.path.join(run, 'log.jsonl'))]
    speed = [r['imgs_per_s'] for r in logs[1:]] or [r['imgs_per_s'] for r in logs]   # the first interval holds warm-up
    row = dict(dataset=ds, variant=variant, seed=int(seed[1:]), fid=e['fid'], acc=e['acc'],
               s_per_step=batch / statistics.median(speed))
    row.update({f'ce_{k}': v for k, v in dg['token_mean_ce'].items()})
    for kind in ('teacher', 'rollout'):
        row.update({f'{kind}_ce_{pn}': v['ce'] for pn, v in dg['per_scale'][kind].items()})
    rows.append(row)
commit = open(os.path.join(out, 'commit.txt')).read().strip() if os.path.isfile(os.path.join(out, 'commit.txt')) else None
json.dump(dict(commit=commit, runs=rows), open(os.path.join(out, 'results.json'), 'w'), indent=1)
with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
ms = lambda xs: f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
cols = ['fid', 'acc', 'ce_teacher', 'ce_ssr', 'ce_rollout', 's_per_step']
for ds in dict.fromkeys(r['dataset'] for r in rows):
    print(f"\n{ds} (commit {commit}): mean ± std over seeds\n| variant | seeds | " + ' | '.join(cols) + ' |')
    print('|---|---|' + '---|' * len(cols))
    for v in dict.fromkeys(r['variant'] for r in rows if r['dataset'] == ds):
        rs = [r for r in rows if r['dataset'] == ds and r['variant'] == v]
        print(f"| {v} | {len(rs)} | " + ' | '.join(ms([r[c] for r in rs]) for c in cols) + ' |')
PYEOF
  exit 0
fi
DATA=${DATA:-toy}
NPROC=${NPROC:-1}
if [ -n "${INIT:-}" ] && [ -z "${DEPTH:-}" ]; then echo "error: INIT given: set DEPTH to its depth (16/20/24)" >&2; exit 2; fi
DEPTH=${DEPTH:-$([ "$SMOKE" = 1 ] && echo 2 || echo 4)}
if [ "$DEPTH" -ge 12 ]; then            # the official sizes: ImageNet 256 px, 1000 classes, official recipe
  IMAGE_SIZE=${IMAGE_SIZE:-256}; SCALES=${SCALES:-1,2,3,4,5,6,8,10,13,16}; BATCH=${BATCH:-768}
  TF_STEPS=${TF_STEPS:-300000}; SAR_STEPS=${SAR_STEPS:-18359}      # 11 epochs x 1669 it (the official SAR run)
  NUM_SAMPLES=${NUM_SAMPLES:-50}; CFG=${CFG:-}; EXTRA_EVAL=""
elif [ "$SMOKE" = 1 ]; then
  IMAGE_SIZE=${IMAGE_SIZE:-32}; SCALES=${SCALES:-1,2,3,4,5,6,8}; BATCH=${BATCH:-8}
  TF_STEPS=${TF_STEPS:-8}; SAR_STEPS=${SAR_STEPS:-4}; NUM_SAMPLES=${NUM_SAMPLES:-4}; CFG=${CFG:-1.5}
  TOK_FLAGS="--steps 10 --batch-size 8 --ch 16 --eval-images 20"; CLF_FLAGS="--steps 20"
else                                     # the laptop configuration
  IMAGE_SIZE=${IMAGE_SIZE:-32}; SCALES=${SCALES:-1,2,3,4,5,6,8}; BATCH=${BATCH:-32}
  TF_STEPS=${TF_STEPS:-350}; SAR_STEPS=${SAR_STEPS:-50}; NUM_SAMPLES=${NUM_SAMPLES:-100}; CFG=${CFG:-1.5}
  TOK_FLAGS=""; CLF_FLAGS=""
fi
OUT=${OUT:-$([ "$SMOKE" = 1 ] && echo out/smoke || echo out)}
mkdir -p "$OUT"
RUN="$PY"
[ "$NPROC" -gt 1 ] && RUN="$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC"
COMMON="--data $DATA --depth $DEPTH --image-size $IMAGE_SIZE --scales $SCALES --batch-size $BATCH --quiet"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

# ---- 1. tokenizer ----
if [ -z "${VAE:-}" ]; then
  VAE=$OUT/tokenizer.pt
  if [ ! -f "$VAE" ]; then
    stamp "training the tokenizer on $DATA -> $VAE"
    $PY tokenizer.py --data "$DATA" --image-size "$IMAGE_SIZE" --scales "$SCALES" --out "$VAE" ${TOK_FLAGS:-}
  fi
fi

# ---- 2. teacher-forcing pretraining (skipped when INIT is given) ----
if [ -z "${INIT:-}" ]; then
  stamp "teacher-forcing pretraining, $TF_STEPS steps -> $OUT/tf/ckpt.pt"
  $RUN sar.py --mode tf $COMMON --vae "$VAE" --steps "$TF_STEPS" --out-dir "$OUT/tf" --resume
  INIT=$OUT/tf/ckpt.pt
fi

# ---- 3. SAR post-training from that checkpoint ----
stamp "SAR post-training, $SAR_STEPS steps from $INIT -> $OUT/sar/ckpt.pt"
$RUN sar.py --mode sar $COMMON --vae "$VAE" --init "$INIT" --steps "$SAR_STEPS" --out-dir "$OUT/sar" --resume

# ---- 4. sampling of both checkpoints ----
for name in tf sar; do
  ck=$([ "$name" = tf ] && echo "$INIT" || echo "$OUT/sar/ckpt.pt")
  stamp "sampling $NUM_SAMPLES images per class from $ck"
  $RUN sar.py --sample --ckpt "$ck" --vae "$VAE" --num-samples "$NUM_SAMPLES" ${CFG:+--cfg $CFG} --seed 0 \
    --save-npz "$OUT/samples_$name.npz" --out-dir "$OUT/samples_$name" --trajectory --quiet
done

# ---- 5. evaluation ----
if [ "$DEPTH" -lt 12 ]; then  # offline: FID in the features of a small classifier trained on the data, + class accuracy
  [ -f "$OUT/clf.pt" ] || { stamp "training the domain classifier"; $PY fid.py --train-classifier "$DATA" --out "$OUT/clf.pt" --image-size "$IMAGE_SIZE" ${CLF_FLAGS:-}; }
  for name in tf sar; do
    $PY fid.py "$OUT/samples_$name.npz" "$DATA" --features "$OUT/clf.pt" --ref-split val --json "$OUT/eval_$name.json"
  done
fi
if [ -n "${FID_REF:-}" ]; then  # Inception FID/IS/precision/recall as the ADM evaluator (needs the Inception weights)
  for name in tf sar; do
    $PY fid.py "$OUT/samples_$name.npz" "$FID_REF" ${FID_WEIGHTS:+--weights $FID_WEIGHTS} --json "$OUT/inception_$name.json"
  done
fi

stamp "done"
$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
rows = []
for name in ('tf', 'sar'):
    r = {}
    for f in (f'eval_{name}.json', f'inception_{name}.json'):
        p = os.path.join(out, f)
        if os.path.isfile(p):
            r.update(json.load(open(p)))
    rows.append((name.upper(), r))
keys = sorted({k for _, r in rows for k, v in r.items() if isinstance(v, (int, float))})
print('\n| checkpoint | ' + ' | '.join(keys) + ' |')
print('|---|' + '---|' * len(keys))
for name, r in rows:
    print(f'| {name} | ' + ' | '.join(f'{r[k]:.4g}' if k in r else '-' for k in keys) + ' |')
print(f'\nsamples: {out}/samples_tf/samples.png, {out}/samples_sar/samples.png; '
      f'trajectories: {out}/samples_*/trajectory.png')
EOF
