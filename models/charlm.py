"""`char-lm`: a tiny causal transformer over bytes (nanoGPT style), sized to train on 2 CPU cores in minutes.

Token ids enter as float32 (the bundle's input dtype, which the device runtime feeds) and are
cast to int64 inside the model. Attention uses an explicit registered
causal-mask buffer filled with a large negative finite value: `scaled_dot_product_attention`
exports into runtime mask ops (slower `.pte`), and a −inf mask upsets PT2E calibration (STACK-NOTES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

VOCAB = 256  # bytes: any UTF-8 text, no vocabulary file
CONTEXT = 64  # tokens in the fixed inference window
MASK_VALUE = -1e4  # large negative finite value: softmax weight exp(-1e4) == 0 in float32


@dataclass(frozen=True)
class LMConfig:
    n_layer: int
    n_head: int
    d_model: int
    context: int = CONTEXT
    vocab: int = VOCAB


TEACHER = LMConfig(n_layer=3, n_head=4, d_model=128)
STUDENT = LMConfig(n_layer=2, n_head=2, d_model=64)


def causal_mask(context: int) -> torch.Tensor:
    """Additive mask M (T, T): M[i, j] = 0 if j ≤ i else MASK_VALUE (position i sees only j ≤ i)."""
    upper = torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1)
    return torch.zeros(context, context).masked_fill(upper, MASK_VALUE)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.n_head, self.d_head = c.n_head, c.d_model // c.n_head
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.mask: torch.Tensor
        self.register_buffer("mask", causal_mask(c.context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, Dh)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head)) + self.mask[:t, :t]
        y = att.softmax(dim=-1) @ v  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(c.d_model), CausalSelfAttention(c)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.mlp = nn.Sequential(nn.Linear(c.d_model, 4 * c.d_model), nn.GELU(), nn.Linear(4 * c.d_model, c.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    """Bytes → next-byte logits. `forward` maps a (B, T) window to (B, vocab) logits for the token after it.

    The embeddings stay fp32 in the int8 program (XNNPACK has no quantized embedding). A one-hot · Linear
    embedding would be quantized (int8 .pte 0.36× instead of 0.44× of fp32) but its eq/cast ops run as
    portable kernels outside the delegate and made the int8 .pte 2.5× slower (458 vs 185 µs, export bench).
    """

    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab, c.d_model)
        self.pos = nn.Embedding(c.context, c.d_model)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab)
        self.positions: torch.Tensor
        self.register_buffer("positions", torch.arange(c.context), persistent=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) float ids -> (B, T, D)
        h = self.tok(x.to(torch.long)) + self.pos(self.positions[: x.shape[1]])
        for block in self.blocks:
            h = block(h)
        return h

    def sequence_logits(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        return self.head(self.ln_f(self.hidden(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, vocab), head on the last position only
        return self.head(self.ln_f(self.hidden(x)[:, -1, :]))


def trainable_names(model: nn.Module, subset: str) -> list[str]:
    """Parameter names the training program updates: `all`, `last` (last block + final norm + head) or `head`."""
    names = [n for n, _ in model.named_parameters()]
    assert isinstance(model, CharLM)
    last = f"blocks.{model.config.n_layer - 1}."
    keep = {
        "all": lambda n: True,
        "last": lambda n: n.startswith((last, "ln_f.", "head.")),
        "head": lambda n: n.startswith("head."),
    }[subset]
    return [n for n in names if keep(n)]


@torch.no_grad()
def generate(net: CharLM, prompt: bytes, n_bytes: int, temperature: float = 0.8, seed: int = 0) -> bytes:
    """`prompt` followed by `n_bytes` sampled bytes: each from softmax(logits / temperature) of the last
    `context` bytes (temperature 0: the most likely byte)."""
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt) or [ord("\n")]
    for _ in range(n_bytes):
        x = torch.tensor([ids[-net.config.context :]], dtype=torch.float32)  # (1, T) float ids, as the program
        logits = net.eval()(x)[0]  # (vocab,)
        if temperature <= 0:
            ids.append(int(logits.argmax()))
        else:
            ids.append(int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=g)))
    return bytes(ids)
