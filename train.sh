#!/usr/bin/env bash
# The whole SAR recipe: tokenizer -> teacher-forcing pretraining -> SAR post-training -> sampling -> FID.
#
#   bash train.sh                      # the laptop pipeline on the built-in `toy` data (11-20 min, 2 CPU cores)
#   DATA=data/mnist bash train.sh      # the same recipe on MNIST (or any small labelled set; as long)
#   bash train.sh study                # the reproduction study: toy + MNIST, 8 variants x 3 seeds (docs/study.md)
#   bash train.sh study2               # the second study: gamma, budget, from scratch (docs/study2.md)
#   SMOKE=1 bash train.sh              # the same stages with tiny sizes (< 2 min; CI runs it)
#   bash train.sh install              # only install what is missing (+ pytest for the tests)
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
#   SEED     seed of the tokenizer, training and sampling (default 0)
#   FLIP     1 / 0: random horizontal flips on / off (default: on for colour photos and at DEPTH >= 12)
#   TF_STEPS, SAR_STEPS, BATCH, IMAGE_SIZE, CROP, SCALES, CFG, NUM_SAMPLES (per class), FID_REF, FID_WEIGHTS,
#   SAMPLE_SCALES (the scales sampled; default: the checkpoint's)
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python}
# ---- install what is missing: torch (the tested release, else any from 2.4 on), then requirements.txt ----
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0 || $PY -m pip install -q "torch>=2.4"
$PY -c "import numpy, PIL, tqdm, scipy" 2>/dev/null || $PY -m pip install -q -r requirements.txt
# bash train.sh install: only that, plus pytest for the tests (the README's install step; CI takes it too)
if [ "${1:-}" = install ]; then
  $PY -c "import pytest" 2>/dev/null || $PY -m pip install -q pytest
  $PY -c "import torch, numpy, PIL, tqdm, scipy, pytest; print('installed: torch', torch.__version__)"
  exit 0
fi

SMOKE=${SMOKE:-0}

# bash train.sh study: the reproduction study, see experiments/study.sh and docs/study.md
if [ "${1:-}" = study ]; then exec bash experiments/study.sh; fi
# bash train.sh study2: the second study (gamma sweep, budget, from scratch), see docs/study2.md
if [ "${1:-}" = study2 ]; then exec bash experiments/study2.sh; fi
DATA=${DATA:-toy}
NPROC=${NPROC:-1}
if [ -n "${INIT:-}" ] && [ -z "${DEPTH:-}" ]; then echo "error: INIT given: set DEPTH to its depth (16/20/24)" >&2; exit 2; fi
DEPTH=${DEPTH:-$([ "$SMOKE" = 1 ] && echo 2 || echo 4)}
SEED=${SEED:-0}
case "${FLIP:-}" in 1) FLIP_FLAG=--flip ;; 0) FLIP_FLAG=--no-flip ;; "") FLIP_FLAG="" ;;
  *) echo "error: FLIP must be 1 or 0, got '$FLIP'" >&2; exit 2 ;; esac
KIND=other  # colour photos get a recipe of their own below the official sizes (python data.py tells the kind)
if [ "$DEPTH" -lt 12 ] && [ "$SMOKE" != 1 ]; then KIND=$($PY data.py "$DATA"); fi
if [ "$DEPTH" -ge 12 ]; then            # the official sizes and recipe: ImageNet, 1000 classes, 512 px random
  # crops (the official final_reso: a 32x32 latent that every scale is pooled from; the paper's 256 px centre
  # crop is IMAGE_SIZE=256 CROP=center)
  IMAGE_SIZE=${IMAGE_SIZE:-512}; SCALES=${SCALES:-1,2,3,4,5,6,8,10,13,16}; BATCH=${BATCH:-768}
  TF_STEPS=${TF_STEPS:-300000}; SAR_STEPS=${SAR_STEPS:-18359}      # 11 epochs x 1669 it (the official SAR run)
  NUM_SAMPLES=${NUM_SAMPLES:-50}; CFG=${CFG:-}; EXTRA_EVAL=""
elif [ "$KIND" = photos ]; then  # colour photos (CIFAR-like 32 px sets): an 8x8 latent smears their detail,
  # so the tokenizer keeps a 16x16 one (one token per 2x2 pixels) with 256 codes, which the small model
  # learns faster than 1024; the longer token maps cost teacher forcing about 2x per step, so it takes fewer
  # steps; flips are on (colour data: data.colour_photos)
  IMAGE_SIZE=${IMAGE_SIZE:-32}; SCALES=${SCALES:-1,2,4,8,16}; BATCH=${BATCH:-32}
  TF_STEPS=${TF_STEPS:-800}; SAR_STEPS=${SAR_STEPS:-100}; NUM_SAMPLES=${NUM_SAMPLES:-100}; CFG=${CFG:-9}
  # sampling: more scales than training's list (any list works) and strong guidance (the VAR ramp leaves
  # the coarse scales nearly unguided); measured on CIFAR-10 in docs/photos.md
  SAMPLE_SCALES=${SAMPLE_SCALES:-1,2,3,4,6,8,11,16}
  TOK_FLAGS="--ch-mult 1,2 --codebook-size 256"; CLF_FLAGS=""
