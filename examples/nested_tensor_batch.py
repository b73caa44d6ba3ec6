"""A variable-length batch as a NestedTensor (jagged layout) through autosdpa.sdpa, without padding.

Three sequences of different lengths are stored packed, with no padding; attention runs on each sequence
separately. On first sight autosdpa times PyTorch's own NestedTensor attention against two compositions of
dense attention (pad with a key-padding mask; one dense call per group of equal lengths), checks each against
attention over each sequence alone, and keeps the fastest for every batch of that size (the key buckets batch
size, longest sequence and total tokens). Causal attention works too, each sequence causal on its own, where
F.scaled_dot_product_attention has no CPU kernel for causal NestedTensors.
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


def worst_per_sequence(out, q, k, v, **kw):
    """Max difference from dense attention over each sequence alone, as a (heads, length, head_dim) call."""
    return max((F.scaled_dot_product_attention(qi, ki, vi, **kw) - oi).abs().max().item()
               for qi, ki, vi, oi in zip(q.unbind(), k.unbind(), v.unbind(), out.unbind()))


q, k, v = jagged(), jagged(), jagged()
out = autosdpa.sdpa(q, k, v)  # first sight: measures the candidates, then runs the winner
expected = F.scaled_dot_product_attention(q, k, v)

print(f"batch of {len(lengths)} sequences, lengths {lengths}, output is nested: {out.is_nested}")
print(f"max |autosdpa - F.sdpa|: {(out.values() - expected.values()).abs().max().item():.2e}")
print(f"max |autosdpa - per-sequence dense attention|: {worst_per_sequence(out, q, k, v):.2e}")

decision = autosdpa.explain(q, k, v)
print(f"problem: {decision.problem}")
print("measured: " + ", ".join(f"{name} {t * 1e3:.3f} ms" for name, t in decision.timings.items() if t))
print(f"autosdpa chose: {decision.backend} ({decision.reason})")

# Causal: each sequence attends to its own earlier tokens (top-left aligned, as dense is_causal=True).
try:
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    plain = "runs"
except RuntimeError as e:
    plain = f"RuntimeError ({str(e).splitlines()[0]})"
print(f"F.sdpa with is_causal=True on this device: {plain}")
causal = autosdpa.sdpa(q, k, v, is_causal=True)
print(f"causal max |autosdpa - per-sequence dense causal attention|: "
      f"{worst_per_sequence(causal, q, k, v, is_causal=True):.2e}")
decision = autosdpa.explain(q, k, v, is_causal=True)
print(f"autosdpa chose for causal: {decision.backend} ({decision.reason})")
