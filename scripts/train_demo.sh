#!/usr/bin/env bash
# Reproduce the bundled demo model on a CPU: the two-stage recipe of the original toolkit.
#   1. train the autoencoder (configs/demo/demo-autoencoder.yaml): VAE_STEPS steps on 32x32
#      images (4x cheaper), then VAE_STEPS_64 more at the model's 64x64 (resuming the same run)
#   2. train the latent diffusion model on the frozen autoencoder (configs/demo/demo-ldm.yaml):
#      LDM_STEPS steps in all, the last OFFSET_STEPS of them (resuming the same run) with offset
#      noise OFFSET_NOISE (model.params.offset_noise_level; see docs/demo-model.md)
#   3. export the EMA weights (float16, 18 MB) + inference config to models/demo/demo.safetensors
#      and configs/demo/demo-txt2img.yaml
# Usage (from anywhere):  scripts/train_demo.sh
# Knobs (environment): PYTHON, LOGDIR (logs), VAE_STEPS (2000), VAE_STEPS_64 (600), LDM_STEPS (3000), OFFSET_STEPS (1000),
#   OFFSET_NOISE (0.1), SEED (23),
#   OUT (models/demo/demo.safetensors), OUT_CONFIG (configs/demo/demo-txt2img.yaml),
#   VAE_RUN (a finished autoencoder run of this script, logs/<time>_demo-vae: skip stage 1 and train the
#   diffusion model on that autoencoder).
# Everything runs offline; see docs/demo-model.md for settings and timings.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
LOGDIR=${LOGDIR:-logs}
VAE_STEPS=${VAE_STEPS:-2000}
VAE_STEPS_64=${VAE_STEPS_64:-600}
LDM_STEPS=${LDM_STEPS:-3000}
OFFSET_STEPS=${OFFSET_STEPS:-1000}
OFFSET_NOISE=${OFFSET_NOISE:-0.1}
VAE_RUN=${VAE_RUN:-}
SEED=${SEED:-23}
OUT=${OUT:-models/demo/demo.safetensors}
OUT_CONFIG=${OUT_CONFIG:-configs/demo/demo-txt2img.yaml}
# Two threads that sleep instead of spinning while they wait: on a small shared CPU, spinning
# OpenMP threads slow training several times over when other processes run.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

if [ "$OFFSET_STEPS" -lt 0 ] || [ "$OFFSET_STEPS" -ge "$LDM_STEPS" ]; then
    echo "error: OFFSET_STEPS=$OFFSET_STEPS must be at least 0 and smaller than LDM_STEPS=$LDM_STEPS" >&2
    exit 2
fi
if [ -e "$OUT" ]; then
    echo "error: $OUT exists; move it away or set OUT=another/path.safetensors" >&2
    exit 2
fi
t0=$(date +%s)

if [ -n "$VAE_RUN" ]; then
    vae_run=${VAE_RUN%/}
    if [ ! -f "$vae_run/checkpoints/last.ckpt" ]; then
        echo "error: VAE_RUN=$VAE_RUN has no checkpoints/last.ckpt; point it at a finished logs/<time>_demo-vae run" >&2
        exit 2
    fi
else
    "$PYTHON" main.py --base configs/demo/demo-autoencoder.yaml -t --name demo-vae --logdir "$LOGDIR" \
        --seed "$SEED" --max_steps "$VAE_STEPS"
    vae_run=$(ls -td "$LOGDIR"/*_demo-vae | head -n 1)
    "$PYTHON" main.py --resume "$vae_run" -t --seed "$SEED" \
        data.params.train.params.size=64 data.params.batch_size=8 \
        "lightning.trainer.max_steps=$((VAE_STEPS + VAE_STEPS_64))" lightning.trainer.val_check_interval=200
fi
t1=$(date +%s)
echo "autoencoder: $vae_run ($((t1 - t0)) s)"

"$PYTHON" main.py --base configs/demo/demo-ldm.yaml -t --name demo-ldm --logdir "$LOGDIR" \
    --seed "$SEED" --max_steps "$((LDM_STEPS - OFFSET_STEPS))" \
    "model.params.first_stage_config.params.ckpt_path=$vae_run/checkpoints/last.ckpt" \
    "model.params.scheduler_config.params.cycle_lengths=[$LDM_STEPS]"
ldm_run=$(ls -td "$LOGDIR"/*_demo-ldm | head -n 1)
if [ "$OFFSET_STEPS" -gt 0 ]; then
    "$PYTHON" main.py --resume "$ldm_run" -t --seed "$SEED" \
        "model.params.offset_noise_level=$OFFSET_NOISE" "lightning.trainer.max_steps=$LDM_STEPS"
fi
t2=$(date +%s)
echo "latent diffusion: $ldm_run ($((t2 - t1)) s)"

"$PYTHON" -m ldm.training.export --ckpt "$ldm_run/checkpoints/last.ckpt" \
    --config "$(ls "$ldm_run"/configs/*-project.yaml | tail -n 1)" \
    --out "$OUT" --out-config "$OUT_CONFIG" --half \
    --section demo.safety_checker=false --section demo.height=64 --section demo.width=64
t3=$(date +%s)
echo "done in $((t3 - t0)) s: autoencoder $((t1 - t0)) s, latent diffusion $((t2 - t1)) s -> $OUT, $OUT_CONFIG"
