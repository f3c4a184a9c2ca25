"""Settings: defaults < TOML < env < overrides; bad values are named; docs mirror every field."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from core.config import Settings, load_settings
from core.errors import BadRequest

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_defaults_file_env_cli(tmp_path):
    (tmp_path / "config.toml").write_text('[server]\nport = 6000\nhost = "0.0.0.0"\n[chat]\ntemperature = 0.2\n')
    s = load_settings({"data_dir": str(tmp_path)}, environ={})
    assert (s.port, s.host, s.temperature) == (6000, "0.0.0.0", 0.2)
    s = load_settings({"data_dir": str(tmp_path)}, environ={"SWITCHBOARD_PORT": "7000"})
    assert s.port == 7000
    s = load_settings({"data_dir": str(tmp_path), "port": 8000}, environ={"SWITCHBOARD_PORT": "7000"})
    assert s.port == 8000
    assert s.model_path == tmp_path.resolve() / "models"
    assert load_settings({"data_dir": str(tmp_path)}, environ={"MODEL_DIR": "/srv/m"}).model_path == Path("/srv/m")


def test_config_file_from_env_and_connections(tmp_path):
    cfg = tmp_path / "other.toml"
    cfg.write_text(
        '[model_names.deepseek]\nname = "DeepSeek"\nbase_url = "https://api.deepseek.com/v1/"\n'
        'env = "DEEPSEEK_API_KEY"\nmodels = ["deepseek-chat"]\n'
        '[model_names.lan]\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    s = load_settings({"data_dir": str(tmp_path)}, environ={"SWITCHBOARD_CONFIG": str(cfg)})
    assert [(c.key, c.name, c.base_url, c.env, c.models) for c in s.connections] == [
        ("deepseek", "DeepSeek", "https://api.deepseek.com/v1", "DEEPSEEK_API_KEY", ["deepseek-chat"]),
        ("lan", "lan", "http://127.0.0.1:9/v1", "NO_API_KEY", []),
    ]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[server]\nport = 'many'\n", "port"),
        ("[server\nport = 1", "config file"),
        ("[model_names.x]\nname = 'no url'\n", "base_url"),
        ("[model_names.ollama]\nbase_url = 'http://x/v1'\n", "model_names.ollama"),
        ("[model_names.'a b']\nbase_url = 'http://x/v1'\n", "a b"),
    ],
)
def test_bad_config_is_named(tmp_path, text, needle):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(BadRequest) as info:
        load_settings({"data_dir": str(tmp_path)}, environ={})
    assert needle in info.value.message


def test_bad_env_value_is_named(tmp_path):
    with pytest.raises(BadRequest, match="max_new_tokens"):
        load_settings({"data_dir": str(tmp_path)}, environ={"SWITCHBOARD_MAX_NEW_TOKENS": "lots"})


def test_every_setting_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for f in fields(Settings):
        for key in (f.metadata.get("toml"), f.metadata.get("env")):
            if key:
                assert f"`{key}`" in doc, f"docs/configuration.md does not mention {key}"
