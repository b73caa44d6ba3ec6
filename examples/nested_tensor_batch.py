"""A variable-length batch as a NestedTensor (jagged layout) through autosdpa.sdpa, without padding.

Three sequences of different lengths are stored packed, with no padding; attention runs on each sequence
separately. The output equals F.scaled_dot_product_attention on the same nested tensors, and
each sequence's output equals attention over that sequence alone.
"""
import warnings

import torch
import torch.nn.functional as F

import autosdpa

# On the CPU, PyTorch's own attention for nested tensors converts them internally and warns that this older
# nested layout is a prototype; nothing here uses that layout.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
torch.manual_seed(0)
heads, head_dim = 4, 16
lengths = [5, 12, 3]


def jagged():
    """(batch, heads, ragged length, head_dim) from one (length, heads, head_dim) tensor per sequence."""
    seqs = [torch.randn(n, heads, head_dim) for n in lengths]
    return torch.nested.nested_tensor(seqs, layout=torch.jagged).transpose(1, 2)


q, k, v = jagged(), jagged(), jagged()
out = autosdpa.sdpa(q, k, v)
expected = F.scaled_dot_product_attention(q, k, v)

print(f"batch of {len(lengths)} sequences, lengths {lengths}, output is nested: {out.is_nested}")
print(f"max |autosdpa - F.sdpa|: {(out.values() - expected.values()).abs().max().item():.2e}")

# Each sequence alone, as a dense (heads, length, head_dim) call, gives that sequence's output.
worst = 0.0
for qi, ki, vi, oi in zip(q.unbind(), k.unbind(), v.unbind(), out.unbind()):
    worst = max(worst, (F.scaled_dot_product_attention(qi, ki, vi) - oi).abs().max().item())
print(f"max |autosdpa - per-sequence dense attention|: {worst:.2e}")

decision = autosdpa.explain(q, k, v)
print(f"autosdpa chose: {decision.backend} ({decision.reason})")
