"""Teacher targets computed once (distillens/teacher_cache.py, distillens/topk.py).

- hidden (exact): the loss and every gradient equal the live teacher's, in fp32 to 1e-6, on a batch drawn in another
  order and padding than the build's; a tiny fit logs the live fit's curves.
- topk: with k = the vocabulary size it equals the live loss and gradients for every registered divergence; with a
  smaller k it is never above the exact value (merging outcomes loses information).
- storage: a build killed part-way is never read as complete and resumes at the missing shard; a changed teacher,
  template, layer pair, precision or k is another cache folder.
- a fit reading complete top-k targets builds no teacher block weights; `distillens teach` builds and exports
  nothing else.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from helpers import REPO, scalars, tiny_fit_config, write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distillens.cli import main
from distillens.data.collate import TrainingCollator
from distillens.lightning_cli import run_cli
from distillens.losses import REGISTRY
from distillens.module import teacher_cache_location
from distillens.objective import LayerPairs, LossConfig
from distillens.teacher_cache import (
    TEACHER_TARGETS,
    TeacherCache,
    TeacherTargets,
    TeacherView,
    build,
    is_complete,
    is_stripped,
    strip_blocks,
)

VOCAB = 101
ROWS = 7


def example_rows(seed: int = 0) -> list[dict]:
    """Tokenised rows of different lengths: a prompt, then a response (what the pipeline writes)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length in torch.randint(6, 20, (ROWS,), generator=generator).tolist():
        prompt = int(torch.randint(2, length - 2, (1,), generator=generator))
        rows.append(
            {
                "input_ids": torch.randint(1, VOCAB, (length,), generator=generator).tolist(),
                "prompt_length": prompt,
            }
        )
    return rows


def batch_of(rows: list[dict], indices: list[int]) -> dict:
    """A training micro-batch of those rows, as the shuffled loader makes it (indexed, right-padded to 8)."""
    return TrainingCollator(0, pad_to_multiple_of=8)([{**rows[i], "index": i} for i in indices])


def build_cache(
    module, folder: Path, rows: list[dict], kind: str, k: int = 64, forward_context=contextlib.nullcontext
) -> TeacherCache:
    """The teacher's targets over ``rows`` (the train split), built in order, three rows to a batch and a shard,
    under ``forward_context`` (e.g. bf16 autocast)."""
    targets, view = TeacherTargets(kind=kind, k=k, shard_rows=3), TeacherView.of(module.objective)
    build(folder, targets, view, {"train": rows}, TrainingCollator(0), 3, device=torch.device("cpu"),
          forward_context=forward_context, temperature=module.loss_config.temperature)  # fmt: skip
    return TeacherCache(folder, kind, view.layers, view.depth)


