"""Tests of the prompts package: wording, layout invariants, determinism, label words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prompts
from prompts import (
    STOP_STRINGS,
    TASKS,
    TaskFormat,
    answer_prompt,
    chat_messages,
    clean_demonstration,
    demonstrations_system_prompt,
    first_words_distinct,
    format_example,
    generation_prompt,
    generation_suffix,
    generic_task,
    get_task,
    label_from_answer,
    label_word,
    public_generation_prompt,
    truncate_words,
)

DATA = Path(__file__).parents[2] / ".." / "shared" / "data"
DATA_DIRS = {
    "agnews": "agnews",
    "dbpedia": "dbpedia",
    "trec": "trec",
    "mit-g": "slot-movies/genre",
    "mit-d": "slot-movies/director",
}
CLASSIFICATION = [name for name, t in TASKS.items() if t.kind == "classification"]
EXTRACTION = [name for name, t in TASKS.items() if t.kind == "extraction"]

# single-line texts without surrounding whitespace: the form prompts show them in
line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=40
).map(str.strip)
any_text = st.text(max_size=40)


def _example_label(task: TaskFormat, i: int) -> str:
    return task.labels[i % len(task.labels)] if task.labels else f"span {i}"


def _sample(task: TaskFormat, label: str, texts: list[str]) -> list:
    if task.kind == "extraction":
        return [(text, f"span{i}") for i, text in enumerate(texts)]
    return texts


def test_five_tasks_and_names() -> None:
    assert set(TASKS) == {"agnews", "dbpedia", "trec", "mit-g", "mit-d"}
    for name, task in TASKS.items():
        assert task.name == name
        assert get_task(name) is task
        assert get_task(name.upper()) is task
    assert get_task("MIT_G") is TASKS["mit-g"]


def test_get_task_unknown_raises_value_error() -> None:
    with pytest.raises(ValueError, match="agnews"):
        get_task("sst2")
    with pytest.raises(ValueError, match="generic_task"):
        get_task("generic")


def test_reference_wording() -> None:
    ag = TASKS["agnews"]
    assert ag.labels == ("World", "Sports", "Business", "Sci/Tech")
    assert ag.label_words["Sci/Tech"] == "Technology"
    assert ag.gen_instruction == (
        "Given a label of news type, generate the chosen type of news accordingly.\n\n"
    )
    assert ag.cls_instruction == (
        "Classify the news articles into the categories of World, Sports, Business, and "
        "Technology.\n\n"
    )
    assert (ag.gen_label_field, ag.gen_text_field) == ("News Type", "Text")
    assert (ag.cls_input_field, ag.cls_answer_field) == ("Article", "Answer")
    assert TASKS["trec"].labels == (
        "Abbreviation",
        "Entity",
        "Description",
        "Person",
        "Location",
        "Number",
    )
    assert TASKS["dbpedia"].labels[:2] == ("Company", "EducationalInstitution")
    assert TASKS["dbpedia"].label_words["OfficeHolder"] == "Politician"
    g, d = TASKS["mit-g"], TASKS["mit-d"]
    assert g.kind == d.kind == "extraction"
    assert g.labels == () and dict(g.label_words) == {}
    assert "property of Genre" in g.gen_instruction and "propety" not in g.gen_instruction
    assert (g.gen_label_field, g.gen_text_field) == ("Genre", "Sentence")
    assert (d.cls_input_field, d.cls_answer_field) == ("Sentence", "Director")
    assert g.cls_instruction == ""


def test_task_format_is_immutable_and_hashable() -> None:
    ag = TASKS["agnews"]
    with pytest.raises(AttributeError):
        ag.name = "x"  # type: ignore[misc]  # writing a frozen field on purpose
    with pytest.raises(TypeError):
        ag.label_words["World"] = "x"  # type: ignore[index]  # a read-only mapping, on purpose
    assert hash(ag) == hash(get_task("agnews"))


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_label_words_first_word_distinct(name: str) -> None:
    task = TASKS[name]
    firsts = [w.split()[0].lower() for w in task.label_words.values()]
    assert len(set(firsts)) == len(firsts)
    assert first_words_distinct(task)
    assert set(task.label_words) == set(task.labels)


def test_first_words_distinct_detects_clash() -> None:
    assert not first_words_distinct(generic_task(["very good", "very bad"]))
    assert not first_words_distinct(generic_task(["Art", "Artist"]))
    assert first_words_distinct(generic_task(["good", "bad"]))


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_data_labels_have_label_words(name: str) -> None:
    path = DATA / DATA_DIRS[name] / "train.jsonl"
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    task = TASKS[name]
    with path.open(encoding="utf-8") as f:
        seen = {json.loads(line)["label"] for line in f if line.strip()}
    assert seen == set(task.labels)
    for label in seen:
        assert label_word(task, label) == task.label_words[label]


@pytest.mark.parametrize("name", EXTRACTION)
def test_extraction_data_readable(name: str) -> None:
    path = DATA / DATA_DIRS[name] / "train.jsonl"
    if not path.exists():
        pytest.skip(f"shared data missing: {path}")
    task = TASKS[name]
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(5)]
    prompt = generation_prompt(task, "comedy", [(r["text"], r["label"]) for r in rows])
    for r in rows:
        assert prompt.count(format_example(task, r["label"], r["text"])) == 1
    assert prompt.endswith(
        public_generation_prompt(task, "comedy").removeprefix(task.gen_instruction)
    )


@pytest.mark.parametrize("name", list(TASKS))
@settings(max_examples=40, deadline=None)
@given(texts=st.lists(line_text, max_size=6), data=st.data())
def test_generation_prompt_layout(name: str, texts: list[str], data: st.DataObject) -> None:
    task = TASKS[name]
    label = data.draw(st.sampled_from(task.labels)) if task.labels else data.draw(line_text)
    # unique markers so that "exactly once" is about these texts, not chance substrings
    texts = [f"<<{i}>> {t}".strip() for i, t in enumerate(texts)]
    examples = _sample(task, label, texts)
    prompt = generation_prompt(task, label, examples)
    public = public_generation_prompt(task, label)
    suffix = generation_suffix(task, label)
    assert prompt == generation_prompt(task, label, list(examples))  # deterministic
    assert public == generation_prompt(task, label, [])
    assert public == task.gen_instruction + suffix
    assert prompt.startswith(task.gen_instruction)
    assert prompt.endswith(suffix)
    assert suffix.endswith(f"{task.gen_text_field}:")
    assert not prompt.endswith(" ")
    for i, text in enumerate(texts):
        assert prompt.count(f"<<{i}>>") == 1
        assert text in prompt
    blocks = [
        format_example(task, ex[1], ex[0])
        if isinstance(ex, tuple)
        else format_example(task, label, ex)
        for ex in examples
    ]
    middle = prompt.removeprefix(task.gen_instruction).removesuffix(suffix)
    assert middle == "".join(b + "\n" for b in blocks)
    for block in blocks:
        assert block.count("\n") == 2 and block.endswith("\n")


@given(text=any_text)
def test_private_text_is_one_line(text: str) -> None:
    task = TASKS["agnews"]
    block = format_example(task, "World", text)
    assert block.count("\n") == 2
    prompt = generation_prompt(task, "World", [text])
    assert prompt.count("\n") == public_generation_prompt(task, "World").count("\n") + 3


def test_format_example_shape() -> None:
    assert format_example(TASKS["agnews"], "Sci/Tech", "Chips get faster") == (
        "News Type: Technology\nText: Chips get faster\n"
    )
    assert format_example(TASKS["mit-d"], "john woo", "a film by john woo") == (
        "Director: john woo\nSentence: a film by john woo\n"
    )
    assert public_generation_prompt(TASKS["trec"], "Number").endswith(
        "\n\nAnswer Type: Number\nText:"
    )


def test_generation_prompt_rejects_mixed_labels_and_bare_extraction_texts() -> None:
    with pytest.raises(ValueError):
        generation_prompt(TASKS["agnews"], "World", [("text", "Sports")])
    assert generation_prompt(TASKS["agnews"], "Sci/Tech", [("t", "Technology")]).count("t\n") == 1
    with pytest.raises(ValueError):
        generation_prompt(TASKS["mit-g"], "comedy", ["a sentence"])
    with pytest.raises(ValueError):
        generation_prompt(TASKS["agnews"], "Nope", [])
    with pytest.raises(ValueError):
        generation_prompt(TASKS["agnews"], "World", "one string")


@pytest.mark.parametrize("name", list(TASKS))
@settings(max_examples=30, deadline=None)
@given(pairs=st.lists(st.tuples(line_text, st.integers(0, 20)), max_size=5), query=line_text)
def test_answer_prompt_shape(name: str, pairs: list[tuple[str, int]], query: str) -> None:
    task = TASKS[name]
    demos = [(text, _example_label(task, i)) for text, i in pairs]
    prompt = answer_prompt(task, demos, query)
    assert prompt == answer_prompt(task, list(demos), query)
    expected = task.cls_instruction
    for text, label in demos:
        expected += f"{task.cls_input_field}: {text}\n{task.cls_answer_field}: {label_word(task, label)}\n\n"
    expected += f"{task.cls_input_field}: {query}\n{task.cls_answer_field}:"
    assert prompt == expected
    assert prompt.endswith(f"\n{task.cls_answer_field}:")


def test_answer_prompt_examples() -> None:
    ag = TASKS["agnews"]
    assert answer_prompt(ag, [("Chips", "Sci/Tech"), ("Goal", "Sports")], "Oil up") == (
        "Classify the news articles into the categories of World, Sports, Business, and "
        "Technology.\n\nArticle: Chips\nAnswer: Technology\n\nArticle: Goal\nAnswer: Sports\n\n"
        "Article: Oil up\nAnswer:"
    )
    assert answer_prompt(TASKS["mit-g"], [("a scary horror film", "horror")], "a comedy") == (
        "Sentence: a scary horror film\nGenre: horror\n\nSentence: a comedy\nGenre:"
    )


@pytest.mark.parametrize("name", list(TASKS))
@settings(max_examples=20, deadline=None)
@given(pairs=st.lists(st.tuples(line_text, st.integers(0, 20)), max_size=5), query=line_text)
def test_chat_messages_structure(name: str, pairs: list[tuple[str, int]], query: str) -> None:
    task = TASKS[name]
    demos = [(text, _example_label(task, i)) for text, i in pairs]
    messages = chat_messages(task, demos, query)
    assert messages == chat_messages(task, demos, query)
    assert messages[0]["role"] == "system" and messages[0]["content"]
    roles = [m["role"] for m in messages[1:]]
    assert roles == ["user", "assistant"] * len(demos) + ["user"]
    assert messages[-1] == {"role": "user", "content": f"{task.cls_input_field}: {query}"}
    for (text, label), user, bot in zip(demos, messages[1::2], messages[2::2], strict=False):
        assert user["content"] == f"{task.cls_input_field}: {text}"
        assert bot["content"] == label_word(task, label)
    assert all(set(m) == {"role", "content"} for m in messages)


def test_chat_system_lists_label_words() -> None:
    system = chat_messages(TASKS["agnews"], [], "q")[0]["content"]
    assert system.startswith("Classify the news articles")
    for word in ("World", "Sports", "Business", "Technology"):
        assert word in system


def test_demonstrations_system_prompt() -> None:
    demos = [("Chips get faster", "Sci/Tech"), ("Goal!", "Sports")]
    plain = demonstrations_system_prompt(demos)
    assert plain == (
        "Here are labelled examples:\n\nInput: Chips get faster\nAnswer: Sci/Tech\n\n"
        "Input: Goal!\nAnswer: Sports"
    )
    with_task = demonstrations_system_prompt(demos, TASKS["agnews"])
    assert with_task.startswith(TASKS["agnews"].cls_instruction + "Here are labelled examples:")
    assert "Article: Chips get faster\nAnswer: Technology" in with_task
    assert with_task == demonstrations_system_prompt(list(demos), TASKS["agnews"])
    mit = demonstrations_system_prompt([("a comedy", "comedy")], TASKS["mit-g"])
    assert mit == "Here are labelled examples:\n\nSentence: a comedy\nGenre: comedy"
    with pytest.raises(ValueError):
        demonstrations_system_prompt([])


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (" Stocks fall on oil.\nNews Type: World", "Stocks fall on oil."),
        (' "Stocks fall on oil."\n', "Stocks fall on oil."),
        (' "Stocks fall on oil.', "Stocks fall on oil."),
        ('Stocks fall on oil." \n', "Stocks fall on oil."),
        ("  \u201cCurly quoted\u201d  ", "Curly quoted"),
        ("'single'", "single"),
        ('"He said "hi"', '"He said "hi"'),  # ambiguous: kept
        ('"Hi" he said', '"Hi" he said'),
        ("the players'", "the players'"),
        ("\nsecond line", ""),
        ("", ""),
        ("a\r\nb", "a"),
        ('""', ""),
    ],
)
def test_clean_demonstration_cases(raw: str, clean: str) -> None:
    assert clean_demonstration(raw) == clean


@given(any_text)
def test_clean_demonstration_properties(raw: str) -> None:
    out = clean_demonstration(raw)
    assert clean_demonstration(out) == out
    assert out == out.strip()
    assert not any(stop in out for stop in STOP_STRINGS)
    assert "\r" not in out


def test_stop_strings() -> None:
    assert STOP_STRINGS == ("\n",)


@given(text=any_text, n=st.integers(0, 12))
def test_truncate_words(text: str, n: int) -> None:
    out = truncate_words(text, n)
    assert len(out.split()) == min(n, len(text.split()))
    assert text.startswith(out)
    assert out.split() == text.split()[:n]
    if len(text.split()) <= n:
        assert out == text


def test_truncate_words_negative() -> None:
    with pytest.raises(ValueError):
        truncate_words("a b", -1)
    assert truncate_words("a  b c", 2) == "a  b"


def test_generic_task() -> None:
    task = generic_task(["positive", "negative"])
    assert task.name == "generic" and task.kind == "classification"
    assert task.labels == ("positive", "negative")
    assert dict(task.label_words) == {"positive": "positive", "negative": "negative"}
    assert task.gen_instruction == "Given a label, write a new example with that label.\n\n"
    assert (task.gen_label_field, task.gen_text_field) == ("Label", "Text")
    assert (task.cls_input_field, task.cls_answer_field) == ("Input", "Answer")
    assert public_generation_prompt(task, "positive").endswith("Label: positive\nText:")
    assert answer_prompt(task, [("great", "positive")], "bad").endswith(
        "Input: great\nAnswer: positive\n\nInput: bad\nAnswer:"
    )
    assert generic_task(["positive", "negative"]) == task
    for bad in ([], ["a", "a"], ["a\nb"], [" a"], [""], "ab"):
        with pytest.raises(ValueError):
            generic_task(bad)


def test_task_format_validation() -> None:
    ag = TASKS["agnews"]
    fields = {f: getattr(ag, f) for f in TaskFormat.__dataclass_fields__}
    with pytest.raises(ValueError):
        TaskFormat(**{**fields, "label_words": {"World": "World"}})
    with pytest.raises(ValueError):
        TaskFormat(**{**fields, "label_words": dict.fromkeys(ag.labels, "Same")})
    with pytest.raises(ValueError):
        TaskFormat(**{**fields, "kind": "extraction"})
    with pytest.raises(ValueError):
        TaskFormat(**{**fields, "gen_instruction": "no blank line"})
    assert TaskFormat(**fields) == ag


def test_label_from_answer() -> None:
    ag = TASKS["agnews"]
    assert label_from_answer(ag, " Technology\n") == "Sci/Tech"
    assert label_from_answer(ag, " sports.") == "Sports"
    assert label_from_answer(ag, " Weather") is None
    assert label_from_answer(ag, "") is None
    assert label_from_answer(TASKS["mit-d"], " john woo\nSentence: x") == "john woo"


def test_package_is_stdlib_only() -> None:
    import ast
    import sys

    root = Path(prompts.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top == "prompts" or top in sys.stdlib_module_names, (path.name, name)
