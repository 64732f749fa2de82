"""qlearn.train.fit: equals a hand-written AdamW loop, accumulation, determinism, schedule, errors."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qlearn.train import FitResult, _lr_factor, fit, resolve_autocast


class Toy(nn.Module):
    """A model with the causal-LM calling convention: model(**batch).loss (mean squared error)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.frozen.requires_grad_(False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        pred = self.head(torch.tanh(self.frozen(input_ids))).squeeze(-1)
        return SimpleNamespace(loss=((pred - labels) ** 2).mean())


def toy_batches(n: int, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, 4, generator=g)
        out.append({"input_ids": x, "attention_mask": torch.ones(size, 3, dtype=torch.long),
                    "labels": x.sum(-1)})
    return out


def test_fit_equals_a_hand_written_adamw_loop():
    ours, ref = Toy(), Toy()
    data = toy_batches(5)
    fit(ours, iter(data), steps=5, lr=1e-2, weight_decay=0.1, max_grad_norm=None, progress=False)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for b in data:
        ref(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)  # the same operations in the same order: bit for bit


def test_only_trainable_parameters_change():
    model = Toy()
    frozen = copy.deepcopy(model.frozen.state_dict())
    head = copy.deepcopy(model.head.state_dict())
    fit(model, iter(toy_batches(3)), steps=3, lr=1e-2, progress=False)
    assert all(torch.equal(v, model.frozen.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(head["weight"], model.head.weight)


def test_grad_accum_of_two_halves_equals_one_full_batch():
    a, b = Toy(), Toy()
    data = toy_batches(2, size=4)
    full = {k: torch.cat([data[0][k], data[1][k]]) for k in data[0]}
    fit(a, iter(data), steps=1, lr=1e-2, grad_accum=2, progress=False)
    fit(b, iter([full]), steps=1, lr=1e-2, grad_accum=1, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)  # mean of means vs one mean: fp32 reordering


def test_same_seed_same_losses_and_loss_falls():
    losses = []
    for _ in range(2):
        model = Toy()
        losses.append(fit(model, iter(toy_batches(1) * 30), steps=30, lr=1e-1, progress=False))
    assert losses[0] == losses[1]  # CPU: bit-for-bit repeatable
    assert losses[0][-1] < 0.5 * losses[0][0]


def test_fit_result_is_the_loss_list_with_a_report():
    res = fit(Toy(), iter(toy_batches(4)), steps=2, lr=1e-3, grad_accum=2, progress=False)
    assert isinstance(res, FitResult) and isinstance(res, list) and len(res) == 2
    assert res.losses == list(res)
    assert res.tokens == 4 * 8 * 3  # attention_mask summed over the 4 micro-batches
    assert res.peak_memory is None and res.autocast is None and res.seconds > 0
    assert "steps=2" in repr(res)


def test_trains_a_llama_with_lora():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlearn.lora import apply_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         max_position_embeddings=16))
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    res = fit(model, iter([batch] * 40), steps=40, lr=5e-2, progress=False)
    assert res[-1] < res[0] - 0.3  # starts at ln(32) = 3.47 and learns the one batch (3.0 after 40 steps)
    res16 = fit(model, iter([batch] * 2), steps=2, lr=1e-3, mixed_precision="bf16", progress=False)
    assert res16.autocast == torch.bfloat16 and all(torch.isfinite(torch.tensor(res16)))


def test_autocast_choice():
    assert resolve_autocast("auto", torch.device("cpu")) is None  # slower and not bit-repeatable on CPUs
    assert resolve_autocast("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_autocast("no", torch.device("cuda")) is None


def test_warmup_then_constant_or_linear_decay():
    assert [_lr_factor(k, 10, 4, "constant") for k in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert [_lr_factor(k, 10, 0, "linear") for k in (1, 10)] == [1.0, 0.1]
    assert _lr_factor(5, 10, 4, "linear") == 1.0


def test_nan_loss_raises():
    model = Toy()
    batch = toy_batches(1)[0]
    batch["labels"] = torch.full_like(batch["labels"], float("nan"))
    with pytest.raises(FloatingPointError, match="the loss is nan at step 1"):
        fit(model, iter([batch]), steps=1, lr=1e-3, progress=False)


def test_running_out_of_batches_raises():
    with pytest.raises(ValueError, match="batches ran out after 1 steps"):
        fit(Toy(), iter(toy_batches(1)), steps=2, lr=1e-3, progress=False)


def test_no_trainable_parameters_raises():
    model = Toy().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, iter(toy_batches(1)), steps=1, lr=1e-3, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be a positive int"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(lr=float("inf")), "lr must be a finite number > 0"),
    (dict(grad_accum=0), "grad_accum must be a positive int"),
    (dict(weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
    (dict(warmup=-1), "warmup must be an int >= 0"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be None"),
    (dict(schedule="cosine"), "schedule must be one of"),
    (dict(mixed_precision="fp16"), "mixed_precision must be one of"),
])
def test_bad_arguments_raise(kwargs, match):
    args = dict(steps=1, lr=1e-3) | kwargs
    with pytest.raises(ValueError, match=match):
        fit(Toy(), iter(toy_batches(1)), progress=False, **args)
