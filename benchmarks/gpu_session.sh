#!/usr/bin/env bash
# The GPU measurements of issue 10 (item 5), as one device session runs them. Two calls,
# because SmolLM2's GGUF (98 MB) travels in two parts under the device tool's 64 MiB limit:
#
#   phase 1 (carry .whl .wgt/smol.part0 .wgt/smol_tok): install the wheels in .whl (the
#     harness's dependencies that the device image lacks), keep GGUF part 0; verify3_gpu.py
#     (random GPT-2 small, SmolLM2's tokenizer) and the whole default scan of that model;
#   phase setup: phase 1 without its measurements;
#   phase 2 (carry .wgt/smol.part1), on the same warm machine: join the GGUF; the default scan
#     of SmolLM2 in bf16 (the GGUF conversion included) and in float32.
#
# Everything lands in $OUT (logs, JSON summaries, per-token verdict CSVs).
#
# Prepared here first, by `benchmarks/gpu_session.sh prepare` (after `make install`; both
# folders ignored through .git/info/exclude):
#   .whl: `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
#     manylinux2014_x86_64 ...` of transformers, sqlalchemy, alembic, mako, gguf, platformdirs,
#     typer, pydantic, pydantic-core, annotated-types, typing-inspection, annotated-doc and
#     ahocorasick-rs at this venv's versions (not huggingface_hub: 2.x needs httpx2, and the
#     image's 1.x serves transformers 5.24);
#   .wgt/smol.part0 and .part1: SmolLM2's GGUF cut at byte 38,000,000 (`head -c`, `tail -c`);
#   .wgt/smol_tok: its tokenizer saved by transformers (`AutoTokenizer.from_pretrained(...,
#     gguf_file=...).save_pretrained(...)`).
set -u
phase=$1

if [ "$phase" = prepare ]; then  # here, not on the device
    PY=.venv/bin/python
    specs=$($PY - <<'PY'
import importlib.metadata as md
names = ("transformers sqlalchemy alembic mako gguf platformdirs typer pydantic pydantic-core "
         "annotated-types typing-inspection annotated-doc ahocorasick-rs").split()
print(" ".join(f"{n}=={md.version(n)}" for n in names))
PY
    ) || exit 1
    rm -rf .whl .wgt && mkdir -p .whl .wgt
    # shellcheck disable=SC2086
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 -d .whl $specs || exit 1
    gguf=$($PY -c "import models.aliases as a; print(a.smollm2_gguf())") || exit 1
    head -c 38000000 "$gguf" > .wgt/smol.part0
    tail -c +38000001 "$gguf" > .wgt/smol.part1
    HF_HUB_OFFLINE=1 $PY -c "import sys, os; from transformers import AutoTokenizer; \
AutoTokenizer.from_pretrained(os.path.dirname(sys.argv[1]), \
gguf_file=os.path.basename(sys.argv[1])).save_pretrained('.wgt/smol_tok')" "$gguf" \
        2>/dev/null || exit 1
    for d in .whl .wgt; do
        grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
    done
    du -sh .whl .wgt/smol.part0 .wgt/smol.part1 .wgt/smol_tok
    exit 0
fi
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/w
export XDG_DATA_HOME=/tmp/xdg/data XDG_CACHE_HOME=/tmp/xdg/cache PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
H=/tmp/site/bin/harness
TIMEFORMAT='TIME %R s'

scan() {  # scan NAME DB MODEL [ARGS...]: timed, summarised, verdicts exported
    local name=$1 db=$2; shift 2
    echo "== scan $name: $*"
    time timeout 280 "$H" scan "$@" --db "$db" --top 20 2>&1 | tail -45
    python3 benchmarks/gpu_scan.py summary "$db" "$OUT/$name.json" \
        --verdicts "$OUT/$name.csv"
}

setup() {  # the wheels and GGUF part 0 onto the machine
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, \
torch.cuda.get_device_name(0))"
    time python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --no-build-isolation --target /tmp/site .whl/*.whl . || exit 1
    cp .wgt/smol.part0 /tmp/w/
}

if [ "$phase" = setup ]; then
    setup
elif [ "$phase" = 1 ]; then
    setup
    echo "== verify3_gpu.py"
    time timeout 240 python3 benchmarks/verify3_gpu.py --tokenizer .wgt/smol_tok \
        --out "$OUT/verify3_gpu.json" 2>&1 | grep -v "tokens, "
    python3 benchmarks/gpu_scan.py build /tmp/gpt2r .wgt/smol_tok 2>&1 | tail -1
    scan gpt2-random /tmp/gpt2r.db hf:/tmp/gpt2r
else
    cat /tmp/w/smol.part0 .wgt/smol.part1 > /tmp/w/smollm2.gguf || exit 1
    sha256sum /tmp/w/smollm2.gguf
    scan smollm2-bf16-cold /tmp/s16.db hf:/tmp/w/smollm2.gguf
    scan smollm2-f32 /tmp/s32.db hf:/tmp/w/smollm2.gguf -b dtype=float32
    nvidia-smi --query-gpu=name,memory.used --format=csv
fi
