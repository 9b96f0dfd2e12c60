"""``dpicl classify``: a batch from the shell, in-process, with a progress bar and resumability.

``dpicl classify --data in.jsonl --model NAME --out out.jsonl`` answers every line of
``in.jsonl`` with the same code the Batch API runs (:func:`proxy.batches.run_lines`: lines
validated up front, then generated many rows per engine call) and appends OpenAI's output lines
(``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``, errors
included) to ``out.jsonl`` as they complete. A line of ``in.jsonl`` is either a Batch API
request line (``custom_id``, ``url``, ``body``; ``method`` and ``url`` may be left out: POST
to chat completions) or a text to classify, ``{"text": ..., "custom_id"?: ...}``, asked as
one user message at temperature 0. ``--model`` names every line's model: the base model, or
a released demonstration set of the tenant whose API key ``--key`` (or ``$DPICL_API_KEY``)
gives. Rerunning with the same ``--out`` skips the lines whose ``custom_id`` is already there
(a line cut short by an interruption is dropped and answered again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when the command runs: `dpicl --help` loads none of the server
    from proxy.batch_input import InputLine
    from proxy.context import AppContext
    from proxy.storage.batches import LineResult
    from proxy.store import ApiKey

__all__ = ["classify", "done_ids", "local_key", "read_requests", "register"]


def local_key() -> ApiKey:
    """The caller when no key is given: a key of no tenant, which sees the base model only."""
    from proxy.store import ApiKey

    return ApiKey(
        id="local",
        tenant_id="",
        scope="serving",
        name="dpicl classify",
        epsilon_cap=None,
        prefix="",
    )


def register(sub: Any, db_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``classify`` to the ``dpicl`` subcommands (``db_arg`` adds the CLI's ``--db``)."""
    p = sub.add_parser(
        "classify",
        help="answer a JSONL file of requests or texts in-process (the Batch API's work)",
        description="Answer every line of --data (Batch API request lines, or texts as "
        '{"text": ...}) with the code the Batch API runs, many lines per engine call, and '
        "append the Batch API's output lines to --out as they complete. --model is every "
        "line's model: the base model, or a released demonstration set of the tenant of "
        "--key. A rerun skips the custom_ids already in --out.",
    )
    p.add_argument("--data", required=True, type=Path, help="input JSONL (requests or texts)")
    p.add_argument("--model", required=True, help="the model every line is sent to")
    p.add_argument("--out", required=True, type=Path, help="output JSONL (appended; resumable)")
    p.add_argument(
        "--key",
        default=os.environ.get("DPICL_API_KEY"),
        help="the tenant's API key, needed for a demonstration set (default $DPICL_API_KEY)",
    )
    db_arg(p)
    p.add_argument("--engine", default="embedded", help="engine name (default embedded)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (embedded engine)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of a text line")
    p.add_argument("--chunk-lines", type=int, default=None, help="lines per engine batch")
    p.set_defaults(func=_cmd_classify)


def read_requests(
    data: bytes, model: str, max_tokens: int
) -> tuple[list[InputLine], list[dict[str, Any]]]:
    """The requests of ``data`` (text lines become chat requests), every body's ``model`` set
    to ``model``; and the validation errors (line numbers), as for a batch."""
    from proxy.answering import CHAT_ENDPOINT
    from proxy.batch_input import dumps, parse_input

    out: list[str] = []
    for number, raw in enumerate(data.decode("utf-8", errors="replace").split("\n"), start=1):
        try:
            obj = json.loads(raw) if raw.strip() else None
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "body" not in obj and isinstance(obj.get("text"), str):
            obj = {
                "custom_id": str(obj.get("custom_id", obj.get("id", f"line-{number}"))),
                "body": {
                    "messages": [{"role": "user", "content": obj["text"]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            }
        if isinstance(obj, dict) and isinstance(obj.get("body"), dict):
            obj["body"] = {**obj["body"], "model": model}
            obj.setdefault("url", CHAT_ENDPOINT)
            raw = dumps(obj)
        out.append(raw)
    return parse_input("\n".join(out).encode("utf-8"), None)


def done_ids(out: Path) -> set[str]:
    """The ``custom_id`` of every complete line of ``out``; a trailing partial line (an
    interrupted write) is cut off the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1
    ids: set[str] = set()
    for number, raw in enumerate(data[:keep].split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            ids.add(str(json.loads(raw)["custom_id"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"line {number} of the output file is not an output line") from None
    if keep != len(data):
        with out.open("r+b") as f:
            f.truncate(keep)
    return ids


def classify(
    context: AppContext,
    key: ApiKey,
    lines: list[InputLine],
    out: Path,
    *,
    chunk_lines: int | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> tuple[int, int]:
    """Answer the lines not already in ``out``, appending each result as it completes;
    returns (answered now, of which failed). ``progress(done, total)`` makes the bar."""
    from proxy.batches import CHUNK_LINES, run_lines

    done = done_ids(out)
    todo = [line for line in lines if line.custom_id not in done]
    counts = [0, 0]
    bar = progress(len(lines) - len(todo), len(lines)) if progress else None
    with out.open("a", encoding="utf-8") as f:

        def write(result: LineResult) -> None:
            f.write(result.text + "\n")
            f.flush()
            counts[0] += 1
            counts[1] += 0 if result.ok else 1
            if bar is not None:
                bar.update(1)

        # a line's stable name (for a charged model: its idempotency key) is the output file's
        # path and its custom_id, so a rerun into the same file finds a charged line's answer
        where = str(out.resolve())
        run_lines(
            context,
            key,
            todo,
            write,
            chunk_lines=chunk_lines or CHUNK_LINES,
            ref=lambda line: f"classify:{where}:{line.custom_id}",
        )
    if bar is not None:
        bar.close()
    return counts[0], counts[1]


def _cmd_classify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dp_decoding.engines import load_engine
    from proxy.backends import backend_for
    from proxy.context import AppContext
    from proxy.metrics import Metrics
    from proxy.store import StorageError, Store

    lines, errors = read_requests(args.data.read_bytes(), args.model, args.max_tokens)
    try:
        done_ids(args.out)
    except ValueError as exc:
        errors.append({"message": str(exc)})
    if errors:
        for e in errors:
            print(f"dpicl: error: {e['message']}", file=sys.stderr)
        return 2
    try:
        store = Store.open(args.db)
    except StorageError as exc:
        print(f"dpicl: error: cannot open the database ({exc})", file=sys.stderr)
        return 2
    key = local_key()
    if args.key:
        found = store.authenticate(args.key)
        if found is None:
            print("dpicl: error: unknown API key", file=sys.stderr)
            return 2
        key = found
    kwargs = {"threads": args.threads} if args.threads and args.engine == "embedded" else {}
    engine = load_engine(args.engine, **kwargs)
    backend = backend_for(engine)
    context = AppContext(store, engine, Metrics(), backend, None, engine.name)

    def bar(initial: int, total: int) -> Any:
        return tqdm(total=total, initial=initial, unit="line", file=sys.stderr)

    answered, failed = classify(
        context, key, lines, args.out, chunk_lines=args.chunk_lines, progress=bar
    )
    close = getattr(backend, "close", None)
    if close is not None:
        close()
    print(f"dpicl: {answered} line(s) answered ({failed} failed) into {args.out}", file=sys.stderr)
    return 0
