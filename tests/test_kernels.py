"""qlearn.kernels against bitsandbytes: dequantize bit for bit, the GEMV within its stated bound,
NF4Linear in a Llama, the errors.

With CUDA visible the kernels run compiled on the GPU (bitsandbytes' CUDA kernels as the reference);
without, Triton's interpreter runs them on CPU tensors against bitsandbytes' CPU kernels: this file
sets TRITON_INTERPRET=1 before it imports bitsandbytes (which imports Triton), which works when
Triton was not imported before (run alone, or with TRITON_INTERPRET=1 exported; else they skip, saying so).
Without Triton they skip too. The interpreter's cost is per program (about 20 ms each), so the CPU
shapes are small.
"""

import copy
import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Read when Triton is first imported (bitsandbytes imports it), when the kernels are defined, and by
# Triton's own lazy imports later: so it stays set for the rest of this process.
if HAS_TRITON and not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU backend notes about optional kernels
bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")
if not HAS_TRITON:
    SKIP = ("Triton is not installed (it ships with CUDA PyTorch; on a CPU `pip install triton` runs these "
            "tests in its interpreter)")
elif not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    SKIP = "no GPU, and Triton was imported before TRITON_INTERPRET=1 could be set: export TRITON_INTERPRET=1"
else:
    SKIP = ""
    from qlearn.kernels import _triton, gemv, linear, nf4
    from qlearn.kernels.nf4 import round_to_bf16

    tl = _triton.tl

    @_triton.triton.jit
    def _round_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y_ptr + i, round_to_bf16(tl.load(x_ptr + i)))
needs_triton = pytest.mark.skipif(bool(SKIP), reason=SKIP)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
# (64, 256): 8 programs of the default tile; (33, 70): a partial last block and tile; (7, 9): an odd count.
SHAPES = [(64, 256), (33, 70), (7, 9)] + ([(1024, 4096), (8192, 1000)] if CUDA else [])


def _quantized(shape, dtype=torch.bfloat16, nested=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype).to(DEVICE)
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.dtype])


def test_import_qlearn_imports_no_triton_and_a_missing_triton_names_the_fix():
    code = ("import sys, torch; before = 'triton' in sys.modules\n"
            "import qlearn, qlearn.kernels\n"
            "assert ('triton' in sys.modules) == before, 'import qlearn imported triton'\n"
            "sys.modules['triton'] = None  # as if it were not installed\n"
            "try:\n    qlearn.kernels.dequantize_4bit\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CUDA builds of PyTorch" in out.stdout and "pip install triton" in out.stdout, out.stdout


@needs_triton
def test_round_to_bf16_rounds_to_nearest_even_like_torch():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31 - 2**23, (1024,), generator=g, dtype=torch.int64)  # finite positives
    bits[:4] = torch.tensor([0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7FFFFF])  # two ties, below a tie, max
    x = (bits.to(torch.int32).view(torch.float32) * torch.where(torch.arange(1024) % 2 == 0, 1.0, -1.0)).to(DEVICE)
    y = torch.empty(1024, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(1,)](x, y, BLOCK=1024)
    assert torch.equal(_bits(y), _bits(x.to(torch.bfloat16)))  # torch's cast rounds to nearest even


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_matches_bitsandbytes_bit_for_bit(dtype, nested, shape):
    packed, state = _quantized(shape, dtype, nested)
    ours, theirs = nf4.dequantize_4bit(packed, state), bnbF.dequantize_4bit(packed, state)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == dtype
    assert torch.equal(_bits(ours), _bits(theirs)), f"{(ours != theirs).sum()} of {ours.numel()} values differ"


@needs_triton
@pytest.mark.parametrize("shape, blocksize, tile", [((8, 256), 128, 64), ((2, 256), 256, 16), ((24, 512), 32, 2048)])
def test_dequantize_other_blocksizes_and_tiles(shape, blocksize, tile):
    packed, state = _quantized(shape, torch.bfloat16, nested=True, blocksize=blocksize)
    assert torch.equal(_bits(nf4.dequantize_4bit(packed, state, tile=tile)), _bits(bnbF.dequantize_4bit(packed, state)))


