"""alter-jax: ALTER unlearning in JAX / Flax NNX."""
import importlib.util as _util
import os as _os

__version__ = "0.1.0"

# PyTorch is optional (parity tests only): without it transformers prints "PyTorch was not found ..."
# on every import, i.e. on every command. That message is an advisory warning; silence those only then.
if _util.find_spec("torch") is None:
    _os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
