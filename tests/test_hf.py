"""attn_implementation="autosdpa" in Hugging Face transformers gives what "sdpa" gives (tiny random models built
from configs: nothing is downloaded)."""
import copy
import inspect
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import autosdpa  # noqa: E402
from autosdpa.integrations import hf  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

# Older transformers (4.5x) ignore a T5-style position bias in "sdpa" and build BERT without AttentionInterface.
_HF_BIAS = "position_bias" in inspect.signature(sdpa_attention_forward).parameters
_HF5 = int(transformers.__version__.split(".")[0]) >= 5

# float32 on CPU: autosdpa may pick another backend than PyTorch (math vs the CPU flash kernel), whose sums
# round differently; the models below are small enough that this stays far below these bounds.
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    hf.register()


def _pair(model_cls, config):
    """The same random weights twice: one model on "sdpa", one on "autosdpa" (each with its own config: a
    model's attention implementation is stored in its config)."""
    torch.manual_seed(0)
    ref, ours = (model_cls(copy.deepcopy(config)).eval() for _ in range(2))
    ref.set_attn_implementation("sdpa")
    ours.set_attn_implementation("autosdpa")
    ours.load_state_dict(ref.state_dict())
    assert (ref.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", "autosdpa")
    return ref, ours


@pytest.fixture(scope="module")
def llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0)
    return _pair(transformers.LlamaForCausalLM, cfg)


def _padded(batch=3, length=9, vocab=96, side="left"):
    """Token ids and attention mask with rows of 9, 6 and 3 real tokens; left padding is what batched
    generation uses, right padding what BERT tokenizers give."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    if side == "right":
        mask = mask.flip(1)
    ids[mask == 0] = 0
    return ids, mask


def test_register_is_idempotent_and_registers_the_mask_builder():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert hf.register() == hf.register() == "autosdpa"
    assert AttentionInterface()["autosdpa"] is hf.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["autosdpa"] is hf.mask_builder


def test_missing_transformers_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when absent
    with pytest.raises(ImportError, match=r"pip install 'autosdpa\[hf\]'"):
        hf.register()


def test_a_broken_transformers_reports_its_real_import_error(monkeypatch):
    """An installed, recent transformers whose import fails (e.g. a shadowed dependency) is reported as that
    error, not as "needs transformers >= 4.56"."""
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)  # its import raises ImportError
    with pytest.raises(ImportError) as err:
        hf.register()
    msg = str(err.value)
    assert f"transformers {transformers.__version__} is installed" in msg and "masking_utils" in msg
    assert ">= 4.56" not in msg


def test_an_old_transformers_is_told_to_upgrade(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)
    monkeypatch.setattr(transformers, "__version__", "4.40.2")
    with pytest.raises(ImportError, match=r"needs transformers >= 4.56.*4\.40\.2 is installed"):
        hf.register()


class _Attn(torch.nn.Module):
    def __init__(self, groups, is_causal=True):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


def _bool_mask(b, lq, lk, pad, causal=True):
    m = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    m = m.tril(lk - lq) if causal else m
    m[-1, ..., :pad] = False
    return m


# (groups, Lq, Lk, mask, position_bias, module is_causal): prefill, padded prefill, decode step (query heads
# folded), float mask, a mask that is not causal (it wins over the module's causality), T5-style bias with and without mask, empty static cache (keys past Lq dropped).
_CASES = {
    "gqa-causal-nomask": (2, 6, 6, None, False, True),
    "gqa-padded": (2, 6, 6, "bool", False, True),
    "gqa-decode-padded": (4, 1, 7, "bool", False, True),
    "gqa-decode-nomask": (2, 1, 7, None, False, True),
    "float-mask": (1, 5, 5, "float", False, False),
    "prefix-lm-mask": (2, 5, 5, "bidirectional", False, True),  # a causal module given a non-causal mask
    "bias-causal": (1, 5, 5, None, True, True),
    "bias-bool-mask": (2, 5, 5, "bool", True, True),
    "static-cache-prefill": (2, 4, 8, None, False, True),
    "encoder": (1, 5, 5, None, False, False),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_attention_forward_matches_transformers_sdpa(case):
    groups, lq, lk, mask_kind, with_bias, causal = _CASES[case]
    if with_bias and not _HF_BIAS:
        pytest.skip("this transformers' sdpa_attention_forward takes no position_bias")
    g = torch.Generator().manual_seed(2)
    hkv, b, d = 2, 2, 8
    q = torch.randn(b, hkv * groups, lq, d, generator=g)
    k, v = (torch.randn(b, hkv, lk, d, generator=g) for _ in range(2))
    mask = None if mask_kind is None else _bool_mask(b, lq, lk, pad=2, causal=mask_kind != "bidirectional")
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    bias = torch.randn(1, q.shape[1], lq, lk, generator=g) if with_bias else None
    module = _Attn(groups, causal)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3, position_bias=bias)
    got, weights = hf.attention_forward(module, q, k, v, mask, scaling=0.3, position_bias=bias)
    assert weights is None
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, **TOL)


def test_softcap_is_refused_like_sdpa():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        hf.attention_forward(_Attn(1), q, q, q, None, softcap=30.0)


def test_llama_logits_equal_sdpa_with_left_padding_and_gqa(llama):
    ref, ours = llama
    ids, mask = _padded()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits,
                                   **TOL)
        full = torch.ones_like(ids)  # no padding: transformers passes no mask and relies on is_causal
        torch.testing.assert_close(ours(ids, attention_mask=full).logits, ref(ids, attention_mask=full).logits,
                                   **TOL)


def test_llama_attention_goes_through_autosdpa(llama):
    """A backend that cannot run on the CPU, forced through autosdpa, fails "autosdpa" and not "sdpa"."""
    ref, ours = llama
    ids, mask = _padded()
    with torch.no_grad(), autosdpa.backend("cudnn"):
        ref(ids, attention_mask=mask)
        with pytest.raises(RuntimeError, match="cudnn"):
            ours(ids, attention_mask=mask)


def test_llama_greedy_generation_equals_sdpa(llama):
    """Prefill (Lq = Lk) then KV-cache decode steps (Lq = 1 < Lk) over a left-padded batch."""
    ref, ours = llama
    ids, mask = _padded()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want, got = ref.generate(ids, **kw), ours.generate(ids, **kw)
    assert got.shape == (3, 9 + 6)
    assert torch.equal(got, want)


@pytest.mark.skipif(not _HF5, reason="BERT uses AttentionInterface from transformers 5 on")
def test_bert_padding_mask_equals_sdpa():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    ref, ours = _pair(transformers.BertModel, cfg)
    ids, mask = _padded(vocab=64, side="right")
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, **TOL)
    # the padding really matters here: without the mask the sequences' outputs differ
    assert not torch.allclose(ours(ids).last_hidden_state[2], got[2], **TOL)


@pytest.mark.skipif(not _HF_BIAS, reason="this transformers' sdpa path takes no position_bias")
def test_t5_position_bias_and_generation_equal_sdpa():
    """T5 adds a learned position bias to attention scores: it reaches autosdpa merged into the mask."""
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, pad_token_id=0)
    ref, ours = _pair(transformers.T5ForConditionalGeneration, cfg)
    ids, mask = _padded(vocab=64, side="right")
    dec = ids[:, :4].clamp(min=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                   ref(ids, attention_mask=mask, decoder_input_ids=dec).logits, **TOL)
        kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


def _seen_masks(monkeypatch):
    """The masks "autosdpa" hands autosdpa.sdpa: their structure words (or the dense mask's class)."""
    from autosdpa.masks import StructuredMask

    seen = []
    real = hf._autosdpa

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask.structure.word if isinstance(attn_mask, StructuredMask) else
                    (None if attn_mask is None else type(attn_mask).__name__))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(hf, "_autosdpa", spy)
    return seen


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_reach_autosdpa_as_mask_objects(llama, monkeypatch, side):
    """transformers hands "autosdpa" a StructuredMask for a padded batch (lengths read once per forward), with
    the same logits as "sdpa"; then decode steps over the padded cache are key padding."""
    ref, ours = llama
    ids, mask = _padded(side=side)
    seen = _seen_masks(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits,
                                   **TOL)
    assert seen == ["cpad_" + side[0]] * 2  # both layers, one mask object
    if side == "left":
        seen.clear()
        kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
        assert seen[:2] == ["cpad_l"] * 2 and set(seen[2:]) == {"kpad_l"}


