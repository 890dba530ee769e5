"""``bin/study <name> [options]``: run a study (each stage resumable; report under studies/).

Studies (``bin/study <name> --help`` for the options of one):

    tofu-small      a tiny Llama trained from scratch on real TOFU authors; every method
                    (alter_jax.study.tofu_small)
    tofu-smollm2    the pretrained SmolLM2-135M-Instruct on TOFU (alter_jax.study.tofu_smollm2)
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

STUDIES = {
    "tofu-small": "alter_jax.study.tofu_small",
    "tofu-smollm2": "alter_jax.study.tofu_smollm2",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in STUDIES:
        print(f"study: unknown study {name!r}; choose one of {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(STUDIES[name])
    except ModuleNotFoundError as e:
        print(f"study: {name} is not available in this checkout ({e})", file=sys.stderr)
        return 2
    import torch  # noqa: F401  (torch before jax: jax first stalls PyTorch's OpenMP workers)

    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
