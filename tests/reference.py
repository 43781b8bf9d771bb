"""Independent computations that tests compare the project's code against.

Nothing here imports distillens: the objective is written from its definition (``output_hidden_states`` from
Hugging Face, divergences written out term by term from probabilities), and so are gradient
clipping, AdamW and the learning-rate schedule. A bug in the project's objective, token normalisation or optimizer
set-up therefore shows up as a difference, instead of being reproduced on both sides of the comparison.

The lens here is Llama's (final RMSNorm ``model.model.norm``, then the output embedding, nothing after it): the
tests that use it build Llama models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from torch import Tensor, nn

# ------------------------------------------------------------------------------------------------ test data


def tiny_llama(layers: int, hidden: int, vocab: int = 101) -> dict:
    """A ModelSpec (dict form) of a random Llama built from a config, no hub: 4 heads, 2 key/value heads, tied
    embeddings."""
    config = dict(
        model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return {"config": config, "tokenizer": "unused"}


def supervised_batch(
    seed: int, response_starts: list[int], length: int = 10, vocab: int = 101
) -> dict[str, Tensor]:
    """Rows of ``length`` random tokens; row r is supervised from position response_starts[r] on, so rows (and
    batches) differ in their number of supervised tokens."""
    input_ids = torch.randint(
        0, vocab, (len(response_starts), length), generator=torch.Generator().manual_seed(seed)
    )
    labels = torch.full_like(input_ids, -100)  # (B, T)
    for row, start in enumerate(response_starts):
        labels[row, start:] = input_ids[row, start:]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


# ------------------------------------------------------------------------------------------------ divergences


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)


def _kl(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)  # (N,); 0 log(0/q) = 0 by convention


def _log_mix(weight: float, log_a: Tensor, log_b: Tensor) -> Tensor:
    """log(weight a + (1 - weight) b) from log a and log b, finite where a and b underflow to 0 together."""
    if weight in (0.0, 1.0):  # the mixture is one of the two (math.log(0) has no value)
        return log_a if weight == 1.0 else log_b
    return torch.logaddexp(math.log(weight) + log_a, math.log1p(-weight) + log_b)  # (N, V)


def divergence(
    name: str, student: Tensor, teacher: Tensor, temperature: float = 1.0, **params: float
) -> Tensor:
    """Per-row divergence between student and teacher logits (N, V) -> (N,), from the textbook definitions.

    Defaults of the parameters are the published ones: JSD beta 0.5, skew KL alpha 0.1 (DistiLLM).
    """
    log_s, log_t = _log_probs(student, temperature), _log_probs(teacher, temperature)  # (N, V)
    s, t = log_s.exp(), log_t.exp()  # (N, V)
    if name == "forward_kl":
        return _kl(t, log_t, log_s)
    if name == "reverse_kl":
        return _kl(s, log_s, log_t)
    if name == "jeffreys":
        return _kl(t, log_t, log_s) + _kl(s, log_s, log_t)
    if name == "jsd":
        beta = params.get("beta", 0.5)
        log_m = _log_mix(beta, log_t, log_s)  # M = beta T + (1 - beta) S
        return beta * _kl(t, log_t, log_m) + (1 - beta) * _kl(s, log_s, log_m)
    if name == "skew_forward_kl":
        alpha = params.get("alpha", 0.1)
        return _kl(t, log_t, _log_mix(alpha, log_t, log_s))
    if name == "skew_reverse_kl":
        alpha = params.get("alpha", 0.1)
        return _kl(s, log_s, _log_mix(alpha, log_s, log_t))
    raise NotImplementedError(name)


# ------------------------------------------------------------------------------------------------ the objective


@dataclass
class Objective:
    """The DistillLens objective's settings, as the reference reads them (defaults: the paper's runs)."""

    ce_weight: float = 0.0
    kd_weight: float = 1.0
    kd_divergence: str = "reverse_kl"
    kd_params: dict[str, float] = field(default_factory=dict)
    lens_weight: float = 1.0
    lens_divergence: str = "jsd"
    lens_params: dict[str, float] = field(default_factory=dict)
    temperature: float = 1.0
    lens_final_norm: bool = True
    student_layers: list[int] = field(default_factory=list)
    teacher_layers: list[int] = field(default_factory=list)
    mse_weight: float = 0.0
    # the MSE baseline's learned projections, teacher -> student width, one per pair
    projections: list[nn.Module] = field(default_factory=list)


def _supervised_rows(model: nn.Module, batch: dict[str, Tensor], keep: Tensor) -> list[Tensor]:
    """Every hidden state of a Llama (0 = embeddings) at the positions that predict a supervised token, each (N, d).

    Hugging Face's last hidden state already has the final norm applied: its projection is the model's logits.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model.model(**inputs, output_hidden_states=True, use_cache=False)
    return [h[:, :-1][keep] for h in out.hidden_states]  # (N, d) each


