"""Hypothesis strategies over an architecture's configuration space.

The shared shape space (hidden size, heads and KV heads — MHA, GQA of several ratios, MQA —,
head_dim different from hidden/heads, 1 to 3 layers, odd vocabulary sizes, rope theta, tied or
untied embeddings) is drawn jointly here; each plugin adds the fields its architecture allows
through the ``porter_config_space`` hook (an Architecture's ``space`` attribute by default).
"""

from __future__ import annotations

from hypothesis import strategies as st

from porter.plugins import config_space


# The smallest vocabulary shapes() draws: token ids below it are valid in every drawn config.
MIN_VOCAB = 41


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def shapes(draw) -> dict:
    n_head = draw(st.sampled_from([1, 2, 4, 6, 8]))
    n_kv = draw(st.sampled_from(_divisors(n_head)))  # n_head: MHA, 1: MQA, between: GQA
    head_dim = draw(st.sampled_from([8, 16, 32]))
    # transformers insists hidden % heads == 0 even when head_dim is explicit
    hidden = n_head * draw(st.sampled_from([8, 12, 16, 24]))
    return {
        "hidden_size": hidden,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": draw(st.sampled_from([40, 64, 88])),
        "num_hidden_layers": draw(st.integers(1, 3)),
        "vocab_size": draw(st.integers((MIN_VOCAB - 1) // 2, 150)) * 2 + 1,  # odd sizes, MIN_VOCAB up
        "tie_word_embeddings": draw(st.booleans()),
    }


@st.composite
def configs(draw, model_type: str) -> dict:
    """Config overrides for ``Architecture.tiny_config`` of ``model_type``."""
    fields = draw(shapes())
    theta = draw(st.sampled_from([10000.0, 1e6, 100.0]))
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    for name, choices in config_space(model_type).items():
        strategy = choices if isinstance(choices, st.SearchStrategy) else st.sampled_from(list(choices))
        fields[name] = draw(strategy)
    return fields


def token_ids(vocab_size: int, min_len: int = 1, max_len: int = 64):
    return st.lists(st.integers(0, vocab_size - 1), min_size=min_len, max_size=max_len)
