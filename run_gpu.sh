#!/usr/bin/env bash
# The GPU twin of run_cpu.sh: the same eight stages and the same summary, at the real sizes, with torchrun
# for the two training stages that scale over GPUs (image tokenizers, pretraining).
#   bash run_gpu.sh                                     # one node, all its GPUs, synthetic world at 224 px
#   DATA=/data/terramesh NGPU=8 SIZE=base bash run_gpu.sh   # TerraMesh as published: {train,val}/<MOD>/*.tar
#   N=600 TILE=64 SIZE=tiny TOKENIZER_SIZE=smoke TOKENIZER_STEPS=30 TOKEN_BUDGET=2e5 BATCH=32 TOTAL_BATCH=64 \
#       WORKERS=2 EPOCHS=2 EVAL_N=16 bash run_gpu.sh   # minutes: checks the whole chain on a GPU
# Wall times per stage are written to $OUT/times.tsv and into the summary. At the real sizes none have been
# measured. The small run above (bench/gpu_checks.sh) ran stages 1-5 on one H100 in 253 s (data 16 s, six
# tokenizers 158 s, mostly start-up, text 6 s, shards 9 s, compiled pretraining 64 s) and was stopped by its
# time limit inside stage 6, after the chained generation had run. A CPU copy of the script at the same size
# ran stages 1-7; stage 8 has not run to the end on either.
# Base at batch 128 per 80 GB GPU runs at 28.5% MFU (bench/pretrain_gpu.py); 64 fits 40 GB.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/gpu}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
SIZE=${SIZE:-base}                            # TerraMind preset: tiny, small, base, large
DATA=${DATA:-}                                # TerraMesh root in the published layout; empty: synthesize one
N=${N:-20000}                                 # synthetic tiles when DATA is empty
TILE=${TILE:-224}                             # synthetic tile side in px (16 k, or 16 k + 8 as TerraMesh's 264)
TOKENIZER_SIZE=${TOKENIZER_SIZE:-official}    # fsq_tokenizer.py preset: official (paper §8.1 recipe), tiny, smoke
TOKENIZER_EPOCHS=${TOKENIZER_EPOCHS:-}        # per tokenizer; empty: the preset's (official: the paper's 100)
TOKENIZER_STEPS=${TOKENIZER_STEPS:-}          # optimizer steps instead of epochs (short runs)
TOKENIZER_BATCH=${TOKENIZER_BATCH:-32}        # per GPU (32 x 8 GPUs = the paper's global batch 256)
TEXT_TOKENIZER=${TEXT_TOKENIZER:-official}    # official: the v1 WordPiece vocabulary (paper §4.1); train: fit one
TOKEN_BUDGET=${TOKEN_BUDGET:-2e9}             # pretraining tokens (paper: 500e9)
BATCH=${BATCH:-64}                            # pretraining micro-batch per GPU
TOTAL_BATCH=${TOTAL_BATCH:-}                  # pretraining global batch; empty: the size's (4096; smoke 32)
WORKERS=${WORKERS:-8}                         # DataLoader workers per process
EPOCHS=${EPOCHS:-80}                          # PANGAEA head epochs (official 80); TiM uses EPOCHS / 2
EVAL_N=${EVAL_N:-500}
PY=${PYTHON:-python}
TORCHRUN="torchrun --standalone --nproc_per_node=$NGPU"
TILES=$OUT/tile; TOK=$OUT/tokenizers; MODEL=$OUT/pretrain/terramind.safetensors
REAL=assets                                   # the real samples vendored in the repository (assets/README.md)
mkdir -p "$OUT"
SECONDS=0; : > "$OUT/times.tsv"
stage() { echo; echo "== $1 ($SECONDS s)"; }
took() { echo -e "$1\t$SECONDS" >> "$OUT/times.tsv"; }

stage "1/8 data"
if [ -z "$DATA" ]; then
    DATA=$OUT/data
    $PY terramesh.py synth --layout shards --out "$DATA" --n "$N" --size "$TILE" --overwrite
fi
EVAL_SPLIT=test; [ -d "$DATA/test" ] || EVAL_SPLIT=val   # TerraMesh as published has train/ and val/
$PY terramesh.py stats --root "$DATA" --limit 500
took data

stage "2/8 image tokenizers, $TOKENIZER_SIZE preset and recipe, $NGPU GPUs"
LENGTH=(); [ -n "$TOKENIZER_EPOCHS" ] && LENGTH=(--epochs "$TOKENIZER_EPOCHS")
[ -n "$TOKENIZER_STEPS" ] && LENGTH=(--steps "$TOKENIZER_STEPS")
for m in S2L2A S1GRD S1RTC DEM LULC NDVI; do
    $TORCHRUN fsq_tokenizer.py train --modality "$m" --data "$DATA" --size "$TOKENIZER_SIZE" "${LENGTH[@]}" \
        --batch-size "$TOKENIZER_BATCH" --workers "$WORKERS" --out "$TOK" --overwrite
done
for m in S2L2A S1GRD DEM NDVI LULC; do
    $PY fsq_tokenizer.py reconstruct --modality "$m" --data "$DATA" --tokenizers "$TOK" --n "$EVAL_N" \
        --clip 1 --pictures 2 --device cuda --out "$OUT/tokenizers_eval" --overwrite
