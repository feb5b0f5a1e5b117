"""A GPT built only from whitelisted layers and ops, so it can travel as a model graph.

Embedding, LayerNorm, Linear, GELU; attention as matmul, masked_fill and softmax.
``GPT.small()`` has GPT-2 small's shape (124 M parameters, about 500 MB in float32).

>>> m = GPT(vocab=11, context=8, width=16, depth=2, heads=2)
>>> m(torch.zeros(3, 5, dtype=torch.long)).shape
torch.Size([3, 5, 11])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GPT", "generate"]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        hd = c // self.heads
        q = q.view(b, t, self.heads, hd).transpose(1, 2)
        k = k.view(b, t, self.heads, hd).transpose(1, 2)
        v = v.view(b, t, self.heads, hd).transpose(1, 2)
        att = torch.matmul(q, k.transpose(-2, -1)) * hd ** -0.5
        causal = torch.ones_like(att[0, 0]).tril()  # (t, t); bool buffers do not travel
        att = att.masked_fill(causal == 0, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * width, width)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token ids (batch, time) -> next-token logits (batch, time, vocab)."""

    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int):
        super().__init__()
        self.context = context
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False, device="meta")  # no memory: tied below
        self.head.weight = self.wte.weight  # tied, as in GPT-2
        for m in self.modules():  # GPT-2's initialisation: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def small(cls) -> "GPT":
        """GPT-2 small's shape: 50257 tokens, 1024 context, 768 wide, 12 layers and heads."""
        return cls(vocab=50257, context=1024, width=768, depth=12, heads=12)

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, steps: int, *, context: int,
             temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample `steps` tokens after `prompt` (1-D token ids); works on imported GraphModels."""
    idx = prompt.view(1, -1)
    for _ in range(steps):
        logits = model(idx[:, -context:])[:, -1, :] / max(temperature, 1e-6)
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[0]
