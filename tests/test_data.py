"""InstructionDataModule: formats, templates, exact label masks, caching, padding, splits and every bad input.

Expected prompts are written out here by hand (not taken from distillens.data), and label checks decode the
tokens back to text, so a wrong template, boundary or mask fails whatever the implementation does.
"""

from __future__ import annotations

import codecs
import csv
import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

import distillens.data as data_module
import distillens.data.formats as formats_code
import distillens.data.pipeline as pipeline_code
import distillens.data.sources as sources_code
from distillens.data import InstructionDataModule, SplitStats

ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhat is the capital?\n\n### Input:\nFrance is in Europe.\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a colour.\n\n### Response:\n"
)
SMOLLM2_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)

DOLLY_ROWS = [
    {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "brainstorming"},
    {
        "instruction": "What is the capital?",
        "context": "France is in Europe.",
        "response": "Paris.",
        "category": "qa",
    },
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def numbered_rows(count: int) -> list[dict]:
    return [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(count)]


def ready(tokenizer, tmp_path: Path, stage: str | None = None, **kwargs) -> InstructionDataModule:
    """A connected, set-up data module whose cache lives in tmp_path."""
    datamodule = InstructionDataModule(cache_dir=str(tmp_path / "cache"), **kwargs)
    datamodule.connect(tokenizer)
    datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


def training_batches_in_order(datamodule: InstructionDataModule) -> DataLoader:
    """The training split, collated as for training but not shuffled, so that tests can match rows."""
    collator = data_module.TrainingCollator(datamodule.pad_token_id, datamodule.pad_to_multiple_of)
    return DataLoader(datamodule.splits["train"], batch_size=datamodule.batch_size, collate_fn=collator)


def generation_rows(datamodule: InstructionDataModule, name: str) -> list[tuple[str, list[str]]]:
    """(prompt, references) of every row of a split, in order, through the generation dataloader."""
    rows = []
    for batch in datamodule.generation_dataloader(name):
        rows += list(zip(batch["prompts"], batch["references"], strict=True))
    return rows


# --------------------------------------------------------------------------------------------- formats


class FormatCase(NamedTuple):
    rows: list[dict]
    detected: str  # what format="auto" must find
    field_map: dict[str, str] | None
    expected: list[tuple[str, list[str]]]  # (prompt, references) per row


ALPACA_NO_INPUT_CAPITAL = ALPACA_NO_INPUT.replace("Name a colour.", "What is the capital?")
FORMAT_CASES = {
    "dolly": FormatCase(
        DOLLY_ROWS, "dolly", None, [(ALPACA_NO_INPUT, ["Blue."]), (ALPACA_INPUT, ["Paris."])]
    ),
    "alpaca": FormatCase(
        [
            {"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "What is the capital?", "input": "France is in Europe.", "output": "Paris."},
        ],
        "alpaca",
        None,
        [(ALPACA_NO_INPUT, ["Blue."]), (ALPACA_INPUT, ["Paris."])],
    ),
    "minillm": FormatCase(
        [
            {"instruction": "Name a colour.", "input": "", "output": ["Blue.", "Red."]},
            {"instruction": "What is the capital?", "input": "France is in Europe.", "output": ["Paris."]},
        ],
        "alpaca",  # the same fields as Alpaca, so detection cannot (and need not) tell them apart
        None,
        [(ALPACA_NO_INPUT, ["Blue.", "Red."]), (ALPACA_INPUT, ["Paris."])],
    ),
    "prompt_response": FormatCase(
        [
            {"prompt": "Name a colour.", "response": "Blue."},
            {"prompt": "What is the capital?", "response": "Paris."},
        ],
        "prompt_response",
        None,
        [(ALPACA_NO_INPUT, ["Blue."]), (ALPACA_NO_INPUT_CAPITAL, ["Paris."])],
    ),
    "dolly_field_map": FormatCase(
        [
            {"question": "Name a colour.", "passage": "", "answer": "Blue."},
            {"question": "What is the capital?", "passage": "France is in Europe.", "answer": "Paris."},
        ],
        "dolly",
        {"instruction": "question", "input": "passage", "response": "answer"},
        [(ALPACA_NO_INPUT, ["Blue."]), (ALPACA_INPUT, ["Paris."])],
    ),
}


@pytest.mark.parametrize("case", FORMAT_CASES)
@pytest.mark.parametrize("named", [False, True], ids=["auto", "named"])
def test_each_format_gives_alpaca_prompts_and_references(case, named, gpt2_tokenizer, tmp_path):
    rows, detected, field_map, expected = FORMAT_CASES[case]
    source = write_jsonl(tmp_path / f"{case}.jsonl", rows)
    row_format = case.removesuffix("_field_map") if named else "auto"
    datamodule = ready(gpt2_tokenizer, tmp_path, test=str(source), format=row_format, field_map=field_map)
    assert generation_rows(datamodule, case) == expected
    assert formats_code.resolve_format("auto", field_map, set(rows[0]), "x.jsonl").name == detected


def test_minillm_list_output_trains_on_its_first_reference(gpt2_tokenizer, tmp_path):
    source = write_jsonl(
        tmp_path / "eval.jsonl", [{"instruction": "Hi.", "input": "", "output": ["Hello.", "Hey."]}]
    )
    datamodule = ready(gpt2_tokenizer, tmp_path, validation=str(source), format="minillm")
    batch = next(iter(datamodule.val_dataloader()))
    response = batch["labels"][0][batch["labels"][0] != -100]
    assert gpt2_tokenizer.decode(response) == "Hello.<|endoftext|>"


def test_chat_messages_use_the_tokenizer_chat_template(smollm2_tokenizer, tmp_path):
    conversation = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    datamodule = ready(smollm2_tokenizer, tmp_path, test=str(source), template="chat")

    expected_prompt = (
        SMOLLM2_SYSTEM + "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert generation_rows(datamodule, "chat") == [(expected_prompt, ["Blue."])]


# --------------------------------------------------------------------------------------------- templates


def test_chat_template_wraps_instruction_and_input_as_one_user_turn(smollm2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS)
    datamodule = ready(smollm2_tokenizer, tmp_path, test=str(source), template="chat")
    turn = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    assert [prompt for prompt, _ in generation_rows(datamodule, "dolly")] == [
        SMOLLM2_SYSTEM + turn.format("Name a colour."),
        SMOLLM2_SYSTEM + turn.format("What is the capital?\n\nFrance is in Europe."),
    ]


def test_user_string_template(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS)
    datamodule = ready(gpt2_tokenizer, tmp_path, test=str(source), template="Q: {instruction} [{input}]\nA:")
    assert [prompt for prompt, _ in generation_rows(datamodule, "dolly")] == [
        "Q: Name a colour. []\nA:",
        "Q: What is the capital? [France is in Europe.]\nA:",
    ]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Q: {question}", "unknown placeholder"),
        ("Q: {input}", "needs an {instruction}"),
        ("Q: {instruction", "not a valid format string"),
        ("vicuna", "use 'alpaca', 'chat'"),
    ],
)
def test_bad_user_templates_fail_at_construction(template, message):
    with pytest.raises(ValueError, match=f"template .*{message}"):
        InstructionDataModule(template=template)


def test_chat_template_needs_a_tokenizer_with_one(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS)
    with pytest.raises(ValueError, match="template 'chat': tokenizer .* has no chat template"):
        ready(gpt2_tokenizer, tmp_path, train=str(source), template="chat")


def test_chat_rows_need_the_chat_template(smollm2_tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(ValueError, match="chat.jsonl: format 'chat' needs template 'chat', not 'alpaca'"):
        ready(smollm2_tokenizer, tmp_path, train=str(source))


# --------------------------------------------------------------------------------------------- labels


# A prompt ending in a space: tokenised with its response, GPT-2-style BPE would merge " " + "Paris" into
# " Paris" across the boundary; tokenised apart, the boundary must stay exact.
BOUNDARY_ROWS = [
    {"instruction": "The capital of France is", "input": "", "output": "Paris, of course."},
    {"instruction": "Write a haiku", "input": "about rain", "output": " Drops on the roof\n\nsoft, steady"},
]


@pytest.mark.parametrize(
    ("tokenizer_name", "template"),
    [
        ("gpt2_tokenizer", "{instruction} {input} "),
        ("gpt2_tokenizer", "alpaca"),
        ("smollm2_tokenizer", "{instruction} {input} "),
        ("smollm2_tokenizer", "alpaca"),
        ("smollm2_tokenizer", "chat"),  # GPT-2 has no chat template
    ],
)
def test_labels_are_exactly_the_response_and_eos(tokenizer_name, template, tmp_path, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    source = write_jsonl(tmp_path / "train.jsonl", BOUNDARY_ROWS)
    datamodule = ready(tokenizer, tmp_path, train=str(source), template=template, batch_size=2)
    prompts = {response: prompt for prompt, (response,) in generation_rows(datamodule, "train")}
    batch = next(iter(training_batches_in_order(datamodule)))

    for input_ids, labels, mask in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
    ):
        supervised = labels != -100
        response = tokenizer.decode(labels[supervised])
        reference = response.removesuffix(tokenizer.eos_token)
        assert response == reference + tokenizer.eos_token and reference in prompts
        prompt_length = int(supervised.int().argmax())
        assert not supervised[:prompt_length].any() and supervised[prompt_length : int(mask.sum())].all()
        assert tokenizer.decode(input_ids[:prompt_length]) == prompts[reference]
        assert torch.equal(labels[supervised], input_ids[supervised])
        assert (labels[mask == 0] == -100).all()
    assert sorted(prompts) == sorted(row["output"] for row in BOUNDARY_ROWS)


def test_boundary_is_exact_where_joint_tokenisation_would_merge(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", BOUNDARY_ROWS[:1])
    datamodule = ready(gpt2_tokenizer, tmp_path, train=str(source), template="{instruction} ")
    batch = next(iter(datamodule.train_dataloader()))
    joint = gpt2_tokenizer("The capital of France is Paris, of course.")["input_ids"]
    assert gpt2_tokenizer.convert_ids_to_tokens(joint)[5] == "ĠParis"  # the merge that the split avoids
    labels = batch["labels"][0]
    assert gpt2_tokenizer.decode(batch["input_ids"][0][labels == -100]) == "The capital of France is "
    assert gpt2_tokenizer.decode(labels[labels != -100]) == "Paris, of course.<|endoftext|>"


# --------------------------------------------------------------------------------------------- lengths


def test_long_prompts_are_dropped_and_long_responses_cut_and_both_counted(gpt2_tokenizer, tmp_path, caplog):
    rows = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "word " * 40, "output": "dropped"},
        {"instruction": "short too", "output": "one two three four five six seven eight nine ten"},
    ]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="distillens.data"):
        datamodule = ready(
            gpt2_tokenizer,
            tmp_path,
            train=str(source),
            template="{instruction}:",
            max_prompt_length=8,
            max_length=10,
        )
    expected_stats = SplitStats(rows_read=3, long_prompts_dropped=1, kept=2, responses_truncated=1)
    assert datamodule.stats["train"] == expected_stats
    assert "dropped 1 rows with prompts over max_prompt_length=8" in caplog.text
    assert "truncated 1 responses to fit max_length=10" in caplog.text

    batch = next(iter(training_batches_in_order(datamodule)))
    assert batch["input_ids"].shape[1] == 10
    cut = batch["labels"][1][batch["labels"][1] != -100]
    budget = 10 - len(gpt2_tokenizer("short too:")["input_ids"])
    response_ids = gpt2_tokenizer("one two three four five six seven eight nine ten")["input_ids"]
    assert cut.tolist() == response_ids[:budget]
    assert gpt2_tokenizer.eos_token_id not in cut.tolist()  # a cut response must not teach the model to stop


