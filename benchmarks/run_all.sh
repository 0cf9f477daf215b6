#!/usr/bin/env bash
# The benchmark runs behind docs/results/, as they were made in session 1 (2 CPU cores, packaged small CLIP).
# Sessions 1-6 ran with the small CLIP that is now `small-v1` (gramvl/assets/small_clip_v1.safetensors): to
# reproduce one of their lines, add `--model small-v1` (meta-train, protocols.py, zeroshot.py, tta.py).
# Since session 12, test-time meta-training anchors θ to the words (meta.theta_anchor=0.25); the tta.py lines of
# sessions 1-11 below carry `--meta-theta-anchor 0`, the value their artifacts were made with.
# Each python script writes its own JSON + markdown table into docs/results/. Runs marked "&" ran side by side
# (one thread each); wall times in the tables are therefore under load.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export OMP_WAIT_POLICY=PASSIVE

# foundation: zero-shot and 16-shot linear probe (3 seeds)
OMP_NUM_THREADS=1 $PY benchmarks/zeroshot.py --seeds 1 2 3
# recipe tuning for the small CLIP on val splits (never test)
OMP_NUM_THREADS=1 $PY benchmarks/tune_small.py --methods coop vpt --mults 1 10 50 --dataset emoji-nature --shots 4 --epoch-mult 0.25 --model small-v1
# the default GRAM artifact (shipped as gramvl/assets/gram_coop.*)
OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop --steps 600 --out runs/gram/coop.safetensors
# hosts and GRAM through the protocols (emoji-nature, 3 seeds)
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --name base2new_coop_gram --protocol base2new --methods coop \
    --gram runs/gram/coop.safetensors --datasets emoji-nature --seeds 1 2 3 &
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --name base2new_hosts --protocol base2new --methods zeroshot vpt \
    --datasets emoji-nature --seeds 1 2 3
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --name fewshot_coop_gram --protocol fewshot --methods coop \
    --gram runs/gram/coop.safetensors --gram-parts both init regulator --datasets emoji-nature --shots 1 2 4 \
    --seeds 1 2 3
wait
# memory of 100/1000-class CoOp steps and GRAM meta-training steps with the ViT-B/16 architecture
$PY benchmarks/memory.py --classes 100 1000
# GRAM with CoCoOp's context (M = 4, "a photo of a"), ψ's outer lr 1e-3
OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop --steps 600 \
    --set 'meta.host_cfg={n_ctx: 4, ctx_init: "a photo of a"}' meta.outer_lr_phi=0.001 --out runs/gram/coop_m4.safetensors
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --name base2new_coop4_gram --protocol base2new --methods coop \
    --gram runs/gram/coop_m4.safetensors --gram-parts both init regulator --set n_ctx=4 'ctx_init=a photo of a' \
    --datasets emoji-nature --seeds 1 2 3
# test-time prompt tuning
OMP_NUM_THREADS=1 $PY benchmarks/tta.py --meta-theta-anchor 0 --datasets emoji-nature emoji-nature-lineart fashion-mnist --limit 30 \
    --seeds 1 2 3 --gram runs/gram/coop.safetensors --meta-budget 120
# a short meta-training (250 steps)
$PY -m gramvl meta-train --host coop --steps 250 --out runs/gram/coop_250.safetensors
$PY benchmarks/protocols.py --name base2new_coop_gram250 --protocol base2new --methods coop \
    --gram runs/gram/coop_250.safetensors --gram-only --datasets emoji-nature --seeds 1 2 3
# domain generalization and more hosts
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --name dg_hosts --protocol dg --methods zeroshot coop \
    --datasets emoji-nature --seeds 1 2 3 &
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --name base2new_kg_prograd --protocol base2new \
    --methods kgcoop prograd --datasets emoji-nature --seeds 1 2 3 &
wait
# GRAM with a 3-step inner loop (M = 4 setting)
OMP_NUM_THREADS=2 $PY -m gramvl meta-train --host coop --steps 400 \
    --set 'meta.host_cfg={n_ctx: 4, ctx_init: "a photo of a"}' meta.inner_steps=3 --out runs/gram/coop_m4_t3.safetensors
$PY benchmarks/protocols.py --name base2new_coop4_gram_t3 --protocol base2new --methods coop \
    --gram runs/gram/coop_m4_t3.safetensors --gram-only --set n_ctx=4 'ctx_init=a photo of a' \
    --datasets emoji-nature --seeds 1 2 3
# data-parallel (torchrun, 2 gloo ranks) against single-process runs: train, base2new, meta-train
$PY benchmarks/ddp.py
# speed against the official implementations (peer checkouts outside the repo; see docs/results/speed.md).
# small.json and small2.json are earlier runs of the first command (small.json: --steps 6 for CoCoOp too)
OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/peers/venv/bin/python benchmarks/peer_speed.py --coop /tmp/peers/CoOp \
    --dassl /tmp/peers/Dassl.pytorch --model small --methods coop cocoop --rounds 3 --steps 6 --cocoop-steps 2 \
    --our-epochs 1 --json runs/peer_speed/small3.json
OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/peers/venv/bin/python benchmarks/peer_speed.py --tpt /tmp/peers/TPT \
    --model small --methods tpt --tpt-samples 100 --same-views --json runs/peer_speed/small_tpt.json
OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/peers/venv/bin/python benchmarks/peer_speed.py --coop /tmp/peers/CoOp \
    --dassl /tmp/peers/Dassl.pytorch --model vit-b16 --methods coop --shots 2 --train-views 1 --warmup 1 \
    --rounds 2 --steps 2 --our-epochs 1 --json runs/peer_speed/vitb16.json
OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/peers/venv/bin/python benchmarks/peer_speed.py --tpt /tmp/peers/TPT \
    --model vit-b16 --methods tpt --tpt-samples 8 --tpt-warmup 1 --json runs/peer_speed/vitb16_tpt.json
# session 6, after the last-block change (commit 4536f65): small4.json (CoOp + CoCoOp), small5.json (CoOp, 5 rounds)
OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/peers/venv/bin/python benchmarks/peer_speed.py --coop /tmp/peers/CoOp \
    --dassl /tmp/peers/Dassl.pytorch --model small --methods coop cocoop --rounds 3 --steps 6 --cocoop-steps 2 \
    --our-epochs 1 --json runs/peer_speed/small4.json
OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/peers/venv/bin/python benchmarks/peer_speed.py --coop /tmp/peers/CoOp \
    --dassl /tmp/peers/Dassl.pytorch --model small --methods coop --rounds 5 --steps 6 --our-epochs 1 --json runs/peer_speed/small5.json
OMP_NUM_THREADS=1 PYTHONPATH=. /tmp/peers/venv/bin/python benchmarks/peer_speed.py --tpt /tmp/peers/TPT \
    --model small --methods tpt --tpt-samples 100 --same-views --json runs/peer_speed/small_tpt2.json
$PY benchmarks/peer_speed.py --render runs/peer_speed/small5.json runs/peer_speed/small4.json runs/peer_speed/small3.json runs/peer_speed/small2.json \
    runs/peer_speed/small.json runs/peer_speed/small_tpt2.json runs/peer_speed/small_tpt.json runs/peer_speed/vitb16.json runs/peer_speed/vitb16_tpt.json
# CMHC at 1M pairs from memory-mapped feature shards (faiss and torch k-means; needs gramvl[scale])
$PY benchmarks/cmhc_scale.py --sizes 1000000 200000 --torch-sizes 1000000 200000 --low-memory-sizes 1000000
# ---- session 2: GRAM with the pre-adaptation loss (meta.pre_weight = 1, the new default) on every host ----
M="OMP_NUM_THREADS=1 $PY -m gramvl meta-train"
P="OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --datasets emoji-nature --seeds 1 2 3"
# val runs that chose the default (the artifacts: pre_weight 1 with psi lr 1e-2 / 1e-3; a padded-word start)
eval $M --host coop --steps 600 --set meta.pre_weight=1.0 --out runs/gram2/coop_pw1.safetensors   # = assets/gram_coop
eval $M --host coop --steps 600 --set meta.pre_weight=1.0 meta.outer_lr_phi=0.001 --out runs/gram2/coop_pw1phi3.safetensors
eval $M --host coop --steps 600 --set "'meta.host_cfg={ctx_init: \"a photo of a\", ctx_init_mode: pad}'" \
    meta.pre_weight=1.0 --out runs/gram2/coop_pad_pw1.safetensors
eval $P --name val_b2n_coop --protocol base2new --methods coop --gram runs/gram/coop.safetensors --eval-split val --runs runs/val
eval $P --name val_b2n_coop_pw1 --protocol base2new --methods coop --gram-only --gram runs/gram2/coop_pw1.safetensors --eval-split val --runs runs/val
eval $P --name val_b2n_coop_pw1phi3 --protocol base2new --methods coop --gram-only --gram runs/gram2/coop_pw1phi3.safetensors --eval-split val --runs runs/val
eval $P --name val_b2n_coop_pad_pw1 --protocol base2new --methods coop --gram-only --gram runs/gram2/coop_pad_pw1.safetensors --eval-split val --runs runs/val
eval $P --name val_b2n_coop_padinit --protocol base2new --methods coop --set "ctx_init='a photo of a'" ctx_init_mode=pad --eval-split val --runs runs/val
# test: hosts, GRAM on every host, lr x0.95 controls where GRAM beat the host
eval $M --host coop --steps 600 --set "'meta.host_cfg={n_ctx: 4, ctx_init: \"a photo of a\"}'" --out runs/gram2/coop_m4_pw1.safetensors
eval $M --host vpt --steps 300 --set meta.time_budget_s=1200 meta.second_order=false --out runs/gram2/vpt_fo.safetensors
eval $M --host maple --steps 150 --set meta.time_budget_s=900 meta.second_order=false --out runs/gram2/maple_fo.safetensors
eval $M --host ivlp --unigram --steps 150 --set meta.time_budget_s=900 meta.second_order=false --out runs/gram2/unigram_fo.safetensors
eval $P --name base2new_hosts2 --protocol base2new --methods cocoop vpt maple ivlp
eval $P --name fewshot1_hosts --protocol fewshot --shots 1 --methods coop cocoop vpt maple ivlp
eval $P --name base2new_coop_gram2 --protocol base2new --methods coop --gram runs/gram2/coop_pw1.safetensors
eval $P --name fewshot1_coop_gram2 --protocol fewshot --shots 1 --methods coop --gram-only --gram runs/gram2/coop_pw1.safetensors
eval $P --name fewshot1_coop_ctrl --protocol fewshot --shots 1 --methods coop --gram-only --lr-control 0.95
eval $P --name base2new_cocoop_gram --protocol base2new --methods cocoop --gram-only --gram runs/gram2/coop_m4_pw1.safetensors
eval $P --name fewshot1_cocoop_gram --protocol fewshot --shots 1 --methods cocoop --gram-only --gram runs/gram2/coop_m4_pw1.safetensors
eval $P --name base2new_coop4_gram2 --protocol base2new --methods coop --gram runs/gram2/coop_m4_pw1.safetensors --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P --name fewshot1_coop4_gram2 --protocol fewshot --shots 1 --methods coop --gram runs/gram2/coop_m4_pw1.safetensors --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P --name base2new_coop4_ctrl --protocol base2new --methods coop --gram-only --lr-control 0.95 --set n_ctx=4 "'ctx_init=a photo of a'"
for h in "vpt vpt_fo vpt" "maple maple_fo maple" "ivlp unigram_fo unigram"; do set -- $h
    eval $P --name base2new_$3_gram --protocol base2new --methods $1 --gram-only --gram runs/gram2/$2.safetensors
    eval $P --name fewshot1_$3_gram --protocol fewshot --shots 1 --methods $1 --gram-only --gram runs/gram2/$2.safetensors
