#!/usr/bin/env bash
# GPU checks, run on a lent CUDA machine (session 5: one H100; results in docs/gpu.md and docs/results/):
#   1. smoke: every CLI path on the GPU (zeroshot, protocol fewshot for each host in bf16, CoOp fp32/fp16 and with
#      GRAM, train + eval, TPT with and without GRAM, meta-train second order and --tta) on a folder:ROOT subset of
#      emoji-nature, so that the same commands can be run on the CPU and the accuracies compared;
#   2. GPU memory and step time of 1000-class prompt tuning on ViT-B/16 (benchmarks/memory_gpu.py);
#   3. second-order GRAM meta-training of the visual hosts (VPT, MaPLe, IVLP + UNIGRAM), which the 2-core CPU could
#      only run first order for 60-200 steps.
# Carried, not in git: .whl (open_clip_torch, omegaconf, ftfy, wcwidth wheels for the machine's Python),
# .gpu/home (a GRAMVL_HOME with the meta-training corpus and its cached features), .gpu/toy (2/1/5 train/val/test
# images per class of emoji-nature). Usage on the machine:
#   bash benchmarks/device_check.sh [smoke] [memory] [meta]      (default: all three; results in $OUT/device.tgz)
# A CPU dry run of the harness: DEV=cpu O=runs/device-cpu bash benchmarks/device_check.sh smoke
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEV=${DEV:-cuda}
O=${O:-/tmp/device}
META_BUDGET=${META_BUDGET:-60}
export GRAMVL_HOME=${GRAMVL_HOME:-$PWD/.gpu/home} PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
mkdir -p "$O/logs" "$O/smoke"
T=folder:$PWD/.gpu/toy
A=gramvl/assets/gram_coop_v2.safetensors  # the default artifact of the packaged small CLIP (session 7)
PARTS=${*:-smoke memory meta}

step() {  # step NAME TIMEOUT_S ARGS... : one gramvl command, its log, rc and seconds
    local name=$1 t=$2
    shift 2
    local t0 rc
    t0=$(date +%s%N)
    timeout "$t" "$@" > "$O/logs/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$O/steps.txt"
}
G="$PY -m gramvl"
pack() {  # what is done so far comes back even if the call is stopped later
    if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
        tar czf "$OUT/device.tgz" -C "$O" . && cp "$O/steps.txt" "$OUT/steps.txt"
    fi
}

if [[ $PARTS == *smoke* ]]; then
    $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'python', sys.version.split()[0])" | tee "$O/env.txt"
    step zeroshot 120 $G zeroshot --device $DEV --dataset $T --json $O/smoke/zeroshot.json
    for m in coop cocoop kgcoop prograd vpt ivlp maple linear_probe; do
        step fewshot_${m}_bf16 180 $G protocol fewshot --method $m --datasets $T --shots 2 --seeds 1 --device $DEV \
            --precision bf16 --out $O/smoke/fewshot_${m}_bf16
    done
    step fewshot_coop_fp32 120 $G protocol fewshot --method coop --datasets $T --shots 2 --seeds 1 --device $DEV \
        --out $O/smoke/fewshot_coop_fp32
    step fewshot_coop_fp16 120 $G protocol fewshot --method coop --datasets $T --shots 2 --seeds 1 --device $DEV \
        --precision fp16 --out $O/smoke/fewshot_coop_fp16
    step fewshot_coop_gram 120 $G protocol fewshot --method coop --gram $A --datasets $T --shots 2 --seeds 1 \
        --device $DEV --out $O/smoke/fewshot_coop_gram
    step base2new_coop 180 $G protocol base2new --method coop --datasets $T --shots 2 --seeds 1 --device $DEV \
        --precision bf16 --out $O/smoke/base2new_coop
    step train_coop 120 $G train --method coop --dataset $T --shots 2 --seed 1 --device $DEV --precision bf16 \
        --out $O/smoke/train_coop
    step eval_coop 120 $G eval --prompt $O/smoke/train_coop/prompt.safetensors --dataset $T --device $DEV \
        --json $O/smoke/eval_coop.json
    step tta_tpt 180 $G tta --method tpt --dataset $T --limit 100 --device $DEV --json $O/smoke/tta_tpt.json
    step tta_tpt_bf16 180 $G tta --method tpt --dataset $T --limit 100 --device $DEV --encode-precision bf16 \
        --json $O/smoke/tta_tpt_bf16.json
    step tta_tpt_gram 180 $G tta --method tpt --dataset $T --limit 100 --device $DEV --gram $A \
        --json $O/smoke/tta_tpt_gram.json
    step meta_coop 180 $G meta-train --host coop --device $DEV --steps 40 --out $O/smoke/meta_coop.safetensors
    step meta_tta 180 $G meta-train --tta --device $DEV --steps 20 --out $O/smoke/meta_tta.safetensors
    step tta_structure 180 $G tta --method tpt --dataset $T --limit 100 --device $DEV \
        --gram $O/smoke/meta_tta.safetensors --json $O/smoke/tta_structure.json
    pack
fi

if [[ $PARTS == *memory* ]]; then
    step memory_gpu 300 $PY benchmarks/memory_gpu.py --classes 1000 --out $O/memory
    pack
fi

if [[ $PARTS == *meta* ]]; then
    mkdir -p "$O/meta"
    step meta_vpt $((META_BUDGET + 60)) $G meta-train --host vpt --device $DEV --time-budget $META_BUDGET \
        --out $O/meta/vpt_so.safetensors
    pack
    step meta_maple $((META_BUDGET + 60)) $G meta-train --host maple --device $DEV --time-budget $META_BUDGET \
        --out $O/meta/maple_so.safetensors
    pack
    step meta_unigram $((META_BUDGET + 60)) $G meta-train --host ivlp --unigram --device $DEV \
        --time-budget $META_BUDGET --out $O/meta/unigram_so.safetensors
fi

pack
cat "$O/steps.txt"
