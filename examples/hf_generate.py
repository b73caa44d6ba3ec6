"""A Hugging Face model with attn_implementation="autosdpa" (needs `pip install 'autosdpa[hf]'`).

A tiny Llama (grouped-query attention) with random weights, built from a config so nothing is downloaded;
with a real checkpoint, pass attn_implementation="autosdpa" to from_pretrained the same way. Greedy generation
over a left-padded batch (a padding mask, a prefill, then KV-cache decode steps) gives the same tokens as
attn_implementation="sdpa".
"""
import sys

import torch

try:
    from transformers import AutoModelForCausalLM, LlamaConfig
except ImportError:
    print("transformers is not installed: pip install 'autosdpa[hf]'; skipping this example")
    sys.exit(0)

import autosdpa
import autosdpa.integrations.hf

autosdpa.integrations.hf.register()  # makes attn_implementation="autosdpa" known to transformers

config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
torch.manual_seed(0)
reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
model = AutoModelForCausalLM.from_config(config, attn_implementation="autosdpa").eval()
model.load_state_dict(reference.state_dict())  # the same random weights in both

# Two prompts, the shorter one left-padded as batched generation wants.
input_ids = torch.tensor([[5, 17, 42, 9, 77, 3, 28, 61],
                          [0, 0, 0, 12, 8, 99, 4, 31]])
attention_mask = (input_ids != 0).long()

with torch.no_grad():
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = reference.generate(input_ids, **kwargs)
    tokens = model.generate(input_ids, **kwargs)

print("generated (autosdpa):", tokens[:, input_ids.shape[1]:].tolist())
print("generated (sdpa):    ", expected[:, input_ids.shape[1]:].tolist())
print(f"tokens equal: {torch.equal(tokens, expected)}")

# What autosdpa chose for the prompt (prefill): each layer's queries as (batch, heads, length, head_dim) views,
# the 2 key/value heads repeated to 4 (with a padding mask, PyTorch's fused kernels take no grouped heads), and
# the causal + padding mask transformers builds.
q = torch.randn(2, 8, 4, 16).transpose(1, 2)
k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
mask = torch.ones(8, 8, dtype=torch.bool).tril() & attention_mask.bool()[:, None, None, :]
decision = autosdpa.explain(q, k, v, attn_mask=mask, scale=16 ** -0.5)
print(f"autosdpa chose for the prompt: {decision.backend} ({decision.reason})")
