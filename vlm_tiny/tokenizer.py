"""Tiny byte-level BPE tokenizers for random-weight test checkpoints.

The tokenizer is trained offline, deterministically, on a small embedded English corpus, then wrapped
in a transformers fast tokenizer so that `save_pretrained` writes the same files a real checkpoint
ships (tokenizer.json + tokenizer_config.json, chat template included). Nothing is downloaded.

Layout of the vocabulary (ids are stable for a given set of arguments):
  [0, 256)                      the 256 byte symbols of the byte-level alphabet
  [256, vocab_size - n_special) learned merges
  [vocab_size - n_special, vocab_size)  the family's special tokens, in the order given
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["CORPUS", "build_tokenizer"]

# Written for this project. Vocabulary leans towards what VLM prompts say: pictures, places, colours,
# animals, counting and short questions, so that test prompts split into a handful of tokens.
CORPUS = """\
The picture shows a small red house next to a quiet river. A wooden bridge crosses the water, and two
children are standing on it, looking down at the ducks. Behind the house there is a green hill with a
few tall trees. The sky is blue, with some white clouds drifting slowly to the east.

What is in this image? Describe the image in detail. How many people can you see? What colour is the
car on the left? Is there a dog in the photo? Which city is this? Where was this picture taken? What
time of day is it? Read the text on the sign. What is the man holding in his right hand?

In the centre of the photo, a black cat sits on a window sill. The cat is watching a bird outside. The
window is open, and a white curtain moves in the wind. On the table below the window there are three
cups, a bowl of oranges and a small yellow lamp. The light is warm and soft, as if it were evening.

A busy street in a large city: cars, buses and bicycles wait at a traffic light. People walk along the
pavement, carrying bags and umbrellas. A tall building with many windows rises above the street, and a
clock on its front shows a quarter past nine. The road is wet because it has been raining all morning.

The diagram has four parts. The first part is a square, the second is a circle, the third is a
triangle and the fourth is a line that connects them. Each shape has a different colour: red, green,
blue and orange. The square is larger than the circle, and the triangle is the smallest of all.

Answer the question using a single word or phrase. Please answer with a short sentence. The answer is
yes. The answer is no. There are two dogs and one cat. There are five birds on the wire. The image
shows a mountain lake at sunrise, with snow on the peaks and a boat near the shore.

The assistant gives helpful, detailed, and polite answers to the user's questions. A chat between a
curious user and an artificial intelligence assistant. The user asks about the picture, and the
assistant describes what it sees: objects, people, animals, colours, text and the scene as a whole.

A train moves through a green valley. Cows stand in the fields near a farm, and a farmer drives a red
tractor along a narrow road. In the distance, a village with a white church tower sits at the foot of
the mountains. The weather is clear and sunny, and the shadows are short because it is almost noon.

On the beach, a family builds a sand castle. The waves are small and the water is calm. A girl in a
blue hat holds a bucket, her brother carries a yellow spade, and their mother reads a book under an
umbrella. Far out at sea, a white sailing boat moves slowly towards the harbour.

The kitchen is clean and bright. There is a pot of soup on the stove, bread on a wooden board, and a
jar of honey next to a plate of apples. A recipe is written on a card: mix the flour with water and
salt, add the eggs, and bake the bread for forty minutes in a hot oven.

Numbers and counting: one, two, three, four, five, six, seven, eight, nine, ten. The first image and
the second image are different. Compare the two images and say what changed. In the left image the
door is closed; in the right image the door is open and a person is walking out.

USER: What is in this image? ASSISTANT: A brown dog is running on the grass.
USER: Which city is this? ASSISTANT: This is Paris, the capital of France.
USER: Describe the picture. ASSISTANT: A woman rides a bicycle past a bakery.
Question: What is shown in the photo? Answer: Two horses in a field.
Question: Which animal is bigger? Answer: The elephant.
"""


def _train_backend(corpus: str, num_learned: int) -> Tokenizer:
    """Train a byte-level BPE with `num_learned` = 256 bytes + merges entries (no specials yet)."""
    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_learned,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    return backend


def _canonical_backend(trained: Tokenizer) -> Tokenizer:
    """Rebuild the model from an explicitly ordered vocab/merges so ids never depend on training order.

    The byte alphabet gets ids 0..255 in byte order, merges follow in merge-rank order. The trainer is
    deterministic in practice, but pinning the id layout here makes that a property of our code.
    """
    state = json.loads(trained.to_str())
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    byte_to_symbol = _bytes_to_unicode()
    if set(byte_to_symbol.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise AssertionError("byte-level alphabet differs from the tokenizers library's")
    vocab: dict[str, int] = {byte_to_symbol[b]: b for b in range(256)}
    for left, right in merges:
        merged = left + right
        if merged not in vocab:
            vocab[merged] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode mapping (the byte-level alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    codepoints = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codepoints.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codepoints, strict=True)}


def build_tokenizer(
    *,
    special_tokens: list[str],
    bos_token: str | None,
    eos_token: str,
    pad_token: str | None,
    unk_token: str | None,
    add_bos: bool,
    chat_template: str | None,
    vocab_size: int = 768,
    extra: dict[str, Any] | None = None,
) -> PreTrainedTokenizerFast:
    """Build a deterministic tiny byte-level BPE tokenizer with a family's special tokens.

    Args:
        special_tokens: every special/added token of the family, in id order (appended after the
            learned vocabulary). bos/eos/pad/unk must be among them (bos may equal eos, as in OPT).
        bos_token, eos_token, pad_token, unk_token: the named special tokens (None where the family
            has none).
        add_bos: prepend `bos_token` to every encoded sequence (post-processor), like Llama/OPT.
        chat_template: Jinja chat template stored in tokenizer_config.json, or None.
        vocab_size: total size, special tokens included; `len(tokenizer) == vocab_size`.
        extra: further tokenizer_config entries (e.g. `model_max_length`, `padding_side`), passed to
            the transformers tokenizer constructor.

    Returns:
        A transformers fast tokenizer; `save_pretrained(dir)` writes tokenizer.json and
        tokenizer_config.json. Same arguments give a byte-identical tokenizer.json.
    """
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens has duplicates: {special_tokens}")
    for name, tok in (
        ("bos_token", bos_token),
        ("eos_token", eos_token),
        ("pad_token", pad_token),
        ("unk_token", unk_token),
    ):
        if tok is not None and tok not in special_tokens:
            raise ValueError(f"{name}={tok!r} must be listed in special_tokens")
    if add_bos and bos_token is None:
        raise ValueError("add_bos=True needs a bos_token")
    num_learned = vocab_size - len(special_tokens)
    if num_learned < 256 + 16:
        raise ValueError(
            f"vocab_size={vocab_size} leaves too few learned tokens (need >= {256 + 16 + len(special_tokens)})"
        )

    backend = _canonical_backend(_train_backend(CORPUS, num_learned))
    if backend.get_vocab_size() != num_learned:
        raise ValueError(
            f"the embedded corpus supports at most {backend.get_vocab_size() + len(special_tokens)} tokens; "
            f"got vocab_size={vocab_size}"
        )
    # Specials are matched before BPE, never split, and never normalised.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if add_bos:
        assert bos_token is not None
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0",
            pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, backend.token_to_id(bos_token))],
        )
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="$A:0", pair="$A:0 $B:1", special_tokens=[]
        )

    kwargs: dict[str, Any] = {
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": unk_token,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    kwargs.update(extra or {})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    return tokenizer
