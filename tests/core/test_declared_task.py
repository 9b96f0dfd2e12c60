"""A declared task for custom data (issue 15): the description and label words reach every
prompt path (generation private and public, answer and chat, the serving prompt, the eval's
rows), are refused when malformed (PlanError / exit 2 / 400), are part of the stored plan and of
demos.json; ``plan`` warns without a description and prints an estimate before the job."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from dp_decoding.generate import DemoGenerator
from dp_decoding.generation.estimate import count, describe, warm_up
from dp_decoding.plan import DEFAULTS, Plan, PlanError, make_plan
from dp_decoding.rows import RowBuilder
from prompts import (
    answer_prompt,
    chat_messages,
    demonstrations_system_prompt,
    generation_prompt,
    generic_task,
    public_generation_prompt,
    task_from_declaration,
    task_of_plan,
)
from tests.core.test_cli import dpicl
from tests.fakes import FakeEngine, two_label_records

DESC = "A short movie review"
WORDS = {"A": "positive", "B": "negative"}
REPO = Path(__file__).resolve().parents[2]


def _plan(**kw: Any) -> Plan:
    base: dict[str, Any] = {"labels": ["A", "B"], "description": DESC, "label_words": WORDS}
    return make_plan(**{**base, "max_tokens": 3, "prompts": 2, **kw})


def _has(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def test_nothing_declared_is_the_generic_task() -> None:
    assert task_from_declaration(["A", "B"]) == generic_task(["A", "B"])
    assert _plan(description=None, label_words=None).prompt_task() == generic_task(["A", "B"])


def test_description_and_words_reach_every_text_prompt() -> None:
    task = _plan().prompt_task()
    prompts = [
        public_generation_prompt(task, "A"),
        generation_prompt(task, "A", ["a private text"]),
        answer_prompt(task, [("x", "A")], "query"),
        chat_messages(task, [("x", "A")], "query")[0]["content"],
        demonstrations_system_prompt([("x", "A")], task),
    ]
    for text in prompts:
        assert DESC + "." in text, text
        assert "positive" in text, text
    assert "Label: positive\nText:" in prompts[0]
    described = task_from_declaration(
        ["A", "B"],
        description=DESC,
        label_descriptions={"A": "the reviewer liked the film"},
        instruction="Is the review positive or negative?",
    )
    assert "A: the reviewer liked the film." in described.gen_instruction
    assert described.cls_instruction.endswith("Is the review positive or negative?\n\n")


def test_description_reaches_private_and_public_rows_and_the_declared_width() -> None:
    engine = FakeEngine()
    plan = _plan()
    DemoGenerator(engine, plan, plan.prompt_task()).run(two_label_records(8))
    needle = engine.tokenize(DESC + ".")
    word = engine.tokenize(" positive")
    rows = [row for batch in engine.started for row in batch]
    assert rows and all(_has(row, needle) for row in rows)
    assert any(_has(row, word) for row in rows)
    plain = _plan(description=None, label_words=None)
    w = RowBuilder(engine.tokenize, plan.prompt_task(), plan.labels, 96).width(2)
    w0 = RowBuilder(engine.tokenize, plain.prompt_task(), plain.labels, 96).width(2)
    assert w > w0  # a longer description is a wider declared row, still declared


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"description": "two\nlines"}, "one line"),
        ({"description": "   "}, "empty"),
        ({"description": "x" * 301}, "longer than"),
        ({"label_words": {"C": "other"}}, "not a declared label"),
        ({"label_words": {"A": "B"}}, "pairwise different"),
        ({"label_words": {"A": "pos\nitive"}}, "one line"),
        ({"label_words": {"A": ""}}, "empty"),
        ({"label_descriptions": {"A": "a\rb"}}, "one line"),
        ({"instruction": "x" * 301}, "longer than"),
        ({"task": "agnews", "labels": ["World"], "label_words": None}, "preset task"),
    ],
)
def test_malformed_declarations_are_refused(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(PlanError, match=needle):
        _plan(**kw)


def test_part_of_the_stored_plan() -> None:
    plan = _plan(label_descriptions={"B": "the reviewer did not"}, instruction="Classify.")
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["description"] == DESC and d["label_words"] == WORDS
    assert d["label_descriptions"] == {"B": "the reviewer did not"}
    assert Plan.from_dict(d) == plan
    assert task_of_plan(d) == plan.prompt_task()
    old = {k: v for k, v in d.items() if k not in ("description", "label_words")}
    old.pop("label_descriptions")
    old.pop("instruction")
    assert task_of_plan(old) == generic_task(["A", "B"])  # plans stored before still read


def test_estimate_counts_and_warm_up() -> None:
    engine = FakeEngine()
    plan = _plan(shots=3)
    est = count(plan, width=100, public_tokens=10)
    assert est.demonstrations == 6 and est.prefill_prompts == 6 * 2 + 6
    assert est.prefill_tokens == 12 * 100 + 6 * 10 and est.decode_tokens == 12 * 3 + 6 * 3
    timed = warm_up(engine, plan, est, 100, engine.tokenize("public prompt"))
    assert timed.seconds is not None and timed.seconds >= 0
    assert engine.widths[-1] == 100  # the warm-up runs at the declared width
    assert any("time on this engine" in line for line in describe(timed))


def test_defaults_are_the_documented_ones() -> None:
    """docs/results.md, "Defaults for a new task": chosen once, for every task."""
    plan = make_plan(labels=["A", "B"])
    assert (plan.mechanism, plan.public_prior, plan.regime, plan.candidates) == (
        "exponential",
        1.0,
        "fixed",
        "public-topk",
    )
    assert (plan.M, plan.N, plan.max_tokens, plan.top_k) == (12, 2, 20, 50)
    assert DEFAULTS["public_prior"] is None  # resolved per mechanism
    assert make_plan(labels=["A"], mechanism="gaussian").public_prior == 0.0


# -- command line ------------------------------------------------------------------------------
ENGINE = ("--engine", "fake")


@pytest.fixture(scope="module", autouse=True)
def _fake_engine_for_subprocesses(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``--engine fake`` in the CLI's subprocess: a sitecustomize registering the fake."""
    d = tmp_path_factory.mktemp("site")
    (d / "sitecustomize.py").write_text(
        "from dp_decoding.engines import register_engine\n"
        "from dp_decoding.engines.fake import FakeEngine\n"
        "register_engine('fake', lambda **kw: FakeEngine(), replace=True)\n"
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", f"{d}:{REPO}")
    yield
    mp.undo()


def test_cli_warns_without_a_description_and_prints_an_estimate() -> None:
    r = dpicl("plan", "--labels", "A,B", *ENGINE)
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "off-topic" in r.stderr
    assert "estimate" in r.stdout and "demonstrations" in r.stdout
    r = dpicl("plan", "--labels", "A,B", "--description", DESC, "--warmup", *ENGINE)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    assert "time on this engine" in r.stdout and DESC in r.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--description", "two\nlines"],
        ["--description", ""],
        ["--label-words", "C=other"],
        ["--label-words", "A"],
        ["--description", "x" * 400],
    ],
)
def test_cli_refuses_malformed_declarations(args: list[str]) -> None:
    r = dpicl("plan", "--labels", "A,B", *args, *ENGINE)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_task_file_and_demos_json(tmp_path: Path) -> None:
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"description": DESC, "label_words": WORDS}))
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"t {i}", "label": "AB"[i % 2]}) + "\n" for i in range(8))
    )
    out = tmp_path / "demos.json"
    r = dpicl(
        "generate", "--data", str(data), "--task-file", str(task), "--max-tokens", "3",
        "-M", "2", "--quiet", "--out", str(out), *ENGINE,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "estimate" in r.stderr and "tokens to decode" in r.stderr
    demos = json.loads(out.read_text())
    assert demos["plan"]["description"] == DESC and demos["plan"]["label_words"] == WORDS
    assert demos["plan"]["labels"] == ["A", "B"]  # the label words' keys, declared
    assert demos["task"]["description"] == DESC
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"description": DESC, "surprise": 1}))
    r = dpicl("plan", "--task-file", str(bad), *ENGINE)
    assert r.returncode == 2 and "unknown key" in r.stderr


