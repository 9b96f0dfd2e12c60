"""``dpicl`` with a chat-capable fake engine registered as ``fake-chat``, for the Batch API
and fault tests: ``python -m tests.proxy.fake_server serve --engine fake-chat ...`` (see
:class:`devtools.server.Server`'s ``entry``).

Test-only holds (environment variables of the server process; nothing in ``proxy/`` reads
them). Each hold waits while its file exists and, on reaching it, creates ``FILE.reached``,
so a test can stop the server at a point it chooses (then cancel, or SIGKILL it) without
relying on timing:

``DPICL_FAKE_HOLD_FILE`` and ``DPICL_FAKE_HOLD_AFTER=k``
    the engine's (k+1)-th and later ``start`` calls (private batches, and the step loop's)
    wait: a Batch API chunk, or a demonstration job's first engine call.
``DPICL_FAKE_STEP_HOLD_FILE``
    every decode step of a continuous-batching serving batch waits (after its first token
    was handed out): a stream stops after its first token.
``DPICL_FAKE_ADMISSION_HOLD_FILE``
    an admission transaction waits right after appending its charge, before it commits.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dp_decoding.engines import register_engine
from dp_decoding.engines.fake import FakeBatch, FakeEngine, FakeServingBatch

MODEL = "fake-model"


def hold(path: str | None) -> None:
    """Wait while ``path`` exists, after creating ``path + '.reached'`` (no-op for None)."""
    if not path or not os.path.exists(path):
        return
    Path(path + ".reached").touch()
    while os.path.exists(path):
        time.sleep(0.05)


class HeldServingBatch(FakeServingBatch):
    """A serving batch whose decode steps wait on ``DPICL_FAKE_STEP_HOLD_FILE``."""

    def append(self, tokens: Sequence[int]) -> None:
        hold(os.environ.get("DPICL_FAKE_STEP_HOLD_FILE"))
        super().append(tokens)


class ChatFakeEngine(FakeEngine):
    """:class:`FakeEngine` with a chat template (``role: content`` lines) and the holds."""

    name = MODEL

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize("".join(f"{m['role']}: {m['content']}\n" for m in messages))

    def start(self, prompts: Sequence[Sequence[int]], *, width: int | None = None) -> FakeBatch:
        self.starts += 1
        if self.starts > int(os.environ.get("DPICL_FAKE_HOLD_AFTER", "0")):
            hold(os.environ.get("DPICL_FAKE_HOLD_FILE"))
        return super().start(prompts, width=width)

    def start_serving(self, prompts: Sequence[Sequence[int]]) -> FakeServingBatch:
        self.serving_started.append([list(p) for p in prompts])
        return HeldServingBatch(self, prompts)


def _hold_admissions(path: str) -> None:
    """Make every ledger append wait on ``path`` inside its (uncommitted) transaction."""
    from proxy.storage import ledger

    append: Callable[..., None] = ledger.append

    def held_append(*args: Any, **kwargs: Any) -> None:
        append(*args, **kwargs)
        hold(path)

    ledger.append = held_append  # test-only wrapper with the same call


def main() -> int:
    from proxy.cli import main as dpicl

    register_engine("fake-chat", ChatFakeEngine)
    admission_hold = os.environ.get("DPICL_FAKE_ADMISSION_HOLD_FILE")
    if admission_hold:
        _hold_admissions(admission_hold)
    return dpicl()


if __name__ == "__main__":
    sys.exit(main())
