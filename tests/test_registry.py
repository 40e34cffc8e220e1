"""The one registry idiom (``passk_jax.registry.Registry``) behind estimators, loss aggregations, KL
estimators and tasks: lookups, the unknown-name sentence, duplicate names."""
import pytest

from passk_jax import advantages, tasks
from passk_jax.registry import Registry
from passk_jax.rl import losses


def test_lookup_names_and_errors():
    r = Registry("widget")
    assert r.register("beta", 2) == 2 and r.register("alpha", 1) == 1
    assert r.names() == ("alpha", "beta") and list(r) == ["alpha", "beta"] and len(r) == 2 and "beta" in r
    assert r.lookup("alpha") == 1
    with pytest.raises(ValueError, match=r"^unknown widget 'alpah'; valid names: alpha, beta \(did you mean 'alpha'\?\)\.$"):
        r.lookup("alpah")
    with pytest.raises(ValueError, match=r"^unknown widget 'zzz'; valid names: alpha, beta\.$"):
        r.lookup("zzz")
    with pytest.raises(ValueError, match="widget 'alpha' is already registered"):
        r.register("alpha", 3)
    r.register("alpha", 3, replace=True)
    assert r.lookup("alpha") == 3
    with pytest.raises(ValueError, match="must be a non-empty string"):
        r.register("", 0)


@pytest.mark.parametrize("lookup,kind", [
    (advantages.entry, "advantage estimator"),
    (losses.AGGREGATION_REGISTRY.lookup, "loss aggregation"),
    (losses.KL_REGISTRY.lookup, "KL estimator"),
    (lambda name: tasks.get(name), "task"),
])
def test_every_extension_point_speaks_the_same_sentence(lookup, kind):
    with pytest.raises(ValueError, match=f"^unknown {kind} 'nope'; valid names: "):
        lookup("nope")
