"""emoe: task-aware, memory-efficient Mixture-of-Experts inference (after eMoE, arXiv 2503.06823)."""
from importlib.resources import files

__version__ = "0.1.0"


def default_model_dir() -> str:
    """The embedded model shipped as package data (trained by `emoe train-model`)."""
    return str(files("emoe") / "models" / "emoe-tiny")
