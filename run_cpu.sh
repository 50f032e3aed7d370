#!/usr/bin/env bash
# The whole TerraMind method end to end on a laptop CPU, at smoke size, on the synthetic world:
# data -> image tokenizers -> text tokenizer -> token shards -> pretraining -> any-to-any and chained
# generation -> TiM fine-tuning -> PANGAEA-protocol segmentation and few-shot -> summary table.
# Everything goes under one folder (OUT, default runs/cpu); the summary is $OUT/summary.md.
# The world is written and read in the published TerraMesh layout ($DATA/{train,val,test}/<FOLDER>/*.tar of
# zarr.zip samples, plus our caption/ and label_water/ extras), so every stage reads what a TerraMesh user
# reads. Tiles are 64 px (4 x 4 tokens), not TerraMesh's 264: the smoke scale keeps the whole run near
# 15 minutes on 2 cores (tests/fixtures and tests/test_terramesh_shards.py cover 264 px).
# The sizes below are environment variables so that tests/test_pipeline.py runs the same chain smaller.
#   bash run_cpu.sh                      # about 15 minutes on 2 cores
#   OUT=runs/mine N=4000 PRETRAIN_STEPS=2000 bash run_cpu.sh
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/cpu}
N=${N:-2000}                              # synthetic samples (64 px tiles = 4 x 4 tokens)
TOKENIZER_STEPS=${TOKENIZER_STEPS:-400}   # optimizer steps per image tokenizer
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1000}    # TerraMind steps of 32 samples
EPOCHS=${EPOCHS:-3}                       # TiM and PANGAEA head epochs
EVAL_N=${EVAL_N:-100}                     # held-out samples for tokenizer and generation metrics
FEWSHOT_RUNS=${FEWSHOT_RUNS:-200}         # few-shot runs averaged (paper: 200)
WAYS=${WAYS:-5}                           # few-shot classes per run (dominant LULC classes)
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cpu}                     # every stage runs here, even where a GPU is present
DATA=$OUT/synth; TILES=$OUT/tile; TOK=$OUT/tokenizers; MODEL=$OUT/pretrain/terramind.safetensors
REAL=assets                               # the real samples vendored in the repository (assets/README.md)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
SECONDS=0; : > "$OUT/times.tsv"
stage() { echo; echo "== $1 ($SECONDS s)"; }
took() { echo -e "$1\t$SECONDS" >> "$OUT/times.tsv"; }

stage "1/8 data: the synthetic TerraMesh world, $N tiles of 64 px, in the published layout"
$PY terramesh.py synth --layout shards --out "$DATA" --n "$N" --size 64 --overwrite
$PY terramesh.py show --root "$DATA" --id 00005 --out "$OUT/sample.png" --overwrite
took data

stage "2/8 image tokenizers: FSQ encoders with diffusion decoders (LULC: ViT decoder)"
$PY fsq_tokenizer.py train --modality S2L2A S1GRD S1RTC DEM LULC NDVI --data "$DATA" --size smoke \
    --steps "$TOKENIZER_STEPS" --out "$TOK" --device "$DEVICE" --overwrite
for m in S2L2A S1GRD DEM NDVI LULC; do
    $PY fsq_tokenizer.py reconstruct --modality "$m" --data "$DATA" --tokenizers "$TOK" --n "$EVAL_N" \
        --clip 1 --pictures 1 --out "$OUT/tokenizers_eval" --device "$DEVICE" --overwrite
done
took tokenizers

stage "3/8 text tokenizer: WordPiece on the captions (official ids for special and coordinate tokens)"
$PY terramesh.py captions --root "$DATA" --out "$OUT/captions.txt" --overwrite
$PY text_tokenizer.py train --corpus "$OUT/captions.txt" --vocab-size 30000 --out "$OUT/wordpiece.json" --overwrite
took text

stage "4/8 token shards: every tile through its tokenizer"
$PY fsq_tokenizer.py tokenize --data "$DATA" --tokenizers "$TOK" --out "$OUT/tokens" --device "$DEVICE"
took tokenize

stage "5/8 pretraining: masked cross-modal token prediction, $PRETRAIN_STEPS steps"
$PY pretrain.py --size smoke --data "$DATA" --tokens "$OUT/tokens" --text-tokenizer "$OUT/wordpiece.json" \
    --steps "$PRETRAIN_STEPS" --batch-size 32 --lr 2e-3 --workers 1 --log-every 100 \
    --eval-every $((PRETRAIN_STEPS / 5)) --save-every "$PRETRAIN_STEPS" --out "$OUT/pretrain" \
    --device "$DEVICE"
took pretrain

stage "6/8 generation: chained, any-to-any, metrics on held-out tiles"
# the first test sample with S2L2A, S1GRD and DEM, as the GeoTIFFs $TILES/<MOD>.tif
$PY terramesh.py export --root "$DATA" --split test --modality S2L2A,S1GRD,DEM --out "$TILES" --overwrite
$PY generate.py --model "$MODEL" --tokenizers "$TOK" --input S2L2A="$TILES/S2L2A.tif" \
    --targets LULC,NDVI,S1GRD,DEM,coords,caption --scheme maskgit --steps 4 --temperature 0 \
    --out "$OUT/generate/chained" --device "$DEVICE" --overwrite
$PY generate.py --model "$MODEL" --tokenizers "$TOK" --input S1GRD="$TILES/S1GRD.tif" \
    --input DEM="$TILES/DEM.tif" --targets S2L2A,LULC --scheme roar --steps 4 --out "$OUT/generate/any2any" \
    --device "$DEVICE" --overwrite
S1F11=(--sen1floods11 "$REAL/sen1floods11")
$PY generate.py eval --model "$MODEL" --tokenizers "$TOK" --data "$DATA" --split test --n "$EVAL_N" \
    --temperature 0 --pairs S2L2A:S1GRD,S2L2A:DEM,S2L2A:NDVI,S1GRD:S2L2A,S2L2A:LULC,S1GRD:LULC,S2L2A:coords \
    "${S1F11[@]}" --out "$OUT/generate/eval" --device "$DEVICE" --overwrite
took generate

stage "7/8 Thinking-in-Modalities: S-1 water mapping, plain vs with generated LULC"
for tim in none LULC; do
    $PY tim_finetune.py train --model "$MODEL" --data "$DATA" --classes land,water --modalities S1GRD --tim $tim \
        --temperature 0 --cache --channels 64 --lr 5e-4 --epochs "$EPOCHS" --log-every 1000 --out "$OUT/tim/S1GRD_$tim" \
        --device "$DEVICE"
done
$PY tim_finetune.py table "$OUT"/tim/*/results.json
took tim

stage "8/8 PANGAEA protocol (frozen encoder, UPerNet) on the water task, and few-shot LULC classes"
$PY eval_pangaea.py seg --dataset terramesh --root "$DATA" --labels label_water --classes land,water \
    --modalities S2L2A,S1GRD --model "$MODEL" --crop 64 --channels 64 --epochs "$EPOCHS" --workers 0 \
    --out "$OUT/pangaea/water" --device "$DEVICE"
$PY eval_pangaea.py folders --root "$DATA" --out "$OUT/classes"
$PY eval_pangaea.py fewshot --root "$OUT/classes" --modality S2L1C --ways "$WAYS" --shots 1 --runs "$FEWSHOT_RUNS" \
    --model "$MODEL" --out "$OUT/pangaea/fewshot" --device "$DEVICE"
took pangaea

stage "summary"
$PY summary.py "$OUT"
echo "done in ${SECONDS} s; everything is in $OUT"
