"""DistillationModule: the objective against an independent computation, and the frozen teacher's isolation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import llama_spec, without_tokenizer
from reference import Objective, divergence, objective_sums, supervised_batch, weighted
from transformers import AutoConfig, AutoModelForCausalLM

from distillens.models import ModelSpec
from distillens.module import DistillationModule
from distillens.objective import LayerPairs, LossConfig, evenly_spaced

VOCAB = 101


def llama(layers: int, hidden: int) -> ModelSpec:
    return llama_spec(layers, hidden, VOCAB)


@pytest.fixture
def module(tiny_module) -> DistillationModule:
    return tiny_module(
        student=(2, 32),
        teacher=(4, 48),
        vocab=VOCAB,
        loss=LossConfig(
            ce_weight=0.3, kd_weight=0.5, lens_weight=0.7, kd_divergence="forward_kl", chunk_size=5
        ),
        layers=LayerPairs(student=[1, 2], teacher=[2, 3]),
    )


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    labels = torch.full_like(input_ids, -100)
    labels[0, 4:9] = input_ids[0, 4:9]  # row 0: a long response
    labels[1, 7:9] = input_ids[1, 7:9]  # row 1: a short one
    attention_mask = torch.ones_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def independent_terms(module: DistillationModule, batch) -> dict[str, torch.Tensor]:
    """Each term from the models' own outputs (output_hidden_states, full logits), token by token."""
    student, teacher = module.student, module.teacher
    s_out = student(batch["input_ids"], output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(batch["input_ids"], output_hidden_states=True)
    mask = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:]
    ce = sum(
        F.cross_entropy(s_out.logits[b, t], targets[b, t]) for b in range(2) for t in range(8) if mask[b, t]
    )
    kd = sum(
        divergence("forward_kl", s_out.logits[b, t][None], t_out.logits[b, t][None])[0]  # textbook formula
        for b in range(2)
        for t in range(8)
        if mask[b, t]
    )

    def lens_logits(model, out, i):
        """Final norm + tied unembedding written out; the last entry of hidden_states is already normed,
        and its lens is the model's logits."""
        if i == model.config.num_hidden_layers:
            return out.logits
        return model.model.norm(out.hidden_states[i]) @ model.model.embed_tokens.weight.T

    lens = 0
    for i, j in ((1, 2), (2, 3)):  # student layer 2 is its last: the pair's student side is its output logits
        s_lens = lens_logits(student, s_out, i)
        t_lens = lens_logits(teacher, t_out, j)
        lens = lens + sum(
            divergence("jsd", s_lens[b, t][None], t_lens[b, t][None])[0]
            for b in range(2)
            for t in range(8)
            if mask[b, t]
        )
    return {"ce": ce, "kd": kd, "lens": lens / 2, "tokens": mask.sum()}


def test_objective_terms_equal_an_independent_computation(module, batch):
    module.train()
    got = module(batch)
    expected = independent_terms(module, batch)
    assert int(got["tokens"]) == int(expected["tokens"]) == 7
    for name in ("ce", "kd", "lens"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    total = got.total()
    torch.testing.assert_close(total, 0.3 * expected["ce"] + 0.5 * expected["kd"] + 0.7 * expected["lens"])


def test_objective_gradients_equal_an_independent_computation(module, batch):
    module.train()
    module(batch).total().backward()
    got = {name: p.grad.clone() for name, p in module.student.named_parameters()}
    module.student.zero_grad()
    terms = independent_terms(module, batch)
    (0.3 * terms["ce"] + 0.5 * terms["kd"] + 0.7 * terms["lens"]).backward()
    for name, param in module.student.named_parameters():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-3, atol=1e-6, msg=name)


def test_teacher_is_frozen_unsaved_and_outside_the_optimizer(module):
    assert module.teacher is not None
    assert not any(key.startswith("teacher") for key in module.state_dict())
    assert all(not p.requires_grad for p in module.teacher.parameters())
    module.train()
    assert not module.teacher.training and module.student.training
    student_params = {id(p) for p in module.student.parameters()}
    assert all(id(p) in student_params for p in module.parameters())


def test_checkpoint_records_the_student_architecture(module):
    """Enough to rebuild the student without its teacher: the same architecture, every weight fitting."""
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    config = dict(checkpoint["student_config"])
    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    assert rebuilt.config.num_hidden_layers == 2 and rebuilt.config.hidden_size == 32
    rebuilt.load_state_dict(module.student.state_dict())  # strict: same names and shapes


def test_sft_without_teacher_trains_on_cross_entropy_only(monkeypatch, batch):
    without_tokenizer(monkeypatch)
    module = DistillationModule(
        student=llama(2, 32), loss=LossConfig(ce_weight=1, kd_weight=0, lens_weight=0)
    )
    module.configure_model()
    module.train()
    terms = module(batch)
    assert set(terms) == {"ce", "tokens"}
    logits = module.student(batch["input_ids"]).logits[:, :-1]
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(terms["ce"], expected)


def test_objective_without_teacher_but_distillation_weights_is_an_error(monkeypatch):
    without_tokenizer(monkeypatch)
    with pytest.raises(ValueError, match="teacher is not set"):
        DistillationModule(student=llama(2, 32))


def test_unknown_divergence_is_an_error_at_construction(monkeypatch):
    without_tokenizer(monkeypatch)
    with pytest.raises(ValueError, match="unknown divergence 'kl2'"):
        DistillationModule(student=llama(2, 32), teacher=llama(2, 32), loss=LossConfig(kd_divergence="kl2"))


