"""The embedded model, its loader, perplexity and the task data."""

import json
import math

import pytest
import torch

import qlearn
from qlearn import tasks
from qlearn.evaluate import token_windows
from qlearn.paths import data_dir


@pytest.fixture(scope="module")
def tiny():
    return qlearn.load_model("tiny", device="cpu")


def test_tiny_is_a_llama_of_the_documented_shape(tiny):
    model, tok = tiny
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size) == (256, 6, 768, 8192)
    assert sum(p.numel() for p in model.parameters()) == 9_309_440
    assert len(tok) == cfg.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)


def test_data_folder_fits_its_budget():
    total = sum(f.stat().st_size for f in data_dir().rglob("*") if f.is_file())
    assert total <= 30e6, f"data/ is {total / 1e6:.1f} MB, over the 30 MB budget"


def test_perplexity_is_deterministic_and_in_the_card_range(tiny):
    model, tok = tiny
    a = qlearn.perplexity(model, tok)
    b = qlearn.perplexity(model, tok)
    assert a == b
    # data/README.md reports 15.50 for float32 on this protocol; a broken load gives thousands.
    assert 14.0 < a < 17.0


def test_perplexity_of_a_random_model_is_near_the_vocabulary_size(tiny):
    from transformers import LlamaForCausalLM

    model, tok = tiny
    torch.manual_seed(0)
    random = LlamaForCausalLM(model.config).eval()
    ppl = qlearn.perplexity(random, tok, max_tokens=1024)
    assert 0.5 * 8192 < ppl < 2 * 8192  # an untrained model is close to uniform over 8192 tokens


def test_token_windows_shape_and_errors(tiny):
    _, tok = tiny
    w = token_windows(tok, seq_len=128, max_tokens=1000)
    assert w.shape == (7, 128)
    with pytest.raises(ValueError, match="seq_len"):
        token_windows(tok, seq_len=1)
    with pytest.raises(ValueError, match="max_tokens"):
        token_windows(tok, seq_len=256, max_tokens=100)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tok, texts="too short", seq_len=64)
    with pytest.raises(ValueError, match="texts"):
        token_windows(tok, texts=[])


def test_nf4_model_is_close_to_full_precision_and_really_4bit(tiny):
    import bitsandbytes as bnb

    model, tok = tiny
    q, _ = qlearn.load_model("tiny", quantization="nf4", device="cpu")
    layers = [m for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 6 * 7  # every projection of every block; lm_head stays in high precision
    assert layers[0].weight.quant_state.quant_type == "nf4" and layers[0].weight.quant_state.nested
    # on a CPU the 4-bit layers compute in float32 (bf16 is emulated there, 10x slower): QLoRA's recipe otherwise
    assert all(m.compute_dtype == torch.float32 for m in layers)
    assert qlearn.models.bnb_config("nf4").bnb_4bit_compute_dtype == torch.bfloat16
    assert not any(qlearn.models.is_repacked(m) for m in layers)  # load_model kept the standard layout
    ref = qlearn.perplexity(model, tok)
    ppl = qlearn.perplexity(q, tok)
    assert ref < ppl < 1.10 * ref  # the card's claim: NF4 within 10% of full precision
    assert not any(qlearn.models.is_repacked(m) for m in layers)  # not even after eval-mode passes


def test_load_model_errors():
    with pytest.raises(ValueError, match="quantization must be one of"):
        qlearn.load_model("tiny", quantization="int3")
    with pytest.raises(ValueError, match="dtype must be a floating"):
        qlearn.load_model("tiny", dtype=torch.int8)


def test_missing_embedded_model_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("QLEARN_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="QLEARN_DATA"):
        qlearn.load_model("tiny")


def offline(monkeypatch):
    """Offline mode now: huggingface_hub reads HF_HUB_OFFLINE once, at import, so patch the constant
    (else the test waits for network time-outs)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_offline_names_the_fix(monkeypatch):
    offline(monkeypatch)
    with pytest.raises(FileNotFoundError, match="name='tiny'"):
        qlearn.load_model("qlearn-course/no-such-model-for-tests")


def test_qlearn_model_env_overrides_default_name(monkeypatch, tmp_path):
    monkeypatch.setenv("QLEARN_MODEL", str(tmp_path / "nowhere"))
    offline(monkeypatch)
    with pytest.raises((FileNotFoundError, OSError)):
        qlearn.load_model()


def test_task_splits_are_disjoint_and_sized():
    for name in tasks.TASKS:
        t = tasks.load(name)
        assert (len(t.train), len(t.test)) == (1200, 200)
        assert not {e["prompt"] for e in t.train} & {e["prompt"] for e in t.test}
        assert all(e["answer"].startswith(" ") for e in t.train + t.test)


def test_task_keyword_sets_of_the_test_split_never_occur_in_train():
    def keys(prompt):  # the ordered keyword names of a to_dict prompt
        inner = prompt.split("(", 1)[1].rsplit(")", 1)[0]
        return tuple(part.split("=")[0] for part in inner.split(", "))

    t = tasks.load("to_dict")
    assert not {keys(e["prompt"]) for e in t.train} & {keys(e["prompt"]) for e in t.test}


def test_encode_masks_the_prompt_and_ends_with_eos(tiny):
    _, tok = tiny
    ex = tasks.load("to_dict").train[:2]
    enc = tasks.encode(tok, ex)
    for i, e in enumerate(ex):
        labels = enc["labels"][i]
        kept = labels[labels != tasks.IGNORE]
        assert tok.decode(kept[:-1]) == e["answer"]
        assert kept[-1].item() == tok.eos_token_id
        n_prompt = len(tok(e["prompt"]).input_ids)
        assert (labels[:n_prompt] == tasks.IGNORE).all()
    assert enc["input_ids"].shape == enc["attention_mask"].shape == enc["labels"].shape


def test_base_model_fails_the_tasks_zero_shot(tiny):
    model, tok = tiny
    for name in tasks.TASKS:
        assert tasks.evaluate(model, tok, name, n=50) <= 0.10


def test_evaluate_scores_a_model_that_knows_the_answers(tiny):
    """evaluate() must give 1.0 to perfect answers: use examples whose answer is what the model says."""
    model, tok = tiny
    ex = tasks.load("to_dict").test[:5]
    said = tasks.generate(model, tok, [e["prompt"] for e in ex])
    fake = [{"prompt": e["prompt"], "answer": " " + s.strip()} for e, s in zip(ex, said)]
    assert tasks.evaluate(model, tok, "to_dict", examples=fake) == 1.0


def test_task_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="name must be one of"):
        tasks.load("sentiment")
    with pytest.raises(ValueError, match="n must be a positive int"):
        tasks.evaluate(model, tok, "to_dict", n=0)
    with pytest.raises(ValueError, match="split must be"):
        tasks.evaluate(model, tok, "to_dict", split="dev")
    with pytest.raises(ValueError, match="batch_size"):
        next(tasks.batches(tok, "to_dict", 0))


def test_training_log_matches_the_shipped_config():
    log = json.loads((data_dir() / "tiny" / "train_log.json").read_text())
    assert log["parameters"] == 9_309_440
    assert math.isclose(math.exp(log["best_val_loss"]), log["best_val_ppl"], rel_tol=1e-3)
