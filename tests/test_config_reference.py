"""One source for configuration: the reference page and the documented job are written from config.py."""
import dataclasses
import os
import sys

import pytest
import yaml

from conftest import REPO, cli
from hvd_infer import config_reference
from hvd_infer.config import JobConfig, load_config

sys.path.insert(0, os.path.join(REPO, "scripts"))
import config_reference as writer  # noqa: E402  scripts/config_reference.py


def test_the_written_files_are_what_config_py_says():
    assert writer.main(["--check"]) == 0, "run python scripts/config_reference.py"


def test_every_key_of_config_py_is_in_the_reference():
    keys = [k.name for keys in config_reference.sections().values() for k in keys]
    fields = [f"{s.name}.{f.name}" for s in dataclasses.fields(JobConfig) for f in dataclasses.fields(s.default_factory())]
    assert keys == fields
    page = open(os.path.join(REPO, "docs", "configuration.md")).read()
    assert all(f"| `{k}` |" in page for k in keys)


def flatten(tree):
    return {f"{section}.{key}": value for section, keys in tree.items() for key, value in keys.items()}


def test_example_yaml_holds_every_key_at_its_default():
    """Read as YAML, not through our loader: what a user sees in the file is what the code defaults to."""
    example = flatten(yaml.safe_load(open(os.path.join(REPO, "conf", "example.yaml"))))
    defaults = flatten(JobConfig().to_dict())
    assert sorted(example) == sorted(defaults)
    differ = {k: (example[k], defaults[k]) for k in example if example[k] != defaults[k]}
    assert set(differ) == set(writer.EXAMPLE_VALUES), differ
    cfg = load_config(os.path.join(REPO, "conf", "example.yaml"))  # and it loads as a job
    assert cfg.data.path == writer.EXAMPLE_VALUES["data.path"]


def test_a_field_without_a_comment_is_refused():
    @dataclasses.dataclass
    class Section:
        # above
        documented: int = 1  # and beside
        bare: int = 2

    docs = config_reference._field_comments(Section)
    assert docs == {"documented": "above and beside", "bare": ""}


def test_config_keys_prints_every_key():
    r = cli(["--config-keys"])
    assert r.returncode == 0, r.stderr
    for keys in config_reference.sections().values():
        for k in keys:
            assert f"\n{k.name}: " in "\n" + r.stdout
    assert "model.dtype: one of auto, auto-check" in r.stdout


def test_help_points_to_the_reference(capsys):
    from hvd_infer.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "docs/configuration.md" in capsys.readouterr().out


def test_a_removed_key_names_what_to_do(tmp_path):
    r = cli(["--config", "/dev/null", "model.path=m", "data.path=d", f"output.path={tmp_path}", "runtime.seed=3"])
    assert r.returncode == 2
    assert "config key 'runtime.seed' was removed: inference draws no random numbers" in r.stderr
