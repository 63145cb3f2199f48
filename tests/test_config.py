"""Config: typed, validated, one clear line per mistake."""
import os

import pytest

from hvd_infer.config import load_config, mask_secrets
from hvd_infer.errors import ConfigError

BASE = {"model": {"path": "/m"}, "data": {"path": "/d"}, "output": {"path": "/o"}}


def cfg(**kw):
    return load_config(BASE, **kw)


def test_defaults_and_overrides():
    c = load_config(BASE, ["data.batch_size=64", "model.dtype=bfloat16", "data.id_columns=[id, doc]"])
    assert c.data.batch_size == 64 and c.model.dtype == "bfloat16" and c.data.id_columns == ["id", "doc"]
    assert c.model.deepspeed is True and c.output.mode == "error"
    assert cfg(**{"data.batch_size": 8}).data.batch_size == 8


@pytest.mark.parametrize("override, message", [
    ("data.batchsize=3", "unknown config key 'data.batchsize'; valid keys in data are: path, text_column"),
    ("modle.path=/x", "unknown config key 'modle'"),
    ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("data.batch_size=abc", "data.batch_size must be an integer, got 'abc'"),
    ("model.deepspeed=maybe", "model.deepspeed must be true or false"),
    ("model.dtype=float64", "model.dtype must be one of auto, auto-check, float32, float16, bfloat16; got 'float64'"),
    ("model.task=summarize", "model.task must be one of"),
    ("output.mode=append", "output.mode must be one of error, overwrite, resume"),
    ("data.on_null=drop", "data.on_null must be one of error, skip, empty"),
    ("data.max_tokens_per_batch=-1", "data.max_tokens_per_batch must be >= 0"),
    ("output.rows_per_part=0", "output.rows_per_part must be >= 1"),
    ("runtime.stall_timeout_s=0", "runtime.stall_timeout_s must be > 0 seconds, or auto, got 0"),
    ("runtime.stall_timeout_s=soon", "runtime.stall_timeout_s must be a number or auto, got 'soon'"),
    # removed: a value, and a key
    ("model.quantize=int8", "model.quantize=int8 (per-tensor scales) was removed: use model.quantize=int8-per-channel"),
    ("model.keep_float32=[bert.pooler.dense]", "config key 'model.keep_float32' was removed: "),
])
def test_errors_name_key_and_fix(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_required_paths():
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config({"data": {"path": "/d"}, "output": {"path": "/o"}})


def test_yaml_file_relative_paths(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("model:\n  path: models/m\ndata:\n  path: data\noutput:\n  path: out\n"
                 "mlflow:\n  tracking_uri: sqlite:///mlflow.db\n")
    c = load_config(str(p))
    assert c.model.path == str(tmp_path / "models/m")
    assert c.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert c.mlflow.artifact_location == str(tmp_path / "mlartifacts")


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(p))


def test_secrets_masked():
    tree = {"mlflow": {"tags": {"api_token": "abc", "team": "x"}, "tracking_uri": "https://user:pw@host/x"},
            "data": {"max_tokens_per_batch": 512}}
    m = mask_secrets(tree)
    assert m["mlflow"]["tags"] == {"api_token": "***", "team": "x"}
    assert m["mlflow"]["tracking_uri"] == "https://***@host/x"
    assert m["data"]["max_tokens_per_batch"] == 512


def test_no_config_key_is_masked_as_a_secret():
    """Keys named like token counts (generation.max_new_tokens) are figures, not secrets: every
    key of a full config without credentials prints and logs as it is."""
    full = cfg(**{"mlflow.tracking_uri": "http://127.0.0.1:5000"}).to_dict()
    assert mask_secrets(full) == full


def test_security_defaults():
    c = cfg()
    assert c.model.trust_remote_code is False and c.model.allow_pickle is False
