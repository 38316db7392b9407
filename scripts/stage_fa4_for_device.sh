#!/usr/bin/env bash
# FlashAttention-4 (`model.sdpa_kernel = "fa4"`) and the bench peers' wheels for the device machine, which has no
# network and takes at most 64 MiB of carried files a call. The CUTLASS DSL's cu13 library wheel alone is 92 MB
# (60.6 MiB even as xz), so it travels in two halves, in two calls less than 30 s apart (the machine keeps
# /tmp while it stays warm):
#
#   here:     bash scripts/stage_fa4_for_device.sh stage        # fills .fa4/a and .fa4/b (git-ignored)
#   call A:   carry [".fa4/a"], command: bash scripts/stage_fa4_for_device.sh a && <work that needs no FA4>
#   call B:   carry [".fa4/b"], command: bash scripts/stage_fa4_for_device.sh b && export PYTHONPATH=$PWD:/tmp/keep/site && ...
#   later calls while warm: carry [], export PYTHONPATH=$PWD:/tmp/keep/site
#
# .fa4/a: the cu13 wheel's first 50 MiB, liger-kernel, torchao. .fa4/b: its rest, its sha256, flash-attn-4, the
# other CUTLASS DSL wheels, quack, tvm-ffi, dlpack, einops, torchdata (Python 3.12, x86_64, as on the device).
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=/tmp/keep
CU13=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl

case "${1:-}" in
  stage)
    grep -qx '/.fa4/' .git/info/exclude 2>/dev/null || echo '/.fa4/' >> .git/info/exclude
    dl=$(mktemp -d)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      -d "$dl" flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
      nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
      apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 einops==0.8.2 torchdata==0.11.0 \
      liger-kernel==0.8.5 torchao==0.18.0
    rm -rf .fa4 && mkdir -p .fa4/a/whl .fa4/b/whl
    (cd "$dl" && sha256sum "$CU13" > cu13.sha256 && split -b 50M "$CU13" part_)
    mv "$dl"/part_aa .fa4/a/ && mv "$dl"/part_ab "$dl"/cu13.sha256 .fa4/b/
    mv "$dl"/liger_kernel-*.whl "$dl"/torchao-*.whl .fa4/a/whl/
    rm "$dl/$CU13" && mv "$dl"/*.whl .fa4/b/whl/ && rmdir "$dl"
    du -sh .fa4/a .fa4/b ;;
  a)
    mkdir -p "$KEEP" && cp -r .fa4/a "$KEEP/fa4a"
    python3 -m pip install -q --no-index --no-deps --target "$KEEP/site" .fa4/a/whl/*.whl ;;
  b)
    repo=$PWD
    (cd "$KEEP" && cat fa4a/part_aa "$repo/.fa4/b/part_ab" > "$CU13" && sha256sum -c "$repo/.fa4/b/cu13.sha256")
    python3 -m pip install -q --no-index --no-deps --target "$KEEP/site" "$KEEP/$CU13" .fa4/b/whl/*.whl ;;
  *)
    echo "usage: $0 stage | a | b  (see the comment at the top)" >&2
    exit 2 ;;
esac
