"""nn.TransformerEncoderLayer with a key padding mask, through autosdpa.

nn.MultiheadAttention calls F.scaled_dot_product_attention, so autosdpa.patch() is all it takes. The padding
mask reaches the attention as a mask per key; outputs and gradients equal the unpatched layer's.

Note: in eval mode under torch.no_grad(), PyTorch runs this layer through a fused "fast path" that does not
call F.scaled_dot_product_attention at all; autosdpa sees the calls made with autograd on (training,
fine-tuning), as below.
"""
import torch
import torch.nn as nn

import autosdpa

torch.manual_seed(0)
layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
x = torch.randn(3, 12, 64)
lengths = torch.tensor([12, 7, 4])
padding = torch.arange(12)[None, :] >= lengths[:, None]  # True where a token is padding


def run():
    """Output and the gradient of the layer's attention input projection."""
    layer.zero_grad()
    out = layer(x, src_key_padding_mask=padding)
    out[~padding].sum().backward()  # only real tokens count
    return out.detach(), layer.self_attn.in_proj_weight.grad.clone()


plain_out, plain_grad = run()
with autosdpa.patch():
    out, grad = run()

real = ~padding  # padded positions' outputs are not meaningful in either run
print(f"output max |autosdpa - plain| on real tokens: {(out - plain_out)[real].abs().max().item():.2e}")
print(f"gradient max |autosdpa - plain|: {(grad - plain_grad).abs().max().item():.2e}")
print(f"outputs equal: {torch.allclose(out[real], plain_out[real], atol=1e-5)}")

# What autosdpa chose for this call. MultiheadAttention hands over (B, heads, L, head_dim) views of
# (L, B * heads, head_dim) tensors, and the padding as an additive float mask of shape (B, heads, 1, L).
q, k, v = (torch.randn(12, 3 * 4, 16).transpose(0, 1).view(3, 4, 12, 16).requires_grad_() for _ in range(3))
mask = torch.zeros(3, 4, 1, 12).masked_fill(padding[:, None, None, :], float("-inf"))
decision = autosdpa.explain(q, k, v, attn_mask=mask)
print(f"autosdpa chose: {decision.backend} ({decision.reason})")
