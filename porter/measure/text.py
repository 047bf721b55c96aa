"""An English text every Python installation carries, for perplexity without a download.

``pydoc_data.topics`` is the standard library's copy of the Python Language Reference's topics
(what ``help("assignment")`` prints), PSF license: about 465k characters of prose and grammar.
"""

from __future__ import annotations


def python_reference(n_chars: int | None = None) -> str:
    """The reference topics in sorted order, separated by blank lines (the first ``n_chars``)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return text if n_chars is None else text[:n_chars]
