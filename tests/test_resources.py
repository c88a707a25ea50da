"""The shipped configs: one loader for every named JSON config (training presets, gate policies, pipelines)."""

from __future__ import annotations

import json

import pytest

from diaggym.errors import InputError
from diaggym.resources import bundled, load_config


@pytest.mark.parametrize("kind", ["train", "gate", "pipeline"])
def test_every_shipped_config_loads_by_name(kind):
    names = sorted(p.stem for p in bundled("configs", kind).glob("*.json"))
    assert names, f"no configs in configs/{kind}"
    for name in names:
        path, data = load_config(kind, name, "config")
        assert path == bundled("configs", kind, f"{name}.json") and isinstance(data, dict)


def test_a_path_wins_over_a_name(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"lr": 1}))
    assert load_config("train", f, "training config") == (f, {"lr": 1})


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(InputError, match=r"no gate policy 'nope' \(a JSON file, or a name in .*configs/gate\)"):
        load_config("gate", "nope", "gate policy")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        load_config("train", bad, "training config")
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="a pipeline config must be a JSON object"):
        load_config("pipeline", bad, "pipeline config")
