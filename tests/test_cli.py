"""The command line: merge never destroys a directory, label names travel with classification adapters, errors are
one line."""

import json
import os

import pytest
import transformers

from smolpeft import storage
from smolpeft.cli import main
from smolpeft.train import bundled_model


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A tiny BERT (the bundled tokenizer) trained for two steps on the built-in sentiment task."""
    d = tmp_path_factory.mktemp("cls")
    transformers.AutoTokenizer.from_pretrained(bundled_model()).save_pretrained(d / "bert")
    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    transformers.BertForSequenceClassification(cfg).save_pretrained(d / "bert")
    assert (
        main(
            [
                "train",
                "--model",
                str(d / "bert"),
                "--task",
                "sentiment",
                "--output-dir",
                str(d / "run"),
                "--max-steps",
                "2",
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    return d


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_labels_travel_with_the_adapter(cls_run, capsys):
    run = cls_run / "run"
    assert storage.read_labels(run) == ["negative", "positive"]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--task", "sentiment"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["eval_accuracy"] <= 1
    assert main(["generate", "--adapter", str(run), "--prompt", "Loved it."]) == 0
    assert sorted(line.split("\t")[0] for line in capsys.readouterr().out.splitlines()) == ["negative", "positive"]


def test_merge_refuses_to_destroy_directories(cls_run, tmp_path, monkeypatch, capsys):
    run, base = cls_run / "run", cls_run / "bert"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("cwd file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("a user's file")
    adapter_files = sorted(os.listdir(run))
    merge = ["merge", "--adapter", str(run), "--output-dir"]
    for out, extra, msg in [
        (
            "mine",
            [],
            "output directory mine is not empty (1 entry, e.g. 'notes.txt'); choose a new directory, "
            "or overwrite it if it is a smolpeft output (--overwrite)",
        ),
        (
            "mine",
            ["--overwrite"],
            "output directory mine is not a smolpeft output (no smolpeft.json); not replacing it",
        ),
        (str(run), ["--overwrite"], f"output directory {run} is the adapter"),
        (str(base), ["--overwrite"], f"output directory {base} is the base model"),
        (str(cls_run), ["--overwrite"], f"output directory {cls_run} holds the adapter"),
        (".", ["--overwrite"], "output directory . is the current directory"),
    ]:
        assert main([*merge, out, *extra]) == 1
        assert _one_line_error(capsys).startswith(f"smolpeft merge: error: OutputDirError: {msg}")
    assert (tmp_path / "keep.txt").read_text() == "cwd file" and (tmp_path / "mine/notes.txt").exists()
    assert sorted(os.listdir(run)) == adapter_files and (base / "config.json").exists()

    assert main([*merge, "merged"]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained("merged")
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    storage.verify("merged", "merged")
    assert main([*merge, "merged"]) == 1 and "is not empty" in _one_line_error(capsys)
    assert main([*merge, "merged", "--overwrite"]) == 0
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []  # no temp dirs left behind


def test_train_refuses_a_used_output_dir_in_one_line(cls_run, capsys):
    rc = main(
        [
            "train",
            "--model",
            str(cls_run / "bert"),
            "--task",
            "sentiment",
            "--output-dir",
            str(cls_run / "run"),
            "--max-steps",
            "1",
        ]
    )
    assert rc == 1
    assert _one_line_error(capsys).endswith("or overwrite it if it is a smolpeft output (--overwrite)")


def test_missing_command_lists_every_command(capsys):
    from smolpeft.cli import COMMANDS

    with pytest.raises(SystemExit) as e:
        main(["--debug", "--debug"])  # no command (a bare `smolpeft` runs train)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"choose a command: {', '.join(COMMANDS)}" in err and len(COMMANDS) == 8


def test_the_executable_freezes_its_imports_and_main_does_not():
    """`smolpeft` (console script, `python -m smolpeft`) owns its process: what its imports created is moved out of the
    cyclic collector's reach (cheap full collections, a fast exit). main() called from a user's program freezes
    nothing of the caller's."""
    import gc
    import subprocess
    import sys

    probe = "import gc, smolpeft.cli as c; c.main = lambda: print(gc.get_freeze_count()) or 3; c.run()"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr  # run() exits with main()'s code
    assert int(out.stdout) > 100_000  # torch and transformers' objects
    before = gc.get_freeze_count()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert gc.get_freeze_count() == before
