"""Each default is written once: the base config is derived from the typed spec, and states only where the
CPU default run departs from it."""
import dataclasses

from ml_collections import ConfigDict

from experiments import configs
from experiments.configs import base
from passk_jax.run.spec import RunSpec


def _plain(value):
    return value.to_dict() if isinstance(value, ConfigDict) else value


def test_base_config_is_the_spec_defaults_plus_the_cpu_overrides():
    c = base.get_config()
    assert sorted(c.keys()) == sorted(["seed", *base.SECTIONS])
    for name, cls in base.SECTIONS.items():
        fields = dataclasses.fields(cls)
        assert sorted(c[name].keys()) == sorted(f.name for f in fields), name
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            dotted = f"{name}.{f.name}"
            want = base.CPU_OVERRIDES.get(dotted, default)
            assert _plain(c[name][f.name]) == (dict(want) if isinstance(want, dict) else want), dotted
            if dotted in base.CPU_OVERRIDES:  # an override that restates the default would be a second copy
                assert base.CPU_OVERRIDES[dotted] != default, dotted
    spec = RunSpec.from_config(c)
    assert spec.step.estimator == "passk_analytic" and spec.rollout == type(spec.rollout)()


def test_every_named_config_starts_from_the_base():
    """A named config changes fields, never the set of fields (so every override and the did-you-mean
    sentence see the same names)."""
    keys = lambda c: {f"{s}.{k}" for s in base.SECTIONS for k in c[s].keys()}  # noqa: E731
    want = keys(base.get_config())
    for name in configs.names():
        c = configs.get(name)
        assert keys(c) == want, name
