"""A torch.compile'd model that calls autosdpa.sdpa directly.

autosdpa works inside compiled code without a graph break (fullgraph=True compiles). The compiled model's
output equals the eager model's.
"""
import torch
import torch.nn as nn

import autosdpa


class Attention(nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = autosdpa.sdpa(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


torch.manual_seed(0)
model = Attention().eval()
x = torch.randn(4, 32, 64)

with torch.no_grad():
    eager = model(x)  # eager calls: autosdpa measures the backends on first sight and remembers the winner
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = compiled_model(x)

print(f"compiled max |compiled - eager|: {(compiled - eager).abs().max().item():.2e}")
print(f"outputs equal: {torch.allclose(compiled, eager, atol=1e-5)}")

# What autosdpa chose for these attention calls: (B, heads, T, head_dim) views of one (B, T, 3, heads, head_dim)
# projection, as in Attention.forward.
q, k, v = torch.randn(4, 32, 3, 4, 16).permute(2, 0, 3, 1, 4)
decision = autosdpa.explain(q, k, v, is_causal=True)
print(f"autosdpa chose: {decision.backend} ({decision.reason})")
