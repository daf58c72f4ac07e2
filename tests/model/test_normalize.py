"""Text normalisation with offsets (model/normalize.py)."""
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from slm360_rasa.model import normalize as N
from slm360_rasa.model.normalize import normalize


def test_normalize_folds_case_punctuation_and_whitespace():
    assert normalize("Book a TABLE,   please!!")[0] == "book a table please"
    assert normalize("  ¿Qué?  ")[0] == "qué"
    assert normalize("tab\there\nnew\u00a0line")[0] == "tab here new line"
    # Full-width forms (NFKC) and the precomposed vs combining spelling of é are one text.
    assert normalize("ＨＥＬＬＯ！")[0] == "hello"
    assert normalize("cafe\u0301")[0] == normalize("café")[0] == "café"
    # Symbols are not punctuation: prices and emoji stay.
    assert normalize("$5 🙂")[0] == "$5 🙂"


def test_normalize_index_points_into_the_original_text():
    text = "Hi,  THERE!"
    norm, index = normalize(text)
    assert norm == "hi there"
    assert index == [0, 1, 2, 5, 6, 7, 8, 9]
    for ch, i in zip(norm, index):
        assert ch == " " or text[i].lower() == ch


def test_normalize_index_handles_casefold_growing_the_text():
    # 'ß' casefolds to 'ss': two normalised characters come from one original character.
    norm, index = normalize("Straße!")
    assert norm == "strasse"
    assert index == [0, 1, 2, 3, 4, 4, 5]
    norm, index = normalize("ﬁne")  # the ligature is one character, NFKC gives two
    assert norm == "fine" and index == [0, 0, 1, 2]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_normalize_invariants_on_any_text(text):
    norm, index = normalize(text)
    assert len(norm) == len(index)
    assert norm == norm.strip() and "  " not in norm
    assert index == sorted(index) and all(0 <= i < len(text) for i in index)
    assert not any(unicodedata.category(c)[0] == "P" for c in norm)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
def test_ascii_fast_normalisation_equals_the_general_one(text):
    assert N.normalize_ascii(text) == N._normalize_spans_general(text)[0]
    assert N._normalize_ascii_spans(text) == N._normalize_spans_general(text)