# -- API ---------------------------------------------------------------------------------------
class _Engine(FakeEngine):
    name = "fake-model"

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenize("".join(m["content"] for m in messages))


def test_api_plan_job_and_serving_prompt_use_the_declaration(tmp_path: Path) -> None:
    from proxy.app import create_app
    from proxy.store import Store

    store = Store.open(f"sqlite:///{tmp_path / 'a.db'}")
    _, key = store.create_tenant("t", 8.0, 1e-6)
    engine = _Engine()
    app = create_app(store, engine, run_jobs=False)
    h = {"Authorization": f"Bearer {key}"}
    body = {"epsilon": 1.0, "max_tokens": 3, "description": DESC, "label_words": WORDS}

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            rows = "\n".join(json.dumps({"text": f"t{i}", "label": "AB"[i % 2]}) for i in range(6))
            ds = await c.post(
                "/v1/private/datasets",
                data={"name": "d"},
                headers=h,
                files={"file": ("d.jsonl", rows.encode())},
            )
            out = [await c.post("/v1/private/demonstrations/plan", headers=h, json=body)]
            for bad in (
                {"description": "a\nb"},
                {"labels": ["A", "B"], "label_words": {"C": "x"}},
                {"description": ""},
            ):
                out.append(
                    await c.post("/v1/private/demonstrations/plan", headers=h, json={**body, **bad})
                )
            job = await c.post(
                "/v1/private/demonstrations",
                headers=h,
                json={**body, "dataset": ds.json()["id"], "name": "reviews"},
            )
            store.update_job(
                job.json()["id"],
                status="succeeded",
                demonstrations=[{"text": "a fine film", "label": "A"}],
            )
            out.append(job)
            out.append(
                await c.post(
                    "/v1/completions",
                    headers=h,
                    json={"model": "reviews", "prompt": "q", "max_tokens": 1},
                )
            )
            return out

    plan, *bad, job, served = asyncio.run(go())
    assert plan.status_code == 200 and plan.json()["plan"]["description"] == DESC
    assert plan.json()["plan"]["labels"] == ["A", "B"]
    for r in bad:
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
    assert job.status_code == 200 and job.json()["plan"]["label_words"] == WORDS
    assert served.status_code == 200, served.text
    # serving rows: continuous batching starts them with start_serving (recorded apart)
    served_rows = [row for batch in engine.started + engine.serving_started for row in batch]
    assert any(_has(row, engine.tokenize(DESC + ".")) for row in served_rows)
    assert any(_has(row, engine.tokenize("Answer: positive")) for row in served_rows)
    store.close()


