"""The study behind docs/results.md (make study): its quick variant end to end, the report's structure."""

import re

import pytest
from scipy.stats import ttest_ind

from dml.study import difference_ci, load_spec, main, mean_and_ci

CELL = r"-?\d+\.\d{3} \+/- (\d+\.\d{3}|nan)"


def test_mean_and_confidence_half_width():
    mean, half = mean_and_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)


def test_difference_interval_is_welch():
    a, b = [0.5, 0.6, 0.7], [0.2, 0.4, 0.0]
    reference = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)  # dof 2.94
    assert difference_ci(a, b) == pytest.approx((0.4, reference.low, reference.high))
    assert reference.low < 0 < reference.high  # this pair is "not separated"
    assert difference_ci([1.0, 1.0], [0.0, 0.0]) == (1.0, 1.0, 1.0)


def tables_of(section: str) -> list[list[str]]:
    """The Markdown tables of a report section, each as its rows (header and rule left out)."""
    found, rows = [], []
    for line in [*section.splitlines(), ""]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            found.append(rows[2:])
            rows = []
    return found


@pytest.mark.slow  # about twenty one-epoch trainings
def test_quick_study_writes_tables_sweeps_claims_paper_numbers_and_pictures(tmp_path):
    out = tmp_path / "docs" / "results.md"
    main(["study=quick", f"out={out}", f"runs={tmp_path / 'runs'}"])
    text = out.read_text()
    spec = load_spec("quick")
    sections = text.split("\n## ")[1:]
    assert len(sections) == len(spec.tables) + 1, "a section per table, then the AntiCo forms"
    for table, section in zip(spec.tables, sections, strict=False):
        assert section.startswith(table.title)
        arms = list(table.arms)[: spec.max_arms]
        found = tables_of(section)
        assert len(found) == len(table.splits), "one Markdown table per split"
        for rows in found:
            ours = [r for r in rows if "(paper)" not in r]
            names = [r.split(" | ")[0][2:] for r in ours]
            assert [n for n, a in zip(names, arms, strict=True) if not a.get("sweep")] == [
                a.name for a in arms if not a.get("sweep")
            ]
            cells = [c for r in ours for c in r.strip("| ").split(" | ")[1:]]
            assert len(cells) == len(arms) * len(table.columns)
            assert all(re.fullmatch(CELL, c) for c in cells), cells
        claims = [
            c for c in table.claims if c.better in {a.name for a in arms} and c.than in {a.name for a in arms}
        ]
        verdicts = re.findall(r"^- (.*): \*\*(held|did not hold|not separated)\*\*", section, re.M)
        assert [v[0] for v in verdicts] == [c.text for c in claims] and claims
    eps, antico, forms = sections
    assert "| triplet (paper) | 0.420 | 0.875 | 0.966 |" in eps  # train digits
    assert "| triplet (paper) | 0.352 | 0.809 | 0.933 |" in eps  # test digits
    for arm in ("triplet", "triplet_eps", "margin"):
        assert (out.parent / "results" / f"eps_{arm}.png").is_file()
        assert f"(results/eps_{arm}.png)" in eps
    # the swept arm: each value tried on the sweep's split, the best one named in its row
    tried = re.search(
        r"^- Proxy-Anchor \+ AntiCo batch_proxy, swept weight: 0\.1: (\S+), 1: (\S+) -> (\S+)$", antico, re.M
    )
    assert tried, antico
    best = "0.1" if float(tried[1]) >= float(tried[2]) else "1"
    assert tried[3] == best and f"| Proxy-Anchor + AntiCo batch_proxy, swept weight {best} | " in antico
    assert len(list((tmp_path / "runs" / "antico" / "sweep").glob("*/*/seed0/checkpoints/last.ckpt"))) == 2
    assert re.search(r"^\| 11,318 \| 1756\.\d\d \| 0 \| 0 \| \d", forms, re.M), forms
