import pytest
import torch

from core.models.coeffs import BFM09_LAYOUT, CoeffLayout


def test_bfm09_layout_matches_spec():
    s = BFM09_LAYOUT.slices()
    assert BFM09_LAYOUT.total == 257
    assert (s["id"], s["exp"], s["tex"]) == (slice(0, 80), slice(80, 144), slice(144, 224))
    assert (s["angles"], s["gamma"], s["trans"]) == (slice(224, 227), slice(227, 254), slice(254, 257))


def test_pack_unpack_round_trip():
    x = torch.randn(3, 257)
    c = BFM09_LAYOUT.unpack(x)
    assert torch.equal(c.angles, x[:, 224:227]) and torch.equal(c.trans, x[:, 254:])
    assert torch.equal(BFM09_LAYOUT.pack(c), x)


def test_other_layout_and_errors():
    lay = CoeffLayout(n_id=63, n_exp=6, n_tex=0)
    assert lay.total == 63 + 6 + 0 + 3 + 27 + 3
    z = lay.zeros(2)
    assert z.tex.shape == (2, 0) and lay.pack(z).shape == (2, lay.total)
    with pytest.raises(ValueError, match=r"\(B, 257\)"):
        BFM09_LAYOUT.unpack(torch.zeros(2, 256))
    with pytest.raises(ValueError, match="'exp'"):
        BFM09_LAYOUT.pack(BFM09_LAYOUT.zeros(1).replace(exp=torch.zeros(1, 3)))