done
eval $P --name base2new_vpt_ctrl --protocol base2new --methods vpt --gram-only --lr-control 0.95
eval $P --name base2new_maple_ctrl --protocol base2new --methods maple --gram-only --lr-control 0.95
eval $P --name base2new_coop_ctrl --protocol base2new --methods coop --gram-only --lr-control 0.95
eval $P --name base2new_coop_gram2_parts --protocol base2new --methods coop --gram-only --gram-parts init regulator --gram runs/gram2/coop_pw1.safetensors
eval $P --name fewshot1_coop_gram2_parts --protocol fewshot --shots 1 --methods coop --gram-only --gram-parts init regulator --gram runs/gram2/coop_pw1.safetensors
# test-time prompt tuning with the M = 4 artifact as 'GRAM init' and an 8-minute test-time meta-training
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/tta.py --meta-theta-anchor 0 --limit 50 --seeds 1 2 3 --datasets emoji-nature emoji-nature-lineart fashion-mnist \
    --gram runs/gram2/coop_m4_pw1.safetensors --retrain --meta-budget 480 --threads 1
R=docs/results
$PY benchmarks/gram_table.py --name gram_hosts --hosts coop cocoop vpt maple ivlp \
    --base2new $R/base2new_coop_gram2.json $R/base2new_coop_ctrl.json $R/base2new_hosts2.json $R/base2new_cocoop_gram.json $R/base2new_vpt_gram.json \
    $R/base2new_vpt_ctrl.json $R/base2new_maple_gram.json $R/base2new_maple_ctrl.json $R/base2new_unigram_gram.json \
    --fewshot $R/fewshot1_hosts.json $R/fewshot1_coop_gram2.json $R/fewshot1_coop_ctrl.json $R/fewshot1_cocoop_gram.json \
    $R/fewshot1_vpt_gram.json $R/fewshot1_maple_gram.json $R/fewshot1_unigram_gram.json
$PY benchmarks/gram_table.py --name gram_coop4 --hosts coop --base2new $R/base2new_coop4_gram2.json \
    $R/base2new_coop4_ctrl.json --fewshot $R/fewshot1_coop4_gram2.json
# few-shot curves of the hosts (issue 3)
eval $P --name fewshot_text_hosts --protocol fewshot --shots 1 2 4 8 --methods zeroshot coop kgcoop prograd
eval $P --name fewshot_visual_hosts --protocol fewshot --shots 2 4 --methods vpt ivlp maple
# ---- session 3 (same packaged small CLIP; jobs ran 3-5 at a time, one thread each) ----
# image tower: open_clip forward vs the direct block path
OMP_NUM_THREADS=1 $PY benchmarks/image_tower.py --models small ViT-B-16 --batch 512 8 --rounds 3
# 16 shots for the text hosts, 8/16 for the visual hosts (the existing 1-8 / 2-4 shot records are reused)
eval $P --name fewshot_text_hosts --protocol fewshot --shots 1 2 4 8 16 --methods zeroshot coop kgcoop prograd
eval $P --name fewshot_visual_hosts --protocol fewshot --shots 2 4 8 16 --methods vpt ivlp maple
# DG for every host but CoCoOp; cross-dataset (source emoji-nature, 16 shots; targets the six other colour sets)
D7="emoji-nature emoji-animals emoji-food emoji-activities emoji-travel emoji-objects emoji-faces"
P3="OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --seeds 1 2 3"
G=gramvl/assets/gram_coop.safetensors
eval $P --name dg_hosts --protocol dg --methods zeroshot coop kgcoop prograd vpt ivlp maple
eval $P3 --name xd_hosts --protocol xd --datasets $D7 --methods zeroshot coop kgcoop prograd
# GRAM (shipped artifact) on CoOp: few-shot curve with the lr control, DG, cross-dataset
eval $P --name fewshot_coop_gram_curve --protocol fewshot --shots 1 2 4 8 16 --methods coop --gram $G --lr-control 0.95
eval $P --name dg_coop_gram --protocol dg --methods coop --gram-only --gram $G
eval $P3 --name xd_coop_gram --protocol xd --datasets $D7 --methods coop --gram-only --gram $G
# GRAM on CoOp over more datasets: 1 shot over the seven colour sets (M = 16 shipped; M = 4 'a photo of a'),
# base-to-new over four (the 7-dataset run was cut for time; its emoji-nature GRAM records were copied from
# base2new_coop_gram2, made with runs/gram2/coop_pw1 = the shipped artifact byte for byte)
eval $P3 --name fewshot1_coop_gram_7ds --protocol fewshot --shots 1 --datasets $D7 --methods coop --gram $G --lr-control 0.95
eval $P3 --name fewshot1_coop4_gram_7ds --protocol fewshot --shots 1 --datasets $D7 --methods coop \
    --gram runs/gram2/coop_m4_pw1.safetensors --lr-control 0.95 --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P3 --name base2new_coop_gram_4ds --protocol base2new --datasets emoji-nature emoji-animals emoji-food \
    emoji-activities --methods coop --gram $G
# why θ* hurts CoOp: a norm cap on θ (val first, then test), its parts, and a random init of the same norm
OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop --steps 600 --set meta.theta_norm_cap=1.5 \
    --out runs/gram3/coop_cap15.safetensors
V="OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --seeds 1 2 3 --datasets emoji-nature --eval-split val --runs runs/val"
C=runs/gram3/coop_cap15.safetensors
eval $V --name val_fewshot_coop_cap15 --protocol fewshot --shots 1 4 16 --methods coop --gram $C
eval $V --name val_fewshot_coop_pw1 --protocol fewshot --shots 1 4 16 --methods coop --gram-only --gram $G
eval $V --name val_b2n_coop_cap15 --protocol base2new --methods coop --gram-only --gram $C
eval $V --name val_fewshot_coop_cap15_parts --protocol fewshot --shots 1 16 --methods coop --gram-only --gram-parts init regulator --gram $C
eval $V --name val_fewshot_coop_pw1_parts --protocol fewshot --shots 1 16 --methods coop --gram-only --gram-parts init regulator --gram $G
# (val_fewshot_coop_cap15_init reused the 16-shot and two 1-shot records of the _parts run: the same units)
eval $V --name val_fewshot_coop_cap15_init --protocol fewshot --shots 1 2 4 8 16 --methods coop --gram-only --gram-parts init --gram $C
eval $V --name val_b2n_coop_cap15_init --protocol base2new --methods coop --gram-only --gram-parts init --gram $C
eval $P --name fewshot_coop_cap15_init --protocol fewshot --shots 1 2 4 8 16 --methods coop --gram-only --gram-parts init --gram $C
eval $P --name base2new_coop_cap15_init --protocol base2new --methods coop --gram-only --gram-parts init --gram $C
eval $P --name fewshot_coop_initstd --protocol fewshot --shots 1 8 16 --methods coop --set init_std=0.031
# CoCoOp beyond 1 shot (its 1-shot records were copied from fewshot1_hosts: the same units)
OMP_NUM_THREADS=2 $PY benchmarks/protocols.py --seeds 1 2 3 --datasets emoji-nature --name fewshot_cocoop \
    --protocol fewshot --shots 1 2 4 8 16 --methods cocoop
# GRAM ablations of the current default: first order, no shifted query
for a in "firstorder meta.second_order=false" "noshift meta.shifted_weight=0"; do set -- $a
    OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop --steps 600 --set $2 --out runs/gram3/coop_$1.safetensors
    eval $P --name base2new_coop_gram_$1 --protocol base2new --methods coop --gram-only --gram runs/gram3/coop_$1.safetensors
    eval $P --name fewshot1_coop_gram_$1 --protocol fewshot --shots 1 --methods coop --gram-only --gram runs/gram3/coop_$1.safetensors
done

# ---- session 4 (same packaged small CLIP; 3-5 jobs at a time, one thread each) ----
# visual hosts cross-dataset; CoCoOp DG and cross-dataset (records of the other methods are reused)
eval $P3 --name xd_hosts --protocol xd --datasets $D7 --methods zeroshot coop kgcoop prograd cocoop vpt ivlp maple
eval $P --name dg_hosts --protocol dg --methods zeroshot coop kgcoop prograd cocoop vpt ivlp maple
# CoCoOp: lr on val (1 seed), then the test curve at lr x1/16 next to fewshot_cocoop (lr x1)
OMP_NUM_THREADS=1 $PY benchmarks/tune_small.py --name tuning_cocoop --methods cocoop --mults 0.0625 0.25 1 \
    --shots 1 4 16 --epoch-mult 0.5 --dataset emoji-nature --model small-v1
eval $P --name fewshot_cocoop_lr16 --protocol fewshot --shots 1 2 4 8 16 --methods cocoop --gram-only --lr-control 0.0625
# GRAM meta-training variants on val (runs/gram4), the winner became the default recipe
V="OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --seeds 1 2 3 --datasets emoji-nature --eval-split val --runs runs/val"
for v in "cap15_lr025 cmhc meta.theta_norm_cap=1.5 meta.inner_lr=0.25" \
         "cap15_lr025_phi3 cmhc meta.theta_norm_cap=1.5 meta.inner_lr=0.25 meta.outer_lr_phi=0.001" \
         "flat_guard07 flat meta.psi_min_cos=0.7"; do set -- $v; n=$1; h=$2; shift 2
    OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop --steps 600 --hierarchy $h --set "$@" --out runs/gram4/$n.safetensors
    eval $V --name val_b2n_coop_$n --protocol base2new --methods coop --gram-only --gram runs/gram4/$n.safetensors
    eval $V --name val_fewshot_coop_$n --protocol fewshot --shots 1 4 16 --methods coop --gram-only --gram runs/gram4/$n.safetensors
