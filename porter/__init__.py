"""porter: port Hugging Face transformers architectures to the ggml runtime, with parity proof."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path, *, n_threads: int | None = None, n_ctx: int | None = None, cache_type: str = "f32",
         use_repack: bool = True, bf16_as_f16: bool = True, use_mmap: bool = True, rpc=None, devices=None,
         n_gpu_layers=None, huge_pages: bool | None = None):
    """Load the GGUF file at ``path`` and return a :class:`porter.runtime.model.Model`.

    A file porter wrote carries its graph spec; a stock llama.cpp file of an architecture a
    plugin knows has its spec rebuilt from llama.cpp's keys. ``n_threads``: default the physical
    cores; ``n_ctx``: the KV cache's length (default the model's, at most 2048); ``cache_type``:
    f32, f16 or q8_0 keys and values; ``use_repack``: ggml's CPU-repacked weight layouts;
    ``bf16_as_f16``: BF16 weights that fit F16 run as F16; ``use_mmap``: map the file instead of
    reading it; ``huge_pages``: weights and KV cache moved onto 2 MiB pages in the background
    (default: when the kernel offers them; ``PORTER_HUGE_PAGES=0`` turns them off); ``rpc``:
    ``host:port`` strings of ggml RPC servers (``porter rpc-server``) to split the layers across,
    with the local CPU; ``devices`` (names as ``porter devices`` prints them:
    CPU, RPC0, ...) and ``n_gpu_layers`` (a count or "all": the last layers go to the non-CPU
    devices) choose where layers go, as llama.cpp's ``--device`` and ``-ngl``
    (:mod:`porter.runtime.placement`). Use it as a context manager (or call ``close()``) to
    free the memory at once::

        with porter.load("model.gguf") as m:
            print(m.chat([{"role": "user", "content": "Hi"}]))
    """
    from porter.runtime.model import Model

    return Model.load(path, n_threads=n_threads, n_ctx=n_ctx, cache_type=cache_type, use_repack=use_repack,
                      bf16_as_f16=bf16_as_f16, use_mmap=use_mmap, rpc=rpc, devices=devices,
                      n_gpu_layers=n_gpu_layers, huge_pages=huge_pages)
