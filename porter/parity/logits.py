"""End-to-end logits parity between a transformers checkpoint and a porter GGUF."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from porter.parity.metrics import kl_divergence, max_abs, nmse, top1_agreement


@dataclass
class PromptParity:
    """porter's logits against transformers' on one prompt: NMSE (all positions, last), max
    |error|, top-1 agreement, KL divergence, and both sides' greedy continuations."""

    prompt: str
    n_tokens: int
    nmse_all: float  # logits NMSE over every prompt position
    nmse_last: float  # logits NMSE at the last position
    max_abs: float
    top1: float  # argmax agreement over positions
    kl: float
    greedy_hf: list[int]
    greedy_porter: list[int]

    @property
    def greedy_match(self) -> bool:
        """Both sides' greedy continuations are the same ids."""
        return self.greedy_hf == self.greedy_porter

    def as_dict(self) -> dict:
        """The fields as JSON-ready values, with ``greedy_match``."""
        d = asdict(self)
        d["greedy_match"] = self.greedy_match
        return d


def reference_class(model_type: str, traced: bool = False):
    """The transformers Auto class porter compares with: AutoModel for encoders (whose output
    is the final hidden state), AutoModelForCausalLM otherwise (always for a traced port, which
    traces the causal-LM class)."""
    from transformers import AutoModel, AutoModelForCausalLM

    from porter.plugins import architectures, register_transformers_classes

    register_transformers_classes(models=True)
    if traced:
        return AutoModelForCausalLM
    arch = architectures().get(model_type)
    return AutoModel if arch is not None and not arch.causal else AutoModelForCausalLM


def model_output(out):
    """The logits, or for an encoder the final hidden state, of a transformers forward."""
    logits = getattr(out, "logits", None)
    return out.last_hidden_state if logits is None else logits


def load_reference(model_dir: str | Path, traced: bool = False):
    """The transformers model in float32, eval mode, and its tokenizer (the causal-LM class for
    a traced port)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from porter.plugins import register_transformers_classes

    register_transformers_classes(models=True)
    torch.manual_seed(0)
    auto = reference_class(AutoConfig.from_pretrained(model_dir).model_type, traced=traced)
    model = auto.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir) if (Path(model_dir) / "tokenizer.json").exists() else None
    return model, tok


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model_output(model(torch.tensor([ids]), use_cache=False))[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding with transformers' KV cache: no logits processors (generate()
    would, e.g., suppress EOS under min_new_tokens), so both sides do the same thing."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        step = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            tok = int(step.logits[0, -1].argmax())
            out.append(tok)
            step = model(torch.tensor([[tok]]), past_key_values=step.past_key_values, use_cache=True)
    return out


def compare_prompt(hf_model, porter_model, ids: list[int], n_greedy: int = 32, prompt: str = "") -> PromptParity:
    ref = hf_logits(hf_model, ids)
    got = porter_model.logits(ids)
    greedy_hf = hf_greedy(hf_model, ids, n_greedy) if n_greedy else []
    greedy_porter = list(porter_model.generate_ids(ids, n_greedy)) if n_greedy else []
    return PromptParity(prompt=prompt, n_tokens=len(ids), nmse_all=nmse(ref, got), nmse_last=nmse(ref[-1], got[-1]),
                        max_abs=max_abs(ref, got), top1=top1_agreement(ref, got), kl=kl_divergence(ref, got),
                        greedy_hf=greedy_hf, greedy_porter=greedy_porter)
