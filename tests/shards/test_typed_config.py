from dataclasses import dataclass, field

import pytest

from shards.typed_config import ConfigError, from_dict, load_yaml, to_dict


@dataclass
class Inner:
    rate: float = 0.1
    sizes: tuple[int, int, int] = (1, 2, 3)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] = field(default_factory=dict)


def test_round_trip_and_coercions():
    cfg = from_dict(Outer, {"steps": 3, "inner": {"rate": 1, "sizes": [4, 5, 6]}, "weights": {"a": 2}})
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.sizes == (4, 5, 6)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"stepz": 1}, "stepz"),
        ({"inner": {"rte": 1.0}}, "rte"),
        ({"steps": "10"}, "config.steps"),
        ({"steps": 1.5}, "config.steps"),
        ({"flag": 1}, "config.flag"),
        ({"inner": {"sizes": [1, 2]}}, "config.inner.sizes"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        from_dict(Outer, data)


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  rate: 0.5\n")
    cfg = load_yaml(Outer, str(path), ["inner.sizes=[7, 8, 9]", "steps=4"])
    assert (cfg.name, cfg.steps, cfg.inner.rate, cfg.inner.sizes) == ("run", 4, 0.5, (7, 8, 9))
    with pytest.raises(ConfigError, match="nope"):
        load_yaml(Outer, str(path), ["inner.nope=1"])


def test_exponent_floats_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  rate: 1.5e-3\n")
    assert load_yaml(Outer, str(path)).inner.rate == 1.5e-3
    assert load_yaml(Outer, str(path), ["inner.rate=3e-4"]).inner.rate == 3e-4