@pytest.mark.parametrize("given", ["validation file", "val_size"])
def test_long_validation_prompts_are_dropped_not_cut(given, gpt2_tokenizer, tmp_path):
    """Validation is scored like training (teacher-forced loss), so it filters as training does: a long prompt is
    dropped; only test sets cut it (the paper's evaluation protocol)."""
    rows = [
        {"instruction": "short", "output": "ok"},
        {"instruction": "word " * 40, "output": "long"},
        {"instruction": "short too", "output": "fine"},
    ]
    if given == "validation file":
        train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(3))
        splits = {"train": str(train), "validation": str(write_jsonl(tmp_path / "dev.jsonl", rows))}
    else:  # a validation part cut from train: with seed 1, it holds the long row (checked below)
        source = write_jsonl(tmp_path / "train.jsonl", rows + numbered_rows(3))
        splits = {"train": str(source), "val_size": 3, "seed": 1}
    datamodule = ready(
        gpt2_tokenizer, tmp_path, template="{instruction}:", max_prompt_length=8, max_length=16, **splits
    )
    stats = datamodule.stats["validation"]
    references = [refs for _, refs in generation_rows(datamodule, "validation")]
    assert (stats.kept, stats.long_prompts_dropped, stats.prompts_truncated) == (2, 1, 0)
    assert ["long"] not in references and len(references) == 2