def _lens(model: nn.Module, rows: list[Tensor], i: int, final_norm: bool) -> Tensor:
    """Lens logits of hidden state i (N, V): U(norm(h_i)), or U(h_i) without the norm; the logits at i = depth."""
    unembedding = model.get_output_embeddings().weight  # (V, d)
    if i == len(rows) - 1:
        if not final_norm:
            raise NotImplementedError("the raw last residual stream is not in hidden_states")
        return rows[i] @ unembedding.T  # (N, V)
    return (model.model.norm(rows[i]) if final_norm else rows[i]) @ unembedding.T  # (N, V)


def objective_sums(
    student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor], objective: Objective
) -> dict[str, Tensor]:
    """Token sums of each term on one batch (fp32), and the supervised-token count under "tokens"."""
    keep = batch["labels"][:, 1:] != -100  # (B, T-1): position t predicts token t+1
    targets = batch["labels"][:, 1:][keep]  # (N,)
    s_rows = _supervised_rows(student, batch, keep)
    s_logits = _lens(student, s_rows, len(s_rows) - 1, True)  # (N, V)
    logp = torch.log_softmax(s_logits.float(), dim=-1)  # (N, V)
    sums = {"tokens": keep.sum(), "ce": -logp.gather(1, targets[:, None]).sum()}
    if teacher is None:
        return sums
    with torch.no_grad():
        t_rows = _supervised_rows(teacher, batch, keep)
        t_logits = _lens(teacher, t_rows, len(t_rows) - 1, True)  # (N, V)
    o = objective
    sums["kd"] = divergence(o.kd_divergence, s_logits, t_logits, o.temperature, **o.kd_params).sum()
    per_pair = []
    for i, j in zip(o.student_layers, o.teacher_layers, strict=True):
        with torch.no_grad():
            t_lens = _lens(teacher, t_rows, j, o.lens_final_norm)  # (N, V)
        s_lens = _lens(student, s_rows, i, o.lens_final_norm)  # (N, V)
        per_pair.append(divergence(o.lens_divergence, s_lens, t_lens, o.temperature, **o.lens_params).sum())
    if per_pair:
        sums["lens"] = sum(per_pair) / len(per_pair)
    if o.mse_weight:  # squared error averaged over features, summed over tokens, averaged over pairs
        pairs = list(zip(o.projections, o.student_layers, o.teacher_layers, strict=True))
        if any(i == len(s_rows) - 1 or j == len(t_rows) - 1 for _, i, j in pairs):
            raise NotImplementedError("the raw last residual stream is not in hidden_states")
        errors = [((proj(t_rows[j]) - s_rows[i]) ** 2).mean(-1).sum() for proj, i, j in pairs]  # (N, d) -> ()
        sums["mse"] = sum(errors) / len(errors)
    return sums


def weighted(sums: dict[str, Tensor], objective: Objective) -> Tensor:
    """The objective's token sum: each present term times its weight."""
    weights = {
        "ce": objective.ce_weight, "kd": objective.kd_weight, "lens": objective.lens_weight, "mse": objective.mse_weight
    }  # fmt: skip
    return sum(w * sums[name] for name, w in weights.items() if w and name in sums)


# ------------------------------------------------------------------------------------------------ optimisation


def warmup_cosine_lr(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): warm-up rising linearly from peak/(warmup+1) to the peak
    at step ``warmup``, then a half cosine from the peak down to ``min_ratio * peak`` at step ``total``."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2)


def no_decay(name: str) -> bool:
    """Norm weights and biases are not decayed (by parameter name)."""
    return "norm" in name or name.endswith("bias")


@dataclass
class StepRecord:
    grads: dict[str, Tensor]  # token-mean gradient of the step, before clipping
    weights: dict[str, Tensor]  # after the optimizer step


