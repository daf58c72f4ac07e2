"""kernels/layout.py: the Q4 format constants come from nano/quant.py and are never redeclared."""
import ast
from pathlib import Path

from slm360_rasa.nano import kernels as K
from slm360_rasa.nano import quant as Q
from slm360_rasa.nano.kernels import layout as L


def test_format_constants_are_the_ones_of_quant():
    assert L.QK is Q.QK and K.QK is Q.QK
    assert L.Q4_ZERO == Q.Q4_ZERO and isinstance(L.Q4_ZERO, float)
    assert 2 * L.HALF_QK == Q.QK
    assert L.Q4_BLOCK_BYTES_T == L.Q4_TILE * Q.QK // 2


def test_tiles_fit_the_micro_kernels():
    assert L.Q4_TILE == 2 * L.MK_LANES  # _q8q4_4x32 works on two 16-lane halves of a tile
    assert L.ATT_TILE == L.MK_WIDTH and int(L.ATT_TILE_U) == L.ATT_TILE
    assert L.Q4_ACC_SIZE == 4 * L.Q4_TILE and L.ATT_ACC_SIZE == 4 * L.ATT_TILE
    assert Q.QK % L.VNNI_QUAD == 0


def test_no_kernel_module_assigns_quant_constants():
    for path in Path(K.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
        assert not names & {"QK", "BLOCK_BYTES"}, path.name
