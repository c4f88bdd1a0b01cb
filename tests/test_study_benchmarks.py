"""make study STUDY=cub_antico (and cars_antico): AntiCo against its baselines on the real benchmarks,
from the pinned recipes; its quick mode on a CUB-layout archive."""

import re

import pytest
from omegaconf import OmegaConf

from dml.config import compose
from dml.study import load_spec, main
from dml.study.report import claims_of
from tests.benchmark_fixtures import make_cub
from tests.test_study import check_report


def arm_config(spec, arm, *extra):
    return compose([*arm.overrides, *spec.overrides, "seed=1", *extra])


@pytest.mark.parametrize(
    "name, benchmark, epochs", [("cub_antico", "cub", 100), ("cars_antico", "cars", 300)]
)
def test_each_arm_is_its_recipe_with_only_the_antico_term_changed(name, benchmark, epochs):
    """What the loss, optimizer and sampler of each arm receive: the AntiCo recipe's (Adam 1e-5, proxies
    x2000, 0.0035 x Proxy-Anchor alpha 64, batch 90 = 45 x 2) with the term at weight 0, 1 (exp) or
    swept (-R); the EPS paper's MS recipe with hard positives, + pair AntiCo; nothing else differs."""
    spec = load_spec(name)
    assert spec.out == f"docs/results_{benchmark}.md" and len(spec.seeds) >= 3
    (table,) = spec.tables
    arms = {a.name: a for a in table.arms}
    configs = {
        a.name: arm_config(spec, a, *([f"{table.sweep.key}=0.03"] if a.get("sweep") else []))
        for a in table.arms
    }
    without, official, neg = (configs[n] for n in list(arms)[:3])
    for cfg in (without, official, neg):
        assert (
            cfg.dataset._target_.endswith(("CUBDataModule", "CarsDataModule"))
            and benchmark in cfg.dataset.root
        )
        assert (cfg.optimizer.lr, cfg.model.lr_mult.loss, cfg.trainer.max_epochs) == (1e-5, 2000.0, epochs)
        assert (cfg.dataset.batch_size, cfg.dataset.samples_per_class) == (90, 2)
        assert cfg.loss.terms.proxy_anchor.weight == 0.0035 and cfg.loss.terms.proxy_anchor.loss.alpha == 64
        assert cfg.loss.terms.antico.loss.variant == "batch_proxy"
    assert (without.loss.antico_weight, official.loss.antico_weight, neg.loss.antico_weight) == (
        0.0,
        1.0,
        0.03,
    )
    assert (official.loss.terms.antico.loss.form, neg.loss.terms.antico.loss.form) == ("exp", "neg")

    def differences(a, b):
        flat_a, flat_b = (OmegaConf.to_container(c.loss) for c in (a, b))
        return {k for k in flat_a | flat_b if flat_a.get(k) != flat_b.get(k)}

    assert differences(without, official) == {"antico_weight"}
    assert differences(official, neg) == {"antico_weight", "terms"}
    ms, ms_exp, ms_neg = (configs[n] for n in list(arms)[4:])
    for cfg in (ms, ms_exp, ms_neg):
        assert cfg.loss.terms.ms.miner.positives == "hard" and cfg.loss.terms.ms.loss.base == 1.0
        assert OmegaConf.to_container(cfg.optimizer) == OmegaConf.to_container(ms.optimizer)
    assert "antico" not in ms.loss.terms and ms_exp.loss.terms.antico.loss.variant == "pair"
    assert (ms_exp.loss.antico_weight, ms_neg.loss.antico_weight) == (1.0, 0.03)
    assert configs["Proxy-Anchor (its recipe)"].run_group == f"proxy_anchor_{benchmark}_r50"
    # every AntiCo arm is claimed against its baseline on Recall@1, MAP@R and the coding rate
    assert len(claims_of(table)) == 3 * sum(1 for a in table.arms if a.get("baseline"))


@pytest.mark.slow  # about twenty one-epoch trainings on a fixture
def test_cub_quick_study_on_a_cub_layout_archive(tmp_path):
    make_cub(tmp_path / "data" / "cub", per_class=6, train_classes=6)
    out = tmp_path / "report" / "results_cub.md"
    main(
        [
            "study=cub_antico_quick",
            f"study.data_dir={tmp_path / 'data'}",
            f"out={out}",
            f"runs={tmp_path / 'runs'}",
        ]
    )
    spec = load_spec("cub_antico_quick")
    section = check_report(out, spec)["antico_cub"]
    swept = r"^- AntiCo recipe with -R of the batch proxies: 0\.01: \S+, 0\.1: \S+ -> (0\.01|0\.1)$"
    assert re.search(swept, section, re.M), section
    assert (
        tmp_path / "runs" / "antico_cub" / "multi_similarity" / "seed2" / "checkpoints" / "last.ckpt"
    ).is_file()