@pytest.mark.skipif(not _HF5, reason="BERT uses AttentionInterface from transformers 5 on")
def test_bert_padding_reaches_autosdpa_as_key_padding(monkeypatch):
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    ref, ours = _pair(transformers.BertModel, cfg)
    ids, mask = _padded(vocab=64, side="right")
    seen = _seen_masks(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).last_hidden_state,
                                   ref(ids, attention_mask=mask).last_hidden_state, **TOL)
    assert seen == ["kpad_r"] * 2


def test_the_mask_builder_gives_sdpas_mask_where_no_object_describes_it():
    from transformers import masking_utils as mu

    from autosdpa.masks import StructuredMask

    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    kw = dict(batch_size=2, q_length=4, kv_length=4)
    assert isinstance(hf.mask_builder(**kw, attention_mask=pad), StructuredMask)
    for extra in (dict(attention_mask=holes), dict(attention_mask=torch.ones(2, 4, dtype=torch.long)),
                  dict(attention_mask=pad, mask_function=mu.sliding_window_causal_mask_function(2)),
                  dict(attention_mask=pad, q_offset=1)):
        got, want = hf.mask_builder(**kw, **extra), mu.sdpa_mask(**kw, **extra)
        assert not isinstance(got, StructuredMask)
        assert (got is None and want is None) or torch.equal(got, want), extra
    m = hf.mask_builder(**kw, attention_mask=pad)
    assert torch.equal(m.materialize(), mu.sdpa_mask(**kw, attention_mask=pad))