def train_reference(
    student: nn.Module,
    teacher: nn.Module | None,
    steps: Iterable[list[dict[str, Tensor]]],
    objective: Objective,
    lrs: list[float],
    *,
    weight_decay: float,
    clip: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> list[StepRecord]:
    """Plain-PyTorch training: each step's gradient is that of the token mean of the objective over all of the
    step's batches (every micro-batch of every rank); optional clipping of the global norm; AdamW by hand.
    The MSE baseline's projections (``objective.projections``) are trained with the student."""
    params = dict(student.named_parameters())
    params |= {
        f"projections.{k}.{n}": p
        for k, proj in enumerate(objective.projections)
        for n, p in proj.named_parameters()
    }
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    records = []
    for k, batches in enumerate(steps):
        for p in params.values():
            p.grad = None
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:  # gradients add up over batches: one backward each bounds the memory
            (weighted(objective_sums(student, teacher, batch, objective), objective) / tokens).backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        scale = min(1.0, clip / (grad_norm(grads) + 1e-6)) if clip is not None else 1.0
        b1, b2, t = betas[0], betas[1], k + 1
        with torch.no_grad():
            for n, p in params.items():
                g = grads[n] * scale
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                decay = 0.0 if no_decay(n) else weight_decay
                p.mul_(1 - lrs[k] * decay)
                p.sub_(lrs[k] * (m[n] / (1 - b1**t)) / ((v[n] / (1 - b2**t)).sqrt() + eps))
        records.append(StepRecord(grads, {n: p.detach().clone() for n, p in student.state_dict().items()}))
    return records


def grad_norm(grads: dict[str, Tensor]) -> float:
    """Global L2 norm of a set of gradients, as gradient clipping measures it."""
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def relative_difference(
    actual: dict[str, Tensor], expected: dict[str, Tensor], start: dict[str, Tensor]
) -> float:
    """|| (actual - start) - (expected - start) || / || expected - start ||, over all tensors: how far the updates
    differ, relative to their size (robust to Adam's sign of near-zero gradients, unlike an elementwise check)."""
    keys = sorted(expected)
    assert sorted(actual) == keys, f"different tensors: {sorted(set(actual) ^ set(keys))}"
    diff = math.sqrt(sum(float((actual[k].double() - expected[k].double()).pow(2).sum()) for k in keys))
    moved = math.sqrt(sum(float((expected[k].double() - start[k].double()).pow(2).sum()) for k in keys))
    assert moved > 0, "the reference did not move: the comparison would prove nothing"
    return diff / moved


# ------------------------------------------------------------------------------------------------ recorded runs


def probe_models(folder: Path) -> tuple[nn.Module, nn.Module, dict[str, Tensor]]:
    """Student and teacher rebuilt from a ``probes.RecordRun`` folder at their initial weights, and the student's
    initial state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    record = torch.load(folder / "start.pt", weights_only=True)
    models = []
    for name in ("student", "teacher"):
        config = dict(record[name]["config"])
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        model.load_state_dict(record[name]["state"])
        models.append(model.float().train() if name == "student" else model.float().eval())
    return models[0], models[1], record["student"]["state"]


def probe_steps(folder: Path, steps: int) -> list[list[dict[str, Tensor]]]:
    """Every batch of every rank for optimizer steps 0..steps-1, as recorded by ``probes.RecordRun``."""
    return [
        [torch.load(path, weights_only=True) for path in sorted(folder.glob(f"batch-step{k}-rank*.pt"))]
        for k in range(steps)
    ]


def checkpoint_student(path: Path) -> dict[str, Tensor]:
    """The student's weights in a Lightning checkpoint of the DistillationModule (keys without ``student.``)."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}


# ------------------------------------------------------------------------------------------------ scores

PREDICTIONS = [
    "The dog is running in the park.",
    "She runs every morning before work",
    "Paris is the capital of France",
    "completely unrelated words here",
]
REFERENCES = [
    ["A dog runs in a park."],
    ["Every morning she went running.", "She ran before work each morning."],
    ["The capital of France is Paris.", "paris"],
    ["nothing in common", "zero overlap at all"],
]


def rouge_l_by_hand(predictions, references, *, use_stemmer=True):
    """Per-example ROUGE-L F x100 straight from rouge_score: one `score` call per reference, Python max."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return [
        100 * max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
        for pred, refs in zip(predictions, references, strict=True)
    ]
