"""Rotations (QuaRot, Ashkboos et al., 2024; SpinQuant): turn the residual stream by an orthogonal
matrix Q folded into the weights. The function does not change; outlier channels are spread over all
channels, so the activations become easy to quantize, even at 4 bits.

Why it is exact. With row vectors h (one token) and Q^T Q = I:
- RMSNorm(h) = w * h / rms(h), and rms(h Q) = rms(h) (an orthogonal Q keeps the norm). Fold the norm's
  weight into the layers that read it first (W <- W diag(w), w <- 1); then RMSNorm(h Q) = RMSNorm(h) Q.
- A layer that reads the stream, y = x W^T, gets x Q: keep y with W <- W Q (q/k/v, gate/up, lm_head).
- A layer that writes the stream (o_proj, down_proj) must write y Q: W <- Q^T W; the embeddings
  E <- E Q. Every residual addition then happens in the rotated basis.
Two more rotations reach the inputs the residual one cannot:
- per attention head, v_proj's output and o_proj's input: V_h <- H^T V_h and W_o[:, head] <- W_o[:, head] H
  (attention mixes tokens linearly, so the rotation passes through it); offline, as in QuaRot;
- down_proj's input act(gate) * up, which is not linear in anything one could fold into: QuaRot rotates
  it online, x <- x R with W_down <- W_down R; here an `OnlineRotation` module in front of down_proj
  (its linear layer is then `mlp.down_proj.linear`).

The matrices: a randomized Hadamard matrix H diag(+-1) / sqrt(n) where n is a power of two (QuaRot's
choice: fast and maximally spreading), else a random orthogonal matrix (QR of a Gaussian matrix, the
uniform "Haar" distribution). QuaRot builds non-power-of-two Hadamards as Kronecker products; a dense
random Q does the same job in a simulation. The folds are computed in float64, then rounded once.

On `qlearn.outliers.emulate_outliers`'s variant the residual rotation wins by construction: the
emulated scale lives in the RMSNorm weights and the readers' columns, and folding the norm first puts
W diag(w f) diag(f)^-1 = W diag(w) back, the original model's folded weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..outliers import decoder_layers

__all__ = ["OnlineRotation", "fold_norms", "hadamard", "random_orthogonal", "rotate", "rotation_matrix"]


def hadamard(n: int) -> Tensor:
    """Sylvester's Hadamard matrix of size n (a power of two) divided by sqrt(n): orthogonal, float64."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two for a Sylvester Hadamard matrix, got {n!r} "
                         "(use random_orthogonal for other sizes)")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)  # [[H, H], [H, -H]]
    return H / n**0.5


def random_orthogonal(n: int, seed: int = 0) -> Tensor:
    """A Haar-random orthogonal n x n matrix (float64): Q of the QR of a Gaussian matrix, its columns'
    signs fixed by R's diagonal so that the distribution is uniform."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def rotation_matrix(n: int, seed: int = 0) -> Tensor:
    """H diag(random signs) (randomized Hadamard) for a power of two n, else `random_orthogonal(n, seed)`."""
    if isinstance(n, int) and not isinstance(n, bool) and n >= 1 and not n & (n - 1):
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return signs[:, None] * hadamard(n)  # diag(signs) H: rows of H with random signs
    return random_orthogonal(n, seed)


def _check_rotation(Q: Tensor, n: int, what: str) -> Tensor:
    if not isinstance(Q, Tensor) or Q.shape != (n, n):
        raise ValueError(f"{what} must be a ({n}, {n}) orthogonal matrix for a hidden size of {n}, got "
                         f"{tuple(getattr(Q, 'shape', ()))}")
    Q = Q.double()
    error = (Q.T @ Q - torch.eye(n, dtype=torch.float64, device=Q.device)).abs().max().item()
    if error > 1e-4:
        raise ValueError(f"{what} must be orthogonal (Q^T Q = I), but Q^T Q differs from I by {error:.2g}")
    return Q


class OnlineRotation(nn.Module):
    """x -> linear(x R): a rotation of a layer's input computed at run time (QuaRot's online Hadamard)."""

    def __init__(self, linear: nn.Linear, R: Tensor):
        super().__init__()
        self.register_buffer("R", R.to(linear.weight.dtype))
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x @ self.R)

    def extra_repr(self) -> str:
        return f"R: {tuple(self.R.shape)}"


def _set(layer: nn.Linear, w64: Tensor) -> None:
    layer.weight.data = w64.to(layer.weight.dtype)


def _readers(model: nn.Module):
    """(norm, [layers that read it]) for every RMSNorm of a Llama-style model."""
    for block in decoder_layers(model):
        attn, mlp = block.self_attn, block.mlp
        yield block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]
        yield block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]
    yield model.model.norm, [model.get_output_embeddings()]


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """Fold every RMSNorm weight into the layers that read it (W <- W diag(w), w <- 1), in place; return
    the model. Unties lm_head from the embeddings if they share a weight (the two are folded differently)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        if getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False
    for norm, readers in _readers(model):
        w = norm.weight.double()
        for layer in readers:
            _set(layer, layer.weight.double() * w[None, :])
        norm.weight.fill_(1.0)
    return model


@torch.no_grad()
def rotate(model: nn.Module, seed: int = 0, *, rotation: Tensor | None = None, heads: bool = True,
           online: bool = True) -> nn.Module:
    """Rotate a Llama-style model's residual stream (module docstring) in place and return it.

    rotation  the (hidden, hidden) orthogonal Q (default: `rotation_matrix(hidden, seed)`)
    heads     also rotate each head's v_proj output / o_proj input (Hadamard of head_dim)
    online    also rotate down_proj's input at run time (an OnlineRotation module)
    """
    layers = decoder_layers(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    Q = rotation_matrix(hidden, seed) if rotation is None else _check_rotation(rotation, hidden, "rotation")
    device = next(model.parameters()).device
    Q = Q.to(device)  # float64, on the weights' device (a GPU model rotates on the GPU)
    # Step 1: RMSNorm weights into their readers (so that each norm commutes with Q).
    fold_norms(model)
    # Step 2: the stream's writers and readers.
    embed = model.get_input_embeddings()
    embed.weight.data = (embed.weight.double() @ Q).to(embed.weight.dtype)  # E <- E Q
    for _, readers in _readers(model):
        for layer in readers:
            _set(layer, layer.weight.double() @ Q)  # W <- W Q
    for block in layers:
        for layer in (block.self_attn.o_proj, block.mlp.down_proj):
            _set(layer, Q.T @ layer.weight.double())  # W <- Q^T W
    for i, block in enumerate(layers):
        attn, mlp = block.self_attn, block.mlp
        # Step 3: per head, v_proj's output rows and o_proj's input columns.
        if heads:
            d = attn.head_dim
            H = rotation_matrix(d, seed + 1).to(device)
            v = attn.v_proj.weight.double().reshape(-1, d, hidden)  # (kv_heads, head_dim, hidden)
            _set(attn.v_proj, torch.einsum("ed,hdk->hek", H.T, v).reshape(-1, hidden))  # V_h <- H^T V_h
            o = attn.o_proj.weight.double().reshape(hidden, -1, d)  # (hidden, heads, head_dim)
            _set(attn.o_proj, (o @ H).reshape(hidden, -1))  # W_o[:, head] <- W_o[:, head] H
        # Step 4: down_proj's input, online.
        if online:
            down = mlp.down_proj
            R = rotation_matrix(down.in_features, seed + 2 + i).to(device)
            _set(down, down.weight.double() @ R)  # W <- W R, and x <- x R at run time
            mlp.down_proj = OnlineRotation(down, R)
    return model
