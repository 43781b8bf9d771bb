"""LogitLens on every supported family, and the chunked lens loss against the naive computation."""

from __future__ import annotations

import pytest
import torch
from reference import divergence
from transformers import AutoConfig, AutoModelForCausalLM

from distillens import losses
from distillens.lens import LogitLens, lens_loss, naive_lens_loss

VOCAB = 97
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=64,
)
FAMILIES = {
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0),
    "llama": {**SIZES, "num_key_value_heads": 2},
    "qwen2": SIZES,
    "mistral": SIZES,
    "gemma": dict(SIZES, head_dim=8),
    "gemma2": dict(SIZES, head_dim=8, final_logit_softcapping=3.0),
    "phi3": dict(SIZES, pad_token_id=0, eos_token_id=0, bos_token_id=0),
    "gpt_neox": SIZES,
    "opt": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=16,
    ),
    "cohere": dict(SIZES, logit_scale=0.25, eos_token_id=0, bos_token_id=0),
}


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    config = AutoConfig.for_model(family, **{**FAMILIES[family], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_last_layer_lens_equals_model_logits(family, tokens):
    model = tiny_model(family)
    lens = LogitLens(model)
    assert lens.num_layers == 3
    with torch.no_grad(), lens.capture([0, 1, lens.num_layers]) as hidden:
        out = model(tokens, output_hidden_states=True)
    torch.testing.assert_close(lens.logits(hidden[3]), out.logits, rtol=1e-5, atol=1e-5)
    for i in (0, 1):  # transformers' hidden_states are raw before the last layer: the capture must agree
        torch.testing.assert_close(hidden[i], out.hidden_states[i])


@pytest.mark.parametrize(
    ("family", "after_head"),
    [
        ("gemma2", lambda z: 3.0 * torch.tanh(z / 3.0)),  # final_logit_softcapping 3.0
        ("cohere", lambda z: z * 0.25),  # logit_scale 0.25
    ],
)
def test_softcapping_and_logit_scale_are_part_of_the_intermediate_lens(family, after_head, tokens):
    """An intermediate layer's lens, written out: final norm, tied unembedding, then the family's post-processing."""
    model = tiny_model(family)
    lens = LogitLens(model)
    with torch.no_grad():
        states = model(tokens, output_hidden_states=True).hidden_states
        for i in (0, 1, 2):
            by_hand = after_head(model.model.norm(states[i]) @ model.model.embed_tokens.weight.T)  # (B, T, V)
            torch.testing.assert_close(lens.logits(states[i]), by_hand)


def test_gpt2_intermediate_lens_by_hand(tokens):
    model = tiny_model("gpt2")
    lens = LogitLens(model)
    with torch.no_grad():
        states = model(tokens, output_hidden_states=True).hidden_states
        for i in range(3):
            by_hand = model.transformer.ln_f(states[i]) @ model.transformer.wte.weight.T  # tied unembedding
            torch.testing.assert_close(lens.logits(states[i]), by_hand)


def test_llama_intermediate_lens_by_hand(tokens):
    model = tiny_model("llama")
    lens = LogitLens(model)
    weight, eps = model.model.norm.weight, model.config.rms_norm_eps
    with torch.no_grad():
        states = model(tokens, output_hidden_states=True).hidden_states
        for i in range(3):
            h = states[i]
            normed = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight  # RMSNorm written out
            torch.testing.assert_close(lens.logits(h), normed @ model.lm_head.weight.T, rtol=1e-5, atol=1e-5)


def test_published_lens_switch_skips_the_final_norm(tokens):
    model = tiny_model("llama")
    lens = LogitLens(model, apply_final_norm=False)
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(lens.logits(h), model.lm_head(h))


def test_hooks_are_removed_after_use_and_after_errors(tokens):
    model = tiny_model("llama")
    lens = LogitLens(model)

    def hook_count() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hook_count()
    with lens.capture([0, 2]):
        assert hook_count() == before + 2
        model(tokens)
    assert hook_count() == before
    with pytest.raises(RuntimeError, match="boom"), lens.capture([1]):
        raise RuntimeError("boom")
    assert hook_count() == before


def test_capture_keeps_only_the_listed_layers(tokens):
    model = tiny_model("gpt2")
    lens = LogitLens(model)
    with torch.no_grad(), lens.capture([2]) as hidden:
        model(tokens)
    assert sorted(hidden) == [2]


def test_out_of_range_layers_name_the_depth():
    lens = LogitLens(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"\[4, -1\].*3 blocks"), lens.capture([1, 4, -1]):
        pass


def test_unsupported_model_is_a_clear_error():
    with pytest.raises((ValueError, AttributeError), match="decoder|get_decoder"):
        LogitLens(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------------------
# The chunked lens loss


def independent_lens_loss(student_hidden, teacher_hidden, student, teacher, mask, name, **params):
    """Loop over pairs and supervised tokens, one token at a time, with the public masked divergence."""
    per_pair = []
    for hs, ht in zip(student_hidden, teacher_hidden, strict=True):
        values = [
            losses.get_divergence(name)(student.logits(hs[b, t]), teacher.logits(ht[b, t]).detach(), **params)
            for b in range(mask.shape[0])
            for t in range(mask.shape[1])
            if mask[b, t]
        ]
        per_pair.append(torch.stack(values).mean())
    return torch.stack(per_pair).mean(), torch.stack(per_pair).detach()


@pytest.fixture(scope="module")
def pair_setup():
    torch.manual_seed(3)
    student = tiny_model("llama", hidden_size=32, num_hidden_layers=4).train()
    teacher = tiny_model("llama", hidden_size=48, num_hidden_layers=6)
    tokens = torch.randint(0, VOCAB, (3, 11))
    mask = torch.zeros(3, 11, dtype=torch.bool)  # a different supervised span in every row
    mask[0, 2:5] = True
    mask[1, 6:11] = True
    mask[2, [1, 4, 9]] = True
    return student, teacher, tokens, mask


def run_loss(fn, pair_setup, name="jsd", **kwargs):
    student, teacher, tokens, mask = pair_setup
    s_lens, t_lens = LogitLens(student), LogitLens(teacher)
    student.zero_grad()
    with s_lens.capture([1, 2, 4]) as hs, t_lens.capture([2, 4, 6]) as ht:
        student(tokens)
        with torch.no_grad():
            teacher(tokens)
    s_hidden = [hs[i] for i in (1, 2, 4)]
    for h in s_hidden:
        h.retain_grad()
    loss, per_pair = fn(
        [hs[i] for i in (1, 2, 4)], [ht[i] for i in (2, 4, 6)], s_lens, t_lens, mask, name, **kwargs
    )
    loss.backward()
    grads = [h.grad.clone() for h in s_hidden]
    grads += [student.lm_head.weight.grad.clone(), student.model.norm.weight.grad.clone()]
    grads.append(student.model.layers[0].self_attn.q_proj.weight.grad.clone())
    return loss.detach(), per_pair, grads


@pytest.mark.parametrize(
    ("name", "params"), [("jsd", {}), ("forward_kl", {"temperature": 2.0}), ("reverse_kl", {}), ("akl", {})]
)
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_lens_loss_equals_naive_in_value_and_gradients(pair_setup, name, params, chunk_size):
    chunked = run_loss(lens_loss, pair_setup, name, chunk_size=chunk_size, **params)
    naive = run_loss(naive_lens_loss, pair_setup, name, **params)
    independent = run_loss(independent_lens_loss, pair_setup, name, **params)
    for reference in (naive, independent):
        torch.testing.assert_close(chunked[0], reference[0])
        torch.testing.assert_close(chunked[1], reference[1])
        for got, expected in zip(chunked[2], reference[2], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_lens_loss_projects_one_chunk_at_a_time_and_each_row_once(pair_setup):
    """The memory bound: the lens never sees more than chunk_size rows, and only supervised rows."""
    student, teacher, tokens, mask = pair_setup
    s_lens, t_lens = LogitLens(student), LogitLens(teacher)
    seen: list[int] = []
    original = LogitLens.logits

    def spy(self, hidden, *weight):
        seen.append(hidden.shape[0])
        return original(self, hidden, *weight)

    with s_lens.capture([1, 2]) as hs, t_lens.capture([3, 6]) as ht:
        student(tokens)
        teacher(tokens)
    LogitLens.logits = spy
    try:
        loss, _ = lens_loss([hs[1], hs[2]], [ht[3], ht[6]], s_lens, t_lens, mask, chunk_size=4)
        loss.backward()
    finally:
        LogitLens.logits = original
    supervised = int(mask.sum())
    assert max(seen) <= 4
    assert (
        sum(seen) == 2 * 2 * supervised
    )  # two pairs, both models, each supervised row projected exactly once


def test_lens_loss_under_no_grad_computes_no_gradients(pair_setup):
    student, teacher, tokens, mask = pair_setup
    s_lens, t_lens = LogitLens(student), LogitLens(teacher)
    with torch.no_grad(), s_lens.capture([4]) as hs, t_lens.capture([6]) as ht:
        student(tokens)
        teacher(tokens)
        loss, per_pair = lens_loss([hs[4]], [ht[6]], s_lens, t_lens, mask)
        # the definition: mean over supervised tokens of JSD between the two models' logits (their last layers)
        expected = divergence("jsd", student(tokens).logits[mask], teacher(tokens).logits[mask]).mean()
    assert not loss.requires_grad and not per_pair.requires_grad
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(per_pair, expected[None])


def test_lens_loss_all_masked_is_zero(pair_setup):
    student, teacher, tokens, _ = pair_setup
    s_lens, t_lens = LogitLens(student), LogitLens(teacher)
    with s_lens.capture([4]) as hs, t_lens.capture([6]) as ht:
        student(tokens)
        teacher(tokens)
    loss, per_pair = lens_loss([hs[4]], [ht[6]], s_lens, t_lens, torch.zeros(3, 11, dtype=torch.bool))
    loss.backward()
    assert loss == 0 and per_pair.tolist() == [0.0]


def test_lens_loss_rejects_mismatched_pairs(pair_setup):
    student, teacher, *_ = pair_setup
    with pytest.raises(ValueError, match="same non-zero number"):
        lens_loss([torch.randn(1, 2, 32)], [], LogitLens(student), LogitLens(teacher), torch.ones(1, 2))
