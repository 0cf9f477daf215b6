#!/usr/bin/env bash
# The benchmark runs behind docs/results/, in the order they were made (2 CPU cores).
# Each python script writes its own JSON + markdown table into docs/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export OMP_WAIT_POLICY=PASSIVE

# 1. zero-shot and 16-shot linear probe of the packaged small CLIP (issue: foundation)
$PY benchmarks/zeroshot.py --seeds 1 2 3
# 2. learning-rate tuning for the small CLIP on val splits (never test)
OMP_NUM_THREADS=1 $PY benchmarks/tune_small.py --methods coop vpt --mults 1 10 50 --dataset emoji-nature --shots 4
# 3. the default GRAM artifact for CoOp-family hosts (shipped in gramvl/assets)
$PY -m gramvl meta-train --host coop --time-budget 420 --steps 100000 --out runs/gram/coop.safetensors
# 4. host methods and GRAM, base-to-new and few-shot, 3 seeds
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --name base2new_hosts --protocol base2new \
    --methods zeroshot vpt --datasets emoji-nature --seeds 1 2 3 &
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --name base2new_gram --protocol base2new \
    --methods coop kgcoop prograd --gram runs/gram/coop.safetensors --datasets emoji-nature --seeds 1 2 3 &
wait
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --name fewshot_gram --protocol fewshot --methods coop \
    --gram runs/gram/coop.safetensors --gram-parts both init regulator \
    --datasets emoji-nature --shots 1 2 4 --seeds 1 2 3
# 5. memory of 100/1000-class prompt tuning with the ViT-B/16 architecture
$PY benchmarks/memory.py --classes 100 1000
