"""Sampler: greedy, penalties, truncation filters, seeded reproducibility, min_tokens, log probs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm_service.engine.sampling_params import SamplingParams
from llm_service.layers.sampler import SamplingBatch, SamplingRow, apply_penalties, sample

V = 32


def _row(prompt=(), output=(), eos=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), tuple(eos))


def _sample(logits: torch.Tensor, rows: list[SamplingRow], **kwargs):
    return sample(
        logits, SamplingBatch.build(rows, vocab_size=logits.shape[1], device=logits.device), **kwargs
    )


def _logits(num_rows: int, vocab_size: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = _logits(5)
    logits[1, [3, 9, 20]] = 100.0  # tie: argmax picks 3
    logits[2] = 0.0  # all tied: 0
    before = logits.clone()
    out = _sample(logits, [_row(temperature=0.0) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.token_ids[1:3] == [3, 0]
    assert out.logprobs is None and out.top_logprobs is None
    assert torch.equal(logits, before), "the caller's logits must not be modified"


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = _logits(6)
    rows = [_row(temperature=0.0 if i % 2 else 1.5, top_k=3, top_p=0.5, min_p=0.2) for i in range(6)]
    out = _sample(logits, rows)
    assert out.token_ids[1::2] == logits[1::2].argmax(-1).tolist()


def _reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    out = logits.clone()
    for i, row in enumerate(rows):
        p = row.params
        for token in set(row.prompt_token_ids) | set(row.output_token_ids):
            x = out[i, token].item()
            out[i, token] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for token in set(row.output_token_ids):
            count = list(row.output_token_ids).count(token)
            out[i, token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_match_reference():
    logits = _logits(5)
    rows = [
        _row([1, 2, 2, 5], [5, 7, 7, 7], repetition_penalty=1.3),
        _row([1, 2], [3, 3, 4], frequency_penalty=0.7),
        _row([1, 2], [3, 3, 4], presence_penalty=-1.5),
        _row([0, 9, 31], [9, 9, 30], repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=2.0),
        _row([4, 5, 6], [6]),  # no penalties: untouched
    ]
    batch = SamplingBatch.build(rows, vocab_size=V, device="cpu")
    penalised = logits.clone()
    apply_penalties(penalised, batch)
    torch.testing.assert_close(penalised, _reference_penalties(logits, rows))
    assert torch.equal(penalised[4], logits[4])

    greedy_rows = [
        dataclasses.replace(r, params=dataclasses.replace(r.params, temperature=0.0)) for r in rows
    ]
    assert _sample(logits, greedy_rows).token_ids == penalised.argmax(-1).tolist()


def _allowed(logits: torch.Tensor, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """Straightforward HF-order reference: temperature, top-k, top-p, min-p."""
    scores = logits / temperature
    order = scores.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k else order
    probs = torch.softmax(scores[keep], -1).tolist()
    mass, kept = 0.0, []
    for token, prob in zip(keep, probs, strict=True):
        kept.append(token)
        mass += prob
        if mass >= top_p:
            break
    probs = dict(zip(kept, torch.softmax(scores[kept], -1).tolist(), strict=True))
    best = max(probs.values())
    return {t for t, p in probs.items() if p >= min_p * best}


@pytest.mark.parametrize(
    "settings",
    [
        {"top_k": 4},
        {"top_p": 0.6},
        {"min_p": 0.3},
        {"top_k": 6, "top_p": 0.8, "min_p": 0.1, "temperature": 0.7},
        {"top_k": 1},
    ],
)
def test_filters_never_sample_a_filtered_token(settings):
    logits = _logits(1, seed=3)[0]
    allowed = _allowed(logits, **settings)
    num_draws = 2000
    # Other rows with different settings share the batch: per-row tensors must not leak.
    rows = [_row(**settings) if i % 2 == 0 else _row(temperature=2.0, top_k=20) for i in range(num_draws)]
    out = _sample(logits.expand(num_draws, V).contiguous(), rows, generator=torch.Generator().manual_seed(0))
    drawn = set(out.token_ids[::2])
    assert drawn <= allowed
    assert len(drawn) > 1 or len(allowed) == 1, "the filter kept more than the sampler ever drew"


def test_temperature_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    num_draws = 4000
    out = _sample(
        logits.expand(num_draws, 4).contiguous(),
        [_row(temperature=0.5) for _ in range(num_draws)],
        generator=torch.Generator().manual_seed(1),
    )
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4) / num_draws
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.5, -1), atol=0.03, rtol=0)


def _generate(seeded: SamplingRow, others: list[SamplingRow], position: int, steps: int = 6) -> list[int]:
    """Decode `steps` tokens for `seeded` at row `position` among `others`; logits depend on step only."""
    output: list[int] = []
    generator = torch.Generator().manual_seed(123 + position)
    for step in range(steps):
        row = SamplingRow(seeded.params, seeded.prompt_token_ids, output)
        rows = [*others[:position], row, *others[position:]]
        logits = _logits(len(rows), vocab_size=200, seed=1000 + step)
        logits[position] = _logits(1, vocab_size=200, seed=step)[0]
        output = [*output, _sample(logits, rows, generator=generator).token_ids[position]]
    return output


def test_seeded_request_is_reproducible_whatever_the_batch():
    seeded = _row([1, 2, 3], seed=42, temperature=1.0, top_p=0.95)
    alone = _generate(seeded, [], 0)
    batches = [
        [_row(temperature=0.0)] * 3,
        [
            _row(temperature=1.2, top_k=5),
            _row(seed=7, min_p=0.2),
            _row(temperature=0.0, repetition_penalty=1.5),
        ],
        [_row(temperature=0.8, logprobs=True, top_logprobs=3)] * 5,
    ]
    for others in batches:
        for position in (0, 2, len(others)):
            assert _generate(seeded, others, position) == alone
    assert len(set(alone)) > 1, "draws must vary with the step"


def test_different_seeds_differ_and_unseeded_rows_use_the_shared_generator():
    runs = {tuple(_generate(_row(seed=seed), [], 0)) for seed in range(4)}
    assert len(runs) == 4
    logits = _logits(2, vocab_size=1000)
    rows = [_row(), _row()]
    first = _sample(logits, rows, generator=torch.Generator().manual_seed(5)).token_ids
    again = _sample(logits, rows, generator=torch.Generator().manual_seed(5)).token_ids
    assert first == again


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_blocks_eos_and_stop_tokens(temperature):
    logits = torch.zeros(1, V)
    logits[0, [2, 5, 9]] = 50.0  # EOS 2, end_id 9, stop token 5 dominate everything else
    logits[0, 11] = 40.0

    def token(num_generated: int, **params) -> int:
        rows = [_row(output=[7] * num_generated, eos=(2,), temperature=temperature, **params)]
        return _sample(logits, rows).token_ids[0]

    assert token(1, min_tokens=3, stop_token_ids=(5, 9)) == 11
    assert token(1, min_tokens=3, stop_token_ids=(5,)) == 9
    assert token(1, min_tokens=3, stop_token_ids=(5,), end_id=9) == 2  # end_id replaces EOS 2
    assert token(1, min_tokens=3, stop_token_ids=(5, 9), ignore_eos=True) == 2  # EOS never stops: allowed
    assert token(3, min_tokens=3, stop_token_ids=(5, 9)) in (2, 5, 9)  # min_tokens reached
    assert token(1, min_tokens=3, stop_token_ids=(5, 9, 9999)) == 11  # out-of-vocab ids are ignored


def test_logprobs_raw_and_processed():
    logits = _logits(3)
    rows = [
        _row(logprobs=True, temperature=0.0),
        _row(output=[1, 1], logprobs=True, temperature=0.7, frequency_penalty=1.0, top_k=3),
        _row(temperature=1.0),  # did not ask: gets a value anyway
    ]
    raw = _sample(logits, rows, generator=torch.Generator().manual_seed(0))
    expected = torch.log_softmax(logits, -1)
    for i, token in enumerate(raw.token_ids):
        assert raw.logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-6)

    processed = _sample(logits, rows, generator=torch.Generator().manual_seed(0), logprobs_mode="processed")
    penalised = logits.clone()
    apply_penalties(penalised, SamplingBatch.build(rows, vocab_size=V, device="cpu"))
    expected = torch.log_softmax(penalised, -1)
    assert processed.token_ids == raw.token_ids
    for i, token in enumerate(processed.token_ids):
        assert processed.logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-6)


def test_top_logprobs_sorted_and_sized_per_row():
    logits = _logits(3)
    rows = [_row(logprobs=True), _row(top_logprobs=1, temperature=0.0), _row(top_logprobs=5, seed=1)]
    out = _sample(logits, rows)
    assert [len(t) for t in out.top_logprobs] == [0, 1, 5]
    expected = torch.log_softmax(logits, -1)
    for i, alternatives in enumerate(out.top_logprobs):
        values = [v for _, v in alternatives]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in alternatives] == expected[i].topk(len(alternatives)).indices.tolist()
        for token, value in alternatives:
            assert value == pytest.approx(expected[i, token].item(), abs=1e-6)
    assert out.top_logprobs[1][0][0] == out.token_ids[1]  # greedy: the best alternative is the pick


def test_bf16_logits_and_tiny_temperature_are_greedy():
    logits = _logits(2).to(torch.bfloat16)
    out = _sample(logits, [_row(temperature=1e-6), _row(temperature=0.0, top_logprobs=2)])
    assert out.token_ids == logits.float().argmax(-1).tolist()


def test_batch_shape_mismatch_is_a_bug():
    batch = SamplingBatch.build([_row()], vocab_size=V, device="cpu")
    with pytest.raises(AssertionError):
        sample(torch.zeros(2, V), batch)
    with pytest.raises(AssertionError):
        sample(torch.zeros(1, V + 1), batch)
