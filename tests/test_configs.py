"""Every config composes and validates; the schema rejects typos and wrong types."""
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from conftest import compose
from selftrain.paths import conf_dir
from selftrain.config.checks import validate


def _options(group):
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose([f"experiment={experiment}"])
    validate(cfg)
    assert cfg.generations >= 1


@pytest.mark.parametrize("group", ["constitution", "model", "sampler", "train", "probes", "prompts", "preferences"])
def test_every_group_option_composes(group):
    for option in _options(group):
        validate(compose([f"{group}={option}"]))


@pytest.mark.parametrize("experiment", [None] + _options("experiment"))
def test_every_shipped_monitor_can_alert(experiment):
    """No shipped configuration in which some monitor test could never reach Holm p < alpha."""
    from selftrain.monitor.probe import check_power
    from selftrain.monitor.suites import load_suite

    cfg = compose([f"experiment={experiment}"] if experiment else [])
    assert not cfg.monitor.allow_underpowered
    suite = load_suite(cfg.probes.suite).select(cfg.probes.dimensions, cfg.probes.max_items_per_dimension)
    plan = check_power(suite, cfg.monitor)
    assert plan["underpowered"] == [] and all(t["holm_floor"] < cfg.monitor.alpha for t in plan["tests"].values())


def test_the_old_item_counts_are_refused():
    from selftrain import UserError
    from selftrain.monitor.probe import check_power
    from selftrain.monitor.suites import load_suite

    for n in (4, 6, 8):  # smoke, the default experiment and conf/probes before: 30 tests could never alert
        cfg = compose([f"probes.max_items_per_dimension={n}"])
        full = load_suite(cfg.probes.suite)
        with pytest.raises(UserError, match=r"probes.max_items_per_dimension: .* can reach Holm p .* raise it to "
                                            r"give 1\d items per test, or set monitor.allow_underpowered=true$"):
            check_power(full.select(None, n), cfg.monitor, full)


def test_smoke_is_small():
    cfg = compose(["experiment=smoke"])
    assert sum(s.n for s in cfg.prompts.sources) == 8
    assert cfg.critique.rounds == 1 and cfg.generations == 2


def test_default_run_is_64_prompts_two_generations():
    cfg = compose(["experiment=default"])
    assert sum(s.n for s in cfg.prompts.sources) == 64 and cfg.generations == 2


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["sampler.bogus=1"])
    assert isinstance(e.value.__cause__, (ConfigKeyError, ConfigAttributeError))
    with pytest.raises(ConfigCompositionException) as e:
        compose(["generations=abc"])
    assert isinstance(e.value.__cause__, ValidationError)


def test_train_keys_are_trl_fields():
    from selftrain import UserError

    cfg = compose(["+train.sft.learnin_rate=1e-4"])
    with pytest.raises(UserError, match="train.sft.learnin_rate: not a field of trl.SFTConfig"):
        validate(cfg)


def test_drift_config_composes_and_requires_its_paths():
    from hydra import compose as hcompose, initialize_config_dir
    from omegaconf import OmegaConf

    from selftrain.config.checks import validate_monitor
    from selftrain.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hcompose(config_name="drift", overrides=["reference=a", "candidates=[b,c]", "out=d"])
        missing = hcompose(config_name="drift")
    validate_monitor(cfg.monitor)
    assert list(cfg.candidates) == ["b", "c"] and cfg.probes.max_items_per_dimension == 20
    assert OmegaConf.is_missing(missing, "reference") and OmegaConf.is_missing(missing, "out")


@pytest.mark.parametrize("override, culprit", [
    ("preferences.min_margin=1.5", "preferences.min_margin=1.5"),
    ("preferences.min_margin=-0.1", "preferences.min_margin=-0.1"),
    ("preferences.responses=1", "preferences.responses=1"),
    ("preferences.principles=0", "preferences.principles=0"),
    ("preferences.clamp_low=0.7", "preferences.clamp_low=0.7"),
    ("preferences.source=human", "preferences.source=human"),
    ("train.method=rlhf", "train.method=rlhf"),
    ("+train.dpo.bta=0.1", "train.dpo.bta: not a field of trl.DPOConfig"),
])
def test_preference_and_dpo_settings_are_checked(override, culprit):
    from selftrain import UserError

    cfg = compose(["train=dpo", "preferences=ai_feedback", override])
    with pytest.raises(UserError) as e:
        validate(cfg)
    assert culprit in str(e.value) and "\n" not in str(e.value)


def test_sft_dpo_holds_both_trl_configs():
    cfg = compose(["train=sft_dpo"])
    validate(cfg)
    assert cfg.train.method == "sft_dpo" and cfg.train.sft.learning_rate > 0 and cfg.train.dpo.beta > 0


def test_model_device_auto_follows_the_machine():
    import torch

    from selftrain.models import inference_device

    assert inference_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert inference_device("cpu") == torch.device("cpu")