@needs_triton
def test_dequantize_takes_a_linear4bit_weight_as_is():
    torch.manual_seed(0)
    layer = linear.to_linear4bit(torch.nn.Sequential(torch.nn.Linear(256, 48)).to(DEVICE))[0]
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.nested
    theirs = bnbF.dequantize_4bit(layer.weight, layer.weight.quant_state)
    assert torch.equal(_bits(nf4.dequantize_4bit(layer.weight)), _bits(theirs))  # quant_state read off the weight


def _gemv_case(n, k, dtype, nested, rows, seed=0):
    packed, state = _quantized((n, k), dtype, nested, seed=seed)
    w32 = nf4.dequantize_4bit(packed, state, dtype=torch.float32)  # exactly table * absmax (tested above)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=g).to(dtype).to(DEVICE)
    y_ref = (x.float() @ bnbF.dequantize_4bit(packed, state).float().T).to(dtype)  # dequantize, then matmul
    return packed, state, w32, x, y_ref


@needs_triton
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemv_is_dequantize_then_matmul_within_the_stated_bound(dtype, nested, rows):
    # K = 1536: a full and a masked step of BLOCK_K = 1024; N = 10 rows.
    n, k = (4096, 14336) if CUDA else (10, 1536)
    packed, state, w32, x, y_ref = _gemv_case(n, k, dtype, nested, rows)
    y = gemv.gemv_4bit(x, packed, state)
    assert y.shape == (rows, n) and y.dtype == dtype
    err = (y.double() - y_ref.double()).abs()
    tol = gemv.tolerance(w32, x, y, y_ref)
    assert torch.all(err <= tol), f"max error / bound {(err / tol).max():.3g}"
    # Against the exact sum (float64 over the exact float32 weights): one rounding to dtype plus
    # float32 accumulation, <= u |y| + K 2^-24 sum |w x| (the bound's own terms).
    exact = x.double() @ w32.double().T
    u = gemv.UNIT_ROUNDOFF[dtype]
    bound = u * exact.abs() + k * 2.0**-24 * (x.abs().double() @ w32.abs().double().T)
    assert torch.all((y.double() - exact).abs() <= bound)


@needs_triton
@pytest.mark.parametrize("block_k, rows, unroll", [(512, 4, 1), (256, 2, 2), (2048, 1, 1)])
def test_gemv_other_tiles(block_k, rows, unroll):
    # rows = 4 with N = 10: a program's last rows fall outside the weight and are masked.
    packed, state, w32, x, y_ref = _gemv_case(10, 1536, torch.bfloat16, True, 2)
    y = gemv.gemv_4bit(x, packed, state, block_k=block_k, rows=rows, unroll=unroll)
    assert torch.all((y.double() - y_ref.double()).abs() <= gemv.tolerance(w32, x, y, y_ref))


@needs_triton
def test_the_gemv_bound_rejects_a_wrong_nibble_order():
    packed, state, w32, x, y_ref = _gemv_case(16, 1536, torch.bfloat16, True, 1)
    swapped = (packed << 4) | (packed >> 4)  # the low nibble first: a plausible unpacking bug
    y_bad = gemv.gemv_4bit(x, swapped, state)
    outside = (y_bad.double() - y_ref.double()).abs() > gemv.tolerance(w32, x, y_bad, y_ref)
    assert outside.float().mean() > 0.8, f"only {outside.float().mean():.0%} of outputs flagged"


