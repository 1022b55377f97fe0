"""Every method knob is declared, written into each recipe's config and settable from the
command line (`--config.loss.<knob>=...`); the trainer fills in and refuses by name."""

from __future__ import annotations

import glob
import os

import ml_collections as mlc
import pytest
from absl import flags
from ml_collections import config_flags

from disco_jax import config_lib, methods
from disco_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Training recipes: every configs/*.py except the multi-stage demo (its stages are recipes of
# the same methods, checked through `stage_configs`).
RECIPES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _parse(name: str, *overrides: str) -> mlc.ConfigDict:
    """The config as the command line builds it: `--config=configs/NAME` plus overrides."""
    argv = ["prog", f"--config={os.path.join(ROOT, 'configs', name)}", *overrides]
    fv = flags.FlagValues()
    # sys_argv: the override flags are found in the command line when the flag is defined.
    config_flags.DEFINE_config_file("config", None, flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv["config"].value


def _load(name: str) -> mlc.ConfigDict:
    return _parse(name)


def stage_configs() -> list[tuple[str, str, mlc.ConfigDict]]:
    """(recipe file, stage or "", config) for every training config the recipes define."""
    out = []
    for name in RECIPES:
        c = _load(name)
        if "stages" in c:
            out += [(name, stage, c.stages[stage]) for stage in c.stage_order]
        else:
            out.append((name, "", c))
    return out


def _other_value(value):
    """A value of the same type that differs from `value` where the type allows it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 0.5
    if isinstance(value, tuple):
        return tuple(reversed(value)) if len(set(value)) > 1 else value
    return value  # a string option: its own value still has to parse


def _flag_literal(value) -> str:
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def test_every_method_declares_its_knobs():
    for name in methods.METHODS:
        knobs = methods.get(name).LOSS_DEFAULTS
        assert isinstance(knobs, dict) and knobs, f"{name} declares no LOSS_DEFAULTS"
        assert methods.loss_defaults(name).to_dict() == dict(knobs)


@pytest.mark.parametrize("name,stage,config", stage_configs(),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_recipes_hold_every_knob_of_their_method(name, stage, config):
    knobs = methods.get(config.method).LOSS_DEFAULTS
    missing = sorted(set(knobs) - set(config.loss))
    extra = sorted(set(config.loss) - set(knobs))
    assert not missing and not extra, (name, stage, missing, extra)


@pytest.mark.parametrize("name", [n for n in RECIPES if "stages" not in _load(n)])
def test_every_knob_is_settable_from_the_command_line(name):
    method = _load(name).method
    for knob, default in methods.get(method).LOSS_DEFAULTS.items():
        value = _other_value(default)
        got = _parse(name, f"--config.loss.{knob}={_flag_literal(value)}").loss[knob]
        assert got == value and type(got) is type(value), (name, knob, got, value)


def test_resolve_loss_fills_missing_knobs_and_refuses_unknown_ones():
    c = config_lib.base_config("moco_v2")
    del c.loss["key_bn"]
    resolved = methods.resolve_loss(c)
    assert resolved.loss.key_bn == methods.get("moco_v2").LOSS_DEFAULTS["key_bn"]
    assert "key_bn" not in c.loss  # the caller's config is left as it was
    c.loss.tmep = 0.2
    with pytest.raises(ConfigError, match=r"loss.tmep is not a knob of method 'moco_v2'.*temp"):
        methods.resolve_loss(c)
    # A recipe switched to another method keeps knobs the new method does not have.
    c = config_lib.base_config("moco_v2")
    c.method = "supervised"
    with pytest.raises(ConfigError, match="not a knob of method 'supervised'"):
        methods.resolve_loss(c)


def test_moco_v2_recipe_uses_shuffle_bn_over_official_gpu_groups():
    c = _load("moco_v2_r50.py")
    assert c.loss.key_bn == "shuffle" and c.loss.bn_group_size == 32
    assert c.batch_size // c.loss.bn_group_size == 8  # MoCo's 8 GPUs x 32 images
    methods.get("moco_v2").validate(c)
    c.loss.bn_group_size = 0  # one group: a shuffle would change nothing
    with pytest.raises(ConfigError, match="key_bn='shuffle' needs"):
        methods.get("moco_v2").validate(c)
