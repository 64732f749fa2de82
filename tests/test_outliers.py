"""qlearn.outliers: measuring outlier channels, and the function-preserving variant that has them."""

import pytest
import torch
import transformers

import qlearn
from qlearn import outliers


def toy_llama(seed=0, kv_heads=2):
    """A small random Llama (GQA when kv_heads < 4) whose RMSNorm weights are not all 1 (a fold that
    forgot them would pass with the default init)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=128,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, transformers.models.llama.modeling_llama.LlamaRMSNorm):
                m.weight.uniform_(0.5, 1.5)
    return model


def record_input(layer, seen):
    """A forward pre-hook that keeps the layer's input as (tokens, in_features) in seen["x"]."""
    def hook(module, args):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1])
    return layer.register_forward_pre_hook(hook)


def ids(batch=4, seq=32, seed=0, vocab=128):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    model, tok = qlearn.load_model("tiny", device="cpu")
    return model, qlearn.evaluate.token_windows(tok, seq_len=128, max_tokens=1024)


def test_channel_absmax_is_the_max_over_tokens_of_each_input_channel():
    model = toy_llama()
    x = ids()
    seen = {}
    handle = record_input(model.model.layers[1].mlp.down_proj, seen)
    with torch.no_grad():
        model(x)
    handle.remove()
    absmax = outliers.channel_absmax(model, x, batch_size=8)
    assert torch.equal(absmax["model.layers.1.mlp.down_proj"], seen["x"].abs().amax(0))  # one batch: the same max
    mean = outliers.channel_absmean(model, x, batch_size=2)  # two batches, summed in float64
    torch.testing.assert_close(mean["model.layers.1.mlp.down_proj"], seen["x"].abs().mean(0), rtol=1e-5, atol=0)
    assert set(absmax) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_emulate_outliers_keeps_the_function_and_leaves_its_input_alone(kv_heads):
    model = toy_llama(kv_heads=kv_heads)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variant = outliers.emulate_outliers(model, factor=50.0, mlp_factor=50.0)
    x = ids()
    with torch.no_grad():
        a, b = model(x).logits, variant(x).logits
    # float32 rounding of the rescaled weights and of the sums that read them (measured 2e-7 here)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "outlier_channels")


def test_the_variant_has_outliers_in_the_chosen_channels(tiny):
    model, windows = tiny
    calib = windows[:4]
    variant = outliers.emulate_outliers(model)
    chosen = variant.outlier_channels
    before, after = outliers.channel_absmax(model, calib), outliers.channel_absmax(variant, calib)
    for name in ("model.layers.3.self_attn.q_proj", "model.layers.3.mlp.gate_proj"):
        # the embedded model has no outlier channels (measured: max/median 1.5-2.2 on these inputs)
        assert outliers.outlier_ratio(before[name]) < 3
        assert outliers.outlier_ratio(after[name]) > 10
        assert set(after[name].topk(3).indices.tolist()) == set(chosen["residual"])
    o_proj = after["model.layers.3.self_attn.o_proj"]
    assert set(o_proj.topk(3).indices.tolist()) == set(chosen["attn"][3])
    assert outliers.outlier_ratio(o_proj) > 10


def test_the_variant_keeps_the_embedded_models_logits(tiny):
    model, windows = tiny
    variant = outliers.emulate_outliers(model)
    with torch.no_grad():
        a, b = model(windows[:2]).logits, variant(windows[:2]).logits
    # float32 rounding through 6 blocks (measured max 1.4e-5 on logits of magnitude ~20, 8 x 256 tokens)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_token_sparse_mlp_channels_put_their_outliers_on_few_tokens(tiny):
    model, windows = tiny
    calib = windows[:4]
    variant = outliers.emulate_outliers(model, calib=calib, mlp_channels=2, mlp_factor=20.0)
    seen = {}
    layer = variant.model.layers[2].mlp.down_proj
    handle = record_input(layer, seen)
    with torch.no_grad():
        variant(calib)
    handle.remove()
    x = seen["x"].abs()
    channels = variant.outlier_channels["mlp"][2]
    big = x[:, channels] > 10 * x.amax(0).median()  # entries 10x above the typical channel's maximum
    assert 0 < big.any(dim=1).float().mean() < 0.1  # on some tokens, fewer than 10% of them


def test_explicit_channels_are_used_as_given():
    variant = outliers.emulate_outliers(toy_llama(), channels=[1, 5], attn_channels=[0], mlp_channels=[7])
    assert variant.outlier_channels["residual"] == [1, 5]
    assert variant.outlier_channels["mlp"] == [[7], [7]]


def test_bad_arguments_raise_clear_errors():
    model = toy_llama()
    with pytest.raises(ValueError, match="factor must be a positive number"):
        outliers.emulate_outliers(model, factor=0)
    with pytest.raises(ValueError, match="channels must be a count in 0..64"):
        outliers.emulate_outliers(model, channels=65)
    with pytest.raises(ValueError, match="mlp_channels must hold distinct channel indices in 0..127"):
        outliers.emulate_outliers(model, mlp_channels=[3, 200])
    with pytest.raises(TypeError, match="expected a Llama-style causal LM"):
        outliers.emulate_outliers(torch.nn.Linear(2, 2))


def test_calibration_batch_is_checked():
    model = toy_llama()
    with pytest.raises(ValueError, match="calib is missing"):
        outliers.channel_absmax(model, None)
    with pytest.raises(ValueError, match=r"calib must be a non-empty \(batch, seq\) LongTensor"):
        outliers.channel_absmax(model, ids()[0])
    with pytest.raises(ValueError, match=r"calib must be a non-empty \(batch, seq\) LongTensor"):
        outliers.channel_absmax(model, ids().float())
    with pytest.raises(ValueError, match="width 65, wider than the model's context of 64"):
        outliers.channel_absmax(model, ids(seq=65))
    with pytest.raises(ValueError, match="token ids outside 0..127"):
        outliers.channel_absmax(model, ids(vocab=200, seed=3))