def _layer(dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(512, 24, bias=bias).to(dtype).to(DEVICE)
    if bias:
        torch.nn.init.normal_(dense.bias, std=0.5)  # a visible bias
    return linear.to_linear4bit(torch.nn.Sequential(dense), compute_dtype=dtype)[0]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_nf4linear_matches_linear4bit(dtype):
    q = _layer(dtype)
    ours = linear.NF4Linear.from_linear4bit(q)
    assert ours.weight is q.weight and ours.bias is q.bias  # shared, not copied
    w32 = nf4.dequantize_4bit(q.weight, dtype=torch.float32)
    with torch.no_grad():
        x1 = torch.randn(1, 512, dtype=dtype, device=DEVICE)   # GEMV path
        y, y_ref = ours(x1).double(), q(x1).double()
        b = q.bias.double()
        # The GEMV's bound on the sums, plus the rounding of each result after adding the bias.
        tol = gemv.tolerance(w32, x1, y - b, y_ref - b, dtype) + gemv.UNIT_ROUNDOFF[dtype] * (y.abs() + y_ref.abs())
        assert torch.all((y - y_ref).abs() <= tol)
        x8 = torch.randn(2, 4, 512, dtype=dtype, device=DEVICE)  # 8 rows: dequantize + F.linear
        y8, y8_ref = ours(x8), q(x8)
    assert y8.shape == (2, 4, 24)
    if not CUDA:  # bitsandbytes' CPU path is the same dequantize + F.linear; on CUDA it runs its own GEMM
        assert torch.equal(y8, y8_ref)
    else:
        assert torch.allclose(y8.float(), y8_ref.float(), rtol=2**-6, atol=2**-6)  # bf16 rounding of a 512-term sum
    # Gradients reach x through the dequantize path (as in bitsandbytes), never W.
    x, x_ref = x1.clone().requires_grad_(True), x1.clone().requires_grad_(True)
    ours(x).sum().backward()
    q(x_ref).sum().backward()
    assert q.weight.grad is None
    if not CUDA:  # the same grad_y @ W
        assert torch.equal(x.grad, x_ref.grad)
    else:
        assert torch.allclose(x.grad.float(), x_ref.grad.float(), rtol=2**-6, atol=2**-6)


@needs_triton
@pytest.mark.slow  # 4-15 s on the shared 2-core CPU (HF generate twice, bitsandbytes and the interpreter)
def test_use_nf4_kernels_decodes_a_llama_as_bitsandbytes_does(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlearn.gpu_lab import LLAMA_1B

    if CUDA:  # the 1B shape, two of its 16 layers
        config, dtype = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": 2}), torch.bfloat16
    else:
        config, dtype = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64), torch.float32
        monkeypatch.setattr(nf4, "TILE", 4096)  # fewer programs: the interpreter's cost is per program
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(dtype).eval()
    theirs = linear.to_linear4bit(model, compute_dtype=dtype)
    # On the CPU the interpreter runs one GEMV program per weight row, ~20 ms each: decode through the
    # dequantize path there (test_nf4linear_matches_linear4bit covers the GEMV path); the GPU runs both.
    ours = linear.use_nf4_kernels(copy.deepcopy(theirs), gemv_rows=linear.GEMV_ROWS if CUDA else 0)
    swapped = [m for m in ours.modules() if isinstance(m, linear.NF4Linear)]
    assert len(swapped) == 7 * 2 and not any(isinstance(m, bnb.nn.Linear4bit) for m in ours.modules())
    prompt = torch.tensor([[1, 5, 9, 3, 7, 2]], device=DEVICE)  # 6 rows > GEMV_ROWS: the prefill dequantizes
    kwargs = {"max_new_tokens": 2, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        a, b = theirs.generate(prompt, **kwargs), ours.generate(prompt, **kwargs)  # then one decode step
    la, lb = torch.stack(a.logits).float(), torch.stack(b.logits).float()
    assert b.sequences.shape == (1, 8) and la.shape == lb.shape == (2, 1, config.vocab_size)
    if CUDA:  # bf16: each layer's output is rounded to bf16 in both, differently; agree at bf16's scale
        assert torch.allclose(la, lb, rtol=0.05, atol=0.05 * la.abs().max().item())
    else:  # float32: the two differ only in float32 summation order (measured 1.5e-7)
        assert torch.equal(a.sequences, b.sequences) and torch.allclose(la, lb, rtol=0, atol=1e-5)


# --- Bad input: each error once -------------------------------------------------------------------------

@needs_triton
def test_bad_packed_and_absmax_dtypes_raise_naming_them():
    packed, state = _quantized((8, 128), nested=False)
    with pytest.raises(TypeError, match=r"packed must be torch.uint8, got torch.bfloat16 .*view\(torch.uint8\)"):
        nf4.dequantize_4bit(packed.reshape(-1).view(torch.bfloat16), state)
    bad = copy.copy(state)
    bad.absmax = state.absmax.half()
    with pytest.raises(TypeError, match="quant_state.absmax must be torch.float32, got torch.float16"):
        nf4.dequantize_4bit(packed, bad)
    packed2, state2 = _quantized((8, 128), nested=True)
    bad2 = copy.copy(state2)
    bad2.absmax = state2.absmax.float()
    with pytest.raises(TypeError, match="quant_state.absmax must be torch.uint8.*8-bit codes"):
        gemv.gemv_4bit(torch.ones(1, 128, dtype=torch.bfloat16, device=DEVICE), packed2, bad2)


@needs_triton
def test_wrong_states_and_shapes_raise_clear_errors():
    packed, state = _quantized((8, 128))
    with pytest.raises(TypeError, match="quant_state must be bitsandbytes' QuantState"):
        nf4.dequantize_4bit(packed, "nf4")
    with pytest.raises(ValueError, match="packed has 256 values, expected 512"):
        nf4.dequantize_4bit(packed[:256], state)
    fp4 = copy.copy(state)
    fp4.quant_type = "fp4"
    with pytest.raises(ValueError, match="quant_type must be 'nf4'"):
        nf4.dequantize_4bit(packed, fp4)
    repacked = copy.copy(state)
    repacked.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="keep_standard_layout"):
        nf4.dequantize_4bit(packed, repacked)
    with pytest.raises(ValueError, match="tile must be one of"):
        nf4.dequantize_4bit(packed, state, tile=1000)
    packed96, state96 = _quantized((8, 96))  # in_features 96: blocks of 64 straddle rows
    with pytest.raises(ValueError, match=r"in_features \(96\) must be a multiple of blocksize \(64\)"):
        gemv.gemv_4bit(torch.ones(1, 96, dtype=torch.bfloat16, device=DEVICE), packed96, state96)
    with pytest.raises(ValueError, match="in_features"):
        linear.NF4Linear(packed96, state96)
    x = torch.ones(1, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must have in_features = 128 values in its last dim, got shape \(1, 64\)"):
        gemv.gemv_4bit(x, packed, state)
    with pytest.raises(TypeError, match="x must be a bfloat16, float16 or float32 tensor"):
        gemv.gemv_4bit(torch.ones(1, 128, dtype=torch.int32, device=DEVICE), packed, state)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        gemv.gemv_4bit(torch.ones(1, 128, dtype=torch.bfloat16, device=DEVICE), packed, state, block_k=1000)
    with pytest.raises(ValueError, match="unroll must be a power of two"):
        gemv.gemv_4bit(torch.ones(1, 128, dtype=torch.bfloat16, device=DEVICE), packed, state, unroll=3)
    with pytest.raises(ValueError, match="dtype must be one of"):
        nf4.dequantize_4bit(packed, state, dtype=torch.int8)
    packed3, state3 = _quantized((2, 4, 64))
    with pytest.raises(ValueError, match=r"the weight must be 2-D \(out_features, in_features\), got shape \(2, 4, 64\)"):
        gemv.gemv_4bit(torch.ones(1, 64, dtype=torch.bfloat16, device=DEVICE), packed3, state3)
    with pytest.raises(ValueError, match="gemv_rows must be an int >= 0"):
        linear.NF4Linear(packed, state, gemv_rows=-1)
    unquantized = bnb.nn.Linear4bit(128, 8, quant_type="nf4")  # bitsandbytes quantizes on .to(device)
    with pytest.raises(ValueError, match="not quantized yet"):
        linear.NF4Linear.from_linear4bit(unquantized)


@needs_triton
def test_a_cpu_tensor_to_a_gpu_kernel_says_move_it_or_use_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRET", False)  # as when the kernels were compiled for a GPU
    g = torch.Generator().manual_seed(0)
    packed, state = bnbF.quantize_4bit((torch.randn(8, 128, generator=g) * 0.02).to(torch.bfloat16),
                                       blocksize=64, quant_type="nf4")  # on the CPU
    with pytest.raises(ValueError, match=r"packed is on cpu, but the Triton kernels run on a CUDA GPU.*TRITON_INTERPRET=1"):
        nf4.dequantize_4bit(packed, state)
