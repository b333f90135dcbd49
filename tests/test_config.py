"""Service settings: YAML file, dotted overrides, FTSERVE_* environment variables, and their errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ftserve.config import (
    DEFAULT_SERVICE_FILE,
    ConfigError,
    EngineConfig,
    ServiceConfig,
    env_overrides,
    load_service_config,
)

SHIPPED_DEFAULT = Path(__file__).resolve().parents[1] / "bentos" / "default.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FTSERVE_* variable of the machine running the tests leaks into them (FTSERVE_CONFIG included)."""
    for name in list(os.environ):
        if name.startswith("FTSERVE_"):
            monkeypatch.delenv(name)


def _write(tmp_path: Path, text: str, name: str = "svc.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASIC = """\
model: my-model
served_model_name: served
engine:
  dtype: bfloat16
  max_num_seqs: 2
  max_model_len: 512
limits:
  max_tokens: 128
"""


def test_load_reads_values_from_the_yaml_file(tmp_path: Path) -> None:
    cfg = load_service_config(_write(tmp_path, BASIC))

    assert cfg.model == "my-model"
    assert cfg.base_name == "served"
    assert cfg.engine.dtype == "bfloat16"
    assert cfg.engine.max_num_seqs == 2
    assert cfg.engine.max_model_len == 512
    assert cfg.limits.max_tokens == 128


def test_keys_missing_from_the_file_take_the_model_defaults(tmp_path: Path) -> None:
    cfg = load_service_config(_write(tmp_path, BASIC))

    assert cfg.engine.max_queue == EngineConfig.model_fields["max_queue"].default
    assert cfg.limits.default_max_tokens == ServiceConfig().limits.default_max_tokens


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_service_config(_write(tmp_path, "")) == ServiceConfig()


def test_dotted_string_overrides_apply_with_their_field_types(tmp_path: Path) -> None:
    cfg = load_service_config(
        _write(tmp_path, BASIC), overrides={"engine.dtype": "float32", "engine.max_num_seqs": "4"}
    )

    assert cfg.engine.dtype == "float32"
    assert cfg.engine.max_num_seqs == 4
    assert isinstance(cfg.engine.max_num_seqs, int)
    assert cfg.engine.max_model_len == 512  # siblings from the file are kept


def test_override_can_create_a_section_absent_from_the_file(tmp_path: Path) -> None:
    cfg = load_service_config(_write(tmp_path, "model: m\n"), overrides={"limits.max_stop_sequences": "9"})

    assert cfg.limits.max_stop_sequences == 9


def test_override_value_is_parsed_as_yaml_so_lists_work(tmp_path: Path) -> None:
    cfg = load_service_config(_write(tmp_path, BASIC), overrides={"adapters": "[alpha, beta]"})

    assert cfg.adapters == ["alpha", "beta"]


def test_environment_variable_overrides_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTSERVE_ENGINE__MAX_QUEUE", "3")

    cfg = load_service_config(_write(tmp_path, BASIC))

    assert cfg.engine.max_queue == 3


def test_explicit_overrides_win_over_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTSERVE_ENGINE__MAX_NUM_SEQS", "3")

    cfg = load_service_config(_write(tmp_path, BASIC), overrides={"engine.max_num_seqs": "5"})

    assert cfg.engine.max_num_seqs == 5


def test_env_overrides_maps_double_underscores_to_dots_and_skips_plain_variables() -> None:
    environ = {
        "FTSERVE_ENGINE__DTYPE": "float16",
        "FTSERVE_HOME": "/somewhere",
        "FTSERVE_CONFIG": "x.yaml",
        "OTHER__THING": "1",
    }

    assert env_overrides(environ) == {"engine.dtype": "float16"}


def test_ftserve_config_variable_picks_the_file_when_no_path_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTSERVE_CONFIG", str(_write(tmp_path, "model: from-env\n")))

    assert load_service_config().model == "from-env"


@pytest.mark.parametrize(
    ("text", "overrides", "key"),
    [
        ("model: m\nmodle: typo\n", None, "modle"),
        ("engine:\n  max_num_seq: 4\n", None, "max_num_seq"),
        (BASIC, {"engine.turbo": "true"}, "turbo"),
        (BASIC, {"limits.max_tokenz": "5"}, "max_tokenz"),
    ],
    ids=["top_level_in_file", "nested_in_file", "override_engine", "override_limits"],
)
def test_unknown_key_raises_config_error_naming_it(
    tmp_path: Path, text: str, overrides: dict[str, str] | None, key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        load_service_config(_write(tmp_path, text), overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"engine.max_num_seqs": "0"}, "max_num_seqs"),
        ({"engine.max_num_seqs": "5000"}, "max_num_seqs"),
        ({"engine.max_model_len": "8"}, "max_model_len"),
        ({"engine.max_queue": "-1"}, "max_queue"),
        ({"engine.dtype": "float8"}, "dtype"),
        ({"limits.max_stop_sequences": "65"}, "max_stop_sequences"),
    ],
)
def test_out_of_range_value_raises_config_error_naming_the_key(
    tmp_path: Path, overrides: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        load_service_config(_write(tmp_path, BASIC), overrides=overrides)


def test_out_of_range_environment_value_raises_config_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTSERVE_ENGINE__MAX_NUM_SEQS", "0")

    with pytest.raises(ConfigError, match="max_num_seqs"):
        load_service_config(_write(tmp_path, BASIC))


def test_missing_file_raises_config_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "absent.yaml"

    with pytest.raises(ConfigError) as info:
        load_service_config(missing)

    assert str(missing) in str(info.value)


def test_invalid_yaml_raises_config_error_naming_the_path(tmp_path: Path) -> None:
    path = _write(tmp_path, "engine: [unclosed\n")

    with pytest.raises(ConfigError) as info:
        load_service_config(path)

    assert str(path) in str(info.value)


def test_non_mapping_yaml_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_service_config(_write(tmp_path, "- just\n- a list\n"))


def test_shipped_default_file_validates() -> None:
    assert DEFAULT_SERVICE_FILE.resolve() == SHIPPED_DEFAULT

    cfg = load_service_config(SHIPPED_DEFAULT)

    assert isinstance(cfg, ServiceConfig)
    # The file's values, not the model defaults, are what a deployment gets.
    raw = yaml.safe_load(SHIPPED_DEFAULT.read_text())
    assert cfg.engine.backend == raw["engine"]["backend"]
    assert cfg.engine.max_num_seqs == raw["engine"]["max_num_seqs"]


def test_default_file_is_used_when_no_path_or_variable_is_given() -> None:
    assert load_service_config() == load_service_config(SHIPPED_DEFAULT)


@pytest.mark.parametrize("path", sorted(SHIPPED_DEFAULT.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_deployment_validates_and_optimized_ones_name_their_recipe(path: Path) -> None:
    """A deployment that serves an optimize output points at a recipe's native export (selectable in bentos/)."""
    from ftserve.optimize.recipe import load_recipe

    cfg = load_service_config(path)
    root = SHIPPED_DEFAULT.parents[1]
    if not cfg.model.startswith("optimize/out/"):
        return
    _, _, name, export = Path(cfg.model).parts
    recipe = load_recipe(root / "optimize" / f"{name}.yaml")
    assert export == "native" and recipe.out / export == Path(cfg.model)
    assert any(step.step == "export" and step.format == "native" for step in recipe.steps)
    merged = any(step.step == "merge" for step in recipe.steps)
    assert merged != bool(cfg.adapters), "a merged model serves no adapters; a quantized base serves them unmerged"


def test_speculative_settings_are_checked_with_clear_errors() -> None:
    from ftserve.config import EngineConfig

    assert EngineConfig().speculative.drafter == "none"
    for bad, needle in (
        ({"drafter": "medusa"}, "prompt-lookup"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"num_tokens": 17}, "num_tokens"),
        ({"ngram_min": 3, "ngram_max": 2}, "ngram_min (3) must not exceed ngram_max (2)"),
    ):
        with pytest.raises(ValidationError, match=re.escape(needle)):
            EngineConfig.model_validate({"speculative": bad})
