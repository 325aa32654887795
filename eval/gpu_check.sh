#!/usr/bin/env bash
# The GPU measurements of the speed issue as one prepared run, for a session that has a CUDA machine
# (never CI or the test suite; the README's "GPU check" says how to carry diffusers there).
#
#   bash eval/gpu_check.sh OUT_DIR [WORK_DIR]
#
# Builds the random-weight SD1.5-architecture pipeline (stepdistill/testbed/full_size.py) in WORK_DIR
# (default /tmp/stepdistill_gpu), then runs the parts PARTS names (default "training sampling reference"):
#   training   LCM-LoRA step time and peak GPU memory at batch 8 on 64x64 latents (512 px images) with fp32,
#              bf16 and fp16 mixed precision, and bf16 with xformers when xformers imports;
#   sampling   the latency of the 50-step CFG teacher against a 4-step call, in fp16, decoding with SD1.5's
#              VAE and again with a TAESD-architecture AutoencoderTiny (both random weights);
#   reference  LCM-LoRA against diffusers' reference script on the same teacher, batch 8, 512 px, fp16,
#              REFERENCE_PAIRS (default 2) back-to-back pairs of REFERENCE_STEPS (default 60) timed steps; only
#              when REFERENCE_SCRIPT names train_lcm_distill_lora_sd_wds.py (it needs webdataset and braceexpand).
# OUT_DIR gets one JSON per run and gpu_check.md with every table. WARMUP and STEPS (default 3 and 10) set the
# timed training steps, PYTHON the interpreter (default python3). The checkout need not be installed: it is
# put on PYTHONPATH. All three parts take more than one 10-minute call: run "training sampling", then "reference".
set -euo pipefail
out=${1:?usage: bash eval/gpu_check.sh OUT_DIR [WORK_DIR]}
work=${2:-/tmp/stepdistill_gpu}
py=${PYTHON:-python3}
parts=" ${PARTS:-training sampling reference} "
for part in $parts; do
    case $part in training|sampling|reference) ;; *) echo "error: PARTS names '$part'; allowed: training, sampling, reference" >&2; exit 2;; esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
"$py" -c "import sys, torch; torch.cuda.is_available() or sys.exit('error: eval/gpu_check.sh needs a CUDA GPU; torch.cuda.is_available() is False')"
mkdir -p "$out" "$work"
[ -d "$work/sd15_random" ] || "$py" -m stepdistill.testbed.full_size --output_dir "$work/sd15_random" --dtype fp16
[ -d "$work/taesd_random" ] || "$py" -m stepdistill.testbed.full_size --tiny_decoder_dir "$work/taesd_random" --dtype fp16
# 64 captioned emoji, upscaled to 512 px by the trainer: step time does not depend on how many are cached
"$py" - "$work/emoji64.npz" <<'EOF'
import sys

import numpy as np

from stepdistill.data.emoji32 import load_emoji32

data = load_emoji32()
np.savez_compressed(sys.argv[1], images=data.images[:64], captions=np.array(data.captions[:64]))
EOF
summary="$out/gpu_check.md"
{ echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } > "$summary"

bench() {  # bench NAME TRAINER_OPTIONS...
    local name=$1; shift
    echo "## LCM-LoRA, batch 8, 64x64 latents: $name ($*)" >> "$summary"
    "$py" eval/benchmark_speed.py --parts training --trainers lcm --teacher "$work/sd15_random" --train_batch_size 8 \
        --warmup_steps "${WARMUP:-3}" --measure_steps "${STEPS:-10}" --output_dir "$work/bench_$name" \
        --trainer_args "--resolution 512 --dataset $work/emoji64.npz $*"
    cat "$work/bench_$name/bench_speed.md" >> "$summary"
    cp "$work/bench_$name/bench_speed.json" "$out/$name.json"
}
if [[ $parts == *" training "* ]]; then
    bench bf16 --mixed_precision bf16
    bench fp16 --mixed_precision fp16
    bench fp32 --mixed_precision no
    if "$py" -c "import xformers" 2>/dev/null; then
        bench bf16_xformers --mixed_precision bf16 --enable_xformers_memory_efficient_attention true
    else
        echo "xformers is not installed: no xformers row" >> "$summary"
    fi
fi
# Sampling latency on the GPU in fp16: the 50-step CFG teacher against a 4-step call of the same architecture
# without CFG (what any 4-step student of this UNet costs), at 1 and 8 images per call, with the parts; then the
# same with both decoding through a TAESD-architecture decoder, since SD1.5's VAE decode is a fixed cost of both.
sampling() {  # sampling NAME [BENCHMARK_OPTIONS...]
    local name=$1; shift
    echo "## Sampling, fp16: DDIM-50 with CFG 4 against 4 steps without CFG (same UNet), $name decoder" >> "$summary"
    "$py" eval/benchmark_speed.py --parts sampling --teacher "$work/sd15_random" --students "4-step=$work/sd15_random" \
        --sampling_steps 4 --sampling_batch_sizes 1,8 --sampling_device cuda --sampling_dtype fp16 \
        --output_dir "$work/bench_sampling_$name" "$@"
    cat "$work/bench_sampling_$name/bench_speed.md" >> "$summary"
    cp "$work/bench_sampling_$name/bench_speed.json" "$out/sampling_$name.json"
}
if [[ $parts == *" sampling "* ]]; then
    sampling sd15_vae
    sampling taesd --sampling_decoder "$work/taesd_random"
fi
# Both scripts on the same teacher, batch, resolution and precision, timed from their tqdm progress; GPU memory
# from nvidia-smi for each script's process tree. Ours caches 64 images instead of 1,388 before its first step
# (the step's work does not depend on it; the reference reads its shard as it goes).
if [[ $parts == *" reference "* ]]; then
    if [ -n "${REFERENCE_SCRIPT:-}" ]; then
        echo "## LCM-LoRA against diffusers' reference script: batch 8, 512 px, fp16" >> "$summary"
        "$py" eval/benchmark_speed.py --parts reference --reference_script "$REFERENCE_SCRIPT" --teacher "$work/sd15_random" \
            --train_batch_size 8 --mixed_precision fp16 --reference_pairs "${REFERENCE_PAIRS:-2}" --warmup_steps "${WARMUP:-3}" \
            --measure_steps "${REFERENCE_STEPS:-60}" --trainer_args "--dataset $work/emoji64.npz" --output_dir "$work/bench_reference"
        cat "$work/bench_reference/bench_speed.md" >> "$summary"
        cp "$work/bench_reference/bench_speed.json" "$out/reference.json"
    else
        echo "REFERENCE_SCRIPT is not set: no comparison with diffusers' reference script" >> "$summary"
    fi
fi
cat "$summary"
