"""Per-request sampling settings: the engine's own type, validated once at the service edge."""

from __future__ import annotations

from dataclasses import dataclass

from vlm_protocol.errors import InvalidArgumentError

_MAX_STOP_STRINGS = 16
_MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = _MAX_STOP_STRINGS  # reported to clients as request limits
MAX_TOP_LOGPROBS = _MAX_TOP_LOGPROBS


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `temperature == 0` means greedy. `top_k <= 0` and `top_p == 1` disable those filters.
    `end_id`, when set, replaces the checkpoint's EOS ids as the end-of-sequence token.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    end_id: int | None = None
    pad_id: int | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"sampling.{name} {why}")

        if self.max_tokens < 1:
            raise bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise bad("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise bad("top_k", f"must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", f"must be in [0, 2^63), got {self.seed}")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", f"must be > 0 (1 disables it), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise bad(name, f"must be in [-2, 2], got {value}")
        if len(self.stop) > _MAX_STOP_STRINGS:
            raise bad("stop", f"has {len(self.stop)} strings; at most {_MAX_STOP_STRINGS} are allowed")
        if any(not s for s in self.stop):
            raise bad("stop", "must not contain empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative token ids")
        if self.end_id is not None and self.end_id < 0:
            raise bad("end_id", f"must be a non-negative token id, got {self.end_id}")
        if self.pad_id is not None and self.pad_id < 0:
            raise bad("pad_id", f"must be a non-negative token id, got {self.pad_id}")
        if not 0 <= self.top_logprobs <= _MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be in [0, {_MAX_TOP_LOGPROBS}], got {self.top_logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def max_stop_string_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)
