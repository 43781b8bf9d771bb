"""The reference's evaluation protocol end to end, on tiny random models: what the test sets keep (long test prompts
cut, not dropped; a reference-length filter per test set), `distillens test` over several sets and seeds, and
generation during validation with checkpoint selection on val/rougeL.

Expected values are computed here independently: token counts with the tokenizer, answers by calling transformers'
`generate` on each prompt alone, scores with `rouge_score` directly, means and stds with numpy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO
from reference import rouge_l_by_hand
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from distillens.data import InstructionDataModule
from distillens.lightning_cli import run_cli

LONG = "word " * 40  # 40 GPT-2 tokens ("word" then " word" x 39) plus the template's
BUNDLED = REPO / "data" / "instructions"
MAX_NEW_TOKENS = 8


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def bundled_rows(split: str, count: int) -> list[dict]:
    return read_jsonl(BUNDLED / f"{split}.jsonl")[:count]


def as_minillm(rows: list[dict]) -> list[dict]:
    """MiniLLM's eval layout (instruction, input, output); every second row gets two references."""
    return [
        {
            "instruction": row["instruction"],
            "input": row.get("context", ""),
            "output": [row["response"], "another answer"] if i % 2 else row["response"],
        }
        for i, row in enumerate(rows)
    ]


def ready(tokenizer, tmp_path: Path, stage: str, **kwargs) -> InstructionDataModule:
    datamodule = InstructionDataModule(cache_dir=str(tmp_path / "cache"), template="{instruction}:", **kwargs)
    datamodule.connect(tokenizer)
    datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


# ------------------------------------------------------------------------------------------------ test sets


