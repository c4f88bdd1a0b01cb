"""The README is a front page and the reference lives in docs/: its links resolve, and numbers stated
elsewhere are derived, not restated (the recipes page is generated from the recipes' headers, the
README's results excerpt is taken from the study's report)."""

from __future__ import annotations

import re
import runpy

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_the_readme_is_a_front_page_whose_links_resolve():
    assert len(README.splitlines()) <= 220
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_recipes_page_is_generated_from_the_recipe_headers():
    build = runpy.run_path(str(ROOT / "docs" / "build.py"))
    assert (ROOT / "docs" / "recipes.md").read_text() == build["render"](), "run make docs"
    page = build["render"]()
    for recipe in sorted((ROOT / "conf" / "experiment").glob("*.yaml")):
        assert f"## {recipe.stem}\n" in page


def test_the_readme_results_excerpt_is_the_report_s():
    excerpt = README[README.index("## Results") :]
    report = (ROOT / "docs" / "results.md").read_text()
    numbers = re.findall(
        r"(?<![\w.])\d+\.\d+(?![\w.])", "\n".join(row for row in excerpt.splitlines() if row.startswith("|"))
    )
    assert len(numbers) > 40
    missing = sorted({n for n in numbers if not re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", report)})
    assert not missing, f"README numbers not in docs/results.md: {missing}"
