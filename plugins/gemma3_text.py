"""gemma3_text: not ported yet (placeholder so the entry point resolves; fill in an Architecture)."""

from __future__ import annotations

from porter.plugins import hookimpl


@hookimpl
def porter_architectures():
    return []
