"""The training loop and data path: causal LM end to end, classification on MiniLM, resume, masking, bad data."""

import dataclasses
import json
import math
import os

import peft
import pytest
import tiny
import torch
import transformers

import smolpeft
from smolpeft.cli import main
from smolpeft.config import TaskType
from smolpeft.data import Dataset, encode, encode_lm_row, load_user_data, render_chat
from smolpeft.loss import IGNORE
from smolpeft.train import TrainConfig, lr_factor, train


def _chat_rows(n=48):
    return [
        {
            "messages": [
                {"role": "user", "content": f"what is {a} plus {b} ?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b} ."},
            ]
        }
        for a in range(8)
        for b in range(8)
    ][:n]


def test_causal_lm_end_to_end(lm, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            str(lm / "base"),
            "--data",
            str(lm / "chat.jsonl"),
            "--output-dir",
            str(run),
            "--max-steps",
            "12",
            "--lr",
            "1e-2",
            "--batch-size",
            "8",
            "--log-every",
            "4",
            "--targets",
            "all-linear",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "perplexity:" in out and f"adapter written to {run}" in out
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "training_curve.png",
        "summary.json",
    ):
        assert (run / name).exists(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [4, 8, 12]
    assert all({"loss", "lr", "tokens_per_s"} <= m.keys() for m in metrics if "loss" in m)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["tokens_per_s"] > 0 and summary["peak_rss_mb"] > 0 and summary["config"]["r"] == 8

    # the adapter loads in peft and gives our outputs
    x = tiny.ids(vocab=300)
    ours = smolpeft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(lm / "base"), run)
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(lm / "base"), run)
    with torch.no_grad():
        expected = ours(input_ids=x).logits
        torch.testing.assert_close(theirs(input_ids=x).logits, expected, atol=1e-5, rtol=0)

    assert (
        main(
            ["eval", "--adapter", str(run), "--data", str(lm / "chat.jsonl"), "--exact-match", "--max-new-tokens", "8"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    assert 0 <= result["exact_match"] <= 1
    assert (
        main(["generate", "--adapter", str(run), "--prompt", "what is 2 plus 3 ?", "--chat", "--max-new-tokens", "5"])
        == 0
    )
    tok = transformers.AutoTokenizer.from_pretrained(run)
    prompt = render_chat(tok, [{"role": "user", "content": "what is 2 plus 3 ?"}], add_generation_prompt=True)
    greedy = ours.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert capsys.readouterr().out == tok.decode(greedy[0, len(prompt) :], skip_special_tokens=True) + "\n"

    assert main(["merge", "--adapter", str(run), "--output-dir", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged) is transformers.LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, expected, atol=1e-5, rtol=0)
    assert (tmp_path / "merged/tokenizer.json").exists()
    assert "max |logit difference|" in capsys.readouterr().out

    assert main(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "LORA" and info["r"] == 8 and len(info["target_modules"]) == 14
    assert info["size_bytes"] == (run / "adapter_model.safetensors").stat().st_size
    assert info["parameters"] == summary["trainable_params"]


def test_classification_accuracy_rises_on_minilm(tmp_path):
    s = train(
        TrainConfig(task="intent", output_dir=str(tmp_path), max_steps=60, batch_size=32, lr=2e-3), log=lambda *_: None
    )
    assert s["after"]["eval_accuracy"] > s["before"]["eval_accuracy"] + 0.3
    assert s["trainable_pct"] < 2


def _resume_config(lm, out, **kw):
    return TrainConfig(
        model=str(lm / "base"),
        data=str(lm / "chat.jsonl"),
        output_dir=str(out),
        max_steps=8,
        batch_size=4,
        grad_accum=2,
        lr=5e-3,
        dropout=0.1,
        save_every=3,
        log_every=1,
        schedule="cosine",
        **kw,
    )


def test_resume_continues_exactly(lm, tmp_path):
    train(_resume_config(lm, tmp_path / "full"), log=lambda *_: None)

    class Killed(Exception):
        pass

    def kill(step):
        if step == 4:  # one step after the checkpoint at 3: that step is lost, as in a real crash
            raise Killed

    with pytest.raises(Killed):
        train(_resume_config(lm, tmp_path / "cut"), on_step=kill, log=lambda *_: None)
    assert (tmp_path / "cut/checkpoint-3/trainer_state.pt").exists()
    train(_resume_config(lm, tmp_path / "cut", resume=str(tmp_path / "cut/checkpoint-3")), log=lambda *_: None)
    a = smolpeft.checkpoint.read_weights(tmp_path / "full")
    b = smolpeft.checkpoint.read_weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]  # the lost step 4 is logged once, by the resumed run


def test_loss_ignores_exactly_the_prompt_tokens(lm):
    tok = transformers.AutoTokenizer.from_pretrained(lm / "base")
    row = {"prompt": "what is 2 plus 2 ?", "completion": " 4 ."}
    ids, labels = encode_lm_row(row, 0, tok, False, "t")
    n_prompt = len(tok(row["prompt"])["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id
    assert encode_lm_row(row, 0, tok, True, "t")[1] == ids

    chat = _chat_rows(1)[0]
    ids, labels = encode_lm_row(chat, 0, tok, False, "t")
    learned = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert learned.startswith("0 plus 0 is 0 .") and "what is" not in learned

    # the model's loss is the mean cross-entropy over exactly the completion tokens
    model = tiny.llama(vocab=300)
    x, y = torch.tensor([ids]), torch.tensor([labels])
    logits = model(input_ids=x).logits[0, :-1]
    keep = y[0, 1:] != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[keep], y[0, 1:][keep])
    torch.testing.assert_close(model(input_ids=x, labels=y).loss, manual)


def test_bad_rows_name_the_row_and_field(lm, tmp_path, capsys):
    rows = _chat_rows(4)
    rows[2] = {"messages": [{"role": "user", "content": 5}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(
        [
            "train",
            "--model",
            str(lm / "base"),
            "--data",
            str(bad),
            "--output-dir",
            str(tmp_path / "o"),
            "--max-steps",
            "1",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert f"{bad}: row 2: field 'messages[0]' needs string 'role' and 'content'" in err
    tok = transformers.AutoTokenizer.from_pretrained(lm / "base")
    ds = Dataset([{"text": "fine", "label": "pos"}, {"text": "bad"}], [], TaskType.SEQ_CLS, ["pos", "neg"], "x.jsonl")
    with pytest.raises(ValueError, match=r"x.jsonl \(train\): row 1: missing field 'label'"):
        encode(ds, "train", tok, 64)
    ds = Dataset([{"text": "fine", "label": "maybe"}], [], TaskType.SEQ_CLS, ["pos", "neg"], "x.jsonl")
    with pytest.raises(ValueError, match=r"row 0: field 'label' is 'maybe'; known labels: pos, neg"):
        encode(ds, "train", tok, 64)


def test_file_formats_and_truncation(lm, tmp_path):
    import datasets

    rows = [
        {"text": f"sample number {i} is {'good' if i % 2 else 'bad'}", "label": "good" if i % 2 else "bad"}
        for i in range(40)
    ]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for f in ("d.csv", "d.parquet"):
        ds = load_user_data(str(tmp_path / f))
        assert (
            ds.kind == TaskType.SEQ_CLS and ds.labels == ["bad", "good"] and len(ds.train) == 36 and len(ds.eval) == 4
        )
    tok = transformers.AutoTokenizer.from_pretrained(lm / "base")
    ds = load_user_data(str(lm / "chat.jsonl"))
    examples, truncated = encode(ds, "train", tok, 10)
    assert truncated == len(examples) and all(len(e["input_ids"]) == 10 for e in examples)
    with pytest.raises(ValueError, match="unsupported file type 'txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_user_data(str(tmp_path / "d.txt"))


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(10, 10, 2, "linear") == 0.0
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)


@pytest.mark.parametrize("cmd", ["train", "eval", "generate", "merge", "inspect", "serve", "sweep", "compare-init"])
def test_every_command_has_help_with_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "examples:" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"smolpeft inspect: error: AdapterNotFoundError: adapter directory not found: {tmp_path / 'missing'}"
    ]


def test_packing_trains_on_the_same_tokens(lm, tmp_path):
    cfg = dict(model=str(lm / "base"), data=str(lm / "chat.jsonl"), max_steps=4, batch_size=2, lr=1e-2, max_length=256)
    packed = train(TrainConfig(output_dir=str(tmp_path / "p"), packing=True, **cfg), log=lambda *_: None)
    plain = train(TrainConfig(output_dir=str(tmp_path / "n"), **cfg), log=lambda *_: None)
    assert packed["after"]["eval_loss"] < packed["before"]["eval_loss"]
    # a packed step of 2 rows holds many examples: far more real tokens per step than 2 padded examples
    assert packed["tokens"] > 2.5 * plain["tokens"]
    with pytest.raises(ValueError, match="packing applies to causal-LM data") as e:
        train(
            TrainConfig(task="intent", packing=True, max_steps=1, output_dir=str(tmp_path / "c")), log=lambda *_: None
        )
    assert "--" not in str(e.value)  # a notebook user never passed a flag


def _quiet(cfg, **kw):
    return train(cfg, log=lambda *_: None, **kw)


def _tiny_run(lm, out, **kw):
    args = dict(
        model=str(lm / "base"),
        data=str(lm / "chat.jsonl"),
        output_dir=str(out),
        max_steps=3,
        batch_size=8,
        lr=5e-3,
        log_every=1,
    )
    return TrainConfig(**(args | kw))


def test_reused_output_dir_is_refused_and_overwrite_replaces_the_whole_run(lm, tmp_path):
    out = tmp_path / "run"
    _quiet(_tiny_run(lm, out, save_every=1))
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is not empty"):
        _quiet(_tiny_run(lm, out, rank=4))
    assert (out / "adapter_model.safetensors").read_bytes() == before  # untouched
    _quiet(_tiny_run(lm, out, rank=4, overwrite=True))
    assert not list(out.glob("checkpoint-*"))  # the old run's checkpoints are gone with it
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    smolpeft.storage.verify(out, "run")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files smolpeft did not write: notes.txt"):
        _quiet(_tiny_run(lm, out, overwrite=True))
    with pytest.raises(ValueError, match="is the base model"):
        _quiet(_tiny_run(lm, lm / "base", overwrite=True))


def test_outputs_are_readable_by_others(lm, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        _quiet(_tiny_run(lm, tmp_path / "run", save_every=1, max_steps=2))
    finally:
        os.umask(old)
    for p in [tmp_path / "run", *(tmp_path / "run").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def test_resume_refuses_another_runs_checkpoint(lm, tmp_path):
    _quiet(_tiny_run(lm, tmp_path / "a", save_every=1))
    ckpt = str(tmp_path / "a/checkpoint-2")
    other_data = tmp_path / "pc.jsonl"
    other_data.write_text((lm / "pc.jsonl").read_text())
    other_base = tmp_path / "base2"
    tiny.tokenizer(other_base)
    tiny.llama(vocab=300, seed=1).save_pretrained(other_base)
    tiny.llama(vocab=300, layers=3).save_pretrained(tmp_path / "base3")
    tiny.tokenizer(tmp_path / "base3")
    for i, (kw, msg) in enumerate(
        [
            ({"batch_size": 4}, "batch_size was 8, now 4"),
            ({"data": str(other_data)}, "data was"),
            ({"model": str(other_base)}, "base_model was"),
            ({"model": str(tmp_path / "base3")}, "base_model was"),
            ({"method": "prompt"}, "method was 'lora', now 'prompt'"),
            ({"rank": 4}, "r was 8, now 4"),
        ]
    ):
        with pytest.raises(ValueError, match=f"resume: {ckpt} belongs to another run: {msg}"):
            _quiet(_tiny_run(lm, tmp_path / f"b{i}", resume=ckpt, **kw))
    logs = []
    train(_tiny_run(lm, tmp_path / "c", resume=ckpt, lr=1e-3, max_steps=4), log=logs.append)
    assert any("resume: changed lr 0.005 -> 0.001, max_steps 3 -> 4" in m for m in logs)
    summary = json.loads((tmp_path / "c/summary.json").read_text())
    assert summary["steps"] == 4
    (tmp_path / "a/checkpoint-1/smolpeft.json").unlink()
    with pytest.raises(ValueError, match="no smolpeft.json; not a complete smolpeft checkpoint"):
        _quiet(_tiny_run(lm, tmp_path / "d", resume=str(tmp_path / "a/checkpoint-1")))


def _run_and_maybe_die(cfg: TrainConfig, kill_at: int, counts) -> None:
    """In a forked child: train, and SIGKILL this process at the `kill_at`-th operation of its directory commits
    (0: never): file writes, fsyncs, renames, links, directory creation."""
    import os
    import signal

    import smolpeft.storage as st

    torch.set_num_threads(1)
    n, committing = [0], [False]

    def commit(*a, **kw):
        committing[0] = True
        try:
            return real_commit(*a, **kw)
        finally:
            committing[0] = False

    def hook(fn, name):
        def wrapped(*a, **kw):
            n[0] += committing[0]  # only operations of a directory commit (checkpoints, the run directory) count
            if committing[0] and n[0] == kill_at:
                if name == "torch.save":  # die with the trainer state half written
                    fn(*a, **kw)
                    path = a[1]
                    os.truncate(path, os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)

        return wrapped

    for mod, name in [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "link"), (st, "_exchange")]:
        setattr(mod, name, hook(getattr(mod, name), name))
    torch.save = hook(torch.save, "torch.save")
    real_commit, st.commit_dir = st.commit_dir, commit
    train(cfg, log=lambda *_: None)
    counts.value = n[0]


def test_kill9_during_checkpointing_then_resume_is_bit_identical(lm, tmp_path):
    """Fault injection: a run killed with SIGKILL at random storage operations (10 times) is resumed from its newest
    checkpoint; the result equals an uninterrupted run bit for bit, and no incomplete directory is ever accepted."""
    import multiprocessing
    import random

    import smolpeft.storage as st

    ctx = multiprocessing.get_context("fork")  # the child inherits the imports: a run costs a second, not ten
    cfg = _tiny_run(lm, tmp_path / "ref", max_steps=3, batch_size=4, save_every=1, dropout=0.1)
    counts = ctx.Value("i", 0)
    p = ctx.Process(target=_run_and_maybe_die, args=(cfg, 0, counts))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    reference, n_ops = smolpeft.checkpoint.read_weights(tmp_path / "ref"), counts.value
    rng, outcomes = random.Random(0), []
    for trial in range(10):
        out = tmp_path / f"t{trial}"
        p = ctx.Process(
            target=_run_and_maybe_die,
            args=(dataclasses.replace(cfg, output_dir=str(out)), rng.randint(1, n_ops), counts),
        )
        p.start()
        p.join(120)
        assert p.exitcode == -9
        st.clean_stale(tmp_path)  # what the next writer does first
        st.clean_stale(out)
        for d in out.glob("checkpoint-*"):  # every visible checkpoint is complete
            st.verify(d, "checkpoint")
        for d in out.glob(".checkpoint-*.smolpeft-*"):  # (none: cleaned) a half-built one would be refused
            raise AssertionError(f"stale temp dir left: {d}")
        m = st.read_manifest(out) if out.exists() else None
        if m and m.get("complete"):
            outcomes.append("finished")  # killed after the final commit
        else:
            done = sorted(out.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
            if done:
                _quiet(dataclasses.replace(cfg, output_dir=str(out), resume=str(done[-1])))
                outcomes.append(done[-1].name)
            else:
                _quiet(dataclasses.replace(cfg, output_dir=str(out), overwrite=True))
                outcomes.append("restart")
        st.verify(out, "run")
        got = smolpeft.checkpoint.read_weights(out)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in reference), f"trial {trial}"
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert len({o for o in outcomes if o.startswith("checkpoint-")}) >= 2  # the kills fell at different checkpoints


def test_checkpoints_with_the_old_option_names_still_match():
    from smolpeft.train import check_resume

    current = {"base_model": "m", "r": 8, "lora_alpha": None, "lr": 1e-3}
    check_resume({"base_model": "m", "rank": 8, "alpha": None, "lr": 1e-3}, current, "ckpt", print)
    with pytest.raises(ValueError, match="r was 4, now 8"):
        check_resume({"base_model": "m", "rank": 4, "alpha": None, "lr": 1e-3}, current, "ckpt", print)


@pytest.mark.parametrize("args", [["--method", "dora"], ["--method", "lora", "--loraplus-ratio", "16"]])
def test_lora_variants_learn_on_the_embedded_default(args, tmp_path, capsys):
    """`smolpeft train` with DoRA and with LoRA+ on the default encoder: accuracy rises, and the files say which."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "intent",
                "--output-dir",
                str(out),
                "--max-steps",
                "40",
                "--batch-size",
                "32",
                "--lr",
                "2e-3",
                *args,
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["after"]["eval_accuracy"] > s["before"]["eval_accuracy"] + 0.2
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in keys) == (args[1] == "dora")
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] == (args[1] == "dora")
    with pytest.raises(ValueError, match="loraplus_ratio must be positive"):
        TrainConfig(method="prompt", loraplus_ratio=4)