def test_vocabulary_mismatch_is_an_error(monkeypatch):
    without_tokenizer(monkeypatch)
    teacher = llama(2, 32)
    teacher.config = {**teacher.config, "vocab_size": VOCAB + 3}
    module = DistillationModule(student=llama(2, 32), teacher=teacher)
    with pytest.raises(ValueError, match="vocabularies differ.*104.*101"):
        module.configure_model()


def test_out_of_range_layer_pairs_name_both_depths(monkeypatch):
    without_tokenizer(monkeypatch)
    module = DistillationModule(
        student=llama(2, 32), teacher=llama(4, 48), layers=LayerPairs(student=[1, 3], teacher=[2, 5])
    )
    with pytest.raises(ValueError, match=r"\[3, 5\] out of range \(student has 2 blocks, teacher 4"):
        module.configure_model()


def test_evenly_spaced_pairs_reproduce_the_papers_choices():
    assert evenly_spaced(12, 5) == [2, 4, 6, 8, 10]  # GPT-2 120M
    assert evenly_spaced(48, 5) == [8, 16, 24, 32, 40]  # GPT-2 1.5B
    assert evenly_spaced(24, 5) == [4, 8, 12, 16, 20]  # GPT-2 340M
    assert evenly_spaced(22, 5) == [4, 7, 11, 15, 18]  # TinyLlama 1.1B
    assert evenly_spaced(28, 4) == [6, 11, 17, 22]  # Qwen2.5 1.5B
    assert evenly_spaced(36, 4) == [7, 14, 22, 29]  # Qwen2.5 3B
    assert LayerPairs(count=2).resolve(6, 12) == ([2, 4], [4, 8])


def test_tokenizers_with_different_token_ids_are_an_error(tmp_path, gpt2_tokenizer, smollm2_tokenizer):
    gpt2_tokenizer.save_pretrained(tmp_path / "gpt2")
    smollm2_tokenizer.save_pretrained(tmp_path / "smol")
    smollm2_tokenizer.save_pretrained(tmp_path / "smol-copy")
    student, teacher = llama(2, 32), llama(2, 32)
    student.tokenizer, teacher.tokenizer = str(tmp_path / "smol"), str(tmp_path / "smol-copy")
    DistillationModule(student=student, teacher=teacher)  # same ids under another path: fine
    teacher.tokenizer = str(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="teacher tokenizer .*gpt2.* and student tokenizer .*smol.* differ"):
        DistillationModule(student=student, teacher=teacher)


# ------------------------------------------------------------------------------------------------------------
# The module's settings of the objective, each against tests/reference.py (written from the definitions)

OBJECTIVE_CASES = {
    # the paper's DistillLens defaults: reverse KL at the output, JSD (beta 0.5) between lens distributions, T = 1
    "defaults": (
        {},
        Objective(kd_divergence="reverse_kl", lens_divergence="jsd", lens_params={"beta": 0.5}),
        ([1, 2], [2, 4]),
    ),
    "temperature": (
        {"temperature": 2.5, "kd_divergence": "forward_kl"},
        Objective(kd_divergence="forward_kl", temperature=2.5),
        ([1, 2], [2, 4]),
    ),
    "divergence-params": (
        {
            "kd_divergence": "jsd",
            "kd_params": {"beta": 0.2},
            "lens_divergence": "skew_reverse_kl",
            "lens_params": {"alpha": 0.3},
        },
        Objective(
            kd_divergence="jsd",
            kd_params={"beta": 0.2},
            lens_divergence="skew_reverse_kl",
            lens_params={"alpha": 0.3},
        ),
        ([1, 2], [2, 4]),
    ),  # fmt: skip
    "no-final-norm": (  # the published lens: the unembedding applied to the raw residual stream
        {"lens_final_norm": False},
        Objective(lens_final_norm=False),
        ([0, 1], [1, 3]),
    ),
}


@pytest.mark.parametrize("case", OBJECTIVE_CASES)
def test_objective_settings_equal_an_independent_computation(case, tiny_module):
    loss, objective, (student_layers, teacher_layers) = OBJECTIVE_CASES[case]
    module = tiny_module(
        loss=LossConfig(ce_weight=0.3, kd_weight=0.5, lens_weight=0.7, chunk_size=4, **loss),
        layers=LayerPairs(student=student_layers, teacher=teacher_layers),
    )
    objective = dataclasses.replace(
        objective, ce_weight=0.3, kd_weight=0.5, lens_weight=0.7, student_layers=student_layers,
        teacher_layers=teacher_layers,
    )  # fmt: skip
    module.train()
    batch = supervised_batch(7, [3, 8, 5], length=11)  # three rows, three different masks
    got = module(batch)
    expected = objective_sums(module.student, module.teacher, batch, objective)
    assert int(got["tokens"]) == int(expected["tokens"]) == 8 + 3 + 6
    for name in ("ce", "kd", "lens"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(got.total(), weighted(expected, objective), rtol=1e-4, atol=1e-6)


def test_default_objective_is_the_papers():
    """Reverse KL at the output and JSD between lens distributions, weights 1 and 1, no CE, T = 1, final norm on."""
    config = LossConfig()
    assert (config.kd_divergence, config.lens_divergence) == ("reverse_kl", "jsd")
    assert (config.ce_weight, config.kd_weight, config.lens_weight, config.mse_weight) == (0.0, 1.0, 1.0, 0.0)
    assert (config.temperature, config.lens_final_norm, config.kd_params, config.lens_params) == (
        1.0,
        True,
        {},
        {},
    )
