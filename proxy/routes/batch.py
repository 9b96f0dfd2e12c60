"""Reserved for OpenAI's batch API: ``/v1/files`` and ``/v1/batches``.

No routes yet. When they come, they go on this router (already included by
:func:`proxy.app.create_app`), take their collaborators from
:func:`proxy.context.get_context` and their caller from :func:`proxy.auth.require_key`, and
answer chat/completions lines through :class:`proxy.responses.Reply`, so a batched line's body
is byte for byte the body the online route would have returned. Batch lines are serving work:
they see released demonstrations only and never spend privacy budget.
"""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["router"]

router = APIRouter()
