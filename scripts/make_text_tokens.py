"""Real text as a token file for `data.format = "tokens"`: text files tokenized with a Hugging Face tokenizer.

For runs that must see real text on a machine without network or datasets (the float8 loss check on the GPU):
each file becomes one document (its ids, then the tokenizer's EOS), cut into pieces of at most --chunk tokens (set it
to the run's seq_len: a longer document would be truncated by its packed row) that overlap by one token, so that
every token of the file but its first is a trained target exactly once; written as NAME.uint16.bin (or .uint32.bin
when the vocabulary needs it) plus the sidecar index posttrain's token loader reads.

    python scripts/make_text_tokens.py --tokenizer outputs/smollm2-135m-instruct \
        --glob '/usr/lib/python3.11/**/*.py' --min-tokens 2000000 --chunk 4096 --out data/text_tokens/stdlib.uint16.bin

Files are taken in sorted path order (the same file set gives the same token file) until --min-tokens are
written; unreadable or non-UTF-8 files are skipped, counted and reported.
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from posttrain.datasets.token_files import write_token_file  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer folder")
    p.add_argument("--glob", action="append", required=True, help="files to read (recursive **; repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="skip paths containing this text (repeatable)")
    p.add_argument("--min-tokens", type=int, default=2_000_000, help="stop once this many tokens are written")
    p.add_argument("--chunk", type=int, default=4096,
                   help="pieces of at most this many tokens, overlapping by one (the run's seq_len; 0: whole files)")
    p.add_argument("--out", required=True, help="NAME.uint16.bin or NAME.uint32.bin")
    args = p.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"--tokenizer {args.tokenizer}: the tokenizer has no EOS token to end each document with")
    if args.chunk == 1 or args.chunk < 0:
        raise SystemExit(f"--chunk {args.chunk}: 0 (whole files) or at least 2 tokens")
    dtype = "uint16" if len(tokenizer) <= 2**16 else "uint32"
    if not args.out.endswith(f".{dtype}.bin"):
        raise SystemExit(f"--out {args.out}: a vocabulary of {len(tokenizer):,} ids needs a NAME.{dtype}.bin file")

    paths = sorted({path for pattern in args.glob for path in glob.glob(pattern, recursive=True)})
    paths = [path for path in paths if Path(path).is_file() and not any(text in path for text in args.exclude)]
    documents: list[list[int]] = []
    total, skipped = 0, 0
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        if not text.strip():
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if args.chunk == 0 or len(ids) <= args.chunk:
            documents.append(ids)
        else:  # a piece's first token is only context: it repeats the previous piece's last one
            documents.extend(ids[start:start + args.chunk] for start in range(0, len(ids) - 1, args.chunk - 1))
        total += len(ids)
        if total >= args.min_tokens:
            break
    if total < args.min_tokens:
        raise SystemExit(f"--glob matched {len(paths)} files holding {total:,} tokens, fewer than --min-tokens "
                         f"{args.min_tokens:,}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_token_file(args.out, documents)
    print(f"{args.out}: {total:,} tokens in {len(documents)} documents ({len(paths)} files matched, "
          f"{skipped} skipped as unreadable or not UTF-8)")


if __name__ == "__main__":
    main()