# --------------------------------------------------------------------------------------------- padding


def test_training_batches_are_right_padded_with_positions_from_zero(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", DOLLY_ROWS)
    datamodule = ready(gpt2_tokenizer, tmp_path, train=str(source), batch_size=2)
    batch = next(iter(training_batches_in_order(datamodule)))
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) and int(lengths.min()) < int(lengths.max())
    for row, length in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (
            batch["input_ids"].shape[1] - length
        )
        assert batch["position_ids"][row, :length].tolist() == list(range(length))
        assert (batch["input_ids"][row, length:] == gpt2_tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == -100).all()
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_generation_batches_are_left_padded_prompts_with_positions_from_first_token(
    smollm2_tokenizer, tmp_path
):
    source = write_jsonl(tmp_path / "dolly.jsonl", DOLLY_ROWS)
    datamodule = ready(smollm2_tokenizer, tmp_path, test=str(source), template="chat", eval_batch_size=2)
    (batch,) = list(datamodule.test_dataloader()[0])
    width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(batch["prompts"]):
        ids = smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        pad = width - len(ids)
        assert batch["input_ids"][row].tolist() == [smollm2_tokenizer.pad_token_id] * pad + ids
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * len(ids)
        assert batch["position_ids"][row, pad:].tolist() == list(range(len(ids)))
    assert batch["name"] == "dolly" and "labels" not in batch
    assert batch["attention_mask"][:, 0].tolist().count(0) == 1  # one row padded, the longest not