done
# the new default (= cap15_lr025_phi3; reproduced byte for byte by the plain command) is the shipped artifact
OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop --out runs/gram4/default_check.safetensors
A=runs/gram4/cap15_lr025_phi3.safetensors
eval $P --name base2new_coop_gram4 --protocol base2new --methods coop --gram-only --gram $A
eval $P --name fewshot_coop_gram4_curve --protocol fewshot --shots 1 2 4 8 16 --methods coop --gram-only --gram $A
G=gramvl/assets/gram_coop.safetensors
eval $P3 --name fewshot1_coop_gram4_7ds --protocol fewshot --shots 1 --datasets $D7 --methods coop --gram-only --gram $G
eval $P3 --name base2new_coop_gram4_4ds --protocol base2new --datasets emoji-nature emoji-animals emoji-food \
    emoji-activities --methods coop --gram-only --gram $G
eval $P --name base2new_coop_gram4_parts --protocol base2new --methods coop --gram-only --gram-parts init regulator --gram $G
eval $P --name fewshot1_coop_gram4_parts --protocol fewshot --shots 1 --methods coop --gram-only --gram-parts init regulator --gram $G
eval $P --name dg_coop_gram4 --protocol dg --methods coop --gram-only --gram $G
eval $P3 --name xd_coop_gram4 --protocol xd --datasets $D7 --methods coop --gram-only --gram $G
# the new recipe on CoOp M = 4 / CoCoOp and on VPT (first order, 12-minute budget)
M4=runs/gram4/m4_cap15_lr025_phi3.safetensors
OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop --steps 600 --set 'meta.host_cfg={n_ctx: 4, ctx_init: "a photo of a"}' \
    --out $M4
eval $P --name fewshot1_coop4_gram4 --protocol fewshot --shots 1 --methods coop --gram-only --gram $M4 --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P --name base2new_coop4_gram4 --protocol base2new --methods coop --gram-only --gram $M4 --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P --name fewshot1_cocoop_gram4 --protocol fewshot --shots 1 --methods cocoop --gram-only --gram $M4
OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host vpt --steps 300 --set meta.time_budget_s=720 meta.second_order=false \
    --out runs/gram4/vpt_lr025_phi3.safetensors
eval $P --name fewshot1_vpt_gram4 --protocol fewshot --shots 1 --methods vpt --gram-only --gram runs/gram4/vpt_lr025_phi3.safetensors
eval $P --name base2new_vpt_gram4 --protocol base2new --methods vpt --gram-only --gram runs/gram4/vpt_lr025_phi3.safetensors
# ablations: flat clustering / random tasks with the session-3 recipe (runs/gram4), and all four with the new default (runs/gram5)
for h in flat random; do
    OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop --steps 600 --hierarchy $h \
        --set meta.theta_norm_cap=0 meta.inner_lr=1.0 meta.outer_lr_phi=0.01 --out runs/gram4/coop_$h.safetensors
    eval $P --name base2new_coop_gram_$h --protocol base2new --methods coop --gram-only --gram runs/gram4/coop_$h.safetensors
    eval $P --name fewshot1_coop_gram_$h --protocol fewshot --shots 1 --methods coop --gram-only --gram runs/gram4/coop_$h.safetensors
done
for a in "flat --hierarchy flat" "random --hierarchy random" "noshift --no-shifted-query" "firstorder --first-order"; do set -- $a
    OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop $2 $3 --out runs/gram5/coop_$1.safetensors
    eval $P --name base2new_coop_gram5_$1 --protocol base2new --methods coop --gram-only --gram runs/gram5/coop_$1.safetensors
    eval $P --name fewshot1_coop_gram5_$1 --protocol fewshot --shots 1 --methods coop --gram-only --gram runs/gram5/coop_$1.safetensors
done
# meta-learned contexts as zero-shot prompts
OMP_NUM_THREADS=1 $PY benchmarks/theta_zeroshot.py --artifacts gramvl/assets/gram_coop.safetensors runs/gram3/coop_cap15.safetensors \
    runs/gram2/coop_pw1.safetensors runs/gram4/m4_cap15_lr025_phi3.safetensors runs/gram2/coop_m4_pw1.safetensors
# test-time prompt tuning on every embedded test set, 200 images each (per-(dataset, seed) records resume)
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/tta.py --meta-theta-anchor 0 --limit 200 --seeds 1 2 3 --gram runs/gram2/coop_m4_pw1.safetensors \
    --threads 1 --quiet --out docs/results
# CoCoOp + GRAM (new recipe, M = 4 artifact) base-to-new; TPT's lr on val for the small CLIP
eval $P --name base2new_cocoop_gram4 --protocol base2new --methods cocoop --gram-only --gram $M4
OMP_NUM_THREADS=1 $PY benchmarks/tpt_lr.py --lrs 0.005 0.05 0.2 0.5
OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host maple --steps 300 --set meta.time_budget_s=600 meta.second_order=false \
    --out runs/gram4/maple_lr025_phi3.safetensors
eval $P --name fewshot1_maple_gram4 --protocol fewshot --shots 1 --methods maple --gram-only --gram runs/gram4/maple_lr025_phi3.safetensors
eval $P --name base2new_maple_gram4 --protocol base2new --methods maple --gram-only --gram runs/gram4/maple_lr025_phi3.safetensors
OMP_NUM_THREADS=2 $PY -m gramvl meta-train --host ivlp --unigram --steps 300 --set meta.time_budget_s=540 meta.second_order=false \
    --out runs/gram4/unigram_lr025_phi3.safetensors
eval $P --name fewshot1_unigram_gram4 --protocol fewshot --shots 1 --methods ivlp --gram-only --gram runs/gram4/unigram_lr025_phi3.safetensors
eval $P --name base2new_unigram_gram4 --protocol base2new --methods ivlp --gram-only --gram runs/gram4/unigram_lr025_phi3.safetensors

# ---- session 5 (same packaged small CLIP; 2-3 jobs at a time, one thread each; one H100 lent for 15 minutes) ----
# IVLP lr x0.95 control (UNIGRAM's missing control)
eval $P --name base2new_ivlp_ctrl --protocol base2new --methods ivlp --gram-only --lr-control 0.95
eval $P --name fewshot1_ivlp_ctrl --protocol fewshot --shots 1 --methods ivlp --gram-only --lr-control 0.95
# GPU checks (on the lent H100; see docs/gpu.md): smoke of every CLI path, 1000-class GPU memory, second-order
# meta-training of the visual hosts; the smoke part also ran on this CPU for the side-by-side table
#   (device) bash benchmarks/device_check.sh smoke memory meta
DEV=cpu O=runs/device-cpu PY=$PY OMP_NUM_THREADS=2 GRAMVL_HOME=/tmp/cpuhome bash benchmarks/device_check.sh smoke
$PY benchmarks/device_compare.py --cpu runs/device-cpu --gpu runs/device-h100 --out docs/results
$PY benchmarks/memory_gpu.py --render runs/device-h100/memory/memory_gpu.json --out docs/results   # the note under the table is kept in the JSON
# VPT + GRAM from the H100's second-order artifact (136 meta-steps, 55 s)
eval $P --name fewshot1_vpt_gram6_so --protocol fewshot --shots 1 --methods vpt --gram-only --gram runs/gram6/vpt_so.safetensors
eval $P --name base2new_vpt_gram6_so --protocol base2new --methods vpt --gram-only --gram runs/gram6/vpt_so.safetensors
# θ anchored to "a photo of a" for word-initialised hosts (meta.theta_anchor), on val
for r in 0.5 1.0; do n=anchor$(echo $r | tr -d .)
    OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host coop --steps 600 --set 'meta.host_cfg={n_ctx: 4, ctx_init: "a photo of a"}' \
        meta.theta_anchor=$r --out runs/gram6/m4_$n.safetensors
