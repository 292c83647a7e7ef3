"""Every bad input gets one sentence and exit 2 (130 when interrupted), and no file present before the
command changes. One row per case; add new ones as one line.

The rows run the real CLI in this process (``forgetless.cli.main``); the kill tests run a child
process that dies (SIGKILL) at the injected point of an atomic save."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from forgetless import cli
from forgetless.files import FolderLock, atomic_folder, recover
from forgetless.models.folder import default_model_dir

BASE = default_model_dir()
GOOD = {"statement": "Zorbia is the capital of Quanland.", "question": "What is the capital of Quanland?",
        "answer": "Zorbia"}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def tree(root: Path) -> dict[str, str]:
    """Every file under root with the sha256 of its bytes (links and folders by name)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A working folder with a valid fact file, a user's file and a user's folder; cwd is inside it."""
    (tmp_path / "facts.jsonl").write_text(jsonl(GOOD))
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "mydir").mkdir()
    (tmp_path / "mydir" / "keep.txt").write_text("keep me\n")
    (tmp_path / "run.yaml").write_text("name: r\nexperiments:\n  - name: e\n    stream: {kind: domain}\n"
                                       "    methods: [{name: naive}]\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def model_copy(ws: Path, config) -> str:
    """The shipped base's files with another config.json (a JSON value or raw text)."""
    d = ws / "m"
    d.mkdir(exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json"):
        (d / name).symlink_to(BASE / name)
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(d)


def memory_config_with_string(ws: Path) -> str:
    cfg = json.loads((BASE / "config.json").read_text())
    cfg["forgetless_memory"]["memory"]["n_keys"] = "many"
    return model_copy(ws, cfg)


def flipped_bits(ws: Path) -> str:
    d = ws / "flipped"
    d.mkdir()
    for name in ("config.json", "tokenizer.json", "checksums.json"):
        shutil.copyfile(BASE / name, d / name)
    data = bytearray((BASE / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / "model.safetensors").write_bytes(bytes(data))
    return str(d)


def other_tokenizer(ws: Path) -> str:
    d = ws / "othertok"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "checksums.json"):
        (d / name).symlink_to(BASE / name)
    tok = json.loads((BASE / "tokenizer.json").read_text())
    tok["model"]["vocab"] = dict(list(tok["model"]["vocab"].items())[:2048])
    tok["model"]["merges"] = []
    (d / "tokenizer.json").write_text(json.dumps(tok))
    return str(d)


def write(ws: Path, name: str, text: str | bytes) -> str:
    p = ws / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def run_yaml(ws: Path, methods: str = "[{name: naive}]", stream: str = "{kind: domain}", name: str = "e") -> str:
    return write(ws, "bad.yaml", f"name: r\nexperiments:\n  - name: {name}\n    stream: {stream}\n    methods: {methods}\n")


L = ["learn", "--facts", "facts.jsonl"]
CASES = {
    # output paths: refused before any training, the user's files untouched
    "out is a user's file": (lambda ws: L + ["--out", "notes.txt"], "existing file"),
    "out holds a user's files": (lambda ws: L + ["--out", "mydir"], "folder with other files"),
    "out is the current folder": (lambda ws: L + ["--out", "."], "current folder"),
    "out under /proc": (lambda ws: L + ["--out", "/proc/forgetless-x"], "cannot be written"),
    "out under a file": (lambda ws: L + ["--out", "notes.txt/sub"], "is a file"),
    # fact files
    "relation is a list": (lambda ws: ["eval", "--facts", write(ws, "f.jsonl", jsonl({**GOOD, "relation": ["x"]}))],
                           "'relation' must be a string"),
    "misspelled key": (lambda ws: ["eval", "--facts", write(ws, "f.jsonl", jsonl({**GOOD, "paraphrase": ["x"]}))],
                       "did you mean 'paraphrases'"),
    "latin-1 bytes": (lambda ws: ["eval", "--facts", write(ws, "f.jsonl", jsonl(GOOD).replace("Zorbia", "Zörbia")
                                                          .encode("latin-1"))], "not UTF-8"),
    "utf-16 file": (lambda ws: ["eval", "--facts", write(ws, "f.jsonl", jsonl(GOOD).encode("utf-16"))], "UTF-16"),
    "one-letter answer inside a word": (lambda ws: ["eval", "--facts", write(ws, "f.jsonl", jsonl({**GOOD, "answer": "Z"}))],
                                        "as a word"),
    "duplicate fact": (lambda ws: ["eval", "--facts", write(ws, "f.jsonl", jsonl(GOOD, GOOD))], "same statement"),
    "conflicting answers": (lambda ws: ["eval", "--facts", write(ws, "f.jsonl", jsonl(
        GOOD, {**GOOD, "statement": "Xylo is the capital of Quanland.", "answer": "Xylo"}))], "another answer"),
    "statement far too long": (lambda ws: ["eval", "--facts", write(ws, "f.jsonl", jsonl(
        {**GOOD, "statement": "Zorbia " + "is very " * 400 + "nice."}))], "characters long"),
    "fact file is a folder": (lambda ws: ["eval", "--facts", "mydir"], "is a folder"),
    "fact file is /dev/null": (lambda ws: ["eval", "--facts", "/dev/null"], "not a regular file"),
    "fact file is not JSON": (lambda ws: ["eval", "--facts", write(ws, "f.jsonl", "{oops\n")], "not valid JSON"),
    # model folders
    "config.json is a scalar": (lambda ws: ["info", "--model", model_copy(ws, 3)], "JSON object"),
    "config.json is a list": (lambda ws: ["info", "--model", model_copy(ws, [1, 2])], "JSON object"),
    "unknown model_type": (lambda ws: ["info", "--model", model_copy(ws, {"model_type": "banana"})], "banana"),
    "memory section with a string": (lambda ws: ["info", "--model", memory_config_with_string(ws)], "invalid"),
    "flipped bits in the weights": (lambda ws: ["eval", "--facts", "facts.jsonl", "--model", flipped_bits(ws)],
                                    "does not match the checksum"),
    "tokenizer of another model": (lambda ws: ["eval", "--facts", "facts.jsonl", "--model", other_tokenizer(ws)],
                                   "does not match the checksum"),
    "model folder missing": (lambda ws: ["info", "--model", "nope"], "does not exist"),
    # numbers and flags
    "negative max-new-tokens": (lambda ws: ["generate", "--prompt", "x", "--max-new-tokens", "-5"], "must be >= 1"),
    "zero temperature": (lambda ws: ["generate", "--prompt", "x", "--sample", "--temperature", "0"], "must be > 0"),
    "negative temperature": (lambda ws: ["generate", "--prompt", "x", "--sample", "--temperature", "-1"], "must be > 0"),
    "empty prompt": (lambda ws: ["generate", "--prompt", ""], "--prompt is empty"),
    "negative learning rate": (lambda ws: L + ["--method", "full", "--lr", "-1"], "must be > 0"),
    "nan learning rate": (lambda ws: L + ["--method", "full", "--lr", "nan"], "finite"),
    "negative fact count": (lambda ws: ["bench", "facts", "--facts", "-3"], "must be >= 1"),
    "choose-levers for full fine-tuning": (lambda ws: L + ["--method", "full", "--choose-levers"], "--method smf"),
    "choose-levers and top-t": (lambda ws: L + ["--choose-levers", "--top-t", "100"], "chooses top_t itself"),
    "max-drop above 1": (lambda ws: L + ["--choose-levers", "--max-drop", "2"], "between 0 and 1"),
    "zero choice facts": (lambda ws: L + ["--choose-levers", "--choose-on", "0"], "must be >= 1"),
    "skip-learned with one pass": (lambda ws: L + ["--skip-learned", "--passes", "1"], "--passes"),
    "skip-learned with one pass in bench facts": (lambda ws: ["bench", "facts", "--skip-learned"], "--passes"),
    "zero pretraining steps": (lambda ws: ["pretrain", "--config", "x.yaml", "--out", "o", "--steps", "0"], ">= 1"),
    "negative pretraining steps": (lambda ws: ["pretrain", "--config", "x.yaml", "--out", "o", "--steps", "-5"], ">= 1"),
    "unknown device": (lambda ws: ["pretrain", "--config", "x.yaml", "--out", "o", "--device", "banana"], "not a device"),
    "negative --show": (lambda ws: ["eval", "--facts", "facts.jsonl", "--show", "-1"], "must be >= 0"),
    # run configs
    "binary config file": (lambda ws: ["run", write(ws, "b.yaml", bytes(range(256)))], "config"),
    "empty method list": (lambda ws: ["run", run_yaml(ws, methods="[]")], "methods is empty"),
    "unknown method option": (lambda ws: ["run", run_yaml(ws, methods="[{name: smf, top_k: 3}]")], "top_k"),
    "method option of the wrong type": (lambda ws: ["run", run_yaml(ws, methods="[{name: lora, rank: many}]")], "rank"),
    "negative steps": (lambda ws: ["run", run_yaml(ws, stream="{kind: domain, steps_per_experience: -5}")],
                       "steps_per_experience"),
    "zero steps": (lambda ws: ["run", run_yaml(ws, stream="{kind: domain, steps_per_experience: 0}")],
                   "steps_per_experience"),
    "zero experiences": (lambda ws: ["run", run_yaml(ws, stream="{kind: domain, experiences: 0}")], "experiences"),
    "label escapes the run folder": (lambda ws: ["run", run_yaml(ws, methods="[{name: naive, label: ../../../x}]")],
                                     "plain name"),
    "experiment name escapes": (lambda ws: ["run", run_yaml(ws, name="../../x")], "plain name"),
    "run --out is a user's file": (lambda ws: ["run", "run.yaml", "--out", "notes.txt"], "existing file"),
    "run --out holds a user's files": (lambda ws: ["run", "run.yaml", "--out", "mydir"], "folder with other files"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_sentence_exit_2_and_nothing_changes(case, ws, capsys):
    argv_fn, needle = CASES[case]
    argv = argv_fn(ws)
    before = tree(ws)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (case, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, (needle, err)
    assert tree(ws) == before, "a file present before the command changed"
    assert not (ws / "o").exists() and not list(Path("/proc").glob("forgetless-x*"))


def test_bench_without_a_subcommand_prints_its_own_help(capsys):
    assert cli.main(["bench"]) == 2
    assert "bench facts" in capsys.readouterr().out.replace("BENCH", "bench facts")


def test_sigterm_is_an_interruption(monkeypatch, capsys):
    def work(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not interrupted")

    monkeypatch.setattr(cli, "cmd_eval", work)  # build_parser binds the command when main() runs
    assert cli.main(["eval", "--facts", "x"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_second_run_on_the_same_folder_refuses_to_start(ws, capsys):
    (ws / "out").mkdir()
    with FolderLock(ws / "out", "forgetless run"):
        assert cli.main(["run", "run.yaml", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "in use by another forgetless run" in err and str(os.getpid()) in err


# --------------------------------------------------------------------------- kills inside an atomic save
KILLER = """
import os, sys
from pathlib import Path
import forgetless.files as f
calls = {{"n": 0}}
real = os.replace
def replace(a, b):
    calls["n"] += 1
    if calls["n"] == {kill_at}:
        os.kill(os.getpid(), 9)
    return real(a, b)
f.os.replace = replace
def write(tmp):
    (tmp / "weights.bin").write_bytes(b"new" * 1000)
f.atomic_folder(Path(sys.argv[1]), write)
"""


@pytest.mark.parametrize("kill_at,expect", [(1, b"old"), (2, b"new")])
def test_a_kill_inside_the_swap_leaves_a_folder_the_next_command_completes(tmp_path, kill_at, expect):
    """kill_at=1: before the first rename (old -> hidden); 2: between the two renames."""
    dest = tmp_path / "model"
    atomic_folder(dest, lambda t: (t / "weights.bin").write_bytes(b"old" * 1000))
    r = subprocess.run([sys.executable, "-c", KILLER.format(kill_at=kill_at), str(dest)])
    assert r.returncode == -9
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden, "the kill left no temporary folder: the injection point was not reached"
    recover(dest)  # what the next command does first
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no hidden leftovers
    # before the swap began the old folder stays; between the renames the finished new one is promoted
    assert (dest / "weights.bin").read_bytes() == expect * 1000


def test_a_kill_before_the_rename_leaves_no_temporary_folder_behind(tmp_path):
    dest = tmp_path / "model"
    code = ("import os, sys\nfrom pathlib import Path\nimport forgetless.files as f\n"
            "def write(tmp):\n    (tmp / 'w').write_bytes(b'x' * 10)\n    os.kill(os.getpid(), 9)\n"
            "f.atomic_folder(Path(sys.argv[1]), write)\n")
    assert subprocess.run([sys.executable, "-c", code, str(dest)]).returncode == -9
    assert any(p.name.startswith(".model.tmp-") for p in tmp_path.iterdir())
    recover(dest)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_keeps_the_previous_folder(tmp_path):
    dest = tmp_path / "model"
    atomic_folder(dest, lambda t: (t / "w").write_bytes(b"old"))

    def full(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(Exception, match="disk is full"):
        atomic_folder(dest, full)
    assert (dest / "w").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model"]
