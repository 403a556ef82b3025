"""emoe.gguf_iq against gguf-py's numpy dequantisers, on random bytes with finite block scales."""
from __future__ import annotations

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from emoe.gguf_iq import IQ1_M, IQ2_S, IQ2_XS, IQ_TABLES, IQ_TYPES, iq_dequantize, iq_parts
from gguf_writer import _random_blocks


def random_blocks(qtype: int, rows: int = 64, cols: int = 512, seed: int = 0) -> np.ndarray:
    return _random_blocks((rows, cols), gguf.GGMLQuantizationType(qtype), seed + qtype)


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda q: gguf.GGMLQuantizationType(q).name)
def test_matches_gguf_py(qtype):
    """Bit for bit gguf-py's values (its grids and sign tables, decoded once per device)."""
    blocks = random_blocks(qtype)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(qtype)))
    assert torch.isfinite(want).all()
    got = iq_dequantize(torch.from_numpy(blocks), qtype)
    assert got.shape == (64, 512) and got.dtype == torch.float32
    assert torch.equal(got, want)  # (the scale times the table's integer: factors differ by signs and powers of 2)
    if torch.cuda.is_available():  # the packed bytes unpack where they land
        torch.testing.assert_close(iq_dequantize(torch.from_numpy(blocks).cuda(), qtype).cpu(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda q: gguf.GGMLQuantizationType(q).name)
def test_rows_independent(qtype):
    """Each row unpacks from its own bytes: a slice or a strided view of the rows gives those rows."""
    t = torch.from_numpy(random_blocks(qtype, rows=32, cols=768, seed=1))
    whole = iq_dequantize(t, qtype)
    assert not torch.equal(whole[10], whole[11])
    torch.testing.assert_close(iq_dequantize(t[10:20], qtype), whole[10:20], rtol=0, atol=0)
    # a non-contiguous view of the same rows reads the same bytes
    torch.testing.assert_close(iq_dequantize(t[10:20:3], qtype), whole[10:20:3], rtol=0, atol=0)


def test_rejects_other_types_and_torn_rows():
    """Types gguf_iq does not hold go elsewhere (gguf_blocks.dequantize routes them), and rows that are not
    whole blocks are refused, never unpacked silently."""
    with pytest.raises(NotImplementedError):
        iq_dequantize(torch.zeros(1, 18, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="66"):  # IQ2_XXS rows are whole 66-byte blocks
        iq_dequantize(torch.zeros(1, 65, dtype=torch.uint8), 16)


@pytest.mark.parametrize("qtype", IQ_TYPES, ids=lambda q: gguf.GGMLQuantizationType(q).name)
def test_parts_are_a_tables_integers_times_a_scale_per_group(qtype):
    """iq_parts: integers from the type's table (at most 16, int8: a codebook form's entries) times a scale per 32
    values (16 for IQ2_XS, IQ2_S and IQ1_M), whose products are the dequantised values bit for bit."""
    t = torch.from_numpy(random_blocks(qtype))
    values, scale, group = iq_parts(t, qtype)
    table = IQ_TABLES[qtype]
    assert len(table) <= 16 and all(-127 <= v <= 127 for v in table)
    assert values.dtype == torch.int8 and set(values.unique().tolist()) <= set(table)
    assert group == (16 if qtype in (IQ2_XS, IQ2_S, IQ1_M) else 32) and scale.shape == (64, 512 // group)
    assert torch.equal((values.float().view(64, -1, group) * scale[..., None]).view(64, 512), iq_dequantize(t, qtype))
