"""The README's support table lists exactly the model types porter's own plugins port."""

from porter.plugins import builtin_architectures
from porter.support import markdown, readme_model_types


def test_readme_support_table_matches_plugins():
    assert readme_model_types() == list(builtin_architectures()), "run `make readme` to regenerate the support table"


def test_markdown_table_has_a_row_per_plugin():
    text = markdown(measure=False)
    assert len(text.strip().splitlines()) == 2 + len(builtin_architectures())


def test_readme_parity_snippets_use_ids_every_drawn_config_has():
    """The README's example token ids are valid for every vocabulary configs() can draw."""
    import re

    from porter.support import README
    from porter.testing import MIN_VOCAB
    from porter.testing.strategies import shapes

    calls = re.findall(r"assert_(?:parity|cache_consistent)\(pair, \[([\d, ]+)\]", README.read_text())
    assert calls, "the README shows a parity snippet"
    ids = [int(x) for call in calls for x in call.split(",")]
    assert max(ids) < MIN_VOCAB
    # MIN_VOCAB is what shapes() draws at least: the smallest example hypothesis can produce
    from hypothesis import find

    assert find(shapes(), lambda s: True, settings=None)["vocab_size"] == MIN_VOCAB