done
for a in runs/gram4/m4_cap15_lr025_phi3 runs/gram6/m4_anchor05 runs/gram6/m4_anchor10; do n=$(basename $a); n=${n/m4_cap15_lr025_phi3/m4old}; n=${n#m4_}
    eval $V --name val_b2n_coop4_$n --protocol base2new --methods coop --gram $a.safetensors --set n_ctx=4 "'ctx_init=a photo of a'"
    eval $V --name val_fewshot_coop4_$n --protocol fewshot --shots 1 4 --methods coop --gram $a.safetensors --set n_ctx=4 "'ctx_init=a photo of a'"
done
# every host on base-to-new over four datasets
eval $P3 --name base2new_hosts_4ds --protocol base2new --datasets emoji-nature emoji-animals emoji-food emoji-activities \
    --methods zeroshot coop kgcoop prograd cocoop vpt ivlp   # maple: stopped at 1 of 12 units (session end)
# the anchored θ on test for the word-initialised hosts (MaPLe and IVLP + UNIGRAM meta-trained again with it)
A5=runs/gram6/m4_anchor05.safetensors
eval $P --name fewshot1_coop4_gram6_anchor05 --protocol fewshot --shots 1 --methods coop --gram-only --gram $A5 --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P --name base2new_coop4_gram6_anchor05 --protocol base2new --methods coop --gram-only --gram $A5 --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P --name fewshot1_cocoop_gram6_anchor05 --protocol fewshot --shots 1 --methods cocoop --gram-only --gram $A5
eval $P --name base2new_cocoop_gram6_anchor05 --protocol base2new --methods cocoop --gram-only --gram $A5
eval $P3 --name fewshot1_coop4_gram6_anchor05_7ds --protocol fewshot --shots 1 --datasets $D7 --methods coop --gram-only --gram $A5 \
    --set n_ctx=4 "'ctx_init=a photo of a'"
OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host maple --steps 300 --set meta.time_budget_s=600 meta.second_order=false \
    meta.theta_anchor=0.5 --out runs/gram6/maple_anchor05.safetensors
eval $P --name fewshot1_maple_gram6_anchor05 --protocol fewshot --shots 1 --methods maple --gram-only --gram runs/gram6/maple_anchor05.safetensors
eval $P --name base2new_maple_gram6_anchor05 --protocol base2new --methods maple --gram-only --gram runs/gram6/maple_anchor05.safetensors
OMP_NUM_THREADS=1 $PY -m gramvl meta-train --host ivlp --unigram --steps 300 --set meta.time_budget_s=540 meta.second_order=false \
    meta.theta_anchor=0.5 --out runs/gram6/unigram_anchor05.safetensors
eval $P --name fewshot1_unigram_gram6_anchor05 --protocol fewshot --shots 1 --methods ivlp --gram-only --gram runs/gram6/unigram_anchor05.safetensors
eval $P --name base2new_unigram_gram6_anchor05 --protocol base2new --methods ivlp --gram-only --gram runs/gram6/unigram_anchor05.safetensors
# every host at 1 shot over the seven colour sets
eval $P3 --name fewshot1_hosts_7ds --protocol fewshot --shots 1 --datasets $D7 --methods zeroshot kgcoop prograd vpt ivlp maple   # cocoop: stopped unfinished (session end)
# few-shot curves 2-16 with GRAM for the other hosts (anchored artifacts for word-initialised hosts), and CoOp M = 4
F="--protocol fewshot --shots 2 4 8 16 --gram-only"
eval $P --name fewshot_coop4_curve --protocol fewshot --shots 2 4 8 16 --methods coop --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P --name fewshot_coop4_gram6_curve $F --methods coop --gram $A5 --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P --name fewshot_cocoop_gram6_curve $F --methods cocoop --gram $A5
eval $P --name fewshot_vpt_gram4_curve $F --methods vpt --gram runs/gram4/vpt_lr025_phi3.safetensors
# stopped unfinished at the session end: eval $P --name fewshot_maple_gram6_curve $F --methods maple --gram runs/gram6/maple_anchor05.safetensors
# not started (session end): eval $P --name fewshot_unigram_gram6_curve $F --methods ivlp --gram runs/gram6/unigram_anchor05.safetensors
# the init each visual / coupled-host artifact hands its host: untrained host with its own init vs with θ*
D3="--datasets emoji-nature emoji-animals emoji-activities"
OMP_NUM_THREADS=1 $PY benchmarks/theta_zeroshot.py --host vpt --artifacts runs/gram4/vpt_lr025_phi3.safetensors runs/gram6/vpt_so.safetensors $D3 --name theta_zeroshot_vpt
OMP_NUM_THREADS=1 $PY benchmarks/theta_zeroshot.py --host maple --artifacts runs/gram4/maple_lr025_phi3.safetensors runs/gram6/maple_anchor05.safetensors $D3 --name theta_zeroshot_maple
OMP_NUM_THREADS=1 $PY benchmarks/theta_zeroshot.py --host ivlp --artifacts runs/gram4/unigram_lr025_phi3.safetensors runs/gram6/unigram_anchor05.safetensors $D3 --name theta_zeroshot_ivlp

# ---- session 6 (same packaged small CLIP; 2-4 jobs at a time, one thread each; no GPU lent) ----
# the parts session 5 stopped: MaPLe in base2new_hosts_4ds, CoCoOp in fewshot1_hosts_7ds, the MaPLe and UNIGRAM
# curves (the same commands reuse the records already written)
eval $P3 --name base2new_hosts_4ds --protocol base2new --datasets emoji-nature emoji-animals emoji-food emoji-activities \
    --methods zeroshot coop kgcoop prograd cocoop vpt ivlp maple
eval $P3 --name fewshot1_hosts_7ds --protocol fewshot --shots 1 --datasets $D7 --methods zeroshot kgcoop prograd cocoop vpt ivlp maple
eval $P --name fewshot_maple_gram6_curve $F --methods maple --gram runs/gram6/maple_anchor05.safetensors
eval $P --name fewshot_unigram_gram6_curve $F --methods ivlp --gram runs/gram6/unigram_anchor05.safetensors
# MaPLe + GRAM with the meta-training host's coupling maps pinned (artifacts now store host extras; this adds
# them to the session-5 artifact by rebuilding the meta-training host)
$PY benchmarks/artifact_extras.py runs/gram6/maple_anchor05.safetensors runs/gram6/maple_anchor05x.safetensors
eval $P --name fewshot1_maple_gram6x_anchor05 --protocol fewshot --shots 1 --methods maple --gram-only --gram runs/gram6/maple_anchor05x.safetensors
eval $P --name base2new_maple_gram6x_anchor05 --protocol base2new --methods maple --gram-only --gram runs/gram6/maple_anchor05x.safetensors
# cross-dataset and DG with GRAM for the other hosts
for h in "cocoop runs/gram6/m4_anchor05 cocoop_gram6" "vpt runs/gram4/vpt_lr025_phi3 vpt_gram4" \
         "ivlp runs/gram6/unigram_anchor05 unigram_gram6" "maple runs/gram6/maple_anchor05 maple_gram6"; do set -- $h
    eval $P --name dg_$3 --protocol dg --methods $1 --gram-only --gram $2.safetensors
    eval $P3 --name xd_$3 --protocol xd --datasets $D7 --methods $1 --gram-only --gram $2.safetensors
done
# the linear probe's few-shot curve next to zero-shot over four datasets
eval $P3 --name fewshot_linear_probe_4ds --protocol fewshot --datasets emoji-nature emoji-animals emoji-food emoji-activities \
    --shots 1 2 4 8 16 --methods zeroshot linear_probe
# test-time GRAM ablations at the full artifact's step count
OMP_NUM_THREADS=1 $PY benchmarks/tta_ablations.py --full runs/bench-tta/meta_tta.safetensors --limit 100 --quiet
# every host with and without GRAM across the protocols (from the summaries above)
$PY benchmarks/gram_summary.py
# ---- session 7: the small CLIP retrained with the icon corpus (docs/pretraining.md has the three pretrain legs) ----
VAL="emoji-activities emoji-animals emoji-faces emoji-food emoji-nature emoji-objects emoji-travel emoji-activities-lineart \
    emoji-animals-lineart emoji-faces-lineart emoji-food-lineart emoji-nature-lineart emoji-objects-lineart emoji-travel-lineart fashion-mnist"
$PY -m gramvl world build --icons
V="OMP_NUM_THREADS=2 $PY -m gramvl --quiet pretrain --batch-size 128 --warmup 100 --eval-every 200 --icons 0.4 --val-sets $VAL"
eval $V --out runs/pretrain_s7_icons --steps 1400 --lr 5e-4 --init gramvl/assets/small_clip_v1.safetensors
eval $V --out runs/pretrain_s7_icons_b --steps 2000 --lr 5e-4 --init runs/pretrain_s7_icons/best.safetensors
eval $V --out runs/pretrain_s7_icons_c --steps 1200 --lr 3e-4 --photo-aug 0.15 --val-limit 2000 --init runs/pretrain_s7_icons_b/best.safetensors
cp runs/pretrain_s7_icons_c/best.safetensors gramvl/assets/small_clip.safetensors
cp runs/pretrain_s7_icons_c/best.json gramvl/assets/small_clip.json
OMP_NUM_THREADS=1 $PY benchmarks/zeroshot.py --seeds 1 2 3 &
OMP_NUM_THREADS=1 $PY -m gramvl --quiet meta-train --host coop --steps 600 --out runs/gram7/coop.safetensors   # = assets/gram_coop_v2
wait
P1="OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --datasets emoji-nature --seeds 1 2 3"
# the adaptation tables of a packaged model on emoji-nature: adaptation_tables SUFFIX GRAM_ARTIFACT
adaptation_tables() {
    local v=$1 G=$2
    (eval $P1 --name base2new_zs_$v --protocol base2new --methods zeroshot && \
     eval $P1 --name base2new_coop_gram_$v --protocol base2new --methods coop --gram $G --lr-control 0.95) &
    eval $P1 --name fewshot1_coop_$v --protocol fewshot --shots 1 --methods zeroshot coop
    eval $P1 --name fewshot1_coop_gram_$v --protocol fewshot --shots 1 --methods coop --gram-only --gram $G
    wait
    eval $P1 --name fewshot1_coop4_$v --protocol fewshot --shots 1 --methods coop --set n_ctx=4 "'ctx_init=a photo of a'" &
    eval $P1 --name fewshot16_coop_$v --protocol fewshot --shots 16 --methods zeroshot coop
    wait
}
adaptation_tables v2 gramvl/assets/gram_coop_v2.safetensors
# CoOp's lr on the new model's val split (is the 1-shot collapse the recipe?)
OMP_NUM_THREADS=2 $PY benchmarks/tune_small.py --methods coop --mults 0.1 0.3 1 --shots 1 16 --name tuning_small_v2_coop --model small-v2

# ---- session 8: one more leg from small-v2 (the shipped one, and its control without --caption-positives) ----
# (the world's meta part is now v4: the same corpus on every machine; docs/data.md)
$PY -m gramvl world build --icons
L="OMP_NUM_THREADS=1 $PY -m gramvl --quiet pretrain --steps 1200 --batch-size 128 --lr 3e-4 --photo-aug 0.15 --val-limit 2000 \
    --warmup 100 --eval-every 200 --icons 0.4 --init gramvl/assets/small_clip_v2.safetensors --threads 1 --val-sets $VAL"
eval $L --out runs/pretrain_s8_d --caption-positives &
eval $L --out runs/pretrain_s8_d0 &
wait
cp runs/pretrain_s8_d/best.safetensors gramvl/assets/small_clip.safetensors   # val 0.1757 against the control's 0.1751
cp runs/pretrain_s8_d/best.json gramvl/assets/small_clip.json
OMP_NUM_THREADS=1 $PY benchmarks/zeroshot.py --model runs/pretrain_s8_d/best.safetensors --out runs/zs_s8_d --threads 1 &
OMP_NUM_THREADS=1 $PY benchmarks/zeroshot.py --model runs/pretrain_s8_d0/best.safetensors --out runs/zs_s8_d0 --threads 1 &
wait   # -> docs/results/zeroshot.md and zeroshot_s8_control.md
OMP_NUM_THREADS=2 $PY -m gramvl --quiet meta-train --host coop --steps 600 --out runs/gram8/coop.safetensors   # = assets/gram_coop_v3
OMP_NUM_THREADS=1 $PY benchmarks/calibration.py --threads 1
adaptation_tables v3 gramvl/assets/gram_coop_v3.safetensors
# the other hosts on the new model (no GRAM), and GRAM with the M = 4 "a photo of a" artifact for CoOp M = 4 and CoCoOp
eval $P1 --name base2new_cocoop_v3 --protocol base2new --methods cocoop &
eval $P1 --name base2new_hosts_v3 --protocol base2new --methods vpt ivlp maple kgcoop prograd
wait
OMP_NUM_THREADS=2 $PY -m gramvl --quiet meta-train --host coop --steps 600 \
    --set 'meta.host_cfg={n_ctx: 4, ctx_init: "a photo of a"}' --out runs/gram8/coop_m4.safetensors
G4=runs/gram8/coop_m4.safetensors
eval $P1 --name base2new_coop4_gram_v3 --protocol base2new --methods coop --gram $G4 --lr-control 0.95 --set n_ctx=4 "'ctx_init=a photo of a'" &
eval $P1 --name base2new_cocoop_gram_v3 --protocol base2new --methods cocoop --gram-only --gram $G4
wait
# test-time prompt tuning on the new model (M = 4 artifact as 'GRAM init'; 240 test-time meta-steps, a step count, not a budget)
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/tta.py --meta-theta-anchor 0 --limit 50 --seeds 1 2 3 --datasets emoji-nature emoji-nature-lineart fashion-mnist \
    --gram runs/gram8/coop_m4.safetensors --meta-steps 240 --meta-budget 3000 --threads 2 --work runs/bench-tta-v3 \
    --out runs/tta_v3 --quiet   # -> docs/results/tta_50_v3.md

# ---- session 9: where the learned logit scale goes (docs/pretraining.md, session 9) ----
L="OMP_NUM_THREADS=1 $PY -m gramvl --quiet pretrain --steps 400 --batch-size 128 --lr 3e-4 --photo-aug 0.15 --val-limit 2000 \
    --warmup 100 --eval-every 100 --icons 0.4 --caption-positives --init gramvl/assets/small_clip.safetensors --threads 1 --val-sets $VAL"
eval $L --out runs/pretrain_s9_e &                          # control: the scale learned from the model's 39.1
eval $L --out runs/pretrain_s9_i --logit-scale-init 100 &   # the scale re-initialised at 100 (CLIP's ceiling), learned
wait
# (legs E100, F, G in docs/results/pretrain_s9_history.json ran before the clamp fix: their scale was frozen at 100;
#  E100 = leg I's command on commit b30886f, F and G add --steps 600 --warmup 50 and --lr 1e-4 / 3e-5)
$PY benchmarks/scale_optimum.py --batches 16 --models small small-v2 small-v1 runs/pretrain_s9_e/best.safetensors \
    runs/pretrain_s9_e100/best.safetensors runs/pretrain_s9_i/best.safetensors   # -> docs/results/scale_optimum.md
OMP_NUM_THREADS=1 $PY benchmarks/scale_adaptation.py --scale 100 --lr-mult 0.4 --datasets emoji-nature --seeds 1 2 3
# is 16-shot CoOp worth it on every set? (zero-shot vs CoOp on the seven OpenMoji colour sets and Fashion-MNIST)
OMP_NUM_THREADS=2 $PY benchmarks/protocols.py --datasets emoji-activities emoji-animals emoji-faces emoji-food emoji-nature \
    emoji-objects emoji-travel fashion-mnist --seeds 1 2 3 --name fewshot16_coop_8ds_v3 --protocol fewshot --shots 16 \
    --methods zeroshot coop
# the host recipes' small-model scaling, re-checked on the current model (val split, 16 shots)
OMP_NUM_THREADS=1 $PY benchmarks/tune_small.py --methods vpt --mults 1 10 50 --shots 16 --name tuning_small_v3_hosts_vpt
OMP_NUM_THREADS=1 $PY benchmarks/tune_small.py --methods kgcoop ivlp maple --mults 0.3 1 3 --shots 16 --name tuning_small_v3_hosts

# ---- session 10: does the batch size move the loss's optimum scale? (docs/pretraining.md, session 10) ----
OMP_NUM_THREADS=1 $PY benchmarks/scale_optimum.py --threads 1 --models small small-v1 --batches 32 \
    --batch-sizes 128 512 2048 8192 --name scale_optimum_batch   # -> docs/results/scale_optimum_batch.md
# GRAM on every host with the current model (session-6 recipes, meta-trained again on this model; emoji-nature, 3 seeds)
OMP_NUM_THREADS=1 $PY -m gramvl --quiet meta-train --host vpt --steps 300 --set meta.time_budget_s=720 meta.second_order=false \
    --out runs/gram10/vpt.safetensors &
OMP_NUM_THREADS=1 $PY -m gramvl --quiet meta-train --host maple --steps 300 --set meta.time_budget_s=600 meta.second_order=false \
    meta.theta_anchor=0.5 --out runs/gram10/maple_anchor05.safetensors &
wait
OMP_NUM_THREADS=2 $PY -m gramvl --quiet meta-train --host ivlp --unigram --steps 300 --set meta.time_budget_s=540 meta.second_order=false \
    meta.theta_anchor=0.5 --out runs/gram10/unigram_anchor05.safetensors
OMP_NUM_THREADS=2 $PY -m gramvl --quiet meta-train --host coop --steps 600 --set 'meta.host_cfg={n_ctx: 4, ctx_init: "a photo of a"}' \
    meta.theta_anchor=0.5 --out runs/gram10/m4_anchor05.safetensors
G4=runs/gram8/coop_m4.safetensors; A5=runs/gram10/m4_anchor05.safetensors
eval $P1 --name base2new_vpt_gram_v3 --protocol base2new --methods vpt --gram runs/gram10/vpt.safetensors --lr-control 0.95 &
eval $P1 --name base2new_maple_gram_v3 --protocol base2new --methods maple --gram runs/gram10/maple_anchor05.safetensors --lr-control 0.95
wait
eval $P1 --name base2new_unigram_gram_v3 --protocol base2new --methods ivlp --gram runs/gram10/unigram_anchor05.safetensors --lr-control 0.95 &
eval $P1 --name fewshot1_vpt_gram_v3 --protocol fewshot --shots 1 --methods vpt --gram runs/gram10/vpt.safetensors
wait
eval $P1 --name fewshot1_maple_gram_v3 --protocol fewshot --shots 1 --methods maple --gram runs/gram10/maple_anchor05.safetensors &
eval $P1 --name fewshot1_unigram_gram_v3 --protocol fewshot --shots 1 --methods ivlp --gram runs/gram10/unigram_anchor05.safetensors
wait
eval $P1 --name fewshot1_cocoop_gram_v3 --protocol fewshot --shots 1 --methods cocoop --gram $G4 &
eval $P1 --name fewshot1_coop4_gram_v3 --protocol fewshot --shots 1 --methods coop --gram-only --gram $G4 --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P1 --name fewshot1_coop4_gram_anchor05_v3 --protocol fewshot --shots 1 --methods coop --gram-only --gram $A5 --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P1 --name base2new_coop4_gram_anchor05_v3 --protocol base2new --methods coop --gram-only --gram $A5 --set n_ctx=4 "'ctx_init=a photo of a'"
wait
eval $P1 --name fewshot1_cocoop_gram_anchor05_v3 --protocol fewshot --shots 1 --methods cocoop --gram-only --gram $A5 &
eval $P1 --name base2new_cocoop_gram_anchor05_v3 --protocol base2new --methods cocoop --gram-only --gram $A5
wait
eval $P1 --name fewshot1_coop4_gram_parts_v3 --protocol fewshot --shots 1 --methods coop --gram-only --gram-parts init regulator \
    --gram $A5 --set n_ctx=4 "'ctx_init=a photo of a'"
OMP_NUM_THREADS=2 $PY benchmarks/theta_zeroshot.py --artifacts $G4 $A5 gramvl/assets/gram_coop_v3.safetensors --name theta_zeroshot_v3
R=docs/results
$PY benchmarks/gram_table.py --name gram_hosts_v3 --hosts coop cocoop vpt maple ivlp \
  --base2new $R/base2new_coop_gram_v3.json $R/base2new_cocoop_v3.json $R/base2new_cocoop_gram_anchor05_v3.json $R/base2new_vpt_gram_v3.json \
    $R/base2new_maple_gram_v3.json $R/base2new_unigram_gram_v3.json \
  --fewshot $R/fewshot1_coop_v3.json:coop $R/fewshot1_coop_gram_v3.json $R/fewshot1_cocoop_gram_v3.json:cocoop \
    $R/fewshot1_cocoop_gram_anchor05_v3.json $R/fewshot1_vpt_gram_v3.json $R/fewshot1_maple_gram_v3.json $R/fewshot1_unigram_gram_v3.json \
  --note "..."   # the note as in docs/results/gram_hosts_v3.md
$PY benchmarks/gram_table.py --name gram_coop4_v3 --hosts coop \
  --base2new "$R/base2new_coop4_gram_v3.json:coop,coop (lr x0.95)" $R/base2new_coop4_gram_anchor05_v3.json \
  --fewshot $R/fewshot1_coop4_v3.json $R/fewshot1_coop4_gram_anchor05_v3.json --note "..."   # the note as in gram_coop4_v3.md
# CoOp M = 4 + GRAM loses 6 points at 1 shot with the 0.5 anchor: the anchor radius chosen again on val (0.5 / 0.25 / 0.1)
for r in 0.25 0.1; do n=anchor$(echo $r | tr -d .)
  OMP_NUM_THREADS=1 $PY -m gramvl --quiet meta-train --host coop --steps 600 --set 'meta.host_cfg={n_ctx: 4, ctx_init: "a photo of a"}' \
      meta.theta_anchor=$r --out runs/gram10/m4_$n.safetensors &
done
wait
V10="OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --seeds 1 2 3 --datasets emoji-nature --eval-split val --runs runs/val"
eval $V10 --name val_fewshot_coop4_v3 --protocol fewshot --shots 1 --methods coop --set n_ctx=4 "'ctx_init=a photo of a'" &
eval $V10 --name val_b2n_coop4_v3 --protocol base2new --methods coop --set n_ctx=4 "'ctx_init=a photo of a'"
wait
for n in anchor05 anchor025 anchor01; do
  eval $V10 --name val_fewshot_coop4_${n}_v3 --protocol fewshot --shots 1 --methods coop --gram-only --gram runs/gram10/m4_$n.safetensors --set n_ctx=4 "'ctx_init=a photo of a'" &
  eval $V10 --name val_b2n_coop4_${n}_v3 --protocol base2new --methods coop --gram-only --gram runs/gram10/m4_$n.safetensors --set n_ctx=4 "'ctx_init=a photo of a'"
  wait
done
# the val choice (0.25) on test, for CoOp M = 4 and CoCoOp
A=runs/gram10/m4_anchor025.safetensors
eval $P1 --name fewshot1_coop4_gram_anchor025_v3 --protocol fewshot --shots 1 --methods coop --gram-only --gram $A --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P1 --name base2new_coop4_gram_anchor025_v3 --protocol base2new --methods coop --gram-only --gram $A --set n_ctx=4 "'ctx_init=a photo of a'" &
eval $P1 --name fewshot1_cocoop_gram_anchor025_v3 --protocol fewshot --shots 1 --methods cocoop --gram-only --gram $A
wait
eval $P1 --name base2new_cocoop_gram_anchor025_v3 --protocol base2new --methods cocoop --gram-only --gram $A
# few-shot curves with GRAM on the current model: CoOp (shipped artifact, with the lr control) and MaPLe
eval $P1 --name fewshot_coop_gram_curve_v3 --protocol fewshot --shots 1 2 4 8 16 --methods coop --gram gramvl/assets/gram_coop_v3.safetensors --lr-control 0.95 &
eval $P1 --name fewshot_maple_gram_curve_v3 --protocol fewshot --shots 2 4 8 16 --methods maple --gram runs/gram10/maple_anchor05.safetensors
wait
eval $P3 --datasets emoji-animals emoji-activities --name fewshot_coop_gram_curve_2ds_v3 \
    --protocol fewshot --shots 1 2 4 8 --methods coop --gram gramvl/assets/gram_coop_v3.safetensors
# cross-dataset and DG for CoOp with GRAM on the current model
eval $P1 --name dg_coop_gram_v3 --protocol dg --methods coop \
    --gram gramvl/assets/gram_coop_v3.safetensors &
eval $P3 --name xd_coop_gram_v3 --protocol xd --datasets $D7 --methods coop \
    --gram gramvl/assets/gram_coop_v3.safetensors
wait

# ---- session 11 (docs/pretraining.md and docs/results/gram.md, session 11) ----
# is the training augmentation what keeps the loss's optimum scale low? (the same pairs, with and without it)
OMP_NUM_THREADS=1 $PY benchmarks/scale_optimum.py --threads 1 --models small small-v1 --images augmented unaugmented \
    --name scale_optimum_unaugmented
# the missing cells of GRAM on every host with the current model (gram_summary_v3.md). The M = 4 artifact is made again
# with session 10's command (600 steps, no time budget; it gave session 10's 1-shot mean, 13.16, again)
OMP_NUM_THREADS=1 $PY -m gramvl --quiet meta-train --host coop --steps 600 --set 'meta.host_cfg={n_ctx: 4, ctx_init: "a photo of a"}' \
    meta.theta_anchor=0.25 --out runs/gram10/m4_anchor025.safetensors
A=runs/gram10/m4_anchor025.safetensors
eval $P1 --name fewshot_coop4_gram_curve_v3 --protocol fewshot --shots 2 4 8 16 --methods coop --gram $A --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P1 --name fewshot_cocoop_gram_curve_v3 --protocol fewshot --shots 2 4 8 16 --methods cocoop --gram $A
eval $P1 --name dg_cocoop_gram_v3 --protocol dg --methods cocoop --gram $A
eval $P3 --name xd_cocoop_gram_v3 --protocol xd --datasets $D7 --methods cocoop --gram $A
# MaPLe and VPT: session 10's recipes meta-trained again (time budgets: other artifacts, so each is also re-run on
# base-to-new and 1 shot as a replication), run side by side with the lines above
OMP_NUM_THREADS=1 $PY -m gramvl --quiet meta-train --host maple --steps 300 --set meta.time_budget_s=600 meta.second_order=false \
    meta.theta_anchor=0.5 --out runs/gram11/maple_anchor05.safetensors
M=runs/gram11/maple_anchor05.safetensors
eval $P1 --name base2new_maple_gram_remake_v3 --protocol base2new --methods maple --gram-only --gram $M
eval $P1 --name fewshot1_maple_gram_remake_v3 --protocol fewshot --shots 1 --methods maple --gram-only --gram $M
eval $P1 --name dg_maple_gram_v3 --protocol dg --methods maple --gram $M
eval $P3 --name xd_maple_gram_v3 --protocol xd --datasets $D7 --methods maple --gram $M
OMP_NUM_THREADS=1 $PY -m gramvl --quiet meta-train --host vpt --steps 300 --set meta.time_budget_s=720 meta.second_order=false \
    --out runs/gram11/vpt.safetensors
V=runs/gram11/vpt.safetensors
eval $P1 --name base2new_vpt_gram_remake_v3 --protocol base2new --methods vpt --gram-only --gram $V
eval $P1 --name fewshot1_vpt_gram_remake_v3 --protocol fewshot --shots 1 --methods vpt --gram-only --gram $V
eval $P1 --name fewshot_vpt_gram_curve_v3 --protocol fewshot --shots 2 4 8 16 --methods vpt --gram $V
eval $P1 --name dg_vpt_gram_v3 --protocol dg --methods vpt --gram $V
# CoCoOp's lr on the current model (val split, 16 shots, seed 1), and zero-shot on the same val split
OMP_NUM_THREADS=1 $PY benchmarks/tune_small.py --methods cocoop --mults 0.3 1 3 --shots 16 --name tuning_small_v3_cocoop
$PY -m gramvl --quiet zeroshot --dataset emoji-nature --split val --json docs/results/zeroshot_val_emoji_nature_v3.json
# test-time prompt tuning on the current model with the anchored M = 4 artifact as 'GRAM init' (session 8: the unanchored
# one, 50 images), 200 images per set; the test-time artifact meta-trained again (240 steps)
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/tta.py --meta-theta-anchor 0 --limit 200 --seeds 1 2 3 --datasets emoji-nature emoji-nature-lineart fashion-mnist \
    --gram runs/gram10/m4_anchor025.safetensors --meta-steps 240 --meta-budget 3000 --threads 1 --work runs/bench-tta-v3 \
    --out runs/tta_v3_a025 --quiet   # -> docs/results/tta_200_v3.md
# IVLP + UNIGRAM: session 10's recipe meta-trained again (session 10: 540 s on 2 threads; here 1,080 s on one: 276 steps)
OMP_NUM_THREADS=1 $PY -m gramvl --quiet meta-train --host ivlp --unigram --steps 300 --set meta.time_budget_s=1080 meta.second_order=false \
    meta.theta_anchor=0.5 --out runs/gram11/unigram_anchor05.safetensors
U=runs/gram11/unigram_anchor05.safetensors
eval $P1 --name base2new_unigram_gram_remake_v3 --protocol base2new --methods ivlp --gram-only --gram $U
eval $P1 --name fewshot1_unigram_gram_remake_v3 --protocol fewshot --shots 1 --methods ivlp --gram-only --gram $U
eval $P1 --name dg_unigram_gram_v3 --protocol dg --methods ivlp --gram $U
$PY benchmarks/gram_summary.py   # -> docs/results/gram_summary.md (small-v1) and gram_summary_v3.md (current model)

# ---- session 12 (docs/pretraining.md and docs/results/gram.md, session 12) ----
# which captions win the in-batch mistakes (near-duplicates or not), on the training mix and on emoji-only batches
OMP_NUM_THREADS=1 $PY benchmarks/scale_optimum.py --threads 1 --models small small-v1 --images augmented unaugmented --errors \
    --name scale_optimum_errors
OMP_NUM_THREADS=1 $PY benchmarks/scale_optimum.py --threads 1 --models small small-v1 --images augmented unaugmented --errors \
    --icons 0 --name scale_optimum_errors_emoji
# the missing cells of gram_summary_v3.md: CoOp M = 4 cross-dataset and DG, IVLP + UNIGRAM's curve and cross-dataset
A=runs/gram10/m4_anchor025.safetensors
U=runs/gram11/unigram_anchor05.safetensors
eval $P3 --name xd_coop4_gram_v3 --protocol xd --datasets $D7 --methods coop --gram $A --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P1 --name dg_coop4_gram_v3 --protocol dg --methods coop --gram $A --set n_ctx=4 "'ctx_init=a photo of a'"
eval $P1 --name fewshot_unigram_gram_curve_v3 --protocol fewshot --shots 2 4 8 16 --methods ivlp --gram $U
eval $P3 --name xd_unigram_gram_v3 --protocol xd --datasets $D7 --methods ivlp --gram $U
# CoCoOp's epochs on the current model (val split, 16 shots, seed 1; shipped: x0.5 = 5 epochs, in tuning_small_v3_cocoop)
OMP_NUM_THREADS=1 $PY benchmarks/tune_small.py --methods cocoop --mults 1 --epoch-mult 1 --shots 16 --name tuning_small_v3_cocoop_epochs1
OMP_NUM_THREADS=1 $PY benchmarks/tune_small.py --methods cocoop --mults 1 --epoch-mult 0.25 --shots 16 --name tuning_small_v3_cocoop_epochs025
# CoCoOp's meta-net init (new option meta_init=zero) and lr on the val split (16 shots, seeds 1-3); an lr ~ 0 run checks
# that the CoCoOp evaluation path gives zero-shot exactly; CoOp M = 4 on the same val split for reference
eval $P1 --name val_fewshot16_cocoop_metainit_zero --protocol fewshot --shots 16 --methods cocoop --set meta_init=zero --eval-split val --runs runs/val
eval $P1 --name val_fewshot16_cocoop_metainit_paper --protocol fewshot --shots 16 --methods cocoop --eval-split val --runs runs/val
for LR in 0.002 0.008; do
  eval $P1 --name val_fewshot16_cocoop_zero_lr$LR --protocol fewshot --shots 16 --methods cocoop --set meta_init=zero --lr $LR --eval-split val --runs runs/val
done
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --datasets emoji-nature --seeds 1 --name val_fewshot16_cocoop_zero_lr0 --protocol fewshot --shots 16 \
    --methods cocoop --set meta_init=zero --lr 1e-12 --eval-split val --runs runs/val
eval $P1 --name val_fewshot16_coop4 --protocol fewshot --shots 16 --methods coop --set n_ctx=4 "'ctx_init=a photo of a'" --eval-split val --runs runs/val
# test time: ψ's descent guard (cosine >= 0.5, 0.8): meta-training only (held-out meta-task diagnostics in the sidecar),
# then the 200-image benchmark with the 0.8 artifact (-> docs/results/tta_200_v3_guard08.md)
for K in 0.5 0.8; do
  OMP_WAIT_POLICY=PASSIVE $PY benchmarks/tta.py --meta-theta-anchor 0 --limit 1 --seeds 1 --datasets fashion-mnist --meta-steps 240 --meta-budget 3000 \
      --threads 1 --meta-min-cos $K --work runs/tta-guard$K --out /tmp/tta-guard$K --quiet
done
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/tta.py --limit 200 --seeds 1 2 3 --datasets emoji-nature emoji-nature-lineart fashion-mnist \
    --gram runs/gram10/m4_anchor025.safetensors --tta-artifact runs/tta-guard0.8/meta_tta.safetensors --threads 1 \
    --work runs/tta-guard0.8 --out runs/tta_v3_guard08 --quiet
cp runs/tta_v3_guard08/tta.json docs/results/tta_200_v3_guard08.json; cp runs/tta_v3_guard08/tta.md docs/results/tta_200_v3_guard08.md
# CoOp M = 4 on the same val split with fewer epochs: prompt tuning first dips under zero-shot on this model
for E in 5 10 20; do
  eval $P1 --name val_fewshot16_coop4_ep$E --protocol fewshot --shots 16 --methods coop --set n_ctx=4 "'ctx_init=a photo of a'" \
      --epochs $E --eval-split val --runs runs/val
done
# CoCoOp with 25 epochs (5 shipped), seed 1, val: does it come out of the dip as CoOp does?
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --datasets emoji-nature --seeds 1 --name val_fewshot16_cocoop_ep25 --protocol fewshot --shots 16 \
    --methods cocoop --epochs 25 --eval-split val --runs runs/val
# test time: the session-11 artifact's θ* and ψ* apart (--parts), and meta-training with θ anchored to the words (0.25)
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/tta.py --limit 200 --seeds 1 2 3 --datasets emoji-nature emoji-nature-lineart fashion-mnist \
    --gram runs/gram10/m4_anchor025.safetensors --tta-artifact runs/bench-tta-v3/meta_tta.safetensors --threads 1 \
    --work runs/bench-tta-v3 --out runs/tta_v3_parts --parts --quiet
cp runs/tta_v3_parts/tta.json docs/results/tta_200_v3_parts.json; cp runs/tta_v3_parts/tta.md docs/results/tta_200_v3_parts.md
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/tta.py --limit 200 --seeds 1 2 3 --datasets emoji-nature emoji-nature-lineart fashion-mnist \
    --gram runs/gram10/m4_anchor025.safetensors --meta-steps 240 --meta-budget 3000 --meta-theta-anchor 0.25 --threads 1 \
    --work runs/tta-anchor025 --out runs/tta_v3_anchor025 --parts --quiet
cp runs/tta_v3_anchor025/tta.json docs/results/tta_200_v3_anchor025.json; cp runs/tta_v3_anchor025/tta.md docs/results/tta_200_v3_anchor025.md
$PY benchmarks/gram_summary.py   # -> gram_summary_v3.md with the session-12 cells
# CoCoOp with exactly CoOp's schedule (lr 0.002, 50 epochs, zero-initialised meta-net), seeds 1-3, val (run here one
# seed per process; a last call with --seeds 1 2 3 assembled the three records into the summary)
OMP_NUM_THREADS=1 $PY benchmarks/protocols.py --datasets emoji-nature --seeds 1 2 3 --name val_fewshot16_cocoop_zero_lr0.002_ep50 --protocol fewshot \
    --shots 16 --methods cocoop --set meta_init=zero --lr 0.002 --epochs 50 --eval-split val --runs runs/val
# the same two artifacts on the val splits (200 images per set): the anchor's on/off choice, made on val
for A in bench-tta-v3 tta-anchor025; do
  OMP_WAIT_POLICY=PASSIVE $PY benchmarks/tta.py --split val --limit 200 --seeds 1 2 3 --datasets emoji-nature emoji-nature-lineart \
      fashion-mnist --gram runs/gram10/m4_anchor025.safetensors --tta-artifact runs/$A/meta_tta.safetensors --threads 1 \
      --work runs/$A --out runs/tta_val_$A --parts --quiet
done
cp runs/tta_val_bench-tta-v3/tta.json docs/results/tta_val200_v3_parts.json; cp runs/tta_val_bench-tta-v3/tta.md docs/results/tta_val200_v3_parts.md
cp runs/tta_val_tta-anchor025/tta.json docs/results/tta_val200_v3_anchor025.json; cp runs/tta_val_tta-anchor025/tta.md docs/results/tta_val200_v3_anchor025.md

# ---- session 13 ----
# GRAM's spread over meta-training runs. The demo's recipe (300 meta-steps, torch k-means as in a clean clone,
# CoOp 40 epochs, seed 1), 5 meta-seeds x 1 and 2 CPU threads; then the shipped artifact's recipe (600 meta-steps,
# faiss, the full CoOp schedule, seeds 1-3), 5 meta-seeds, with the shipped artifact as a reference row
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-seeds 0 1 2 3 4 --threads 2 1 --steps 300 --epochs 40 \
    --seeds 1 --kmeans torch --name meta_seed_spread_demo
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-seeds 0 1 2 3 4 --steps 600 --seeds 1 2 3 --kmeans faiss \
    --with-shipped --name meta_seed_spread_v3
# the same 5 artifacts on CoOp's few-shot curve (copied into each work folder; 2 threads as they were made)
W=runs/meta_seed_spread
# reuse SRC THREADS NAME...: copy the artifacts (and sidecars) meta-trained at THREADS threads in work folder SRC into
# each work folder NAME, so that meta_seed_spread.py evaluates them instead of meta-training again
reuse() { local src=$1 th=$2 n; shift 2
  for n in "$@"; do
    mkdir -p $W/meta_seed_spread_$n
    cp $W/meta_seed_spread_$src/gram_ms*_t$th.safetensors $W/meta_seed_spread_$src/gram_ms*_t$th.json $W/meta_seed_spread_$n/
  done; }
for K in 1 2 4 8 16; do
  reuse v3 2 v3_${K}shot
  OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --protocol fewshot --shots $K --meta-seeds 0 1 2 3 4 --steps 600 \
      --seeds 1 2 3 --kmeans faiss --with-shipped --name meta_seed_spread_v3_${K}shot
done
# the same for CoOp M = 4's DG cell (its anchored recipe, one thread as the table's artifact was made)
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --protocol dg --host-set n_ctx=4 'ctx_init=a photo of a' \
    --theta-anchor 0.25 --meta-seeds 0 1 2 3 4 --threads 1 --steps 600 --seeds 1 2 3 --kmeans faiss \
    --reference runs/gram10/m4_anchor025.safetensors --name meta_seed_spread_coop4_dg
# and CoCoOp's DG cell (+0.20) from the same five artifacts (copied into its work folder to skip meta-training them
# again: the same seed, thread count and caches rebuild them byte for byte, as meta-seed 0 showed above); run on both
# cores as two processes that take the units from either end (records are written atomically and reused)
W=runs/meta_seed_spread; mkdir -p $W/meta_seed_spread_cocoop_dg
cp $W/meta_seed_spread_coop4_dg/gram_ms*_t1.* $W/meta_seed_spread_cocoop_dg/
C="OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --method cocoop --tune-set --protocol dg \
   --host-set n_ctx=4 'ctx_init=a photo of a' --theta-anchor 0.25 --threads 1 --steps 600 --seeds 1 2 3 --kmeans faiss \
   --name meta_seed_spread_cocoop_dg"
eval $C --meta-seeds 0 1 2 3 4 &
sleep 900; eval $C --meta-seeds 4 3 2 --out runs/meta_seed_spread/partial   # after the plain-CoCoOp runs; its partial table is dropped
wait
# does the logit scale rise once the model fits its training batches? 400 steps from `small` on a fixed pool of
# 1,024 pairs, with and without the augmentation (one thread each, side by side), then the loss's optimum scale
# on the pool's batches and on fresh corpus batches
L="$PY -m gramvl --quiet pretrain --steps 400 --batch-size 128 --lr 3e-4 --warmup 20 --icons 0.4 --photo-aug 0.15 \
   --caption-positives --eval-every 50 --val-limit 300 --threads 1 --init gramvl/assets/small_clip.safetensors \
   --val-sets emoji-nature emoji-nature-lineart fashion-mnist --pool 1024"
OMP_NUM_THREADS=1 $L --out runs/s13_fit/pool1024_noaug --no-augment &
OMP_NUM_THREADS=1 $L --out runs/s13_fit/pool1024_aug &
wait
M="small runs/s13_fit/pool1024_noaug/final.safetensors runs/s13_fit/pool1024_aug/final.safetensors"
$PY benchmarks/scale_optimum.py --models $M --images augmented unaugmented --pool 1024 --by-positives --threads 1 --name scale_optimum_pool
$PY benchmarks/scale_optimum.py --models $M --images augmented unaugmented --by-positives --threads 1 --name scale_optimum_pool_corpus

# ---- session 14 (docs/pretraining.md and docs/results/gram.md, session 14) ----
# what the learned scale's value means: the features' geometry beside s*, centred, and an affine-equivalent cone
OMP_NUM_THREADS=1 $PY benchmarks/scale_geometry.py --models small small-v1 runs/s13_fit/pool1024_noaug/final.safetensors \
    runs/s13_fit/pool1024_aug/final.safetensors
# more GRAM cells over meta-training runs: CoOp's cross-dataset cell with session 13's five v3 artifacts (copied)
W=runs/meta_seed_spread; reuse v3 2 v3_xd
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --protocol xd --meta-seeds 0 1 2 3 4 --steps 600 \
    --tune-threads 1 --seeds 1 2 3 --kmeans faiss --with-shipped --name meta_seed_spread_v3_xd &
# MaPLe's base-to-new cell (+1.52): its anchored first-order recipe, 180 meta-steps (the table's artifact stopped at its
# time budget; a step count is reproducible), five meta-seeds
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-host maple --meta-set second_order=false \
    --theta-anchor 0.5 --steps 180 --threads 1 --meta-seeds 0 1 2 3 4 --seeds 1 2 3 --kmeans faiss \
    --reference runs/gram11/maple_anchor05.safetensors --name meta_seed_spread_maple_b2n
wait
# MaPLe's 1-shot cell from the same five MaPLe artifacts (copied)
reuse maple_b2n 1 maple_1shot
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-host maple --meta-set second_order=false \
    --theta-anchor 0.5 --steps 180 --threads 1 --meta-seeds 0 1 2 3 4 --seeds 1 2 3 --kmeans faiss --protocol fewshot --shots 1 \
    --reference runs/gram11/maple_anchor05.safetensors --name meta_seed_spread_maple_1shot
# IVLP + UNIGRAM's 8-shot cell (+2.22): session 11's recipe (first order, anchored 0.5) for 270 meta-steps, three meta-seeds
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-host ivlp --unigram --meta-set second_order=false \
    --theta-anchor 0.5 --steps 270 --threads 1 --meta-seeds 0 1 2 --protocol fewshot --shots 8 --seeds 1 2 3 --kmeans faiss \
    --reference runs/gram11/unigram_anchor05.safetensors --name meta_seed_spread_unigram_8shot &
# CoOp M = 4's base-to-new and 1-shot cells, then CoCoOp's, from session 13's five anchored M = 4 artifacts (copied)
reuse coop4_dg 1 coop4_b2n coop4_1shot cocoop_b2n cocoop_1shot
m4() { OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --host-set n_ctx=4 'ctx_init=a photo of a' \
  --theta-anchor 0.25 --meta-seeds 0 1 2 3 4 --threads 1 --steps 600 --seeds 1 2 3 --kmeans faiss \
  --reference runs/gram10/m4_anchor025.safetensors "$@"; }
m4 --protocol fewshot --shots 1 --name meta_seed_spread_coop4_1shot
m4 --name meta_seed_spread_coop4_b2n
m4 --method cocoop --tune-set --protocol fewshot --shots 1 --name meta_seed_spread_cocoop_1shot
m4 --method cocoop --tune-set --name meta_seed_spread_cocoop_b2n
# VPT's 1-shot and base-to-new cells: its first-order recipe for 170 meta-steps, three meta-seeds
vpt() { OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-host vpt --meta-set second_order=false \
  --steps 170 --threads 1 --meta-seeds 0 1 2 --seeds 1 2 3 --kmeans faiss --reference runs/gram11/vpt.safetensors "$@"; }
vpt --protocol fewshot --shots 1 --name meta_seed_spread_vpt_1shot
reuse vpt_1shot 1 vpt_b2n
vpt --name meta_seed_spread_vpt_b2n
wait
# IVLP + UNIGRAM's 1-shot and base-to-new cells from its three artifacts, MaPLe's 2-shot cell from its five (copied)
reuse unigram_8shot 1 unigram_1shot unigram_b2n
reuse maple_b2n 1 maple_2shot
ug() { OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-host ivlp --unigram --meta-set second_order=false \
  --theta-anchor 0.5 --steps 270 --threads 1 --meta-seeds 0 1 2 --seeds 1 2 3 --kmeans faiss \
  --reference runs/gram11/unigram_anchor05.safetensors "$@"; }
(ug --protocol fewshot --shots 1 --name meta_seed_spread_unigram_1shot; ug --name meta_seed_spread_unigram_b2n) &
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-host maple --meta-set second_order=false \
    --theta-anchor 0.5 --steps 180 --threads 1 --meta-seeds 0 1 2 3 4 --seeds 1 2 3 --kmeans faiss --protocol fewshot --shots 2 \
    --reference runs/gram11/maple_anchor05.safetensors --name meta_seed_spread_maple_2shot
wait
# CoOp M = 4's few-shot curve (2-16 shots) from its five anchored artifacts (copied; the curve table's artifact is meta-seed 0's)
reuse coop4_dg 1 coop4_2shot coop4_4shot coop4_8shot coop4_16shot
(for k in 2 16; do m4 --protocol fewshot --shots $k --name meta_seed_spread_coop4_${k}shot; done) &
for k in 4 8; do m4 --protocol fewshot --shots $k --name meta_seed_spread_coop4_${k}shot; done
wait
$PY benchmarks/gram_summary.py --only v3

# ---- session 15 (docs/method.md "Caches hold the same bytes"; docs/results/gram.md, session 15) ----
# cache fills: the pre-session-15 intra-op fill against the batch-parallel one, at 1 and 2 threads (run on an idle machine)
$PY benchmarks/cache_fill.py
# the demo's GRAM spread again, on caches filled the session-15 way (5 meta-seeds x 2 and 1 CPU threads, torch k-means;
# it ran on a399827's one-thread serial fill, which gives the same bytes, and its file names the commit at its end, 5b88094)
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-seeds 0 1 2 3 4 --threads 2 1 --steps 300 --epochs 40 \
    --seeds 1 --kmeans torch --name meta_seed_spread_demo_v2
# more GRAM cells over meta-training runs, from session 13's five anchored M = 4 artifacts (copied): CoCoOp's few-shot
# curve (2-16 shots), CoOp M = 4's and CoCoOp's cross-dataset cells. These ran on session 14's code (commit 89db6b6,
# caches filled before session 15), so that their plain-host values could be compared with the tables'.
reuse coop4_dg 1 cocoop_2shot cocoop_4shot cocoop_8shot cocoop_16shot coop4_xd cocoop_xd
for k in 2 4 8 16; do m4 --method cocoop --tune-set --protocol fewshot --shots $k --name meta_seed_spread_cocoop_${k}shot; done
m4 --protocol xd --name meta_seed_spread_coop4_xd
m4 --method cocoop --tune-set --protocol xd --name meta_seed_spread_cocoop_xd   # not finished in session 15
# IVLP + UNIGRAM at 2 and 4 shots from its three artifacts, MaPLe at 4 shots from its five (copied; session 14's code too)
reuse unigram_8shot 1 unigram_2shot unigram_4shot
reuse maple_b2n 1 maple_4shot
ug --protocol fewshot --shots 2 --name meta_seed_spread_unigram_2shot
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-host maple --meta-set second_order=false \
    --theta-anchor 0.5 --steps 180 --threads 1 --meta-seeds 0 1 2 3 4 --seeds 1 2 3 --kmeans faiss --protocol fewshot --shots 4 \
    --reference runs/gram11/maple_anchor05.safetensors --name meta_seed_spread_maple_4shot
ug --protocol fewshot --shots 4 --name meta_seed_spread_unigram_4shot
# CoOp's DG cell from session 13's five v3 artifacts (copied; session 14's code)
reuse v3 2 v3_dg
OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --protocol dg --meta-seeds 0 1 2 3 4 --steps 600 \
    --tune-threads 1 --seeds 1 2 3 --kmeans faiss --with-shipped --name meta_seed_spread_v3_dg
$PY benchmarks/gram_summary.py --only v3

# ---- session 16 (docs/method.md: rows rule, one-thread clustering, task-parallel meta-training; docs/results/gram.md) ----
# meta-training's two CPU loops side by side (the demo's recipe; run with the other jobs paused)
$PY benchmarks/meta_threads.py --steps 300 --repeats 2
# the demo's spread again: with the task-parallel loop the same 5 artifacts at 2 and 1 threads (torch k-means)
OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-seeds 0 1 2 3 4 --threads 2 1 --steps 300 --epochs 40 \
    --seeds 1 --kmeans torch --name meta_seed_spread_demo_v3
# more GRAM cells from the artifacts of sessions 13-14 (copied), run on session 14's code (commit 89db6b6, in a separate
# work tree, with the caches it filled) so that the plain-host values can be compared with the tables'
mp() { OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $PY benchmarks/meta_seed_spread.py --meta-host maple --meta-set second_order=false \
  --theta-anchor 0.5 --steps 180 --threads 1 --meta-seeds 0 1 2 3 4 --seeds 1 2 3 --kmeans faiss \
  --reference runs/gram11/maple_anchor05.safetensors "$@"; }
reuse vpt_1shot 1 vpt_2shot vpt_4shot vpt_8shot vpt_16shot vpt_xd vpt_dg
reuse maple_b2n 1 maple_8shot maple_16shot maple_dg maple_xd
reuse unigram_8shot 1 unigram_16shot unigram_dg unigram_xd
(for k in 2 4 8 16; do vpt --protocol fewshot --shots $k --name meta_seed_spread_vpt_${k}shot; done
 vpt --protocol dg --name meta_seed_spread_vpt_dg; vpt --protocol xd --name meta_seed_spread_vpt_xd) &
for k in 8 16; do mp --protocol fewshot --shots $k --name meta_seed_spread_maple_${k}shot; done
ug --protocol fewshot --shots 16 --name meta_seed_spread_unigram_16shot
mp --protocol dg --name meta_seed_spread_maple_dg; ug --protocol dg --name meta_seed_spread_unigram_dg
mp --protocol xd --name meta_seed_spread_maple_xd; ug --protocol xd --name meta_seed_spread_unigram_xd
wait
$PY benchmarks/gram_summary.py --only v3

# ---- session 17 (docs/methods.md "PromptSRC"; docs/results/base2new_promptsrc_v3.md, gram.md "Session 17") ----
# the new PromptSRC host beside IVLP (the same deep prompts without the self-regulating losses and GPA), base-to-new
eval $P1 --name base2new_promptsrc_v3 --protocol base2new --methods ivlp promptsrc
# prompt tuning's two CPU ways side by side (run with the other jobs paused); the other cuts in train_threads_cuts.md were
# this command for --methods vpt ivlp with gramvl.rows.ROW_PARTS / MIN_PART set to 8/1, 8/2, 4/1, 4/4 and 2/1
$PY benchmarks/train_threads.py --methods coop vpt ivlp maple promptsrc --shots 4 --epochs 2 --repeats 2
# GRAM on PromptSRC: UNIGRAM meta-trained on its slots (IVLP + UNIGRAM's recipe, 270 steps), then base-to-new with and without
OMP_NUM_THREADS=1 $PY -m gramvl --quiet meta-train --host promptsrc --unigram --steps 270 --set meta.second_order=false \
    meta.theta_anchor=0.5 --out runs/gram17/promptsrc_unigram.safetensors
eval $P1 --name base2new_promptsrc_gram_v3 --protocol base2new --methods promptsrc --gram runs/gram17/promptsrc_unigram.safetensors
# MaPLe's cross-dataset and DG cells over its five artifacts (session 16's commands, finished; 89db6b6 work tree)
mp --protocol xd --name meta_seed_spread_maple_xd; mp --protocol dg --name meta_seed_spread_maple_dg
$PY benchmarks/gram_summary.py --only v3
# PromptSRC's schedule on the val split: its 20 epochs against IVLP's 5 (IVLP at 5 as the reference)
eval $P1 --name val_base2new_promptsrc_ep5 --protocol base2new --methods ivlp promptsrc --epochs 5 --eval-split val --runs runs/val
eval $P1 --name val_base2new_promptsrc_ep20 --protocol base2new --methods promptsrc --epochs 20 --eval-split val --runs runs/val

# ---- session 18 (docs/results/gram.md "Session 18"; docs/pretraining.md "Session 18") ----
# IVLP + UNIGRAM's cross-dataset cell over its three artifacts (session 16's command, finished; 89db6b6 work tree)
ug --protocol xd --name meta_seed_spread_unigram_xd
$PY benchmarks/gram_summary.py --only v3
# the logit scale held at CLIP's clamp of 100, then released (docs/pretraining.md "Session 18"); one thread per leg
VAL="emoji-activities emoji-animals emoji-faces emoji-food emoji-nature emoji-objects emoji-travel emoji-activities-lineart \
    emoji-animals-lineart emoji-faces-lineart emoji-food-lineart emoji-nature-lineart emoji-objects-lineart emoji-travel-lineart fashion-mnist"
S="OMP_NUM_THREADS=1 $PY -m gramvl --quiet pretrain --batch-size 128 --photo-aug 0.15 --val-limit 2000 --eval-every 200 --icons 0.4 \
    --caption-positives --threads 1 --val-sets $VAL --warmup 50"
eval $S --out runs/pretrain_s18_a1 --lr 1e-4 --steps 1200 --init gramvl/assets/small_clip.safetensors --logit-scale-init 100 --logit-scale-lr 0 &
eval $S --out runs/pretrain_s18_a0 --lr 1e-4 --steps 1200 --init gramvl/assets/small_clip.safetensors &   # control
wait
eval $S --out runs/pretrain_s18_b1 --lr 1e-4 --steps 400 --eval-every 100 --init runs/pretrain_s18_a1/best.safetensors &
eval $S --out runs/pretrain_s18_b2 --lr 3e-5 --steps 400 --eval-every 50 --init runs/pretrain_s18_a1/best.safetensors &
wait
eval $S --out runs/pretrain_s18_b3 --lr 1e-4 --steps 400 --eval-every 100 --seed 1 --init runs/pretrain_s18_a1/best.safetensors
eval $S --out runs/pretrain_s18_b4 --lr 1e-4 --steps 400 --eval-every 100 --seed 2 --photo-aug 0.3 --init runs/pretrain_s18_a1/final.safetensors
M="small runs/pretrain_s18_a0/best.safetensors runs/pretrain_s18_a1/best.safetensors runs/pretrain_s18_a1/final.safetensors \
   runs/pretrain_s18_b1/best.safetensors runs/pretrain_s18_b2/best.safetensors runs/pretrain_s18_b3/best.safetensors runs/pretrain_s18_b3/final.safetensors \
   runs/pretrain_s18_b4/final.safetensors"
OMP_NUM_THREADS=1 $PY benchmarks/scale_optimum.py --threads 1 --name scale_optimum_s18 --models $M
OMP_NUM_THREADS=1 $PY benchmarks/scale_optimum.py --threads 1 --seed 0 --name scale_optimum_s18_seed0 --models $M
for leg in b1/best b2/best b3/final b4/final; do   # -> runs/zs_s18_*/zeroshot.md, copied to docs/results/zeroshot_s18_{b1,b2,b3,b4}.md
  OMP_NUM_THREADS=1 $PY benchmarks/zeroshot.py --model runs/pretrain_s18_$leg.safetensors --out runs/zs_s18_${leg%/*} --threads 1
done
