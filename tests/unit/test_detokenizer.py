"""IncrementalDetokenizer against the full decode, with real tokenizers trained here in a second.

Two backends, both built from a short corpus in this file (no downloads, independent of vlm_tiny):
- byte-level BPE (GPT-2 / Llama 3 / Qwen2 style): multi-byte characters split across tokens;
- SentencePiece-style BPE with a Metaspace pre-tokenizer and Llama 2's strip-one-leading-space
  decoder: the case where a window's first token decodes differently than in context;
- the same with Llama 2's byte fallback (<0xNN> tokens): characters outside the vocab become bytes.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llm_service.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer

_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Stop here. STOP. The end is near; stop words and stopping.",
    "日本語のテキストです。東京は大きい都市です。你好，世界！中文测试。",
    "Emoji: 😀 😃 🎉 👍🏽 ❤️ 🚀 and café naïve résumé ß ∑ ≤ ≥",
    "numbers 12345 67890 and symbols <>[]{}()",
] * 3
_MULTIBYTE_TEXT = "Hi 😀 你好，世界！🎉 café 👍🏽 東京 🚀"


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator([line for line in _CORPUS if line.isascii()], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def byte_fallback(metaspace) -> PreTrainedTokenizerFast:
    spec = json.loads(metaspace.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    spec["decoder"]["decoders"].insert(1, {"type": "ByteFallback"})
    backend = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _stream(
    tokenizer, token_ids: list[int], *, chunks: list[int] | None = None, **kwargs
) -> tuple[list[str], str, str | None, int]:
    """Push `token_ids` (one at a time, or in `chunks` sizes) until a stop; return the deltas, the
    flushed text, the stop string and how many ids were pushed."""
    kwargs.setdefault("skip_special_tokens", True)
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], **kwargs)
    deltas: list[str] = []
    sizes = chunks or [1] * len(token_ids)
    start = 0
    for size in sizes:
        update = detok.push(token_ids[start : start + size])
        start += size
        deltas.append(update.text_delta)
        if update.stop_string is not None:
            return deltas, detok.flush(), update.stop_string, start
    tail = detok.flush()
    return deltas, tail, detok.stop_string, start


def _random_chunks(rng: random.Random, n: int) -> list[int]:
    chunks = []
    while n > 0:
        chunks.append(min(n, rng.randint(1, 3)))
        n -= chunks[-1]
    return chunks


def test_multibyte_characters_split_across_tokens(byte_level):
    ids = byte_level.encode(_MULTIBYTE_TEXT)
    pieces = [byte_level.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs tokens that split a character"

    deltas, tail, stop, _ = _stream(byte_level, ids)
    assert stop is None
    assert tail == ""
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == _MULTIBYTE_TEXT == byte_level.decode(ids)


def test_incomplete_character_is_released_by_flush(byte_level):
    ids = byte_level.encode("ok 🐍")  # not in the corpus: split into byte tokens
    truncated = ids[:-1]  # the snake is now incomplete
    assert byte_level.decode(truncated).endswith("\ufffd")
    deltas, tail, _, _ = _stream(byte_level, truncated)
    assert "".join(deltas).startswith("ok")
    assert not any("\ufffd" in d for d in deltas)
    assert tail.endswith("\ufffd")
    assert "".join(deltas) + tail == byte_level.decode(truncated)


def test_text_before_an_incomplete_character_is_not_delayed(byte_level):
    ids = byte_level.encode("the 🐍")
    head = ids[:-1]  # ends inside the snake
    detok = IncrementalDetokenizer(byte_level, [], skip_special_tokens=True)
    assert detok.push(head).text_delta.startswith("the")
    detok = IncrementalDetokenizer(byte_level, [], skip_special_tokens=True, stop=("the",))
    assert detok.push(head) == DetokenizerUpdate("", "the")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries(byte_level, include):
    text = "Hello world. STOP here and more"
    ids = byte_level.encode(text)
    assert "STOP" not in [byte_level.decode([i]).strip() for i in ids], "STOP must span several tokens"

    deltas, tail, stop, num_pushed = _stream(
        byte_level, ids, stop=("STOP",), include_stop_str_in_output=include
    )
    assert stop == "STOP"
    assert tail == ""
    assert "".join(deltas) == ("Hello world. STOP" if include else "Hello world. ")
    assert not any("S" in d for d in deltas[:-1]), "a stop-string prefix was emitted before it resolved"
    assert num_pushed < len(ids)


def test_stop_prefix_held_back_then_released_at_flush(byte_level):
    ids = byte_level.encode("Hello world. ST")
    deltas, tail, stop, _ = _stream(byte_level, ids, stop=("STOP", "world!"))
    assert stop is None
    assert "".join(deltas) == "Hello world. "
    assert tail == "ST"


def test_stop_prefix_that_does_not_complete_is_released_early(byte_level):
    ids = byte_level.encode("STAND STOP")
    deltas, _, stop, _ = _stream(byte_level, ids, stop=("STOP",))
    assert stop == "STOP"
    assert "".join(deltas) == "STAND "


def test_first_completed_stop_string_wins(byte_level):
    ids = byte_level.encode("abcdef")
    # "cd" completes before "bcdef" although "bcdef" starts first.
    deltas, _, stop, _ = _stream(byte_level, ids, chunks=[len(ids)], stop=("bcdef", "cd"))
    assert (stop, "".join(deltas)) == ("cd", "ab")


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(byte_level, skip):
    im_start, im_end = byte_level.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [
        im_start,
        *byte_level.encode("你好 world"),
        im_end,
        *byte_level.encode(" 😀!"),
        byte_level.eos_token_id,
    ]
    deltas, tail, _, _ = _stream(byte_level, ids, skip_special_tokens=skip)
    text = "".join(deltas) + tail
    assert text == byte_level.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip


@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_match_full_decode(byte_level, skip):
    rng = random.Random(1234)
    vocab = len(byte_level)
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
        deltas, tail, stop, _ = _stream(
            byte_level, ids, chunks=_random_chunks(rng, len(ids)), skip_special_tokens=skip
        )
        assert stop is None
        assert "".join(deltas) + tail == byte_level.decode(ids, skip_special_tokens=skip), ids


def test_random_valid_text_never_emits_replacement_chars(byte_level):
    rng = random.Random(7)
    alphabet = list("ab 日本語你好世界😀🎉👍🏽🚀é.")
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        ids = byte_level.encode(text)
        deltas, tail, _, _ = _stream(byte_level, ids, chunks=_random_chunks(rng, len(ids)))
        assert not any("\ufffd" in d for d in deltas), text
        assert "".join(deltas) + tail == text


def test_random_sequences_with_stop_strings(byte_level):
    rng = random.Random(99)
    stops = ("he", "the ", "😀", "STOP", "。")
    pool = byte_level.encode("the he STOP 😀 。 hello the world 日本語。 ST ")
    for _ in range(150):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 20))]
        include = rng.random() < 0.5
        deltas, tail, stop, num_pushed = _stream(
            byte_level,
            ids,
            chunks=_random_chunks(rng, len(ids)),
            stop=stops,
            include_stop_str_in_output=include,
        )
        full = byte_level.decode(ids[:num_pushed])
        hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
        if not hits:
            assert stop is None and "".join(deltas) + tail == full
            continue
        end, start, expected_stop = min(hits)
        assert stop == expected_stop, (ids, full)
        assert "".join(deltas) + tail == (full[:end] if include else full[:start])


@pytest.mark.parametrize("skip", [True, False])
def test_sentencepiece_style_leading_space(metaspace, skip):
    rng = random.Random(5)
    vocab = len(metaspace)
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 16))]
        deltas, tail, _, _ = _stream(
            metaspace, ids, chunks=_random_chunks(rng, len(ids)), skip_special_tokens=skip
        )
        assert "".join(deltas) + tail == metaspace.decode(ids, skip_special_tokens=skip), (
            metaspace.convert_ids_to_tokens(ids)
        )


def test_push_after_stop_is_a_bug(byte_level):
    detok = IncrementalDetokenizer(byte_level, [], skip_special_tokens=True, stop=("a",))
    assert detok.push(byte_level.encode("xa")).stop_string == "a"
    assert detok.flush() == ""
    with pytest.raises(AssertionError):
        detok.push([1])


def test_byte_fallback_with_valid_utf8(byte_fallback):
    rng = random.Random(8)
    alphabet = list("ab the 你好😀é.")
    ids = byte_fallback.encode("Hi 你好 😀", add_special_tokens=False)
    assert "<0xE4>" in byte_fallback.convert_ids_to_tokens(ids)
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 15)))
        ids = byte_fallback.encode(text, add_special_tokens=False)
        deltas, tail, _, _ = _stream(byte_fallback, ids, chunks=_random_chunks(rng, len(ids)))
        assert not any("\ufffd" in d for d in deltas), text
        assert "".join(deltas) + tail == byte_fallback.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("clean_up", [False, True])
def test_backend_fast_path_only_where_it_equals_the_wrapper(byte_level, metaspace, clean_up):
    for tok in (byte_level, metaspace):
        before, tok.clean_up_tokenization_spaces = tok.clean_up_tokenization_spaces, clean_up
        try:
            detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
            assert (detok._backend_decode is not None) == (not clean_up)
            ids = tok.encode(_MULTIBYTE_TEXT + " Hello , world !", add_special_tokens=False)
            assert detok._decode(ids) == tok.decode(ids, skip_special_tokens=True)
        finally:
            tok.clean_up_tokenization_spaces = before
