"""The study behind docs/results.md (make study): its quick variant end to end, the report's structure."""

import re

import pytest

from dml.study import load_spec, main, mean_and_ci

pytestmark = pytest.mark.slow  # eight short trainings


def test_mean_and_confidence_half_width():
    mean, half = mean_and_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)


def test_quick_study_writes_both_tables_with_intervals_paper_numbers_and_pictures(tmp_path):
    out = tmp_path / "docs" / "results.md"
    main(["study=quick", f"out={out}", f"runs={tmp_path / 'runs'}"])
    text = out.read_text()
    spec = load_spec("quick")
    sections = text.split("\n## ")[1:]
    assert len(sections) == len(spec.tables) == 2
    for table, section in zip(spec.tables, sections, strict=True):
        assert section.startswith(table.title)
        rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
        ours = [r for r in rows if "(paper)" not in r]
        assert [r.split(" | ")[0][2:] for r in ours] == [a.name for a in table.arms[:2]]
        cells = [c for r in ours for c in r.strip("| ").split(" | ")[1:]]
        assert len(cells) == 2 * len(table.splits) * len(table.columns)
        assert all(re.fullmatch(r"-?\d+\.\d{3} \+/- \d+\.\d{3}", c) for c in cells), cells
    eps = sections[0]
    assert "| triplet (paper) | 0.420 | 0.875 | 0.966 |" in eps
    for arm in ("triplet", "triplet_eps"):
        assert (out.parent / "results" / f"eps_{arm}.png").is_file()
        assert f"(results/eps_{arm}.png)" in eps