@pytest.mark.parametrize("loader", ["train", "generation"])
def test_pad_to_multiple_of_rounds_the_width_up(gpt2_tokenizer, tmp_path, loader):
    source = write_jsonl(tmp_path / "train.jsonl", DOLLY_ROWS)
    datamodule = ready(gpt2_tokenizer, tmp_path, train=str(source), pad_to_multiple_of=8, batch_size=2)
    plain = ready(gpt2_tokenizer, tmp_path, train=str(source), batch_size=2)
    pick = {
        "train": lambda dm: training_batches_in_order(dm),
        "generation": lambda dm: dm.generation_dataloader("train"),
    }
    padded, unpadded = next(iter(pick[loader](datamodule))), next(iter(pick[loader](plain)))
    assert padded["input_ids"].shape[1] % 8 == 0
    assert unpadded["input_ids"].shape[1] <= padded["input_ids"].shape[1] < unpadded["input_ids"].shape[1] + 8
    assert padded["attention_mask"].sum() == unpadded["attention_mask"].sum()


# --------------------------------------------------------------------------------------------- caching


def count_tokenisations(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = pipeline_code.tokenize_examples

    def counting(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(pipeline_code, "tokenize_examples", counting)  # where the pipeline looks it up
    return calls


def test_second_setup_loads_the_cache_without_tokenising(gpt2_tokenizer, tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "train.jsonl", numbered_rows(10))
    calls = count_tokenisations(monkeypatch)
    first = ready(gpt2_tokenizer, tmp_path, train=str(source), val_size=3)
    assert calls == [7, 3]

    # A second process (another rank, or the next run) with the same settings reads the cache only.
    second = InstructionDataModule(train=str(source), val_size=3, cache_dir=str(tmp_path / "cache"))
    second.connect(gpt2_tokenizer)
    second.setup("fit")
    assert calls == [7, 3]
    for split in ("train", "validation"):
        assert second.splits[split]["input_ids"] == first.splits[split]["input_ids"]
    assert second.stats == first.stats


@pytest.mark.parametrize("change", ["max_length", "template", "source", "tokenizer"])
def test_cache_key_follows_lengths_template_source_and_tokenizer(change, tmp_path, monkeypatch, request):
    source = write_jsonl(tmp_path / "train.jsonl", numbered_rows(4))
    settings = {"train": str(source), "max_length": 64, "max_prompt_length": 48, "template": "alpaca"}
    ready(request.getfixturevalue("gpt2_tokenizer"), tmp_path, **settings)
    calls = count_tokenisations(monkeypatch)

    tokenizer = request.getfixturevalue("smollm2_tokenizer" if change == "tokenizer" else "gpt2_tokenizer")
    settings |= {"max_length": {"max_length": 65}, "template": {"template": "{instruction}"}}.get(change, {})
    if change == "source":
        write_jsonl(source, numbered_rows(5))
    ready(tokenizer, tmp_path, **settings)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------- splits


def test_val_size_split_is_deterministic_disjoint_and_complete(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", numbered_rows(20))

    def split(seed: int, val_size) -> tuple[set[str], set[str]]:
        datamodule = ready(
            gpt2_tokenizer, tmp_path / str(seed), train=str(source), val_size=val_size, seed=seed
        )
        return tuple(
            {refs[0] for _, refs in generation_rows(datamodule, name)} for name in ("train", "validation")
        )

    train, validation = split(1, 5)
    assert len(validation) == 5
    assert not train & validation
    assert train | validation == {str(i) for i in range(20)}
    assert split(1, 5) == (train, validation)  # same seed, fresh cache: same rows
    assert split(2, 5)[1] != validation
    assert len(split(3, 0.25)[1]) == 5


def test_given_validation_file_is_used_as_is(gpt2_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(4))
    validation = write_jsonl(tmp_path / "dev.jsonl", [{"instruction": "Check.", "output": "done"}])
    datamodule = ready(gpt2_tokenizer, tmp_path, train=str(train), validation=str(validation))
    assert [refs for _, refs in generation_rows(datamodule, "validation")] == [["done"]]
    assert len(datamodule.splits["train"]) == 4


def test_max_samples_caps_every_split(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", numbered_rows(10))
    datamodule = ready(gpt2_tokenizer, tmp_path, train=str(source), val_size=4, max_samples=3)
    assert (len(datamodule.splits["train"]), len(datamodule.splits["validation"])) == (3, 3)
    assert datamodule.stats["train"] == SplitStats(rows_read=10, in_other_split=4, over_max_samples=3, kept=3)
    assert datamodule.stats["validation"] == SplitStats(
        rows_read=10, in_other_split=6, over_max_samples=1, kept=3
    )


# --------------------------------------------------------------------------------------------- sources


def test_json_parquet_csv_and_folders_read_the_same_rows(gpt2_tokenizer, tmp_path):
    rows = numbered_rows(3)
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    with (tmp_path / "c.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows([{**row, "output": f"answer {row['output']}"} for row in rows])
    write_jsonl(tmp_path / "splits" / "train.jsonl", rows)
    write_jsonl(tmp_path / "splits" / "valid.jsonl", rows[:1])
    write_jsonl(tmp_path / "parts" / "x.jsonl", rows[:2])
    write_jsonl(tmp_path / "parts" / "y.jsonl", rows[2:])

    folder = str(tmp_path / "splits")
    sources = [str(tmp_path / name) for name in ("a.json", "b.parquet", "parts")]
    datamodule = ready(gpt2_tokenizer, tmp_path, train=folder, validation=folder, test=sources)
    expected = [[row["output"]] for row in rows]
    for name in ("a", "b", "parts", "train"):
        assert [refs for _, refs in generation_rows(datamodule, name)] == expected, name
    assert [refs for _, refs in generation_rows(datamodule, "validation")] == expected[:1]
    csv_only = ready(gpt2_tokenizer, tmp_path, test=str(tmp_path / "c.csv"))
    assert [refs for _, refs in generation_rows(csv_only, "c")] == [[f"answer {i}"] for i in range(3)]


def test_test_sets_are_named_after_files_or_their_folders(gpt2_tokenizer, tmp_path):
    dolly = write_jsonl(tmp_path / "dolly" / "valid.jsonl", numbered_rows(1))
    vicuna = write_jsonl(tmp_path / "vicuna.jsonl", numbered_rows(2))
    datamodule = ready(gpt2_tokenizer, tmp_path, stage="test", test=[str(dolly), str(vicuna)])
    assert datamodule.test_set_names == ["dolly", "vicuna"]
    names = [next(iter(loader))["name"] for loader in datamodule.test_dataloader()]
    assert names == ["dolly", "vicuna"]
    with pytest.raises(ValueError, match="name 'vicuna' is already taken"):
        ready(gpt2_tokenizer, tmp_path, test=[str(vicuna), str(vicuna)])


def test_hub_id_without_network_fails_fast_naming_the_id(gpt2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datamodule = InstructionDataModule(
        train="databricks/databricks-dolly-15k", cache_dir=str(tmp_path / "cache")
    )
    datamodule.connect(gpt2_tokenizer)
    with pytest.raises(ConnectionError, match="'databricks/databricks-dolly-15k'.*offline and not cached"):
        datamodule.prepare_data()


def test_hub_id_on_an_unreachable_hub_fails_naming_the_id(gpt2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sources_code, "hub_reachable", lambda: False)  # where load_hub_dataset looks it up
    datamodule = InstructionDataModule(train="someone/some-set", cache_dir=str(tmp_path / "cache"))
    datamodule.connect(gpt2_tokenizer)
    if sources_code.hub_offline():
        pytest.skip("offline mode is set for this whole process")
    with pytest.raises(ConnectionError, match="'someone/some-set'.*the hub is unreachable"):
        datamodule.prepare_data()


# --------------------------------------------------------------------------------------------- bad input


def test_invalid_jsonl_names_file_and_line(gpt2_tokenizer, tmp_path):
    source = tmp_path / "broken.jsonl"
    source.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n')
    with pytest.raises(ValueError, match=r"broken.jsonl line 3: not valid JSON \(Expecting value\)"):
        ready(gpt2_tokenizer, tmp_path, train=str(source))


def test_invalid_json_array_names_file_and_line(gpt2_tokenizer, tmp_path):
    source = tmp_path / "broken.json"
    source.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(ValueError, match="broken.json line 3: not valid JSON"):
        ready(gpt2_tokenizer, tmp_path, train=str(source))


def test_a_line_that_is_not_an_object_is_an_error(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "lists.jsonl", [{"instruction": "a", "output": "b"}, ["a", "b"]])
    with pytest.raises(ValueError, match="lists.jsonl row 2: expected a JSON object, got list"):
        ready(gpt2_tokenizer, tmp_path, train=str(source))


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (
            {"instruction": "b", "context": "", "category": "x"},
            "row 3: missing field 'response' (format dolly)",
        ),
        ({"instruction": None, "response": "r"}, "row 3: missing field 'instruction' (format dolly)"),
        ({"instruction": "b", "response": 7}, "row 3: field 'response' must be a string"),
        (
            {"instruction": "b", "context": ["x"], "response": "r"},
            "row 3: field 'context' must be a string, got list",
        ),
    ],
)
def test_bad_rows_name_field_file_and_row(bad_row, message, gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "dolly.jsonl", [*DOLLY_ROWS, bad_row])
    with pytest.raises(ValueError, match=re.escape(f"dolly.jsonl {message}")):
        ready(gpt2_tokenizer, tmp_path, train=str(source))


def test_bad_chat_rows_are_errors(smollm2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(
        ValueError, match="chat.jsonl row 1: field 'messages' must end with an assistant message"
    ):
        ready(smollm2_tokenizer, tmp_path, train=str(source), template="chat")


def test_chat_rows_with_an_unknown_role_are_errors_naming_file_and_row(smollm2_tokenizer, tmp_path):
    """A role the chat template does not know would be rendered as-is (<|im_start|>wizard) and trained on."""
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(
        ValueError, match=r"chat.jsonl row 2: field 'messages' has unknown role\(s\) \['wizard'\]"
    ):
        ready(smollm2_tokenizer, tmp_path, train=str(source), template="chat")


def test_rows_with_an_empty_response_are_dropped_and_counted(gpt2_tokenizer, tmp_path, caplog):
    """A blank response would train on the EOS token alone (and give a test row nothing to score against)."""
    blank = [{"instruction": "Say nothing.", "context": "", "response": "  "}]
    source = write_jsonl(tmp_path / "dolly.jsonl", [DOLLY_ROWS[0], *blank, DOLLY_ROWS[1]])
    with caplog.at_level(logging.INFO, logger="distillens.data"):
        datamodule = ready(gpt2_tokenizer, tmp_path, test=str(source))
    assert [refs for _, refs in generation_rows(datamodule, "dolly")] == [["Blue."], ["Paris."]]
    assert datamodule.stats["dolly"].empty_responses_dropped == 1
    assert "dolly: dropped 1 rows with an empty response" in caplog.text
    only_blank = write_jsonl(tmp_path / "blank.jsonl", blank)
    with pytest.raises(ValueError, match="empty after filtering: 1 rows read.*1 dropped for empty responses"):
        ready(gpt2_tokenizer, tmp_path, train=str(only_blank))


def test_skip_bad_rows_skips_and_logs_the_count(gpt2_tokenizer, tmp_path, caplog):
    bad = [{"instruction": "no answer", "context": ""}, {"instruction": "b", "response": 7}]
    source = write_jsonl(tmp_path / "dolly.jsonl", [DOLLY_ROWS[0], *bad, DOLLY_ROWS[1]])
    with caplog.at_level(logging.INFO, logger="distillens.data"):
        datamodule = ready(gpt2_tokenizer, tmp_path, test=str(source), skip_bad_rows=True)
    assert [refs for _, refs in generation_rows(datamodule, "dolly")] == [["Blue."], ["Paris."]]
    assert (datamodule.stats["dolly"].rows_read, datamodule.stats["dolly"].bad_rows_skipped) == (4, 2)
    assert "skipped 2 bad rows" in caplog.text


def test_empty_after_filtering_says_why(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "word " * 30, "output": "x"}])
    with pytest.raises(ValueError, match="empty after filtering: 1 rows read.*1 dropped for long prompts"):
        ready(gpt2_tokenizer, tmp_path, train=str(source), max_prompt_length=8, max_length=16)


def test_empty_file_and_unknown_layout_are_errors(gpt2_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        ready(gpt2_tokenizer, tmp_path, train=str(empty))
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        ValueError, match=r"odd.jsonl: cannot detect the format from fields \['answer', 'question'\]"
    ):
        ready(gpt2_tokenizer, tmp_path, train=str(odd))


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("data/nowhere.jsonl", FileNotFoundError, "data/nowhere.jsonl: no such data file or folder"),
        ("./missing", FileNotFoundError, "./missing: no such data file or folder"),
    ],
)
def test_missing_local_paths_are_not_taken_for_hub_ids(value, error, message):
    with pytest.raises(error, match=message):
        sources_code.resolve_source(value, "train")


def test_unsupported_file_types_and_empty_folders_are_errors(tmp_path):
    write_jsonl(tmp_path / "splits" / "train.jsonl", numbered_rows(1))
    with pytest.raises(
        FileNotFoundError, match=r"splits: no validation file among its split files \['train.jsonl'\]"
    ):
        sources_code.resolve_source(str(tmp_path / "splits"), "validation")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt: unsupported file type '.txt'"):
        sources_code.resolve_source(str(tmp_path / "notes.txt"), "train")
    with pytest.raises(FileNotFoundError, match="folder has no"):
        sources_code.resolve_source(str(tmp_path), "train")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 64, "max_prompt_length": 64}, "max_prompt_length=64 must be positive and below"),
        ({"validation": "v.jsonl", "val_size": 10}, "either validation or val_size"),
        ({"val_size": 1.5}, "val_size=1.5"),
        ({"format": "sharegpt"}, "format 'sharegpt'"),
        ({"field_map": {"answer": "x"}}, r"field_map keys \['answer'\]"),
        ({"batch_size": 0}, "batch_size=0: must be at least 1"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InstructionDataModule(**kwargs)


def test_setup_without_connect_says_what_to_do(tmp_path):
    datamodule = InstructionDataModule(train=str(write_jsonl(tmp_path / "t.jsonl", numbered_rows(1))))
    with pytest.raises(RuntimeError, match=r"call datamodule.connect\(tokenizer\) first"):
        datamodule.setup("fit")


def test_val_size_larger_than_the_data_is_an_error(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", numbered_rows(3))
    with pytest.raises(ValueError, match="val_size=3 leaves no training or no validation rows.*3 rows"):
        ready(gpt2_tokenizer, tmp_path, train=str(source), val_size=3)


# --------------------------------------------------------------------------------------------- DDP


class BuildCountingDataModule(InstructionDataModule):
    """Leaves a marker file each time a split is tokenised, so that a multi-process run can be audited."""

    def _build(self, plan, stats):
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / f"built-{plan.name}-{os.getpid()}").touch()
        return super()._build(plan, stats)


class ShardRecorder(L.LightningModule):
    """A one-parameter model that writes down the label ids each rank trains on."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        with open(Path(self.out_dir) / f"rank{self.global_rank}.jsonl", "a") as handle:
            for labels in batch["labels"]:
                handle.write(json.dumps(labels[labels != -100].tolist()) + "\n")
        return self.weight.sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_ddp_ranks_get_disjoint_shards_and_tokenise_once(gpt2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", numbered_rows(8))
    datamodule = BuildCountingDataModule(train=str(source), batch_size=2, cache_dir=str(tmp_path / "cache"))
    datamodule.connect(gpt2_tokenizer)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ShardRecorder(str(tmp_path)), datamodule=datamodule)

    shards = [
        {
            gpt2_tokenizer.decode(json.loads(line))
            for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()
        }
        for rank in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 4 and not shards[0] & shards[1]
    assert shards[0] | shards[1] == {f"{i}<|endoftext|>" for i in range(8)}
    assert len(list((tmp_path / "cache").glob("built-train-*"))) == 1


# --------------------------------------------------------------------------------------------- configuration


def test_every_argument_is_configurable_and_documented_for_the_cli():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(InstructionDataModule, "data")
    config = parser.parse_args(
        [
            "--data.train=d.jsonl",
            "--data.val_size=1000",
            "--data.test=[a.jsonl, b.jsonl]",
            "--data.template=chat",
        ]
    )
    assert (config.data.val_size, config.data.test, config.data.template) == (
        1000,
        ["a.jsonl", "b.jsonl"],
        "chat",
    )
    assert parser.parse_args(["--data.val_size=0.1"]).data.val_size == 0.1
    help_text = " ".join(parser.format_help().split())
    assert "the paper holds out 1000 Dolly rows" in help_text  # docstrings reach --help
    for argument in inspect.signature(InstructionDataModule).parameters:
        assert f"--data.{argument} " in help_text
        assert f"\n        {argument}: " in InstructionDataModule.__doc__, f"{argument} is not documented"


def test_a_jsonl_file_that_is_not_utf8_is_an_error_naming_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "b"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} line 2: not UTF-8 text \(byte 0xe9\)"):
        sources_code.read_json_rows(path)


def test_a_data_file_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Some editors (Notepad, Excel) start UTF-8 files with a byte-order mark: the rows are the same."""
    rows = [{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "d"}]
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
    (tmp_path / "bom.jsonl").write_bytes(codecs.BOM_UTF8 + lines)
    (tmp_path / "bom.json").write_bytes(codecs.BOM_UTF8 + json.dumps(rows).encode())
    for name in ("bom.jsonl", "bom.json"):
        assert [row.values for row in sources_code.read_json_rows(tmp_path / name)] == rows, name


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("odd.csv", b"instruction,output\na,b\nc,d,e,f\n", "Expected 2 fields in line 3, saw 4"),
        ("cut.parquet", b"PAR1 not a parquet file", "Parquet magic bytes not found"),
    ],
)
def test_an_unreadable_table_is_one_error_naming_the_line_and_nothing_else(
    name, content, reason, tmp_path, capsys, monkeypatch
):
    """The error names the file and the parser's reason (the csv's line); datasets logs no error record and draws
    no progress bar of its own, so a failed run's stderr is the error line alone."""
    path = tmp_path / name
    path.write_bytes(content)
    records = Records()
    logging.getLogger("datasets").addHandler(records)
    try:
        with pytest.raises(
            ValueError, match=rf"{re.escape(str(path))}: not a readable .*{re.escape(reason)}"
        ):
            sources_code.read_table_rows(path, tmp_path / "cache")
    finally:
        logging.getLogger("datasets").removeHandler(records)
    assert [r.getMessage() for r in records.records if r.levelno >= logging.WARNING] == []
    assert capsys.readouterr().err == ""