def test_long_test_prompts_are_cut_to_their_first_tokens_and_counted(gpt2_tokenizer, tmp_path, caplog):
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": LONG, "output": "kept"}]
    source = write_jsonl(tmp_path / "sni" / "valid.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="distillens.data"):
        datamodule = ready(
            gpt2_tokenizer, tmp_path, "test", test=str(source), max_prompt_length=8, max_length=16
        )
    stats = datamodule.stats["sni"]
    assert (stats.kept, stats.prompts_truncated, stats.long_prompts_dropped) == (2, 1, 0)
    assert "sni: cut 1 prompts to their first max_prompt_length=8 tokens" in caplog.text
    batch = next(iter(datamodule.generation_dataloader("sni")))
    full_prompt = gpt2_tokenizer(f"{LONG}:")["input_ids"]
    assert len(full_prompt) > 8
    cut_row = batch["input_ids"][1][batch["attention_mask"][1].bool()]
    assert cut_row.tolist() == full_prompt[:8]  # the first 8 tokens, as the reference truncates
    assert batch["prompts"][1] == gpt2_tokenizer.decode(
        full_prompt[:8]
    )  # the answers file shows what was asked
    assert batch["references"][1] == ["kept"]


def test_long_training_prompts_are_still_dropped(gpt2_tokenizer, tmp_path):
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": LONG, "output": "dropped"}]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    datamodule = ready(gpt2_tokenizer, tmp_path, "fit", train=str(source), max_prompt_length=8, max_length=16)
    stats = datamodule.stats["train"]
    assert (stats.kept, stats.long_prompts_dropped, stats.prompts_truncated) == (1, 1, 0)


def test_min_reference_tokens_keeps_rows_with_a_reference_that_long(gpt2_tokenizer, tmp_path, caplog):
    references = ["one two", "one two three four five", ["a", "one two three four five six"], ["x", "y z"]]
    rows = [{"instruction": f"q{i}", "output": output} for i, output in enumerate(references)]
    sni = write_jsonl(tmp_path / "sni" / "valid.jsonl", rows)
    dolly = write_jsonl(tmp_path / "dolly" / "valid.jsonl", rows)
    minimum = 5
    lengths = [
        [len(gpt2_tokenizer(text)["input_ids"]) for text in ([r] if isinstance(r, str) else r)]
        for r in references
    ]
    expected = [refs for refs, counts in zip(references, lengths, strict=True) if max(counts) >= minimum]
    assert 0 < len(expected) < len(references)  # the filter has something to keep and something to drop
    with caplog.at_level(logging.INFO, logger="distillens.data"):
        datamodule = ready(
            gpt2_tokenizer,
            tmp_path,
            "test",
            test=[str(sni), str(dolly)],
            min_reference_tokens={"sni": minimum},
        )
    kept = [refs for batch in datamodule.generation_dataloader("sni") for refs in batch["references"]]
    assert kept == [[refs] if isinstance(refs, str) else refs for refs in expected]
    assert datamodule.stats["sni"].short_references_dropped == len(references) - len(expected)
    assert datamodule.stats["dolly"].kept == len(references)  # the other set is not filtered
    assert f"{len(references) - len(expected)} dropped for short references" in caplog.text
    assert datamodule.eval_protocol() == {
        "max_prompt_length": 256,
        "min_reference_tokens": {"sni": minimum},
        "prompts_truncated": {"sni": 0, "dolly": 0},
        "short_references_dropped": {"sni": len(references) - len(expected), "dolly": 0},
    }


@pytest.mark.parametrize(
    ("minimums", "message"),
    [
        ({"unni": 11}, "min_reference_tokens: no test set named 'unni' \\(test sets: sni\\)"),
        ({"sni": 0}, "min_reference_tokens\\['sni'\\]=0: use a positive token count"),
    ],
)
def test_min_reference_tokens_names_a_bad_set_or_count(tmp_path, minimums, message):
    source = write_jsonl(tmp_path / "sni" / "valid.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(ValueError, match=message):
        InstructionDataModule(test=str(source), min_reference_tokens=minimums)


# ----------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, smollm2_tokenizer) -> dict[str, Path]:
    """Tiny random Llamas over SmolLM2's vocabulary, saved with the tokenizer, in float64 so that greedy answers
    of a padded batch cannot differ from those of each prompt alone by float32 rounding of near-ties."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for role, (hidden, layers, seed) in {"teacher": (32, 4, 1), "student": (16, 2, 2)}.items():
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(smollm2_tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        folders[role] = root / role
        LlamaForCausalLM(config).double().save_pretrained(folders[role])
        smollm2_tokenizer.save_pretrained(folders[role])
    return folders


def tiny_config(tmp_path: Path, folders: dict[str, Path], generation: dict, **changes) -> Path:
    """configs/tiny.yaml with the saved models, absolute data paths, and logs and caches under tmp_path."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["model"]["teacher"] = {"source": str(folders["teacher"]), "dtype": "auto"}
    config["model"]["student"] = {"source": str(folders["student"]), "dtype": "auto"}
    config["model"]["generation"] = {"max_new_tokens": MAX_NEW_TOKENS, **generation}
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if "ExportStudent" not in c["class_path"]
    ]
    data = config["data"]
    for split in ("train", "validation", "test"):
        data[split] = str(REPO / data[split])
    data["cache_dir"] = str(tmp_path / "cache")
    for section, values in changes.items():
        config[section].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def greedy_alone(folder: Path, tokenizer, prompt: str) -> str:
    """One prompt's greedy answer with plain transformers: no padding, no batching, no distillens code."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]  # (1, P)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # (1, P + new)
    new = out[0, ids.shape[1] :].tolist()
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    return tokenizer.decode(new, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------- distillens test


@pytest.fixture(scope="module")
def sampled_test_run(tmp_path_factory, model_folders):
    """`distillens test` on two sets (Dolly layout; MiniLLM layout with multi-reference rows) under three seeds."""
    tmp_path = tmp_path_factory.mktemp("test-run")
    sets = [
        write_jsonl(tmp_path / "dolly.jsonl", bundled_rows("test", 5)),
        write_jsonl(tmp_path / "minillm.jsonl", as_minillm(bundled_rows("validation", 6))),
    ]
    config = tiny_config(
        tmp_path,
        model_folders,
        {"seeds": [1, 2, 3]},
        data={"test": [str(s) for s in sets], "eval_batch_size": 4},
    )
    cli = run_cli(["test", "--config", str(config)])
    return cli, tmp_path / "logs" / "tiny" / "test-0" / "eval"


def test_answers_are_saved_per_set_and_seed_in_dataset_order(sampled_test_run):
    cli, folder = sampled_test_run
    for name in ("dolly", "minillm"):
        split = cli.datamodule.splits[name]
        expected = [(row["prompt"], list(row["references"])) for row in split]
        answers = {seed: read_jsonl(folder / f"{name}.seed{seed}.jsonl") for seed in (1, 2, 3)}
        for rows in answers.values():
            assert [row["index"] for row in rows] == list(range(len(split)))
            assert [(row["prompt"], row["references"]) for row in rows] == expected
        assert answers[1] != answers[2]  # sampled under different seeds
    assert any(len(row["references"]) == 2 for row in read_jsonl(folder / "minillm.seed1.jsonl"))


def test_results_are_rouge_score_means_and_stds_over_seeds(sampled_test_run):
    cli, folder = sampled_test_run
    results = json.loads((folder / "results.json").read_text())
    per_seed = {}
    for name in ("dolly", "minillm"):
        per_seed[name] = []
        for seed in (1, 2, 3):
            rows = read_jsonl(folder / f"{name}.seed{seed}.jsonl")
            score = np.mean(rouge_l_by_hand([r["prediction"] for r in rows], [r["references"] for r in rows]))
            per_seed[name].append(score)
            assert results["sets"][name]["per_seed"][str(seed)]["rougeL"] == pytest.approx(score)
        assert results["sets"][name]["mean"]["rougeL"] == pytest.approx(np.mean(per_seed[name]))
        assert results["sets"][name]["std"]["rougeL"] == pytest.approx(np.std(per_seed[name]))
        logged = cli.trainer.callback_metrics
        assert float(logged[f"test/{name}/rougeL"]) == pytest.approx(
            np.mean(per_seed[name]), rel=1e-5, abs=1e-5
        )
        assert float(logged[f"test/{name}/rougeL_std"]) == pytest.approx(np.std(per_seed[name]), abs=1e-5)
    average = np.mean([per_seed["dolly"], per_seed["minillm"]], axis=0)  # (seeds,)
    assert results["average"]["mean"]["rougeL"] == pytest.approx(average.mean())
    assert results["average"]["std"]["rougeL"] == pytest.approx(average.std())
    assert results["generator"] == "student" and results["seeds"] == [1, 2, 3]
    table = (folder / "results.md").read_text()
    for name in ("dolly", "minillm", "average"):
        assert f"| {name} |" in table


def test_greedy_answers_equal_each_prompt_generated_alone(tmp_path, model_folders, smollm2_tokenizer):
    test_set = write_jsonl(tmp_path / "dolly.jsonl", bundled_rows("test", 5))
    generation = {"do_sample": False, "seeds": [0], "generator": "teacher"}
    config = tiny_config(
        tmp_path, model_folders, generation, data={"test": str(test_set), "eval_batch_size": 3}
    )
    run_cli(["test", "--config", str(config)])
    rows = read_jsonl(tmp_path / "logs" / "tiny" / "test-0" / "eval" / "dolly.seed0.jsonl")
    expected = [greedy_alone(model_folders["teacher"], smollm2_tokenizer, row["prompt"]) for row in rows]
    assert [row["prediction"] for row in rows] == expected
    assert any(expected)  # not a vacuous comparison of empty strings


# ----------------------------------------------------------------------------------------------- validation


def test_validation_generation_logs_val_rouge_and_selects_checkpoints(
    tmp_path, model_folders, smollm2_tokenizer
):
    """lr 0 keeps the student as saved, so the greedy answers can be computed alone beforehand; references are
    rigged so that the score is far from 0: rows 0 and 2 list a wrong answer first and the right one second."""
    rows = bundled_rows("validation", 5)
    probe = write_jsonl(tmp_path / "probe.jsonl", rows)
    probe_config = tiny_config(tmp_path, model_folders, {}, data={"validation": str(probe)})
    prompts = [row["prompt"] for row in _validation_split(probe_config)]
    answers = [greedy_alone(model_folders["student"], smollm2_tokenizer, prompt) for prompt in prompts]
    references = [
        ["wrong answer", answers[i]] if i in (0, 2) else [rows[i]["response"]] for i in range(len(rows))
    ]
    rigged = [dict(row, response=refs) for row, refs in zip(rows, references, strict=True)]  # same prompts
    validation = write_jsonl(tmp_path / "validation.jsonl", rigged)
    expected = np.mean(rouge_l_by_hand(answers[:4], references[:4]))  # max_prompts: 4
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"monitor": "val/rougeL", "mode": "max", "dirpath": str(tmp_path / "ckpt")},
    }
    config = tiny_config(
        tmp_path,
        model_folders,
        {"do_sample": False, "every_n_val": 1, "max_prompts": 4},
        data={"validation": str(validation), "max_samples": 8},
        trainer={"max_steps": 2, "val_check_interval": 1, "callbacks": [checkpoint]},
    )
    cli = run_cli(["fit", "--config", str(config), "--model.optimizer.lr", "0.0"])
    assert expected > 20  # the rigged rows make the check meaningful
    assert float(cli.trainer.callback_metrics["val/rougeL"]) == pytest.approx(expected, rel=1e-5)
    assert float(cli.trainer.checkpoint_callback.best_model_score) == pytest.approx(expected, rel=1e-5)


def _validation_split(config: Path):
    from distillens.data import InstructionDataModule
    from distillens.models import load_tokenizer

    data = yaml.safe_load(config.read_text())["data"]
    datamodule = InstructionDataModule(**{k: v for k, v in data.items() if k != "test"})
    datamodule.connect(load_tokenizer(yaml.safe_load(config.read_text())["model"]["student"]["source"]))
    datamodule.setup("validate")
    return datamodule.splits["validation"]
