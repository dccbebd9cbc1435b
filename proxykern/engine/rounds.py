"""What the eager and the static speculative rounds share: the stats they report (the
per-row parameters repeat themselves: ``SamplingParams.repeat_rows``). Its own module, so that
:mod:`proxykern.engine.speculative` (which picks the rounds) and
:mod:`proxykern.engine.static_speculative` import it without importing each other."""
from __future__ import annotations

from typing import NamedTuple


class SpeculativeStats(NamedTuple):
    """What a speculative call did (``out.stats``).

    ``drafted``: draft tokens proposed at positions a row could still use (before
    its budget ends and up to its EOS); ``accepted``: those the op agreed with; ``rounds``; ``base_forwards``
    (prefill included); ``steps``: the batch's decode steps ``max(lengths)``.
    """

    num_draft_tokens: int
    rounds: int
    drafted: int
    accepted: int
    base_forwards: int
    steps: int

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def base_forwards_per_token(self) -> float:
        """Base forwards per decode step of the batch (plain decoding: 1.0)."""
        return self.base_forwards / self.steps if self.steps else 0.0
