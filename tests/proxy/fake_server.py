"""``dpicl`` with a chat-capable fake engine registered as ``fake-chat``, for the Batch API
tests: ``python -m tests.proxy.fake_server serve --engine fake-chat ...`` (see
:class:`devtools.server.Server`'s ``entry``).

``DPICL_FAKE_HOLD_FILE`` and ``DPICL_FAKE_HOLD_AFTER=k``: the engine's (k+1)-th and later
``start`` calls wait while that file exists, so a test can stop a batch between two chunks
at a point it chooses (then cancel it, or kill the server) without relying on timing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from dp_decoding.engines import register_engine
from dp_decoding.engines.fake import FakeBatch, FakeEngine

MODEL = "fake-model"


class ChatFakeEngine(FakeEngine):
    """:class:`FakeEngine` with a chat template (``role: content`` lines) and the hold."""

    name = MODEL

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize("".join(f"{m['role']}: {m['content']}\n" for m in messages))

    def start(self, prompts: Sequence[Sequence[int]], *, width: int | None = None) -> FakeBatch:
        self.starts += 1
        hold = os.environ.get("DPICL_FAKE_HOLD_FILE")
        if hold and self.starts > int(os.environ.get("DPICL_FAKE_HOLD_AFTER", "0")):
            while os.path.exists(hold):
                time.sleep(0.05)
        return super().start(prompts, width=width)


def main() -> int:
    from proxy.cli import main as dpicl

    register_engine("fake-chat", ChatFakeEngine)
    return dpicl()


if __name__ == "__main__":
    sys.exit(main())