# -- evaluation --------------------------------------------------------------------------------
def test_eval_rows_use_their_prompts_and_are_keyed_by_the_declaration(tmp_path: Path) -> None:
    from evaluation.declared import DECLARED, method_format
    from evaluation.runner import EvalConfig, cells_for
    from evaluation.tasks import EVAL_TASKS
    from prompts import get_task

    preset = get_task("dbpedia")
    described = method_format("described", "dbpedia", preset)
    assert described.labels == preset.labels
    assert DECLARED["dbpedia"]["description"] in described.gen_instruction
    assert method_format("generic", "dbpedia", preset) == generic_task(preset.labels)
    assert method_format("preset", "dbpedia", preset) is preset
    mit = method_format("described", "mit-g", get_task("mit-g"))
    assert mit.kind == "extraction" and mit.cls_answer_field == "Genre"
    cfg = EvalConfig(
        ["dbpedia"], tmp_path, [4.0], 1, 10, [4], tmp_path, methods=["generic", "described"]
    )
    cells = {c["method"]: c for c in cells_for(cfg, EVAL_TASKS["dbpedia"])}
    assert cells["described"]["declaration"] == DECLARED["dbpedia"]
    assert "declaration" not in cells["generic"] and cells["generic"]["prompts"] == "generic"
    assert cells["described"]["settings"]["M"] == DEFAULTS["prompts"]
