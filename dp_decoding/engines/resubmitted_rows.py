"""Token-id rows kept on the client and resubmitted every step (the vLLM step loop and the
upstream HTTP engine): what both batches share.

Invariant: ``append`` extends every live row by exactly one token, or raises without changing
any row; a closed batch (``_rows is None``) refuses every call.
"""

from __future__ import annotations

from collections.abc import Sequence


class ResubmittedRows:
    """Base of batches whose state is the rows' token ids themselves."""

    def __init__(self, prompts: Sequence[Sequence[int]]) -> None:
        self._rows: list[list[int]] | None = [[int(t) for t in p] for p in prompts]

    @property
    def rows(self) -> int:
        return 0 if self._rows is None else len(self._rows)

    def _live_rows(self) -> list[list[int]]:
        if self._rows is None:
            raise RuntimeError("batch is closed")
        return self._rows

    def _extend(self, tokens: Sequence[int]) -> None:
        rows = self._live_rows()
        if len(tokens) != len(rows):
            raise ValueError(f"append() needs one token per row ({self.rows}), got {len(tokens)}")
        for row, t in zip(rows, tokens, strict=True):
            row.append(int(t))
