"""A GGUF model on the ggml runtime: loading, forward passes with a KV cache, generation."""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from porter.errors import ModelError
from porter.runtime import repack
from porter.runtime._lib import ffi, lib
from porter.runtime.core import Backend, Buffer, Context, get_data, set_data
from porter.runtime.graph import GraphBuilder, KVCache
from porter.runtime.ops import Ops
from porter.runtime.types import GGMLType
from porter.spec import Spec, loads

SPEC_KEY = "porter.graph_spec"
TOKENIZER_KEY = "porter.tokenizer_json"
KV_BUCKET = 256  # decode graphs are reused while the cache fits the same bucket


def _field_value(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


@dataclass
class _CachedGraph:
    ctx: Context
    graph: object
    galloc: object
    inputs: dict
    outputs: dict
    n_kv: int

    def close(self):
        lib.ggml_gallocr_free(self.galloc)
        self.ctx.close()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else float("nan")

    @property
    def generate_tps(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else float("nan")


class Model:
    """Load with :meth:`load` (or ``porter.load(path)``)."""

    def __init__(self, spec: Spec, backend: Backend, weight_ctx: Context, weight_buffer: Buffer,
                 weights: dict, metadata: dict, path: Path | None = None, n_ctx: int | None = None,
                 cache_type: GGMLType = GGMLType.F32):
        self.spec = spec
        self.backend = backend
        self._weight_ctx = weight_ctx
        self._weight_buffer = weight_buffer
        self.weights = weights
        self.metadata = metadata
        self.path = path
        hp = spec.hparams
        self.n_vocab = int(hp["n_vocab"])
        max_pos = int(metadata.get("context_length") or 2048)
        self.n_ctx = int(n_ctx or min(max_pos, 2048))
        # learned position / token-type tables bound what ggml's get_rows may be asked for
        # (an index past a table aborts the process)
        pos_table = weights.get("position_embd.weight")
        self.max_positions = int(pos_table.ne[1]) if pos_table is not None else None
        if self.max_positions is not None and self.n_ctx > self.max_positions:
            if n_ctx:
                logging.getLogger("porter").warning(
                    "n_ctx=%d exceeds the model's %d learned positions; using %d", n_ctx, self.max_positions,
                    self.max_positions)
            self.n_ctx = self.max_positions
        types_table = weights.get("token_types.weight")
        self.n_token_types = int(types_table.ne[1]) if types_table is not None else None
        self.cache_type = cache_type
        self._kv: KVCache | None = None
        self._graphs: OrderedDict[tuple, _CachedGraph] = OrderedDict()
        self._tokenizer = None

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, n_threads: int | None = None, n_ctx: int | None = None,
             cache_type: str = "f32", use_repack: bool = True, bf16_as_f16: bool = True) -> "Model":
        """Load a GGUF written by porter.

        ``bf16_as_f16``: ggml's BF16 matrix product rounds the activations to bfloat16 (8-bit
        significand), which alone costs logits NMSE ~1e-4 on SmolLM2. BF16 matrices whose values
        all fit float16 (normal ones convert exactly, float16-subnormal ones move by at most
        2**-25) are held as F16 instead: same size, same weights, activations rounded to float16.
        """
        from gguf import GGUFReader

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
        try:
            reader = GGUFReader(path)
        except Exception as exc:  # truncated or not a GGUF: gguf raises various errors
            raise ModelError(f"{path}: not a readable GGUF file ({exc}); convert the model again") from None
        text = _field_value(reader, SPEC_KEY)
        if text is None:
            raise ModelError(f"{path}: this GGUF carries no porter graph spec ({SPEC_KEY}); "
                             "convert the checkpoint with `porter convert`")
        spec = loads(text)
        arch = _field_value(reader, "general.architecture")
        metadata = {
            "architecture": arch,
            "name": _field_value(reader, "general.name"),
            "context_length": _field_value(reader, f"{arch}.context_length"),
            "tokenizer_json": _field_value(reader, TOKENIZER_KEY),
            "chat_template": _field_value(reader, "tokenizer.chat_template"),
            "bos_token_id": _field_value(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field_value(reader, "tokenizer.ggml.eos_token_id"),
            "add_bos_token": _field_value(reader, "tokenizer.ggml.add_bos_token"),
            "file_type": _field_value(reader, "general.file_type"),
            "pooling": _field_value(reader, "porter.pooling"),  # encoders: mean | cls | last | none
            "normalize": _field_value(reader, "porter.normalize"),
        }
        expected = {w: None for w in spec.weight_names()}
        backend = Backend(n_threads)
        by_name = {t.name: t for t in reader.tensors}
        missing = [n for n in expected if n not in by_name]
        if missing:
            raise ModelError(f"{path}: tensors the graph needs are missing: {', '.join(missing[:8])}"
                             f"{' ...' if len(missing) > 8 else ''}")
        inline = {w.name: np.asarray(w.data, dtype=np.float32) for w in spec.weights if w.data is not None}
        # quantized matrices that ggml can repack go to the CPU_REPACK buffer (faster products)
        patterns = repack.matmul_only_weights(spec) if use_repack else set()
        to_repack = set()
        for name in expected:
            rt = by_name[name]
            if _layer_pattern(name) in patterns and len(rt.shape) == 2 and repack.supports(int(rt.tensor_type), int(rt.shape[0]), int(rt.shape[1])):
                to_repack.add(name)
        as_f16 = set()
        if bf16_as_f16:
            f16_ok = repack.weights_used_only_as(spec, {("mul_mat", 0), ("get_rows", 0), ("mul_mat_id", 0)})
            for name in expected:
                rt = by_name[name]
                if (int(rt.tensor_type) == int(GGMLType.BF16) and _layer_pattern(name) in f16_ok
                        and _bf16_fits_f16(rt.data)):
                    as_f16.add(name)
        ctx = Context(len(expected) - len(to_repack) + len(inline))
        rctx = Context(max(1, len(to_repack)))
        weights = {}
        for name in expected:
            rt = by_name[name]
            ne = [int(x) for x in rt.shape]
            gtype = GGMLType.F16 if name in as_f16 else GGMLType(int(rt.tensor_type))
            weights[name] = (rctx if name in to_repack else ctx).new_tensor(gtype, ne, name)
        for name, values in inline.items():
            weights[name] = ctx.new_tensor(GGMLType.F32, [values.size], name)
        buffer = Buffer(ctx, backend.buffer_type)
        rbuffer = Buffer(rctx, repack.repack_buffer_type()) if to_repack else None
        for name, values in inline.items():
            set_data(weights[name], values)
        for name in expected:
            t = weights[name]
            data = _bf16_as_f16(by_name[name].data) if name in as_f16 else by_name[name].data
            nbytes = int(lib.ggml_nbytes(t))
            if data.nbytes != nbytes:
                raise ModelError(f"{path}: tensor {name} holds {data.nbytes} bytes, expected {nbytes} (truncated file?)")
            lib.ggml_backend_tensor_set(t, ffi.from_buffer(np.ascontiguousarray(data)), 0, nbytes)
        del reader
        model = cls(spec, backend, ctx, buffer, weights, metadata, path, n_ctx, GGMLType.parse(cache_type))
        model._repack = (rctx, rbuffer)
        model.repacked = sorted(to_repack)
        model.bf16_as_f16 = sorted(as_f16)
        return model

    # -- tokenizer -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            text = self.metadata.get("tokenizer_json")
            if not text:
                raise ModelError("this GGUF has no tokenizer (porter.tokenizer_json); pass token ids instead")
            self._tokenizer = Tokenizer.from_str(text)
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from porter.chat import render_chat

        template = self.metadata.get("chat_template")
        if not template:
            raise ModelError("this model has no chat template; pass a plain prompt")
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self._token_text(self.metadata.get("bos_token_id")),
                           eos_token=self._token_text(self.metadata.get("eos_token_id")))

    def _token_text(self, tid):
        return "" if tid is None else self.tokenizer.id_to_token(int(tid)) or ""

    # -- forward ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the KV cache)."""
        if self._kv is not None:
            self._kv.n_past = 0

    @property
    def kv(self) -> KVCache:
        if self._kv is None:
            self._kv = KVCache(self.backend, self.spec, self.n_ctx, self.cache_type)
        return self._kv

    def _graph(self, n_tokens: int, n_kv: int, n_out: int, use_cache: bool, capture: tuple[str, ...] = ()):
        key = (n_tokens, n_kv, n_out, use_cache, capture)
        cached = self._graphs.get(key)
        if cached is not None:
            self._graphs.move_to_end(key)
            return cached
        hp = self.spec.hparams
        size = max(2048, 64 * int(hp.get("n_layer", 1)) + 256 + 4 * len(capture))
        ctx = Context(2 * size, graph_size=size)
        ops = Ops(ctx)
        inputs = {}
        for decl in self.spec.inputs:
            if decl.kind in ("tokens", "positions", "token_types"):
                inputs[decl.name] = ctx.new_tensor(GGMLType.I32, [n_tokens], decl.name)
            elif decl.kind in ("kq_mask", "kq_mask_swa"):
                inputs[decl.name] = ctx.new_tensor(GGMLType.F16, [n_kv, n_tokens], decl.name)
            elif decl.kind == "kq_mask_alibi":
                n_head = int(hp["n_head"])
                inputs[decl.name] = ctx.new_tensor(GGMLType.F32, [n_kv, n_tokens, n_head], decl.name)
            elif decl.kind == "out_ids":
                inputs[decl.name] = ctx.new_tensor(GGMLType.I32, [n_out], decl.name)
        if use_cache:
            inputs["kv_slots"] = ctx.new_tensor(GGMLType.I64, [n_tokens], "kv_slots")
        for t in inputs.values():
            lib.ggml_set_input(t)
        symbols = {"n_tokens": n_tokens, "n_kv": n_kv, "n_out": n_out}
        nodes = GraphBuilder(self.spec, ops, self.weights, inputs, symbols, self.kv if use_cache else None).build()
        graph = lib.ggml_new_graph_custom(ctx.ptr, size, False)
        outputs = {}
        for name in tuple(self.spec.outputs) + capture:
            t = nodes.get(name)
            if t is None:
                continue
            if not lib.ggml_is_contiguous(t):
                t = ops.cont(t)
            lib.ggml_set_output(t)
            lib.ggml_build_forward_expand(graph, t)
            outputs[name] = t
        galloc = lib.ggml_gallocr_new(self.backend.buffer_type)
        if not lib.ggml_gallocr_alloc_graph(galloc, graph):
            lib.ggml_gallocr_free(galloc)
            raise MemoryError("ggml could not allocate the compute graph")
        entry = _CachedGraph(ctx, graph, galloc, inputs, outputs, n_kv)
        if not capture:
            self._graphs[key] = entry
            while len(self._graphs) > 4:
                self._graphs.popitem(last=False)[1].close()
        return entry

    def _masks(self, positions: np.ndarray, n_kv: int, n_valid: int) -> dict[str, np.ndarray]:
        kv_pos = np.arange(n_kv)[None, :]
        q = positions[:, None]
        visible = np.broadcast_to(kv_pos < n_valid, (len(positions), n_kv))
        if self.spec.causal:
            visible = visible & (kv_pos <= q)
        masks = {"kq_mask": visible}
        window = self.spec.hparams.get("sliding_window")
        if window:
            masks["kq_mask_swa"] = visible & (kv_pos > q - int(window))
        out = {k: np.where(v, 0.0, -np.inf).astype(np.float16) for k, v in masks.items()}
        if any(d.kind == "kq_mask_alibi" for d in self.spec.inputs):
            out["kq_mask_alibi"] = alibi_mask(self.spec.hparams, visible, n_kv)
        return out

    def forward(self, tokens: Sequence[int], *, use_cache: bool = True, all_logits: bool = False,
                capture: Sequence[str] = (), token_types: Sequence[int] | None = None,
                ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run tokens through the model; with the cache they continue the conversation.

        Returns logits (n_out, n_vocab) for the last token (or every token with all_logits);
        with ``capture`` also the named intermediate nodes, as numpy arrays in ggml-reversed
        (numpy) order.
        """
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("forward needs a non-empty 1-D sequence of token ids")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab}); got {tokens.min()}..{tokens.max()}")
        n = tokens.size
        if self.max_positions is not None and n > self.max_positions:
            raise ValueError(f"{n} tokens exceed the model's {self.max_positions} learned positions")
        if token_types is not None:
            token_types = np.asarray(token_types, np.int32)
            limit = self.n_token_types or 1
            if token_types.shape != tokens.shape or token_types.min() < 0 or token_types.max() >= limit:
                raise ValueError(f"token_types must be {n} ids in [0, {limit})")
        start = self.kv.n_past if use_cache else 0
        if use_cache and start + n > self.n_ctx:
            raise ValueError(f"context full: {start} cached + {n} new tokens exceed n_ctx={self.n_ctx}; "
                             "reset() or load with a larger n_ctx")
        if use_cache:
            n_kv = min(self.n_ctx, math.ceil((start + n) / KV_BUCKET) * KV_BUCKET)
        else:
            n_kv = n
        positions = np.arange(start, start + n, dtype=np.int32)
        out_ids = np.arange(n, dtype=np.int32) if all_logits else np.array([n - 1], dtype=np.int32)
        g = self._graph(n, n_kv, out_ids.size, use_cache, tuple(capture))
        feeds = {"tokens": tokens, "positions": positions, "out_ids": out_ids,
                 "token_types": np.zeros(n, dtype=np.int32) if token_types is None else np.asarray(token_types, np.int32),
                 "kv_slots": positions.astype(np.int64)}
        feeds.update(self._masks(positions, n_kv, start + n))
        for name, t in g.inputs.items():
            set_data(t, np.ascontiguousarray(feeds[name]))
        self.backend.compute(g.graph)
        if use_cache:
            self.kv.n_past = start + n
        if "result_output" in g.outputs:
            logits = get_data(g.outputs["result_output"]).reshape(out_ids.size, -1)
        elif "result_embd" in g.outputs:  # encoders: final hidden states of every token
            logits = get_data(g.outputs["result_embd"]).reshape(n, -1)
        else:
            logits = None
        if capture:
            captured = {name: get_data(t) for name, t in g.outputs.items() if name in capture}
            g.close()
            return logits, captured
        return logits

    def embed(self, inputs, *, pooling: str | None = None, normalize: bool | None = None) -> np.ndarray:
        """Sentence embeddings from an encoder: one row per text (or list of token ids).

        Each input runs alone through the model without the KV cache; its final hidden states
        are pooled as the GGUF says (sentence-transformers' choice, stored at conversion:
        ``porter.pooling`` mean | cls | last, mean when none is given) and L2-normalized when
        ``porter.normalize`` is set. Texts are tokenized with their token type ids.
        """
        if self.spec.causal:
            raise ModelError("embed needs an encoder model (this graph is a causal LM)")
        single = isinstance(inputs, str) or (len(inputs) > 0 and isinstance(inputs[0], (int, np.integer)))
        items = [inputs] if single else list(inputs)
        pooling = pooling or self.metadata.get("pooling") or "mean"
        pooling = "mean" if pooling == "none" else pooling
        normalize = bool(self.metadata.get("normalize")) if normalize is None else normalize
        rows = []
        for item in items:
            if isinstance(item, str):
                enc = self.tokenizer.encode(item)  # tokenizer.json may pad: keep attended tokens
                keep = [i for i, a in enumerate(enc.attention_mask) if a][:self.n_ctx]
                ids, types = [enc.ids[i] for i in keep], [enc.type_ids[i] for i in keep]
            else:
                ids, types = list(item), None
            h = self.forward(ids, use_cache=False, token_types=types)
            v = {"mean": lambda: h.mean(axis=0), "cls": lambda: h[0], "last": lambda: h[-1]}.get(pooling)
            if v is None:
                raise ModelError(f"unknown pooling {pooling!r} (mean, cls or last)")
            v = np.asarray(v(), dtype=np.float32)
            if normalize:
                v = v / max(float(np.linalg.norm(v)), 1e-12)
            rows.append(v)
        return np.stack(rows)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position for a fresh sequence (no cache state is kept)."""
        self.reset()
        out = self.forward(tokens, use_cache=True, all_logits=True)
        self.reset()
        return out

    # -- generation ------------------------------------------------------------------------------
    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (),
                     n_batch: int = 512, stats: GenerationStats | None = None) -> Iterator[int]:
        """Yield new token ids: prefill the prompt, then decode one token at a time."""
        stats = stats if stats is not None else GenerationStats()
        rng = np.random.default_rng(seed)
        self.reset()
        prompt_ids = list(prompt_ids)
        t0 = time.perf_counter()
        logits = None
        for i in range(0, len(prompt_ids), n_batch):
            logits = self.forward(prompt_ids[i:i + n_batch])
        stats.prompt_tokens = len(prompt_ids)
        stats.prompt_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        stop = set(int(s) for s in stop_ids)
        for step in range(max_new_tokens):
            tok = sample(logits[-1], temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
            stats.tokens.append(tok)
            stats.generated_tokens += 1
            yield tok
            if tok in stop or step == max_new_tokens - 1 or self.kv.n_past >= self.n_ctx:
                break
            logits = self.forward([tok])
        stats.generate_seconds = time.perf_counter() - t1

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *,
                 on_text: Callable[[str], None] | None = None, **kwargs) -> tuple[str, GenerationStats]:
        """Generate text; ``on_text`` receives each new piece of text as it is decoded."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        stats = GenerationStats()
        eos = self.metadata.get("eos_token_id")
        kwargs.setdefault("stop_ids", [eos] if eos is not None else [])
        out: list[int] = []
        shown = ""
        for tok in self.generate_ids(ids, max_new_tokens, stats=stats, **kwargs):
            out.append(tok)
            if on_text is not None:
                text = self.decode(out)
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    on_text(text[len(shown):])
                    shown = text
        return self.decode(out), stats

    def close(self) -> None:
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()
        if self._kv is not None:
            self._kv.close()
            self._kv = None
        self._weight_buffer.close()
        self._weight_ctx.close()
        rctx, rbuffer = getattr(self, "_repack", (None, None))
        if rbuffer is not None:
            rbuffer.close()
        if rctx is not None:
            rctx.close()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _layer_pattern(name: str) -> str:
    """blk.3.attn_q.weight -> blk.{L}.attn_q.weight (how the spec names per-layer weights)."""
    return re.sub(r"^blk\.\d+\.", "blk.{L}.", name)


def _bf16_values(raw: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _bf16_fits_f16(raw: np.ndarray) -> bool:
    """Whether every BF16 value converts to float16: finite and at most float16's largest, 65504.
    Normal bfloat16 values then convert exactly; float16-subnormal ones move by at most 2**-25."""
    return bool(np.all(np.abs(_bf16_values(raw)) <= np.finfo(np.float16).max))  # NaN compares False


def _bf16_as_f16(raw: np.ndarray) -> np.ndarray:
    """BF16 bits as float16 (for tensors that pass :func:`_bf16_fits_f16`)."""
    return _bf16_values(raw).astype(np.float16)


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even) and back."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def alibi_mask(hparams: dict, visible: np.ndarray, n_kv: int) -> np.ndarray:
    """[n_head, n_tokens, n_kv] F32: slope_h * key position / sqrt(head_dim) where visible, -inf
    elsewhere. Absolute key positions, as transformers uses (softmax ignores the per-row shift
    to relative distances); with ``alibi_bf16`` the products are rounded as transformers does."""
    slopes = np.asarray(hparams["alibi_slopes"], np.float32)
    pos = np.arange(n_kv, dtype=np.float32)
    if hparams.get("alibi_bf16"):
        bias = _bf16(_bf16(slopes)[:, None] * pos[None, :])
    else:
        bias = slopes[:, None] * pos[None, :]
    bias = bias / np.float32(np.sqrt(float(hparams["head_dim"])))
    return np.where(visible[None, :, :], bias[:, None, :], -np.inf).astype(np.float32)


def sample(logits: np.ndarray, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           rng: np.random.Generator | None = None) -> int:
    """Greedy when temperature is 0, else softmax sampling restricted by top-k and top-p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    x = logits.astype(np.float64) / temperature
    order = np.argsort(-x)
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = np.searchsorted(np.cumsum(p), top_p) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])
