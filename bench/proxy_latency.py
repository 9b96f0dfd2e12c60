"""Part 1 of the proxy benchmark: a chat completion through ``dpicl serve`` vs in-process.

Invariant: both sides generate from the same chat-templated prompt ids with the same sampling
parameters (a differing prompt token count aborts the run), and they never run at once:
requests alternate in blocks, each block behind the idle gate and redone (up to ``retries``
times) when other processes used more than FOREIGN_LIMIT of the CPU.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy_timing import FOREIGN_LIMIT, IdleGate, log, ms, pct, pctl

from devtools.machine import CpuWatch
from devtools.server import Server

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionUserMessageParam

    from dp_decoding.engines.embedded import EmbeddedEngine

__all__ = ["LONG_MESSAGES", "LONG_PROMPT", "OverheadResult", "run_overhead"]

# A request that greedy decoding does not finish within 16 tokens (checked: every completion's
# token count and finish_reason are recorded and reported).
LONG_PROMPT = (
    "Write a long, detailed essay about the history of the Roman Empire, "
    "from its founding to its fall."
)
LONG_MESSAGES: list[ChatCompletionUserMessageParam] = [{"role": "user", "content": LONG_PROMPT}]


@dataclass
class OverheadResult:
    proxy: list[float] = field(default_factory=list)
    inproc: list[float] = field(default_factory=list)
    proxy_tokens: Counter[int] = field(default_factory=Counter)
    inproc_tokens: Counter[int] = field(default_factory=Counter)
    proxy_finish: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    same_text: bool = True
    sample_text: str = ""
    warm_proxy: list[float] = field(default_factory=list)
    warm_inproc: list[float] = field(default_factory=list)
    redone: int = 0
    foreign_max: float = 0.0


def run_overhead(
    server: Server,
    api_key: str,
    engine: EmbeddedEngine,
    n: int,
    warmup: int,
    block: int,
    max_tokens: int,
    gate: IdleGate,
    retries: int,
) -> OverheadResult:
    from openai import OpenAI

    from proxy import serving

    res = OverheadResult()
    client = OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=120)
    prompt_ids = engine.apply_chat_template([{"role": "user", "content": LONG_PROMPT}])
    res.prompt_tokens = len(prompt_ids)

    def proxy_once() -> tuple[float, str]:
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model=engine.name,
            messages=LONG_MESSAGES,
            temperature=0,
            max_tokens=max_tokens,
        )
        dt_s = time.perf_counter() - t0
        assert r.usage is not None
        res.proxy_tokens[r.usage.completion_tokens] += 1
        res.proxy_finish[str(r.choices[0].finish_reason)] += 1
        if r.usage.prompt_tokens != len(prompt_ids):
            raise RuntimeError(
                f"server templated {r.usage.prompt_tokens} prompt tokens, we have "
                f"{len(prompt_ids)}: the comparison would not be like for like"
            )
        return dt_s, r.choices[0].message.content or ""

    def inproc_once() -> tuple[float, str]:
        params = serving.SamplingParams(max_tokens=max_tokens, temperature=0.0)
        t0 = time.perf_counter()
        text, count = "", 0
        for ev in serving.generate(engine, prompt_ids, params):
            text += ev.delta
            count += 1
        dt_s = time.perf_counter() - t0
        res.inproc_tokens[count] += 1
        return dt_s, text

    log(f"overhead: warm-up ({warmup} each)")
    texts_p, texts_i = set(), set()
    for _ in range(warmup):
        t, text = proxy_once()
        res.warm_proxy.append(t)
        texts_p.add(text)
        t, text = inproc_once()
        res.warm_inproc.append(t)
        texts_i.add(text)
    log(
        "overhead: warm-up latencies (ms): proxy "
        + ", ".join(ms(t) for t in res.warm_proxy)
        + "; in-process "
        + ", ".join(ms(t) for t in res.warm_inproc)
    )
    res.proxy_tokens.clear()
    res.inproc_tokens.clear()
    res.proxy_finish.clear()
    log(f"overhead: {n} proxy + {n} in-process requests, alternating blocks of {block}")

    def run_block(name: str, once: Any, sink: list[float], texts: set[str]) -> None:
        k = min(block, n - len(sink))
        if k <= 0:
            return
        for attempt in range(retries + 1):
            gate.wait(f"overhead[{name}]")
            with CpuWatch(gate.pids) as watch:
                got = [once() for _ in range(k)]
            if not watch.foreign > FOREIGN_LIMIT or attempt == retries or gate.exhausted:
                break
            res.redone += 1
            log(f"overhead[{name}]: others used {pct(watch.foreign)} of the CPU; redoing block")
        res.foreign_max = max(res.foreign_max, watch.foreign)
        sink.extend(t for t, _ in got)
        texts.update(text for _, text in got)

    while len(res.proxy) < n or len(res.inproc) < n:
        run_block("proxy", proxy_once, res.proxy, texts_p)
        run_block("in-process", inproc_once, res.inproc, texts_i)
        log(
            f"  proxy p50 {ms(pctl(res.proxy, 50))} ms ({len(res.proxy)}), "
            f"in-process p50 {ms(pctl(res.inproc, 50))} ms ({len(res.inproc)})"
        )
    res.same_text = texts_p == texts_i and len(texts_p) == 1
    res.sample_text = next(iter(texts_p)) if texts_p else ""
    if not res.same_text:
        log(f"overhead: WARNING texts differ: proxy {texts_p!r} vs in-process {texts_i!r}")
    return res
