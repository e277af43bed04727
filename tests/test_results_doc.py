"""docs/results.md is generated from a run's claims table, and the README quotes its headline."""

import pandas as pd
import pytest

from conftest import REPO
from eigenattn.claims import results_doc as rd


def _claims():
    rows = [
        dict(claim="C1", model="m", view="all", variant="row_centered", role="headline", state="supported",
             quantity="median k90/d over heads", value=0.17),
        dict(claim="C1", model="m", view="all", variant="raw", role="supporting", state="not supported",
             quantity="median k90/d over heads", value=0.61),
        dict(claim="C1", model="m", view="all", variant="raw", role="supporting", state="reference",
             quantity="median k90 over heads (rank at most N−1 = 11)", value=9.0),
        dict(claim="C2", model="m", view="all", variant="raw", k=8, state="inconclusive",
             quantity="median overlap_k (random 0.250)", value=0.33),
        dict(claim="C2", model="m", view="prefix", variant="raw", k=8, state="supported",
             quantity="median overlap_k (random 0.500)", value=0.71),
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_headline_counts_judged_rows_and_quotes_the_headline_row():
    h = rd.headline(_claims()).set_index("claim")
    assert h.loc["C1", "judged rows"] == "1 supported, 1 not supported"  # the reference row is not judged
    assert "m all row_centered 0.17 (supported)" == h.loc["C1", "headline"]
    # No headline row: the judged values as one range per quantity, parenthetical detail dropped.
    assert h.loc["C2", "headline"] == "median overlap_k: 0.33 to 0.71 (2 rows)"
    assert h.loc["C2", "judged rows"] == "1 supported, 1 inconclusive"
    assert "C3" not in h.index


def test_sync_readme_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{rd.BEGIN}\n| stale |\n{rd.END}\nafter\n")
    assert rd.sync_readme(readme, _claims())
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith("\nafter\n")
    assert rd.readme_block(text) == rd.headline_block(_claims())
    assert not rd.sync_readme(readme, _claims())  # already current
    with pytest.raises(ValueError, match="markers"):
        (tmp_path / "plain.md").write_text("no block\n")
        rd.sync_readme(tmp_path / "plain.md", _claims())


def test_main_writes_a_stamped_page(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    _claims().to_csv(tmp_path / "results" / "claims.csv", index=False)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    rd.main(["--out", "docs/results.md"])
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "SHA-256" in page and "`config.yaml`" in page
    assert rd.headline_block(_claims()) in page
    with pytest.raises(SystemExit, match="claims.csv not found"):
        rd.main(["--results", "nowhere"])


def test_a_hand_edit_is_caught():
    block = rd.headline_block(_claims())
    edited = block.replace("0.17", "0.18")
    assert edited != block and rd.readme_block(f"x{edited}y") != rd.readme_block(f"x{block}y")


def test_the_results_page_and_the_readme_are_the_run_s_numbers():
    """docs/results.md and the README's headline block are rendered again from the claims table kept
    beside the page (docs/results.claims.csv): a number edited by hand in either fails here
    (regenerate both with `python -m eigenattn.claims.results_doc --readme README.md`)."""
    page = (REPO / "docs" / "results.md").read_text()
    claims = pd.read_csv(rd.source_of(REPO / "docs" / "results.md"))
    assert page == rd.render(claims, rd.stamp_line(page)), "docs/results.md is not what its claims table renders"
    readme = (REPO / "README.md").read_text()
    assert rd.BEGIN in readme, "README.md lacks the results-headline block"
    assert rd.readme_block(readme) == rd.headline_block(claims), (
        "README.md's headline table is not the run's: run `python -m eigenattn.claims.results_doc --readme README.md`"
    )


def test_a_hand_edit_of_a_number_in_the_readme_or_the_page_fails(tmp_path):
    claims = _claims()
    page = rd.render(claims, "Commit `x`; config `c` (SHA-256 `0`); written 2026-01-01.")
    assert page == rd.render(claims, rd.stamp_line(page))
    assert page.replace("0.17", "0.18") != rd.render(claims, rd.stamp_line(page))
    readme = f"# x\n{rd.headline_block(claims)}\n"
    assert rd.readme_block(readme.replace("0.17", "0.18")) != rd.headline_block(claims)
    (tmp_path / "results").mkdir()
    claims.to_csv(tmp_path / "results" / "claims.csv", index=False)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    rd.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "docs" / "results.md"),
             "--config", str(tmp_path / "config.yaml")])  # fmt: skip
    kept = pd.read_csv(tmp_path / "docs" / "results.claims.csv")
    assert rd.headline_block(kept) == rd.headline_block(claims)