def loss_and_grads(module, batch: dict, draw_seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's training loss (token mean) on ``batch`` and the gradient of every trained parameter."""
    module.zero_grad()
    terms = module.objective(batch, training=True, draw_seed=draw_seed)
    loss = terms.total() / terms.tokens
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_close(actual, expected, bound: float) -> None:
    loss, grads = actual
    loss_expected, grads_expected = expected
    assert float((loss - loss_expected).abs() / loss_expected.abs()) <= bound, (
        float(loss),
        float(loss_expected),
    )
    assert sorted(grads) == sorted(grads_expected) and grads
    for name, grad in grads.items():
        difference = float((grad - grads_expected[name]).norm() / grads_expected[name].norm())
        assert difference <= bound, f"{name}: relative difference {difference:.3g}"


TRAINED = [4, 1, 6, 2]  # a micro-batch in another order and padding than the build's batches


def test_hidden_targets_give_the_live_loss_and_gradients(tiny_module, tmp_path):
    loss = LossConfig(
        ce_weight=0.5, kd_weight=1.0, kd_divergence="reverse_kl", lens_weight=1.0, mse_weight=0.3
    )
    module = tiny_module(loss=loss, layers=LayerPairs(student=[1, 2], teacher=[2, 4]), vocab=VOCAB)
    rows = example_rows()
    cache = build_cache(module, tmp_path, rows, "hidden")
    batch = batch_of(rows, TRAINED)
    live = loss_and_grads(module, batch)
    strip_blocks(module.objective.teacher_lens.blocks)  # as in training: the teacher can no longer run
    cached = loss_and_grads(module, {**batch, TEACHER_TARGETS: cache.targets(batch, "train")})
    assert_close(cached, live, 1e-6)
    assert "projections.0.weight" in live[1]  # the MSE baseline's gradient is among those compared


def relative_differences(actual, expected) -> list[float]:
    """The loss's relative difference, then each gradient's (norm of the difference over the expected norm)."""
    (loss, grads), (loss_expected, grads_expected) = actual, expected
    return [float((loss - loss_expected).abs() / loss_expected.abs())] + [
        float((grads[name] - grads_expected[name]).norm() / grads_expected[name].norm())
        for name in grads_expected
    ]


def test_bf16_hidden_targets_stay_within_the_live_bf16_bound_of_fp32(tiny_module, tmp_path):
    """Built and trained under bf16 autocast, the cached run is as close to fp32 as the live bf16 run must be
    (test_bf16: loss within 3e-2, every gradient within 5e-2), and no farther from the live bf16 run than that
    run is from fp32: the cache adds no error of its own beyond bf16's rounding."""
    module = tiny_module(
        loss=LossConfig(ce_weight=0.5), layers=LayerPairs(student=[1, 2], teacher=[2, 4]), vocab=VOCAB
    )
    rows, bf16 = example_rows(), lambda: torch.autocast("cpu", torch.bfloat16)
    cache = build_cache(module, tmp_path, rows, "hidden", forward_context=bf16)
    batch = batch_of(rows, TRAINED)
    exact = loss_and_grads(module, batch)
    with bf16():
        live = loss_and_grads(module, batch)
        strip_blocks(module.objective.teacher_lens.blocks)
        cached = loss_and_grads(module, {**batch, TEACHER_TARGETS: cache.targets(batch, "train")})
    live_error, cached_error = relative_differences(live, exact), relative_differences(cached, exact)
    assert max(live_error) > 1e-4, "autocast was inert"
    assert cached_error[0] <= 3e-2 and max(cached_error[1:]) <= 5e-2, cached_error
    assert max(relative_differences(cached, live)) <= max(live_error), (cached_error, live_error)


@pytest.mark.parametrize("divergence", sorted(REGISTRY))
def test_topk_targets_with_the_whole_vocabulary_are_exact(divergence, tiny_module, tmp_path):
    loss = LossConfig(kd_divergence=divergence, lens_divergence=divergence, temperature=1.5, fused=False)
    module = tiny_module(loss=loss, layers=LayerPairs(student=[1], teacher=[2]), vocab=VOCAB)
    rows = example_rows()
    cache = build_cache(module, tmp_path, rows, "topk", k=VOCAB)
    batch = batch_of(rows, TRAINED)
    live = loss_and_grads(module, batch)
    strip_blocks([module.teacher])  # as in training: no teacher weight is left
    cached = loss_and_grads(module, {**batch, TEACHER_TARGETS: cache.targets(batch, "train")})
    assert_close(cached, live, 1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_targets_never_exceed_the_exact_divergence(divergence, tiny_module, tmp_path):
    """Merging the tail into one outcome can only lose information: each term is at most its exact value, and
    closer with a larger k."""
    loss = LossConfig(kd_divergence=divergence, lens_divergence=divergence)
    module = tiny_module(loss=loss, layers=LayerPairs(student=[1], teacher=[2]), vocab=VOCAB)
    rows = example_rows()
    batch = batch_of(rows, TRAINED)
    with torch.no_grad():
        exact = module.objective(batch, training=True)
        values = []
        for k in (4, 32):
            cache = build_cache(module, tmp_path / f"k{k}", rows, "topk", k=k)
            values.append(
                module.objective({**batch, TEACHER_TARGETS: cache.targets(batch, "train")}, training=True)
            )
    for term in ("kd", "lens"):
        small, large = (float(v[term]) for v in values)
        assert small <= large + 1e-5 and large <= float(exact[term]) + 1e-5, (
            term,
            small,
            large,
            float(exact[term]),
        )
        assert small < float(exact[term]) - 1e-4  # truncation does change the value: the test can tell


def test_a_build_killed_part_way_is_not_read_and_resumes(tiny_module, tmp_path, monkeypatch):
    module = tiny_module(layers=LayerPairs(student=[1], teacher=[2]), vocab=VOCAB)
    rows = example_rows()
    written = []
    save = __import__("distillens.teacher_cache", fromlist=["_save_atomically"])._save_atomically

    def killed_after_one(tensors, path):
        if written:
            raise KeyboardInterrupt  # the build stops here, as at a kill
        written.append(path.name)
        save(tensors, path)

    monkeypatch.setattr("distillens.teacher_cache._save_atomically", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        build_cache(module, tmp_path / "cache", rows, "hidden")
    assert not is_complete(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="not complete"):
        TeacherCache(tmp_path / "cache", "hidden", [2], 4)
    assert not list((tmp_path / "cache").glob(".*partial"))  # nothing half-written under a shard's name

    resumed = []
    monkeypatch.setattr(
        "distillens.teacher_cache._save_atomically", lambda t, p: (resumed.append(p.name), save(t, p))
    )
    cache = build_cache(module, tmp_path / "cache", rows, "hidden")
    assert resumed == ["train-00001.safetensors", "train-00002.safetensors"]  # the first shard was kept
    fresh = build_cache(module, tmp_path / "fresh", rows, "hidden")
    batch = batch_of(rows, list(range(ROWS)))
    for layer, value in fresh.targets(batch, "train").hidden.items():
        assert torch.equal(cache.targets(batch, "train").hidden[layer], value)
    assert cache.manifest["splits"]["train"]["tokens"] == int((batch["labels"][:, 1:] != -100).sum())


def location_of(module, tmp_path, split_keys=("train-a", "validation-a"), precision="32-true"):
    """``teacher_cache_location`` of a module in a fit whose data module has these token-cache keys."""
    data = SimpleNamespace(splits={"train": [], "validation": []}, cache_dir=tmp_path,
                           split_key=dict(zip(("train", "validation"), split_keys, strict=True)).get)  # fmt: skip
    module._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), datamodule=data, precision=precision)
    return teacher_cache_location(module).folder


def test_every_setting_that_changes_the_targets_changes_the_cache_folder(tiny_module, tmp_path):
    targets = TeacherTargets(kind="topk", k=64)
    pairs = LayerPairs(student=[1], teacher=[2])
    base = location_of(tiny_module(layers=pairs, teacher_targets=targets), tmp_path)
    assert base == location_of(
        tiny_module(layers=pairs, teacher_targets=targets), tmp_path
    )  # a key, not a nonce
    changed = {
        "teacher": location_of(tiny_module(layers=pairs, teacher=(4, 64), teacher_targets=targets), tmp_path),
        "template (another tokenised split)": location_of(
            tiny_module(layers=pairs, teacher_targets=targets), tmp_path, ("train-b", "validation-a")
        ),
        "layer pair": location_of(
            tiny_module(layers=LayerPairs(student=[1], teacher=[3]), teacher_targets=targets), tmp_path
        ),
        "k": location_of(tiny_module(layers=pairs, teacher_targets=replace(targets, k=16)), tmp_path),
        "precision": location_of(
            tiny_module(layers=pairs, teacher_targets=targets), tmp_path, precision="bf16-true"
        ),
        "kind": location_of(
            tiny_module(layers=pairs, teacher_targets=replace(targets, kind="hidden")), tmp_path
        ),
    }
    assert all(folder != base for folder in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


def test_a_template_changes_the_token_cache_key_the_teacher_cache_reads(smollm2_tokenizer, tmp_path):
    from distillens.data import InstructionDataModule

    keys = []
    for template in ("chat", "alpaca"):
        data = InstructionDataModule(train=str(REPO / "data/instructions/validation.jsonl"), template=template,
                                     max_length=128, max_prompt_length=96, cache_dir=str(tmp_path), val_size=8)  # fmt: skip
        data.connect(smollm2_tokenizer)
        keys.append(data.split_key("train"))
    assert keys[0] != keys[1]


# ------------------------------------------------------------------------------------------------ tiny fits


def fit(folder: Path, cache_dir: Path, *extra: str, command: str = "fit"):
    """``distillens <command>`` on configs/tiny.yaml in this process: the CLI object for fit, None for teach."""
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(tiny_fit_config(folder, cache_dir), folder / "tiny.yaml")
    with mock.patch.object(sys, "argv", ["distillens"]):
        if command == "teach":
            return main(["teach", "--config", str(config), *extra])  # the console's spelling
        return run_cli([command, "--config", str(config), *extra])


def curves(folder: Path) -> dict[str, dict[int, float]]:
    return scalars(
        sorted((folder / "tiny").glob("events.out.tfevents.*")), ("train/loss", "val/loss", "val/lens")
    )


def test_a_tiny_fit_on_hidden_targets_logs_the_live_curves(tmp_path):
    """With the default's callbacks that run the module outside a step: the step-0 validation (read from the
    cache too) and the lens diagnostics (which need every teacher block, so they skip a stripped teacher)."""
    callbacks = [
        f"--trainer.callbacks+=distillens.callbacks.{name}"
        for name in ("InitialValidation", "LensDiagnostics")
    ]
    fit(tmp_path / "live", tmp_path / "cache", *callbacks)
    cli = fit(tmp_path / "hidden", tmp_path / "cache", *callbacks, "--model.teacher_targets.kind", "hidden")
    live, hidden = curves(tmp_path / "live"), curves(tmp_path / "hidden")
    assert sorted(live) == sorted(hidden) == ["train/loss", "val/lens", "val/loss"]
    assert 0 in hidden["val/loss"]  # InitialValidation's point
    for name, values in live.items():
        assert sorted(hidden[name]) == sorted(values)
        for step, value in values.items():
            # the first step's weights are the same: the bound of one loss; Adam then carries the last-digit
            # differences (another batch shape at the build than in training) into the weights
            bound = 1e-6 if step == min(values) else 1e-5
            assert hidden[name][step] == pytest.approx(value, rel=bound), (
                name,
                step,
                hidden[name][step],
                value,
            )
    teacher = cli.model.teacher
    blocks = teacher.model.layers
    assert all(p.is_meta for p in blocks.parameters())  # the blocks were freed
    assert not teacher.lm_head.weight.is_meta and not teacher.model.norm.weight.is_meta  # the lens kept
    assert lens_diagnostics(tmp_path / "hidden") == []  # skipped: no teacher to run


def lens_diagnostics(folder: Path) -> list[str]:
    """The lens_diag/ scalars a run logged."""
    names = []
    for path in sorted((folder / "tiny").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        names += [tag for tag in events.Tags()["scalars"] if tag.startswith("lens_diag/")]
    return names


def test_a_kept_teacher_serves_the_lens_diagnostics_while_the_steps_read_the_cache(tmp_path):
    """keep_teacher (the default's choice): the teacher's blocks stay, so LensDiagnostics runs it at every depth;
    the steps still read the cache (the train curve is the live one)."""
    diagnostics = "--trainer.callbacks+=distillens.callbacks.LensDiagnostics"
    fit(tmp_path / "live", tmp_path / "cache", diagnostics)
    cli = fit(tmp_path / "kept", tmp_path / "cache", diagnostics, "--model.teacher_targets.kind", "hidden",
              "--model.teacher_targets.keep_teacher", "true")  # fmt: skip
    assert cli.model.teacher_cache is not None and not is_stripped(cli.model.teacher)
    assert lens_diagnostics(tmp_path / "kept") == lens_diagnostics(tmp_path / "live") != []
    live, kept = curves(tmp_path / "live")["train/loss"], curves(tmp_path / "kept")["train/loss"]
    assert kept == pytest.approx(live, rel=1e-5)


def test_a_fit_on_complete_topk_targets_builds_no_teacher_block(tmp_path, monkeypatch):
    teach = fit(tmp_path / "teach", tmp_path / "cache", "--model.teacher_targets.kind", "topk",
                "--model.teacher_targets.k", "16", command="teach")  # fmt: skip
    assert (
        teach is None and not (tmp_path / "teach" / "tiny" / "student").exists()
    )  # nothing trained or exported
    assert not list((tmp_path / "teach").rglob("*.ckpt"))
    assert len([f for f in (tmp_path / "cache" / "teacher").glob("topk-*") if is_complete(f)]) == 1

    import distillens.module

    built = []
    load_model = distillens.module.load_model
    monkeypatch.setattr(
        distillens.module, "load_model", lambda spec, **kw: built.append(spec) or load_model(spec, **kw)
    )
    cli = fit(tmp_path / "fit", tmp_path / "cache", "--model.teacher_targets.kind", "topk",
              "--model.teacher_targets.k", "16")  # fmt: skip
    assert cli.trainer.global_step == 6
    assert built == [cli.model.student_spec]  # the student only: no teacher was loaded
    assert is_stripped(cli.model.teacher) and all(p.is_meta for p in cli.model.teacher.parameters())
    assert all(value == value for value in curves(tmp_path / "fit")["train/loss"].values())  # finite, not NaN


@pytest.mark.parametrize(("kind", "per_layer"), [("hidden", 48 * 4), ("topk", 16 * 8 + 4)])
def test_the_cache_holds_the_documented_bytes_per_supervised_token(kind, per_layer, tiny_module, tmp_path):
    """What `model.teacher_targets.kind`'s help and `make bench-teacher MODE=bytes` state: (pairs + 1) layers of
    hidden size x 4 bytes in fp32, or of 8 k + 4 bytes (fp32 log-probabilities, int32 ids, one fp32 tail)."""
    from safetensors import safe_open

    module = tiny_module(layers=LayerPairs(student=[1, 2], teacher=[2, 3]), vocab=VOCAB)  # teacher width 48
    cache = build_cache(module, tmp_path, example_rows(), kind, k=16)
    data = 0
    for path in tmp_path.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as shard:
            tensors = [shard.get_tensor(name) for name in list(shard.keys())]
            data += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    tokens = cache.manifest["splits"]["train"]["tokens"]
    assert data == tokens * 3 * per_layer  # two pairs and the last layer


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "disk"}, r"kind='disk': expected one of live, hidden, topk"),
        ({"kind": "topk", "k": 0}, r"k=0: must be >= 1"),
        ({"kind": "hidden", "on_policy": True}, r"does not combine with on-policy training"),
        ({"kind": "topk", "mse": True}, r"holds no hidden states, which the MSE baseline needs"),
    ],
    ids=["kind", "k", "on-policy", "topk-mse"],
)
def test_targets_that_cannot_work_are_one_line(settings, message):
    kind, k = settings.pop("kind"), settings.pop("k", 64)
    arguments = {"reads_teacher": True, "on_policy": False, "mse": False} | settings
    with pytest.raises(ValueError, match=message):
        TeacherTargets(kind=kind, k=k).resolved(**arguments)


