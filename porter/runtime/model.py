"""A GGUF model on the ggml runtime: forward passes with a KV cache and reused graphs.

Loading lives in :mod:`porter.runtime.loader`, masks in :mod:`porter.runtime.masks`, generation
in :mod:`porter.runtime.generation` and sampling in :mod:`porter.runtime.sampling`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from porter.errors import ModelError, OptionError, ShapeError
from porter.runtime import hugepages
from porter.runtime._lib import ffi, lib
from porter.runtime.core import (Backend, Buffer, Context, _track, available_memory, get_data, host_view,
                                 write_input)
from porter.runtime.generation import GenerationMixin, GenerationStats
from porter.runtime.graph import ABSENT, EarlyRowsUnfit, GraphBuilder, KVCache, kv_cache_bytes
from porter.runtime.loader import SPEC_KEY, TOKENIZER_KEY, _bf16_as_f16, _bf16_fits_f16, index_tables, load_gguf
from porter.runtime.masks import alibi_mask, attention_masks, write_one_query_masks
from porter.runtime.ops import Ops
from porter.runtime.plan import GraphPlan
from porter.runtime.sampling import sample
from porter.runtime.types import GGMLType
from porter.spec import Spec

KV_BUCKET = 256  # decode graphs are reused while the cache fits the same bucket
_STEP_INPUTS = frozenset(("tokens", "positions", "out_ids", "kv_slots", "kq_mask", "kq_mask_swa"))
_RESULTS = ("result_output", "result_embd")  # logits; encoders: the final hidden states


@dataclass
class _CachedGraph:
    ctx: Context
    graph: object
    galloc: object | None  # its own allocator (capture graphs), else the model's shared one
    inputs: dict
    outputs: dict
    n_kv: int
    views: dict | None = None  # name -> numpy array over an input's or result's host memory
    steps: bool | None = None  # whether Model._decode_step can run this graph (known once views are)

    def host_views(self) -> dict:
        """Inputs and results in host memory as numpy arrays (made once: every step then writes
        and reads them with no ggml call); tensors elsewhere (a GPU, none) are left out, and so
        are captured intermediates (read once, with get_data)."""
        if self.views is None:
            tensors = {**self.inputs, **{k: t for k, t in self.outputs.items() if k in _RESULTS}}
            self.views = {name: v for name, t in tensors.items() if (v := host_view(t)) is not None}
            # a decode step writes the inputs it knows, each in host memory (or unread: no memory)
            self.steps = "tokens" in self.views and "result_output" in self.views and all(
                name in _STEP_INPUTS and (name in self.views or t.buffer == ffi.NULL)
                for name, t in self.inputs.items())
        return self.views

    def step_views(self) -> dict | None:
        """:meth:`host_views` when :meth:`Model._decode_step` can run on them alone, else None."""
        views = self.host_views()
        return views if self.steps else None

    def close(self):
        self.views = self.steps = None
        if self.galloc is not None:
            lib.ggml_gallocr_free(self.galloc)
            self.galloc = None
        self.ctx.close()


class Model(GenerationMixin):
    """A GGUF model loaded on ggml's CPU backend: load with :meth:`load` (or ``porter.load(path)``)
    and close with :meth:`close` (or use it as a context manager).

    Text in and out: :meth:`encode`, :meth:`decode`, :meth:`generate`, :meth:`chat`,
    :meth:`apply_chat_template`, :meth:`embed` (encoders). Logits: :meth:`forward` (continues the
    KV cache), :meth:`logits` (a fresh sequence), :meth:`reset`. Attributes: ``spec`` (the graph
    spec), ``metadata`` (the GGUF's keys porter reads), ``n_ctx`` (positions the cache holds),
    ``n_vocab``, ``path``; ``early_rows`` and ``fuse`` switch the graph rewrites of
    :mod:`porter.runtime.plan` (on by default; off, graphs are built node for node as the spec
    writes them, as they always are when intermediates are captured).
    """

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
        self._window = int(hp.get("sliding_window") or 0)  # of the kq_mask_swa input, if any
        # token ids index the table the tokens input reads (get_rows aborts past its rows)
        self.n_token_rows = min([int(weights[w].ne[1]) for w in index_tables(spec, "tokens") if w in weights]
                                or [self.n_vocab])
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
        self._plan: GraphPlan | None = None  # the spec unrolled once (porter.runtime.plan)
        # select the rows whose logits are read as early as the graph allows (llama.cpp's
        # out_ids in the last layer); False: every layer runs on every token
        self.early_rows = True
        # silu + mul of gated MLPs in one kernel (porter.runtime.plan.fuse_swiglu), products of one
        # input whose weights are neighbours as one (porter.runtime.fusion)
        self.fuse = True
        self._galloc = None  # one compute buffer for every cached graph (they run one at a time)
        self._galloc_finalizer = None
        self._tokenizer = None
        self.tokens_evaluated = 0  # every token forward has run (a conversation's reuse shows here)
        self._chat = None
        self.huge_pages = False  # the KV cache on 2 MiB pages (porter.runtime.hugepages); load() decides
        self._migration = None  # the weights' move onto huge pages, started by load

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, n_threads: int | None = None, n_ctx: int | None = None,
             cache_type: str = "f32", use_repack: bool = True, bf16_as_f16: bool = True,
             use_mmap: bool = True, rpc: Sequence[str] | None = None, devices: Sequence[str] | None = None,
             n_gpu_layers: int | str | None = None, huge_pages: bool | None = None) -> "Model":
        """Load the GGUF at ``path`` (porter's, or a stock llama.cpp file whose spec a plugin
        rebuilds) and return the Model. ``n_threads``: default the physical cores; ``n_ctx``:
        the KV cache's length (default the model's, at most 2048); ``cache_type``: f32, f16 or
        q8_0 keys and values; see :func:`porter.runtime.loader.load_gguf` for ``use_repack``,
        ``bf16_as_f16``, ``use_mmap`` and ``huge_pages`` (weights and KV cache on 2 MiB pages:
        :mod:`porter.runtime.hugepages`); ``rpc``: ``host:port`` of ggml RPC servers to split the
        layers across, with the local CPU (:mod:`porter.runtime.sched`); ``devices`` and
        ``n_gpu_layers``: which devices hold which layers (:mod:`porter.runtime.placement`)."""
        huge_pages = hugepages.default() if huge_pages is None else huge_pages  # weights and KV cache alike
        if rpc or devices is not None or n_gpu_layers is not None:
            from porter.runtime.placement import parse_n_gpu_layers
            from porter.runtime.sched import load_split

            g = load_split(path, list(rpc or ()), devices=None if devices is None else list(devices),
                           n_gpu_layers=parse_n_gpu_layers(n_gpu_layers), n_threads=n_threads, use_repack=use_repack,
                           bf16_as_f16=bf16_as_f16, use_mmap=use_mmap, huge_pages=huge_pages)
        else:
            g = load_gguf(path, n_threads=n_threads, use_repack=use_repack, bf16_as_f16=bf16_as_f16,
                          use_mmap=use_mmap, huge_pages=huge_pages)
        model = cls(g.spec, g.backend, g.weight_ctx, g.weight_buffer, g.weights, g.metadata, Path(path),
                    n_ctx, GGMLType.parse(cache_type))
        model._repack = (g.repack_ctx, g.repack_buffer)
        model._mapped = g.mapped
        model._migration = g.migration
        model.huge_pages = huge_pages
        model.repacked = g.repacked
        model.bf16_as_f16 = g.bf16_as_f16
        model.placed = g.placed
        return model

    def __repr__(self) -> str:
        kind = "causal LM" if self.spec.causal else "encoder"
        name = self.metadata.get("name") or self.spec.architecture
        from gguf import LlamaFileType

        code = self.metadata.get("file_type")
        try:
            types = LlamaFileType(code).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (ValueError, TypeError):
            types = "unknown"
        return (f"<porter.Model {name!r} ({self.spec.architecture}, {kind}) from {self.path.name}: "
                f"file type {types}, n_ctx {self.n_ctx}, {self.backend.n_threads} threads>")

    # -- tokenizer -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The ``tokenizers.Tokenizer`` of the GGUF (porter's JSON, or rebuilt from llama.cpp's
        ``tokenizer.ggml.*`` keys); raises ModelError when the file has none porter can use."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            text = self.metadata.get("tokenizer_json")
            if not text:
                why = self.metadata.get("tokenizer_problem") or "porter.tokenizer_json"
                raise ModelError(f"this GGUF has no tokenizer porter can use ({why}); pass token ids instead")
            try:
                self._tokenizer = Tokenizer.from_str(text)
            except Exception as exc:  # the tokenizers library raises a bare Exception
                raise ModelError(f"the tokenizer JSON in this GGUF (porter.tokenizer_json) is corrupt ({exc}); "
                                 "convert the model again") from None
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text`` (special tokens written in it are parsed; with
        ``add_special_tokens`` the BOS/EOS the tokenizer adds, as transformers adds them)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids ``ids``, special tokens left out (transformers'
        ``decode(ids, skip_special_tokens=True)``)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *, tools=None,
                            **kwargs) -> str:
        """The prompt text (a str) transformers' ``apply_chat_template(..., tokenize=False)``
        renders from the GGUF's chat template: ``messages`` (``[{"role": ..., "content": ...}]``),
        ``add_generation_prompt`` (open the assistant's turn), ``tools`` (function schemas, for
        templates that take them) and any other ``kwargs`` the template reads."""
        from porter.chat import render_chat

        template = self.metadata.get("chat_template")
        if not template:
            raise ModelError("this model has no chat template; pass a plain prompt")
        special = {f"{t}_token": self._token_text(self.metadata.get(f"{t}_token_id"))
                   for t in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
                   if self.metadata.get(f"{t}_token_id") is not None}
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           **{"bos_token": "", "eos_token": "", **special, **kwargs})

    def chat(self, messages: list[dict], *, stream: bool = False, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=(), tools=None):
        """The assistant's reply to ``messages`` (``[{"role": ..., "content": ...}]``, rendered
        with the chat template, ``tools`` passed to it): a ChatReply (a str with
        ``finish_reason`` and token counts), or with ``stream=True`` a ChatStream of text pieces.

        At most ``max_new_tokens``; stops at every end-of-generation id the GGUF lists and before
        any of the ``stop`` strings. Sampling: ``temperature`` 0 is greedy, else ``top_k``
        (0: off) and ``top_p`` (1: off) filter, ``seed`` makes it repeatable. The KV cache is
        kept: the next call evaluates only the tokens after what it shares with this one
        (:mod:`porter.runtime.chat_session`)."""
        from porter.runtime.chat_session import chat

        return chat(self, messages, stream=stream, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed, stop=stop, tools=tools)

    def _token_text(self, tid):
        return "" if tid is None else self.tokenizer.id_to_token(int(tid)) or ""

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the weights and the KV cache are on huge pages (the background move
        :mod:`porter.runtime.hugepages` starts at load and with the cache; the model computes the
        same meanwhile). Whether all of it is over within ``timeout`` seconds."""
        moves = [m for m in (self._migration, getattr(self._kv, "migration", None)) if m is not None]
        return all(m.done.wait(timeout) for m in moves)

    # -- forward ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the KV cache)."""
        if self._kv is not None:
            self._kv.n_past = 0

    @property
    def kv(self) -> KVCache:
        """The KV cache (allocated on first use, ``n_ctx`` positions); its ``n_past`` is the
        number of positions it holds."""
        if self._kv is None:
            self._kv = self._new_kv_cache()
        return self._kv

    def _new_kv_cache(self) -> KVCache:
        """The KV cache, refused in Python when it holds nothing or cannot fit (ggml cannot
        allocate an empty buffer, and a failed allocation would blame no one)."""
        need = kv_cache_bytes(self.spec, self.n_ctx, self.cache_type)
        if need == 0:
            raise ModelError(f"{self.path or 'this model'}: the KV cache holds nothing (every layer's cache width is 0: n_layer, "
                             "n_embd_kv or kv_width_*); the file is damaged: convert the model again")
        what = f"the KV cache of {self.n_ctx} positions needs {need / 2**30:.1f} GiB"
        advice = "lower the context (porter run -c, or n_ctx=) or use a smaller cache type (f16, q8_0)"
        have = available_memory()
        if have is not None and need > have:
            raise OptionError(f"{what}, {have / 2**30:.1f} GiB are available; {advice}")
        try:
            return getattr(self.backend, "kv_cache_type", KVCache)(self.backend, self.spec, self.n_ctx, self.cache_type,
                                                                  huge_pages=self.huge_pages)
        except MemoryError:  # within the machine's free memory, beyond what this process may take
            raise OptionError(f"{what} and could not be allocated (a memory limit of this process?); {advice}") from None

    def _graph(self, n_tokens: int, n_kv: int, n_out: int, use_cache: bool, capture: tuple[str, ...] = ()):
        key = (n_tokens, n_kv, n_out, use_cache, capture, self.early_rows, self.fuse)
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
        if self._plan is None:
            # stacked products only on the CPU backend alone (a split model's scheduler places
            # each op by its weight's buffer; it is left as the spec writes it)
            self._plan = GraphPlan(self.spec, self.weights, stack_matmuls=not hasattr(self.backend, "allocate"))
        # captured graphs keep every node as the spec writes it (parity compares them by name)
        early = self.early_rows and n_out < n_tokens and not capture and self._plan.rows is not None
        builder = GraphBuilder(self.spec, ops, self.weights, inputs, symbols, self.kv if use_cache else None,
                               plan=self._plan, early_rows=early, fuse=self.fuse and not capture)
        try:
            nodes = builder.build()
        except EarlyRowsUnfit:  # a shape the plan could not foresee: this model builds graphs as written
            ctx.close()
            self.early_rows = False
            return self._graph(n_tokens, n_kv, n_out, use_cache, capture)
        except ShapeError:
            ctx.close()
            stacked = self._plan.fused
            if not builder.fuse or stacked is None or not stacked.groups:
                raise
            stacked.unstack()  # a reshape a strided product view cannot express: products on their own
            return self._graph(n_tokens, n_kv, n_out, use_cache, capture)
        graph = lib.ggml_new_graph_custom(ctx.ptr, size, False)
        for t in builder.side_effects:  # recurrent-state writes, which no output reads
            lib.ggml_build_forward_expand(graph, t)
        outputs = {}
        for name in tuple(self.spec.outputs) + capture:
            t = nodes.get(name)
            if t is None or t is ABSENT:  # a node switched off in this layer (when) has no value
                continue
            if not lib.ggml_is_contiguous(t):
                t = ops.cont(t)
            lib.ggml_set_output(t)
            lib.ggml_build_forward_expand(graph, t)
            outputs[name] = t
        if hasattr(self.backend, "allocate"):  # a SplitBackend: its scheduler allocates at compute time
            galloc = None
        elif capture:  # every captured node stays allocated: a buffer of its own, freed with the graph
            galloc = lib.ggml_gallocr_new(self.backend.buffer_type)
            if not lib.ggml_gallocr_alloc_graph(galloc, graph):
                lib.ggml_gallocr_free(galloc)
                ctx.close()
                raise MemoryError("ggml could not allocate the compute graph")
        else:
            galloc = None
            self._alloc_shared(graph, ctx)
        entry = _CachedGraph(ctx, graph, galloc, inputs, outputs, n_kv)
        if not capture:
            self._graphs[key] = entry
            while len(self._graphs) > 4:
                self._graphs.popitem(last=False)[1].close()
        return entry

    def _alloc_shared(self, graph, ctx: Context) -> None:
        """Place a graph's intermediates in the shared compute buffer. ggml grows that buffer
        (a new allocation) when a graph needs more than it holds; the graphs cached before then
        point into the freed one, so they are dropped (rebuilt when next needed)."""
        if self._galloc is None:
            galloc = lib.ggml_gallocr_new(self.backend.buffer_type)
            if galloc == ffi.NULL:
                ctx.close()
                raise MemoryError("ggml could not create a graph allocator")
            self._galloc, self._galloc_finalizer = galloc, _track(self, "gallocr", lib.ggml_gallocr_free, galloc)
        before = lib.ggml_gallocr_get_buffer_size(self._galloc, 0)
        if not lib.ggml_gallocr_alloc_graph(self._galloc, graph):
            ctx.close()
            raise MemoryError("ggml could not allocate the compute graph")
        if lib.ggml_gallocr_get_buffer_size(self._galloc, 0) != before:
            for g in self._graphs.values():
                g.close()
            self._graphs.clear()

    def _masks(self, positions: np.ndarray, n_kv: int, n_valid: int) -> dict[str, np.ndarray]:
        return attention_masks(self.spec, positions, n_kv, n_valid)

    def forward(self, tokens: Sequence[int], *, use_cache: bool = True, all_logits: bool = False,
                capture: Sequence[str] = (), token_types: Sequence[int] | None = None,
                ) -> np.ndarray | tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``tokens`` through the model; with ``use_cache`` they continue the sequence the KV
        cache holds (and are added to it), without it they run alone.

        Returns logits (n_out, n_vocab) for the last token (or every token with all_logits);
        with ``capture`` also the named intermediate nodes, as numpy arrays in ggml-reversed
        (numpy) order. ``token_types``: segment ids, for encoders that read them.
        """
        if use_cache and not (capture or all_logits) and token_types is None and len(tokens) == 1:
            logits = self._decode_step(tokens[0])
            if logits is not None:
                return logits
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError("forward needs a non-empty 1-D sequence of token ids")
        self._check_ids(int(tokens.min()), int(tokens.max()))
        n = tokens.size
        if self.max_positions is not None and n > self.max_positions:
            raise ValueError(f"{n} tokens exceed the model's {self.max_positions} learned positions")
        if token_types is not None:
            token_types = np.asarray(token_types, np.int32)
            limit = self.n_token_types or 1
            if token_types.shape != tokens.shape or token_types.min() < 0 or token_types.max() >= limit:
                raise ValueError(f"token_types must be {n} ids in [0, {limit})")
        start = self.kv.n_past if use_cache else 0
        n_kv = self._cache_cells(start, n) if use_cache else n
        positions = np.arange(start, start + n, dtype=np.int32)
        out_ids = np.arange(n, dtype=np.int32) if all_logits else np.array([n - 1], dtype=np.int32)
        g = self._graph(n, n_kv, out_ids.size, use_cache, tuple(capture))
        if use_cache and start == 0:
            self.kv.clear_states()
        feeds = {"tokens": tokens, "positions": positions, "out_ids": out_ids}
        if "token_types" in g.inputs:
            feeds["token_types"] = np.zeros(n, dtype=np.int32) if token_types is None else token_types
        if "kv_slots" in g.inputs:
            feeds["kv_slots"] = positions.astype(np.int64)
        feeds.update(self._masks(positions, n_kv, start + n))
        if hasattr(self.backend, "allocate"):  # a SplitBackend plans the graph unless it ran last
            self.backend.allocate(g)
            views = {}
        else:
            views = g.host_views()
        for name, t in g.inputs.items():
            view = views.get(name)
            if view is not None:
                feed = feeds[name]
                if feed.size != view.size:
                    raise ShapeError(f"input {name!r} holds {view.size} values; got {feed.size}")
                view[:] = feed.ravel()
            elif t.buffer != ffi.NULL:  # an input no node reads has no memory
                write_input(t, feeds[name])
        self.backend.compute(g.graph)
        self.tokens_evaluated += n
        if use_cache:
            self.kv.n_past = start + n
        # logits of the rows out_ids reads; encoders: the final hidden states of every token
        out, rows = ("result_output", out_ids.size) if "result_output" in g.outputs else ("result_embd", n)
        if out not in g.outputs:
            logits = None
        elif out in views:
            logits = views[out].reshape(rows, -1).copy()
        else:
            logits = get_data(g.outputs[out]).reshape(rows, -1)
        if capture:
            captured = {name: get_data(t) for name, t in g.outputs.items() if name in capture}
            g.close()
            return logits, captured
        return logits

    def _check_ids(self, lowest: int, highest: int) -> None:
        if lowest < 0 or highest >= self.n_token_rows:
            raise ValueError(f"token ids must be in [0, {self.n_token_rows}); got {lowest}..{highest}")

    def _cache_cells(self, start: int, n: int) -> int:
        """The KV cells a graph attends for ``n`` new tokens after ``start`` cached ones (whole
        buckets, so a decode graph serves many steps); an error when they do not fit."""
        if start + n > self.n_ctx:
            raise ValueError(f"context full: {start} cached + {n} new tokens exceed n_ctx={self.n_ctx}; "
                             "reset() or load with a larger n_ctx")
        return min(self.n_ctx, -(-(start + n) // KV_BUCKET) * KV_BUCKET)

    def _decode_step(self, token) -> np.ndarray | None:
        """``forward([token])``, the step generation repeats, with its inputs written straight
        into the graph's host memory: no allocation and no ggml call but the compute. (Once a
        graph has streamed the weights through the caches, each Python operation is slow: this
        saves ~0.1 ms of a small model's ~7 ms step.) None where the general path must run: the
        first position (recurrent states are cleared there), ALiBi or segment inputs, a split or
        GPU backend."""
        start = self.kv.n_past
        if start == 0 or hasattr(self.backend, "allocate") or not isinstance(token, (int, np.integer)):
            return None  # (not an integer: the general path says what is wrong)
        token = int(token)
        self._check_ids(token, token)
        g = self._graph(1, self._cache_cells(start, 1), 1, True)
        views = g.step_views()
        if views is None:
            return None
        views["tokens"][0] = token
        for name in ("positions", "kv_slots"):
            if name in views:
                views[name][0] = start
        if "out_ids" in views:
            views["out_ids"][0] = 0
        write_one_query_masks(views, self.spec.causal, self._window, start, start + 1)
        self.backend.compute(g.graph)
        self.tokens_evaluated += 1
        self.kv.n_past = start + 1
        return views["result_output"].reshape(1, -1).copy()

    def node_names(self) -> list[str]:
        """Every node of the graph in order (layer loop instantiated)."""
        from porter.spec import Repeat

        n_layer = int(self.spec.hparams.get(self.spec.layer_loop.repeat, 0)) if self.spec.layer_loop else 0
        names = []
        for item in self.spec.graph:
            if isinstance(item, Repeat):
                names += [n.name.format(L=i) for i in range(n_layer) for n in item.body]
            else:
                names.append(item.name)
        return names

    def first_nonfinite_node(self, tokens: Sequence[int]) -> str | None:
        """The first node (in graph order) whose output holds a NaN or an infinity for ``tokens``
        (run again without the cache), or None if every node is finite."""
        names = self.node_names()
        _, captured = self.forward(tokens, use_cache=False, all_logits=True, capture=names)
        for name in names:
            values = captured.get(name)
            if values is not None and values.dtype.kind == "f" and not np.isfinite(values).all():
                return name
        return None

    def check_finite(self, logits: np.ndarray, tokens: Sequence[int]) -> None:
        """Raise a ModelError naming the first non-finite node (found by running ``tokens``
        again) if ``logits`` are not all finite; return None when they are."""
        if np.isfinite(logits).all():
            return
        node = self.first_nonfinite_node(tokens)
        where = f"the first node that is not finite is {node}" if node else "every captured node is finite"
        raise ModelError(f"the model computed non-finite logits (NaN or infinity) after {len(tokens)} tokens; "
                         f"{where}. The GGUF's weights may be damaged: check them with `porter verify "
                         f"{self.path or 'FILE'}`, or convert the model again")

    def embed(self, inputs, *, pooling: str | None = None, normalize: bool | None = None) -> np.ndarray:
        """Sentence embeddings from an encoder: ``inputs`` is a text, a list of texts, or lists of
        token ids; returns a float32 array with one row per input.

        Each input runs alone through the model without the KV cache; its final hidden states
        are pooled as ``pooling`` says (mean | cls | last), by default as the GGUF says
        (sentence-transformers' choice, stored at conversion: ``porter.pooling``, mean when none
        is given), and L2-normalized when ``normalize`` is true (default: ``porter.normalize``).
        Texts are tokenized with their token type ids.
        """
        if self.spec.causal:
            raise ModelError("embed needs an encoder model (this graph is a causal LM)")
        single = isinstance(inputs, str) or (len(inputs) > 0 and isinstance(inputs[0], (int, np.integer)))
        items = [inputs] if single else list(inputs)
        pooling = pooling or self.metadata.get("pooling") or "mean"
        pooling = "mean" if pooling == "none" else pooling
        normalize = bool(self.metadata.get("normalize")) if normalize is None else normalize
        rows = []
        limit = self.max_seq_length if any(isinstance(item, str) for item in items) else self.n_ctx
        for n, item in enumerate(items):
            if isinstance(item, str):
                enc = self.tokenizer.encode(item)  # tokenizer.json may pad: keep attended tokens
                keep = [i for i, a in enumerate(enc.attention_mask) if a]
                if enc.overflowing or len(keep) > limit:
                    self._warn_truncated(n, item, limit)
                keep = keep[:limit]
                ids, types = [enc.ids[i] for i in keep], [enc.type_ids[i] for i in keep]
            else:
                ids, types = list(item), None
                if len(ids) > self.n_ctx:  # token ids are the caller's choice up to the context
                    raise ModelError(f"input {n} has {len(ids)} token ids; the model embeds at most {self.n_ctx} "
                                     "(its context): shorten it")
            h = self.forward(ids, use_cache=False, token_types=types)
            v = {"mean": lambda: h.mean(axis=0), "cls": lambda: h[0], "last": lambda: h[-1]}.get(pooling)
            if v is None:
                raise ModelError(f"unknown pooling {pooling!r} (mean, cls or last)")
            v = np.asarray(v(), dtype=np.float32)
            if normalize:
                v = v / max(float(np.linalg.norm(v)), 1e-12)
            rows.append(v)
        return np.stack(rows)

    @property
    def max_seq_length(self) -> int:
        """The most tokens :meth:`embed` uses per text: the tokenizer's truncation length
        (sentence-transformers' max_seq_length), within the context."""
        trunc = self.tokenizer.truncation if self.metadata.get("tokenizer_json") else None
        return min(self.n_ctx, int(trunc["max_length"])) if trunc else self.n_ctx

    def _warn_truncated(self, n: int, text: str, limit: int) -> None:
        from tokenizers import Tokenizer

        full = Tokenizer.from_str(self.metadata["tokenizer_json"])
        full.no_truncation()
        full.no_padding()
        length = len(full.encode(text).ids)
        logging.getLogger("porter").warning(
            "text %d is %d tokens long; the model's max_seq_length is %d: only its first %d tokens are embedded "
            "(as sentence-transformers does); split longer texts", n, length, limit, limit)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (n_tokens, n_vocab) of every position of ``tokens`` as a fresh sequence (no
        cache state is kept)."""
        self.reset()
        out = self.forward(tokens, use_cache=True, all_logits=True)
        self.reset()
        return out

    def close(self) -> None:
        """Free the weights, the KV cache and the compute graphs now (the model is unusable
        afterwards); leaving a ``with`` block calls it."""
        if self._migration is not None:  # before the memory it works on goes
            self._migration.stop()
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()
        if self._plan is not None:
            self._plan.close()
            self._plan = None
        if self._galloc_finalizer is not None:
            self._galloc_finalizer()
            self._galloc = self._galloc_finalizer = None
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
        mapped = getattr(self, "_mapped", None)
        if mapped is not None:
            mapped.close()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["GenerationStats", "KV_BUCKET", "Model", "SPEC_KEY", "TOKENIZER_KEY", "alibi_mask", "sample",
           "_bf16_as_f16", "_bf16_fits_f16"]
