"""Config validation and the CLI's error behaviour: one clear line, non-zero exit."""

import subprocess
import sys
from pathlib import Path

import pytest

from forgetless.cli import main
from forgetless.errors import ConfigError
from forgetless.experiments.pretrain import PretrainConfig, load_pretrain_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for name in ("forgetless-tiny.yaml", "smoke.yaml"):
        cfg = load_pretrain_config(ROOT / "configs" / name)
        assert isinstance(cfg, PretrainConfig)
    cfg = load_pretrain_config(ROOT / "configs" / "forgetless-tiny.yaml")
    assert cfg.memory.n_keys**2 >= 65_536 and cfg.memory.layers == [2]


@pytest.mark.parametrize("text,needle", [
    ("train:\n  stepz: 10\n", "train.stepz"),
    ("memory:\n  query_norm: batchnorm\n", "query_norm"),
    ("train:\n  lr: fast\n", "train.lr"),
    ("model:\n  hidden_size: 1.5\n", "model.hidden_size"),
    ("data: [1, 2]\n", "data"),
    ("bogus: 1\n", "bogus"),
    ("train: {steps: 3\n", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_pretrain_config(p)


def test_cli_bad_config_one_line_nonzero(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 10\n")
    code = main(["pretrain", "--config", str(p), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.stepz" in err[0]
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.e2e
def test_cli_corrupt_model_one_line_nonzero(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    (d / "model.safetensors").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "forgetless.cli", "info", "--model", str(d)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0]


@pytest.mark.parametrize("cmd", [["pretrain"], ["info"], ["generate"], ["learn"], ["eval"], ["bench"],
                                 ["bench", "facts"], ["run"], ["report"], ["methods"], ["serve"], ["client"]])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0 and "usage: forgetless " + " ".join(cmd) in capsys.readouterr().out, cmd


@pytest.mark.e2e
def test_the_installed_command_answers_help():
    r = subprocess.run([sys.executable, "-m", "forgetless.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: forgetless" in r.stdout


def test_shipped_run_configs_load():
    from forgetless.experiments.runner import load_run_config

    for name in ("quickstart.yaml", "topics.yaml", "domain-methods.yaml", "smol135m-facts.yaml"):
        cfg = load_run_config(ROOT / "configs" / name)
        assert cfg.experiments and all(e.methods for e in cfg.experiments)
