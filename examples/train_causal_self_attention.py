"""A nanoGPT-style causal self-attention block, trained a few steps with autosdpa.patch().

The model code calls torch.nn.functional.scaled_dot_product_attention as usual; autosdpa.patch() routes those
calls through autosdpa, which picks the fastest backend that gives the right answer. The same training run
without the patch gives the same losses.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import autosdpa


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd=64, n_head=4):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Looked up at call time, so autosdpa.patch() takes effect without touching this line.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class TinyGPT(nn.Module):
    def __init__(self, vocab=64, n_embd=64, block=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(block, n_embd)
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.head = nn.Linear(n_embd, vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


def train(steps=8):
    """Learn to copy a repeating token pattern; returns the loss of every step."""
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (8, 9)).repeat(1, 4)  # (batch, 36): each row repeats a 9-token pattern
    x, y = data[:, :32], data[:, 1:33]
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


plain = train()
with autosdpa.patch():  # F.scaled_dot_product_attention -> autosdpa inside this block
    tuned = train()

print("losses (plain F.sdpa):", " ".join(f"{v:.4f}" for v in plain))
print("losses (autosdpa):    ", " ".join(f"{v:.4f}" for v in tuned))
print(f"loss decreased: {tuned[-1] < tuned[0]}")
print(f"max loss difference vs plain: {max(abs(a - b) for a, b in zip(plain, tuned)):.2e}")

# What autosdpa chose for this block's attention, and why: tensors of the same shape and memory layout as in
# the block ((B, T, H, D) viewed as (B, H, T, D)), needing grad as in training (forward + backward).
q, k, v = (torch.randn(8, 32, 4, 16).transpose(1, 2).requires_grad_() for _ in range(3))
decision = autosdpa.explain(q, k, v, is_causal=True)
print(f"autosdpa chose: {decision.backend} ({decision.reason})")
