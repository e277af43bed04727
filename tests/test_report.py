"""The report gives every figure its own caption: workflow/report/figure.rst, rendered as Snakemake
renders it for each file of a notebook's figure folder, says something specific for every figure
docs/figures.md lists, and falls back to the notebook's general caption for any other file."""

import re
from types import SimpleNamespace

import pytest
from docutils.core import publish_parts
from jinja2 import Environment
from snakemake.iocontainers import Wildcards

from conftest import REPO

TEMPLATE = REPO / "workflow" / "report" / "figure.rst"


def documented_figures() -> dict[str, list[str]]:
    """docs/figures.md: notebook -> the figures its table lists."""
    out, notebook = {}, None
    for line in (REPO / "docs" / "figures.md").read_text().splitlines():
        if m := re.match(r"## `(\w+)`", line):
            notebook = out.setdefault(m.group(1), [])
        elif (m := re.match(r"\| `(\w+)` \|", line)) and notebook is not None:
            notebook.append(m.group(1))
    return out


def caption(notebook: str, fig: str) -> str:
    """The caption's HTML, as `snakemake --report` makes it (report/__init__.py: a Jinja environment
    with trim_blocks and lstrip_blocks, the job's wildcards plus the pattern's, docutils to HTML);
    any docutils warning fails."""
    env = Environment(trim_blocks=True, lstrip_blocks=True)
    snakemake = SimpleNamespace(wildcards=Wildcards(fromdict={"name": notebook, "fig": fig}))
    rst = env.from_string(TEMPLATE.read_text()).render(snakemake=snakemake)
    return publish_parts(rst, writer="html", settings_overrides={"halt_level": 2, "report_level": 2})["body"]


FIGURES = [(nb, fig) for nb, figs in documented_figures().items() for fig in figs]


def test_docs_list_the_figures_of_every_notebook():
    notebooks = {p.stem for p in (REPO / "notebooks").glob("*.ipynb")}
    assert set(documented_figures()) == notebooks
    assert {"frontier", "frontier_plugin", "per_input_cumulative", "per_input_quarter"} <= {f for _, f in FIGURES}


def test_the_rule_captions_each_figure_file_with_this_template():
    rule = (REPO / "workflow" / "rules" / "notebooks.smk").read_text()
    assert 'patterns=["{fig}.png"]' in rule and 'caption="../report/figure.rst"' in rule


@pytest.mark.parametrize("notebook,fig", FIGURES)
def test_each_documented_figure_has_its_own_caption(notebook, fig):
    own, general = caption(notebook, fig), caption(notebook, "not_a_documented_figure")
    assert own.strip() and own != general, f"{notebook}/{fig}.png gets only the notebook's general caption"


def test_captions_are_distinct_and_the_template_names_only_documented_figures():
    captions = [caption(nb, fig) for nb, fig in FIGURES]
    assert len(set(captions)) == len(captions)
    named = set(re.findall(r'fig == "(\w+)"', TEMPLATE.read_text()))
    assert named == {fig for _, fig in FIGURES}, named ^ {fig for _, fig in FIGURES}
    for notebook in documented_figures():
        assert caption(notebook, "not_a_documented_figure").strip(), notebook