elif [ "$SMOKE" = 1 ]; then
  IMAGE_SIZE=${IMAGE_SIZE:-32}; SCALES=${SCALES:-1,2,3,4,5,6,8}; BATCH=${BATCH:-8}
  TF_STEPS=${TF_STEPS:-8}; SAR_STEPS=${SAR_STEPS:-4}; NUM_SAMPLES=${NUM_SAMPLES:-4}; CFG=${CFG:-1.5}
  TOK_FLAGS="--steps 10 --batch-size 8 --ch 16 --eval-images 20"; CLF_FLAGS="--steps 20"
else      # the laptop recipe, for toy and for small real sets (MNIST-like 28 px digits, letters, ...):
  # 1200 TF steps of 32 (4.8 epochs of 8,000 images), no flips (grey and toy data: sar.py's default), bf16 on
  # CPUs that compute it natively; SAR continues at the LR where TF ended
  IMAGE_SIZE=${IMAGE_SIZE:-32}; SCALES=${SCALES:-1,2,3,4,5,6,8}; BATCH=${BATCH:-32}
  TF_STEPS=${TF_STEPS:-1200}; SAR_STEPS=${SAR_STEPS:-100}; NUM_SAMPLES=${NUM_SAMPLES:-100}; CFG=${CFG:-1.5}
  TOK_FLAGS=""; CLF_FLAGS=""
fi
OUT=${OUT:-$([ "$SMOKE" = 1 ] && echo out/smoke || echo out)}
mkdir -p "$OUT"
RUN="$PY"
[ "$NPROC" -gt 1 ] && RUN="$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC"
COMMON="--data $DATA --seed $SEED --depth $DEPTH --image-size $IMAGE_SIZE --scales $SCALES --batch-size $BATCH --quiet ${CROP:+--crop $CROP} $FLIP_FLAG"
start=$(date +%s); stage_start=$start; stage=""; split=""
# stamp NAME MESSAGE: a stage begins; the seconds of the one before go into the split printed at the end
stamp() {
  local now; now=$(date +%s)
  [ -n "$stage" ] && split="$split$stage $((now - stage_start)) s, "
  stage=$1; stage_start=$now; shift; echo "== [$((now - start))s] $*"
}

# ---- 1. tokenizer ----
if [ -z "${VAE:-}" ]; then
  VAE=$OUT/tokenizer.pt
  if [ ! -f "$VAE" ]; then
    stamp tokenizer "training the tokenizer on $DATA -> $VAE"
    $PY tokenizer.py --data "$DATA" --image-size "$IMAGE_SIZE" --scales "$SCALES" --out "$VAE" --seed "$SEED" ${TOK_FLAGS:-} $FLIP_FLAG
  fi
fi

# ---- 2. teacher-forcing pretraining (skipped when INIT is given) ----
if [ -z "${INIT:-}" ]; then
  stamp tf "teacher-forcing pretraining, $TF_STEPS steps -> $OUT/tf/ckpt.pt"
  $RUN sar.py --mode tf $COMMON --vae "$VAE" --steps "$TF_STEPS" --out-dir "$OUT/tf" --resume
  INIT=$OUT/tf/ckpt.pt
fi

# ---- 3. SAR post-training from that checkpoint ----
stamp sar "SAR post-training, $SAR_STEPS steps from $INIT -> $OUT/sar/ckpt.pt"
$RUN sar.py --mode sar $COMMON --vae "$VAE" --init "$INIT" --steps "$SAR_STEPS" --out-dir "$OUT/sar" --resume

# ---- 4. sampling of both checkpoints ----
for name in tf sar; do
  ck=$([ "$name" = tf ] && echo "$INIT" || echo "$OUT/sar/ckpt.pt")
  stamp "sampling_$name" "sampling $NUM_SAMPLES images per class from $ck"
  $RUN sar.py --sample --ckpt "$ck" --vae "$VAE" --num-samples "$NUM_SAMPLES" ${CFG:+--cfg $CFG} --seed "$SEED" \
    ${SAMPLE_SCALES:+--scales $SAMPLE_SCALES} \
    --save-npz "$OUT/samples_$name.npz" --out-dir "$OUT/samples_$name" --trajectory --quiet
done

# ---- 5. evaluation ----
if [ "$DEPTH" -lt 12 ]; then  # offline: FID in the features of a small classifier trained on the data, + class accuracy
  [ -f "$OUT/clf.pt" ] || { stamp classifier "training the domain classifier"; $PY fid.py --train-classifier "$DATA" --out "$OUT/clf.pt" --image-size "$IMAGE_SIZE" ${CLF_FLAGS:-}; }
  for name in tf sar; do
    stamp "eval_$name" "evaluating the $name samples"
    $PY fid.py "$OUT/samples_$name.npz" "$DATA" --features "$OUT/clf.pt" --ref-split val --json "$OUT/eval_$name.json"
  done
fi
if [ -n "${FID_REF:-}" ]; then  # Inception FID/IS/precision/recall as the ADM evaluator (needs the Inception weights)
  for name in tf sar; do
    stamp "inception_$name" "Inception FID of the $name samples"
    $PY fid.py "$OUT/samples_$name.npz" "$FID_REF" ${FID_WEIGHTS:+--weights $FID_WEIGHTS} --json "$OUT/inception_$name.json"
  done
fi

stamp done "done"
echo "time per stage: ${split%, } (total $(( $(date +%s) - start )) s)"
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