done
took tokenizers

stage "3/8 text tokenizer: $TEXT_TOKENIZER"
if [ "$TEXT_TOKENIZER" = train ]; then   # ours: a vocabulary fitted to the captions, official ids kept
    TEXT=$OUT/wordpiece.json
    $PY terramesh.py captions --root "$DATA" --out "$OUT/captions.txt" --overwrite   # our caption/ extra
    $PY text_tokenizer.py train --corpus "$OUT/captions.txt" --vocab-size 30000 --out "$TEXT" --overwrite
else                                     # paper §4.1: BERT's WordPiece vocabulary, modified (the v1 file)
    TEXT=assets/official/terramind_v1_wordpiece_30k.json
fi
took text

stage "4/8 token shards"
$PY fsq_tokenizer.py tokenize --data "$DATA" --tokenizers "$TOK" --batch-size 256 --device cuda --out "$OUT/tokens"
took tokenize

stage "5/8 pretraining TerraMind-$SIZE, $TOKEN_BUDGET tokens, $NGPU GPUs (bf16, fused AdamW, compiled)"
GLOBAL=(); [ -n "$TOTAL_BATCH" ] && GLOBAL=(--total-batch-size "$TOTAL_BATCH")
$TORCHRUN pretrain.py --size "$SIZE" --data "$DATA" --tokens "$OUT/tokens" --text-tokenizer "$TEXT" \
    --token-budget "$TOKEN_BUDGET" --batch-size "$BATCH" "${GLOBAL[@]}" --workers "$WORKERS" --compile \
    --out "$OUT/pretrain"
took pretrain

stage "6/8 generation"
# the first held-out sample with S2L2A, S1GRD and DEM, as the GeoTIFFs $TILES/<MOD>.tif
$PY terramesh.py export --root "$DATA" --split "$EVAL_SPLIT" --modality S2L2A,S1GRD,DEM --out "$TILES" --overwrite
$PY generate.py --model "$MODEL" --tokenizers "$TOK" --input S2L2A="$TILES/S2L2A.tif" \
    --targets LULC,NDVI,S1GRD,DEM,coords,caption --scheme maskgit --steps 8 --temperature 0 --device cuda \
    --out "$OUT/generate/chained" --overwrite
$PY generate.py --model "$MODEL" --tokenizers "$TOK" --input S1GRD="$TILES/S1GRD.tif" \
    --input DEM="$TILES/DEM.tif" --targets S2L2A,LULC --scheme roar --steps 8 --device cuda \
    --out "$OUT/generate/any2any" --overwrite
S1F11=(--sen1floods11 "$REAL/sen1floods11")
$PY generate.py eval --model "$MODEL" --tokenizers "$TOK" --data "$DATA" --split "$EVAL_SPLIT" --n "$EVAL_N" \
    --temperature 0 --batch-size 64 --device cuda \
    --pairs S2L2A:S1GRD,S2L2A:DEM,S2L2A:NDVI,S1GRD:S2L2A,S2L2A:LULC,S1GRD:LULC,S2L2A:coords \
    "${S1F11[@]}" --out "$OUT/generate/eval" --overwrite
took generate

# the water task: the synthetic world's label_water, else Sen1Floods11 (v1.1 layout) from SEN1FLOODS11=...
if [ -n "$(ls -d "$DATA"/*/label_water 2>/dev/null)" ]; then   # our extra label folder (synthetic world)
    WATER=(--data "$DATA" --classes land,water); SEG=(--dataset terramesh --root "$DATA"
    --labels label_water --classes land,water --modalities S2L2A,S1GRD); S1=S1GRD
elif [ -n "${SEN1FLOODS11:-}" ]; then WATER=(--dataset sen1floods11 --data "$SEN1FLOODS11"); SEG=(--dataset sen1floods11
    --root "$SEN1FLOODS11" --modalities S2L1C,S1GRD); S1=S1GRD
else echo "no water task: $DATA has no label_water/ and SEN1FLOODS11 is unset"; S1=; fi

stage "7/8 Thinking-in-Modalities (official example: lr 2e-5, batch 8)"
if [ -n "$S1" ]; then
    for tim in none LULC; do
        $PY tim_finetune.py train --model "$MODEL" "${WATER[@]}" --modalities $S1 --tim $tim --temperature 0 --cache \
            --lr 2e-5 --epochs $((EPOCHS / 2)) --device cuda --out "$OUT/tim/${S1}_$tim"
    done
    $PY tim_finetune.py table "$OUT"/tim/*/results.json
fi
took tim

stage "8/8 PANGAEA protocol on the water task, and few-shot"
[ -n "$S1" ] && $PY eval_pangaea.py seg "${SEG[@]}" --model "$MODEL" --epochs "$EPOCHS" --device cuda \
    --out "$OUT/pangaea/water"
$PY eval_pangaea.py folders --root "$DATA" --out "$OUT/classes"
$PY eval_pangaea.py fewshot --root "$OUT/classes" --modality S2L1C --ways 5 --shots 1 --model "$MODEL" \
    --device cuda --out "$OUT/pangaea/fewshot"
took pangaea

stage "summary"
$PY summary.py "$OUT"
echo "done in ${SECONDS} s; everything is in $OUT"
