"""The Fisher diagonal's storage format (model/fisher.py): 4-bit log codes per group of 32."""
import numpy as np
import pytest

from slm360_rasa.model.fisher import FISHER_GROUP, check_fisher, decode_fisher, encode_fisher, fisher_bytes


def test_fisher_codes_keep_values_within_half_an_octave():
    rng = np.random.default_rng(0)
    f = np.exp2(rng.uniform(-40, 0, size=(37, 29)))  # 40 octaves, odd sizes, groups cross rows
    f[3, :] = 0.0
    f[5, 7] = 0.0
    enc = encode_fisher({"w": f})
    assert enc["fisher.w.codes"].dtype == np.uint8 and enc["fisher.w.top"].dtype == np.float16
    n_bytes = sum(v.nbytes for v in enc.values())
    assert n_bytes == fisher_bytes(f.size) == 2 * -(-f.size // FISHER_GROUP) + -(-f.size // 2)
    back = decode_fisher(enc, {"w": f.shape})["w"].astype(np.float64)
    flat, bflat = f.ravel(), back.ravel()
    gmax = np.repeat([g.max() for g in np.array_split(flat, range(FISHER_GROUP, flat.size, FISHER_GROUP))],
                     FISHER_GROUP)[: flat.size]
    kept = flat >= gmax * 2.0 ** -14.4
    ratio = bflat[kept] / flat[kept]
    assert np.all(ratio <= 2 ** 0.54) and np.all(ratio >= 2 ** -0.54)
    assert np.all(bflat[flat == 0] == 0)
    # Values far below their group's top become 0; they weigh < 1/23,000 of it.
    assert np.all(bflat[flat < gmax * 2.0 ** -14.6] == 0)


def test_fisher_codes_refuse_bad_values_and_shapes():
    with pytest.raises(ValueError, match="w"):
        encode_fisher({"w": np.array([1.0, -1.0])})
    enc = encode_fisher({"w": np.ones((4, 8))})
    with pytest.raises(ValueError, match="w"):
        decode_fisher(enc, {"w": (4, 9)})
    with pytest.raises(ValueError, match="missing"):
        decode_fisher(enc, {"v": (4, 8)})
    # The load-time check refuses the same files without decoding them.
    check_fisher(enc, {"w": (4, 8)})
    with pytest.raises(ValueError, match="expected float16"):
        check_fisher(enc, {"w": (4, 9)})
    with pytest.raises(ValueError, match="missing"):
        check_fisher(enc, {"v": (4, 8)})