def test_targets_nothing_reads_are_live():
    """An SFT run, or the test of an exported student, on a config that caches: nothing to cache, the teacher is
    live (and absent), and a run that reads the teacher keeps its kind."""
    assert (
        TeacherTargets(kind="hidden").resolved(reads_teacher=False, on_policy=False, mse=False).kind == "live"
    )
    assert TeacherTargets(kind="topk").resolved(reads_teacher=True, on_policy=False, mse=False).kind == "topk"


@pytest.mark.parametrize("peaked", [False, True], ids=["spread", "student-mass-in-the-top-k"])
@pytest.mark.parametrize("divergence", sorted(REGISTRY))
def test_the_written_out_bucket_gradient_is_autograds(divergence, peaked):
    """topk.bucket_values_and_grads applies the chain rule from the k + 1 buckets to the V logits by hand; autograd
    through the buckets written here (gather and a log-sum-exp over the rest) must agree, tail included; also where
    the student holds over 0.99 of its mass in the teacher's top k (its tail then comes from the exact sum)."""
    from distillens.losses import get_token_divergence
    from distillens.topk import bucket_values_and_grads, top_k_of

    generator = torch.Generator().manual_seed(3)
    teacher_logits = torch.randn(9, 50, generator=generator) * 3  # (n, V)
    student = torch.randn(9, 50, generator=generator) * 3  # (n, V)
    if peaked:
        student = teacher_logits * 8 + student * 0.1
    target = top_k_of(teacher_logits, k=7, temperature=1.5)
    token_fn = get_token_divergence(divergence)
    values, grad = bucket_values_and_grads(student, target, token_fn, 1.5, {}, weight=0.7)

    logits = student.clone().requires_grad_()
    logq = torch.log_softmax(logits / 1.5, dim=-1)  # (n, V)
    in_top = torch.zeros_like(logq, dtype=torch.bool).scatter(-1, target.ids, True)
    rest = torch.logsumexp(logq.masked_fill(in_top, float("-inf")), dim=-1)  # (n,)
    buckets = torch.cat([logq.gather(-1, target.ids), rest[:, None]], dim=-1)
    teacher = torch.cat([target.logprobs, target.tail[:, None]], dim=-1)
    expected = token_fn(buckets, teacher)
    (0.7 * expected.sum()).backward()
    torch.testing.assert_close(values, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["hidden", "topk"])
