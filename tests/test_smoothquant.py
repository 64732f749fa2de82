"""qlearn.quant.smoothquant: per-channel scales moved from the activations into the weights, exactly."""

import copy

import pytest
import torch
import transformers

import qlearn
from qlearn import outliers
from qlearn.quant import activations, smoothquant


def toy_llama(seed=0, kv_heads=2):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, transformers.models.llama.modeling_llama.LlamaRMSNorm):
                m.weight.uniform_(0.5, 1.5)  # not all 1: a fold into the norm must show
    return model


def ids(batch=4, seq=32, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_scales_follow_the_formula():
    x_max = torch.tensor([4.0, 1.0, 9.0])
    w = [torch.tensor([[1.0, -0.25, 0.5]]), torch.tensor([[-0.5, 1.0, 0.0]])]  # column max 1, 1, 0.5
    s = smoothquant.smoothing_scales(x_max, w, alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 1.0, 3.0 / 0.5**0.5]))  # sqrt(max|X|) / sqrt(max|W|)
    assert torch.equal(smoothquant.smoothing_scales(x_max, w, alpha=1.0), x_max)
    assert torch.equal(smoothquant.smoothing_scales(x_max, w, alpha=0.0), torch.tensor([1.0, 1.0, 2.0]))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_smooth_keeps_the_function_and_balances_activations_and_weights(kv_heads):
    model = toy_llama(kv_heads=kv_heads)
    calib, x = ids(), ids(seed=1)
    with torch.no_grad():
        before = model(x).logits
    assert smoothquant.smooth(model, calib, alpha=0.5) is model
    with torch.no_grad():
        # float32 rounding of the rescaled weights (measured 6e-8 on these logits of magnitude ~0.5)
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)
    # alpha = 0.5: afterwards max|X_j / s_j| = max|W_j s_j| for the layers a norm feeds
    x_max = outliers.channel_absmax(model, calib)["model.layers.1.mlp.gate_proj"]
    mlp = model.model.layers[1].mlp
    w_max = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).abs().amax(0)
    torch.testing.assert_close(x_max, w_max, rtol=1e-5, atol=0)  # float32 rounding of the folds


def test_on_the_emulated_variant_smoothing_wins_by_construction():
    # emulate_outliers multiplies channels by f; SmoothQuant's s_j becomes f_j s_j: the same blocks come
    # out (without GQA, where the v -> o pair is smoothed too). The final norm and lm_head are not
    # smoothed (lm_head stays in full precision), so the emulation's scale stays there.
    model = toy_llama(kv_heads=4)
    calib = ids()
    a = smoothquant.smooth(copy.deepcopy(model), calib)
    b = smoothquant.smooth(outliers.emulate_outliers(model, factor=30.0, mlp_factor=30.0), calib)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if ".layers." in name:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)  # float32 rounding of f and 1/f


def test_w8a8_per_tensor_works_again_on_the_embedded_models_variant():
    model, tok = qlearn.load_model("tiny", device="cpu")
    text = qlearn.evaluate.validation_text()[:20000]  # tokenizing a prefix is enough for 10 windows
    windows = qlearn.evaluate.token_windows(tok, text, seq_len=128, max_tokens=1280)
    calib, score = windows[8:10], windows[:2]

    def nll(m):
        with torch.no_grad():
            return m(score, labels=score).loss.item()

    variant = outliers.emulate_outliers(model)
    with activations.simulate(variant, 8, 8):
        broken = nll(variant)
    smoothquant.smooth(variant, calib)
    with activations.simulate(variant, 8, 8):
        smoothed = nll(variant)
    fp = nll(model)
    # measured on these 256 tokens (nats): fp 3.345, W8A8 per-tensor 3.574, after smoothing 3.341;
    # the margins are far beyond what a change of CPU moves (a few 1e-3)
    assert broken > fp + 0.15 and abs(smoothed - fp) < 0.05, (fp, broken, smoothed)


def test_bad_arguments_raise_clear_errors():
    model = toy_llama()
    for alpha in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
            smoothquant.smooth(model, ids(), alpha=alpha)
    with pytest.raises(ValueError, match="calib is missing"):
        smoothquant.smooth(model, None)
    with pytest.raises(ValueError, match="width 100, wider than the model's context of 64"):
        smoothquant.smooth(model, ids(seq=100))
    with pytest.raises(ValueError, match=r"weights must be a non-empty list of \(out, 3\) tensors"):
        smoothquant.smoothing_scales(torch.ones(3), [torch.ones(2, 4)])
