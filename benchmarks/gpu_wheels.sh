#!/usr/bin/env bash
# Fetch what benchmarks/gpu_check.py needs on a GPU machine that has no package registry, then print
# the one command to run there.
#
# Run from anywhere, on a machine with PyPI:  bash benchmarks/gpu_wheels.sh
#
# The GPU machine (Python 3.12, x86-64) has torch, transformers, peft, accelerate, numpy, tokenizers,
# safetensors, huggingface_hub, click, rich and pyyaml, but not what follows. Wheels go to .whl/ (git
# ignores it), for CPython 3.12 on manylinux x86-64, without their dependencies: the list is exactly
# what a `gpu_check.py --cpu --quick` run imports that the machine lacks or has too old.
#   transformers 5.24  ckptsel's scorer keeps target positions with a boolean `logits_to_keep` mask,
#                      which transformers accepts from 5.21 on (5.20 has no `slice_logits_to_keep`);
#                      the machine's is 5.17 (2026-11). regex: its dependency at the version it asks for
#   peft               the version ckptsel's adapter swap is tested with
#   lm-eval            the scoring baseline (HFLM); none of its optional task dependencies are imported
#   pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions), rapidfuzz:
#                      ckptsel's settings and graders
# The GSM8K and MATH training files the benchmarks read (../shared/data, or $CKPTSEL_BENCH_DATA) are
# copied to .whl/data: the folder beside the checkout does not travel with it.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    transformers==5.24.0 regex==2026.11.19
    peft==0.21.2
    lm_eval==0.4.13
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    rapidfuzz==3.14.6
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
dups=$(for w in .whl/*.whl; do basename "$w" | cut -d- -f1; done | sort | uniq -d)
[ -z "$dups" ] || { echo "two versions of $dups in .whl: keep one (pip install stops on two)" >&2; exit 1; }

DATA="${CKPTSEL_BENCH_DATA:-$(cd .. && pwd)/shared/data}"
for file in gsm8k/train.jsonl math/train.jsonl; do
    mkdir -p ".whl/data/$(dirname $file)"
    cp "$DATA/$file" ".whl/data/$file"
done
du -sh .whl

cat <<'EOF'

The command to run on the GPU machine (carry: [".whl"]; timeout_s 600):

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false CKPTSEL_BENCH_DATA=$PWD/.whl/data CKPTSEL_BENCH_CACHE=/tmp/ckptsel-bench; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; set -o pipefail; timeout 540 python3 benchmarks/gpu_check.py --json $OUT/gpu.json 2>&1 | tee $OUT/gpu.log
EOF