@pytest.mark.parametrize("student", ["sampled lens", "LoRA student"])
def test_cached_targets_serve_the_sampled_lens_and_lora_students(
    kind, student, tiny_module, tmp_path, monkeypatch
):
    """The sampled lens (one of two pairs, half the tokens, the same draw) and a LoRA student read cached targets
    as they read the live teacher: hidden to 5e-6, top-k with the whole vocabulary to 1e-5."""
    from helpers import without_tokenizer
    from reference import tiny_llama

    from distillens.module import DistillationModule

    pairs = LayerPairs(student=[1, 2], teacher=[2, 4])
    if student == "sampled lens":
        loss = LossConfig(lens_pairs_per_step=1, lens_token_fraction=0.5, fused=False)
        module = tiny_module(loss=loss, layers=pairs, vocab=VOCAB)
    else:
        without_tokenizer(monkeypatch)
        spec = {
            **tiny_llama(2, 32, VOCAB),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        }  # the same two passes
        module = DistillationModule(student=spec, teacher=tiny_llama(4, 48, VOCAB), layers=pairs)
        module.configure_model()
        for name, param in module.student.named_parameters():
            if (
                "lora_B" in name
            ):  # as after some training: zero-initialised B would leave A without a gradient
                torch.nn.init.normal_(param, std=0.1)
    rows = example_rows()
    cache = build_cache(module, tmp_path, rows, kind, k=VOCAB)
    batch = batch_of(rows, TRAINED)
    live = loss_and_grads(module, batch, draw_seed=1234)
    strip_blocks(module.objective.teacher_lens.blocks)
    cached = loss_and_grads(module, {**batch, TEACHER_TARGETS: cache.targets(batch, "train")}, draw_seed=1234)
    # the teacher's hidden states were computed in batches of another shape: float32 rounding differs in the last
    # digits, which a loss over half the tokens of one pair shows at 1.4e-6 (the full loss above: under 1e-6)
    assert_close(cached, live, 5e-6 if kind == "hidden" else 1e-5)
    if student == "LoRA student":
        assert all("lora" in name for name in live[1])  # the adapters are what trains
