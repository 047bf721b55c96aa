"""The README's support table lists exactly the model types the installed plugins port."""

from porter.plugins import architectures
from porter.support import markdown, readme_model_types


def test_readme_support_table_matches_plugins():
    assert readme_model_types() == list(architectures()), "run `make readme` to regenerate the support table"


def test_markdown_table_has_a_row_per_plugin():
    text = markdown(measure=False)
    assert len(text.strip().splitlines()) == 2 + len(architectures())
