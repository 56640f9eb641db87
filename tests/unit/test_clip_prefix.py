"""The cut before CLIP's tokeniser keeps every token CLIP reads (its 77-token context)."""

from __future__ import annotations

import open_clip
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.embeddings.service import CLIP_CHARS, clip_prefix

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")
WORD = st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789.,!?'&;#é-_"), max_size=80)


@given(st.lists(WORD, max_size=300), st.sampled_from([" ", "  ", "\n", "\t "]))
@settings(max_examples=200, deadline=None)
def test_the_prefix_tokenises_as_the_whole_text(words: list[str], separator: str) -> None:
    text = separator.join(words)
    assert (TOKENIZER([text]) == TOKENIZER([clip_prefix(text)])).all()


def test_a_single_long_word_is_cut_to_a_bounded_length() -> None:
    text = "x" * 100_000
    assert len(clip_prefix(text)) == CLIP_CHARS
    assert (TOKENIZER([text]) == TOKENIZER([clip_prefix(text)])).all()
