"""The decode engine without HTTP: a failure that belongs to one request ends that request only, every refusal has a
reason, hot-loaded adapters are checked before loading and served in eval mode, and no web framework is imported."""

import json
import os
import subprocess
import sys

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import smolpeft
from smolpeft.engine import BASE, Engine, EngineError, Reason, Request, SamplingParams, adapter_path_under

PROMPT = "the quick brown fox"


def _adapter(base: str, out, seed: int, **lora) -> str:
    torch.manual_seed(seed)
    config = smolpeft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora)  # random B: not the identity
    smolpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny Llama, adapter `a`, adapter `nan` (NaN B matrices), `drop` (lora_dropout 0.5) and their offline model."""
    d = tmp_path_factory.mktemp("engine")
    base = str(d / "base")
    tok = tiny.tokenizer(base)
    tiny.llama(vocab=300).save_pretrained(base)
    paths = {
        "a": _adapter(base, d / "a", 1, r=4, target_modules=["q_proj", "v_proj"]),
        "nan": _adapter(base, d / "nan", 2, r=4, target_modules=["q_proj", "v_proj"]),
        "drop": _adapter(base, d / "drop", 3, r=4, lora_dropout=0.5, target_modules="all-linear"),
    }
    weights = load_file(f"{paths['nan']}/adapter_model.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in weights.items()},
        f"{paths['nan']}/adapter_model.safetensors",
    )
    ref = smolpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), paths["a"], "a")
    ref.load_adapter(paths["drop"], "drop")
    return dict(dir=d, base=base, tok=tok, paths=paths, ref=ref.eval())


def offline(env, ids: list[int], adapter: str, n: int) -> list[int]:
    with torch.no_grad():
        out = env["ref"].generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            adapter_names=[adapter],
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def _engine(env, *adapters: str, **kw) -> Engine:
    return Engine.load(env["base"], {a: env["paths"][a] for a in adapters}, max_batch=8, device="cpu", **kw)


def _run_together(engine: Engine, reqs: list[Request]) -> None:
    """Queue every request before the loop starts, so they are admitted, prefilled and decoded as one batch."""
    for req in reqs:
        engine.submit(req)
    engine.start()
    try:
        for req in reqs:
            assert req.done.wait(30)
    finally:
        engine.stop()


def test_importing_the_engine_imports_no_web_framework():
    code = (
        "import sys, smolpeft.engine; "
        "web = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette')); "
        "assert not web, web"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_a_tiny_temperature_is_greedy_and_fails_no_one(env):
    """temperature 1e-39 once overflowed logits / T to inf, sampling raised, and the whole batch got a 500."""
    engine = _engine(env, "a")
    ids = env["tok"](PROMPT)["input_ids"]
    reqs = [Request(ids, name, SamplingParams(8, temperature=t, seed=1)) for name in ("a", BASE) for t in (0, 1e-39)]
    _run_together(engine, reqs)
    for req in reqs:
        assert req.finish_reason in ("stop", "length"), req.error
        assert req.out_ids == offline(env, ids, req.adapter, 8)
    assert engine.stats["mixed_steps"] > 0


def test_an_adapter_with_nan_weights_fails_only_its_own_requests(env):
    engine = _engine(env, "a", "nan")
    ids = env["tok"](PROMPT)["input_ids"]
    broken = [
        Request(ids, "nan", SamplingParams(8, temperature=0.8, seed=3)),
        Request(ids, "nan", SamplingParams(8, 0)),
    ]
    healthy = [Request(ids, name, SamplingParams(8, temperature=0)) for name in ("a", BASE)]
    _run_together(engine, [healthy[0], *broken, healthy[1]])
    for req in broken:
        assert req.finish_reason == "error" and req.error.reason == Reason.INTERNAL
        assert "non-finite" in req.error.message
    for req in healthy:
        assert req.finish_reason in ("stop", "length") and req.out_ids == offline(env, ids, req.adapter, 8)
    assert engine.stats["errors"] == 2


def test_an_exception_while_finishing_one_request_ends_only_that_request(env, monkeypatch):
    engine = _engine(env, "a")
    ids = env["tok"](PROMPT)["input_ids"]
    reqs = [Request(ids, name, SamplingParams(6, temperature=0)) for name in ("a", BASE, "a")]
    append = engine._append

    def flaky(req, token):  # one request's text handling breaks (a decode error, say) on its third token
        if req is reqs[1] and len(req.out_ids) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")
        append(req, token)

    monkeypatch.setattr(engine, "_append", flaky)
    _run_together(engine, reqs)
    assert reqs[1].finish_reason == "error" and reqs[1].error.reason == Reason.INTERNAL
    assert "simulated" in reqs[1].error.message
    for req in (reqs[0], reqs[2]):
        assert req.finish_reason in ("stop", "length") and req.out_ids == offline(env, ids, "a", 6)


@pytest.mark.parametrize(
    "case,reason,param",
    [
        (dict(adapter="nope"), Reason.NOT_FOUND, "model"),
        (dict(ids=[]), Reason.BAD_REQUEST, "prompt"),
        (dict(ids=[300]), Reason.BAD_REQUEST, "prompt"),
        (dict(ids=[5] * 3000), Reason.CONTEXT_LENGTH, "prompt"),
        (dict(max_tokens=5000), Reason.CONTEXT_LENGTH, "max_tokens"),
        (dict(max_tokens=0), Reason.BAD_REQUEST, "max_tokens"),
        (dict(seed=2**64), Reason.BAD_REQUEST, "seed"),
        (dict(seed=-(2**63) - 1), Reason.BAD_REQUEST, "seed"),
        (dict(temperature=float("nan")), Reason.BAD_REQUEST, "temperature"),
        (dict(temperature=3.0), Reason.BAD_REQUEST, "temperature"),
        (dict(top_p=0.0), Reason.BAD_REQUEST, "top_p"),
        (dict(stop=["\ud800"]), Reason.BAD_REQUEST, "stop"),
        (dict(stop=[None]), Reason.BAD_REQUEST, "stop"),
        (dict(stop=["", "x"]), Reason.BAD_REQUEST, "stop"),
        (dict(stop=list("abcde")), Reason.BAD_REQUEST, "stop"),
    ],
)
def test_submit_refuses_bad_requests_with_a_reason(env, case, reason, param):
    engine = Engine(AutoModelForCausalLM.from_pretrained(env["base"]), env["tok"], "m", max_prompt_tokens=2000)
    params = {k: case[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed") if k in case}
    req = Request(case.get("ids", [5, 6, 7]), case.get("adapter", BASE), SamplingParams(**{"max_tokens": 4} | params))
    with pytest.raises(EngineError) as e:
        engine.submit(req)
    assert (e.value.reason, e.value.param) == (reason, param), e.value.message
    assert len(e.value.message) < 300 and not engine._waiting


def test_seeds_at_the_edges_of_the_range_are_accepted(env):
    engine = Engine(AutoModelForCausalLM.from_pretrained(env["base"]), env["tok"], "m")
    for seed in (2**64 - 1, -(2**63), 0):
        engine.submit(Request([5, 6], BASE, SamplingParams(2, temperature=1.0, seed=seed)))
    assert len(engine._waiting) == 3


def test_the_waiting_queue_is_bounded(env):
    engine = Engine(AutoModelForCausalLM.from_pretrained(env["base"]), env["tok"], "m", max_waiting=2)
    for _ in range(2):
        engine.submit(Request([5, 6], BASE, SamplingParams(2, temperature=0)))
    with pytest.raises(EngineError) as e:
        engine.submit(Request([5, 6], BASE, SamplingParams(2, temperature=0)))
    assert e.value.reason == Reason.OVERLOADED


def test_encoding_refuses_lone_surrogates(env):
    engine = Engine(AutoModelForCausalLM.from_pretrained(env["base"]), env["tok"], "m")
    for call in (
        lambda: engine.encode("hi \ud800" + "x" * 1000),
        lambda: engine.encode_chat([{"role": "user", "content": "\udfff"}]),
    ):
        with pytest.raises(EngineError) as e:
            call()
        assert e.value.reason == Reason.BAD_REQUEST and len(e.value.message) < 300
    assert engine.encode(PROMPT) == env["tok"](PROMPT)["input_ids"]


def test_a_text_too_long_for_the_token_limit_is_refused_without_tokenizing(env, monkeypatch):
    engine = Engine(AutoModelForCausalLM.from_pretrained(env["base"]), env["tok"], "m", max_prompt_tokens=100)
    longest = max(map(len, env["tok"].get_vocab()))
    monkeypatch.setattr(engine, "tokenizer", None)  # tokenizing would raise
    for call in (
        lambda: engine.encode("x" * (100 * longest + 1)),
        lambda: engine.encode_chat([{"role": "user", "content": "x" * (100 * longest)}]),
    ):
        with pytest.raises(EngineError) as e:
            call()
        assert e.value.reason == Reason.CONTEXT_LENGTH


def test_adapter_files_are_checked_before_loading(env, tmp_path):
    engine = _engine(env, "a")
    good = env["paths"]["a"]

    def variant(name: str, config: dict | None = None, weights: str | None = "adapter_model.safetensors") -> str:
        d = tmp_path / name
        d.mkdir()
        cfg = json.load(open(f"{good}/adapter_config.json")) | (config or {})
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        if weights:
            (d / weights).write_bytes(open(f"{good}/adapter_model.safetensors", "rb").read())
        return str(d)

    cases = {
        "alpha": variant("alpha", {"lora_alpha": "abc"}),
        "rank": variant("rank", {"r": -1}),
        "kind": variant("kind", {"peft_type": "IA3"}),
        "bin": variant("bin", weights="adapter_model.bin"),
        "none": variant("none", weights=None),
        "dir": str(tmp_path / "missing"),
    }
    for name, path in cases.items():
        with pytest.raises(EngineError) as e:
            engine.load_adapter(name, path)
        assert e.value.reason == Reason.BAD_REQUEST, (name, e.value.message)
    assert "safetensors" in str(pytest.raises(EngineError, engine.load_adapter, "x", cases["bin"]).value)
    with pytest.raises(EngineError) as e:
        engine.load_adapter("a", good)
    assert e.value.reason == Reason.CONFLICT
    with pytest.raises(EngineError) as e:
        engine.delete_adapter("nope")
    assert e.value.reason == Reason.NOT_FOUND
    assert engine.adapters == ["a"]


def test_adapter_paths_must_stay_inside_the_root_file_by_file(env, tmp_path):
    root, outside = tmp_path / "root", env["paths"]["a"]
    (root / "sneaky").mkdir(parents=True)
    (root / "sneaky" / "adapter_config.json").write_text(open(f"{outside}/adapter_config.json").read())
    os.symlink(f"{outside}/adapter_model.safetensors", root / "sneaky" / "adapter_model.safetensors")
    os.symlink(outside, root / "link")
    for path in ["sneaky", "link", "../", outside]:
        with pytest.raises(EngineError) as e:
            adapter_path_under(str(root), path)
        assert e.value.reason == Reason.FORBIDDEN, path
    (root / "ok").mkdir()
    os.symlink(root / "sneaky" / "adapter_config.json", root / "ok" / "adapter_config.json")  # inside: fine
    assert adapter_path_under(str(root), "ok") == os.path.realpath(root / "ok")


def test_a_hot_loaded_adapter_is_served_in_eval_mode(env):
    """lora_dropout 0.5: an adapter left in training mode would drop half its input and differ from offline."""
    engine = _engine(env)
    engine.start()
    try:
        engine.load_adapter("a", env["paths"]["a"])
        engine.model.train()  # a loader that left training mode on, or the previous adapter's
        engine.load_adapter("drop", env["paths"]["drop"])
        assert not any(m.training for m in engine.model.modules())
        ids = env["tok"](PROMPT)["input_ids"]
        for name in ("drop", "a", BASE):
            assert engine.generate(ids, name, SamplingParams(8, temperature=0)).out_ids == offline(env, ids, name, 8)
    finally:
        engine.stop()


# --- many adapters: an LRU cache of loaded adapters over a larger registered set ---


def _copies(env, n: int) -> dict[str, str]:
    """n adapters shaped like `a` (r=4 on q/v) with their own random weights, written straight as safetensors."""
    template = load_file(f"{env['paths']['a']}/adapter_model.safetensors")
    config = open(f"{env['paths']['a']}/adapter_config.json").read()
    paths = {}
    for i in range(n):
        d = env["dir"] / f"many{i}"
        if not d.exists():
            d.mkdir()
            (d / "adapter_config.json").write_text(config)
            g = torch.Generator().manual_seed(1000 + i)
            save_file(
                {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in template.items()},
                d / "adapter_model.safetensors",
            )
        paths[f"m{i}"] = str(d)
    return paths


@pytest.fixture(scope="module")
def many(env):
    """64 adapters, and an offline model with one adapter slot into which each adapter's file is copied in turn."""
    paths = _copies(env, 64)
    ref = smolpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["base"]), paths["m0"], "slot")
    return dict(env, paths=paths, ref=ref.eval())


def solo(many, ids: list[int], adapter: str, n: int) -> list[int]:
    """Adapter `adapter`'s greedy output for `ids` alone, offline."""
    if adapter != BASE:
        weights = load_file(f"{many['paths'][adapter]}/adapter_model.safetensors")
        assert not smolpeft.set_peft_model_state_dict(many["ref"], weights, "slot").unexpected_keys
        adapter = "slot"
    return offline(many, ids, adapter, n)


def _prompt(env, i: int) -> list[int]:
    return env["tok"](["the quick brown fox", "hello ! how can i", "two plus two equals"][i % 3])["input_ids"]


def _adapter_names_in_model(engine: Engine) -> set[str]:
    return {n for _, m in smolpeft.lora.lora_layers(engine.model) for n in m.r}


def test_64_adapters_in_one_batch_each_row_equals_its_solo_run(many):
    engine = Engine.load(many["base"], many["paths"], max_batch=64, device="cpu")
    reqs = [Request(_prompt(many, i), f"m{i}", SamplingParams(6, temperature=0)) for i in range(64)]
    _run_together(engine, reqs)
    for i, req in enumerate(reqs):
        assert req.finish_reason in ("stop", "length"), req.error
        assert req.out_ids == solo(many, _prompt(many, i), f"m{i}", 6), f"m{i}"
    assert engine.stats["max_rows"] == 64 and engine.stats["mixed_steps"] > 0
    assert len({tuple(r.out_ids) for r in reqs}) > 10  # the adapters differ, so a mixed-up row would show


def test_an_lru_cache_smaller_than_the_adapter_set_reloads_evicted_adapters_exactly(many):
    """12 adapters through 4 slots, 4 rows at a time: every adapter is evicted and loaded back at least once."""
    names = [f"m{i}" for i in range(12)]
    engine = Engine.load(
        many["base"], {n: many["paths"][n] for n in names}, max_batch=4, device="cpu", max_loaded_adapters=4
    )
    assert engine.adapters == names and len(engine._loaded) == 4  # all registered, four held
    loaded_per_step = []
    step = engine._step
    engine._step = lambda: (loaded_per_step.append(set(_adapter_names_in_model(engine))), step())[1]
    rounds = [[Request(_prompt(many, i), n, SamplingParams(5, temperature=0)) for i, n in enumerate(names)]]
    rounds.append([Request(r.prompt_ids, r.adapter, SamplingParams(5, temperature=0)) for r in rounds[0]])
    _run_together(engine, rounds[0] + rounds[1])
    for first, again in zip(*rounds):
        assert first.finish_reason in ("stop", "length"), first.error
        assert again.out_ids == first.out_ids == solo(many, first.prompt_ids, first.adapter, 5), first.adapter
    assert max(map(len, loaded_per_step)) == 4
    assert engine.stats["adapter_loads"] >= 12 and engine.stats["adapter_evictions"] >= 12
    assert all(engine._layout_of[n] is engine._layout_of["m0"] is not None for n in names)  # the fast path ran


def test_requests_wait_while_every_slot_is_held_by_running_rows(many):
    """2 slots, 4 rows: the requests for the third and fourth adapter wait for a row to finish; none fails."""
    names = [f"m{i}" for i in range(4)]
    engine = Engine.load(
        many["base"], {n: many["paths"][n] for n in names}, max_batch=4, device="cpu", max_loaded_adapters=2
    )
    reqs = [Request(_prompt(many, i), n, SamplingParams(3 + 2 * i, temperature=0)) for i, n in enumerate(names)]
    _run_together(engine, reqs)
    for req in reqs:
        assert req.finish_reason in ("stop", "length"), req.error
        assert req.out_ids == solo(many, req.prompt_ids, req.adapter, req.params.max_tokens)
    assert engine.stats["max_rows"] == 2 and engine.stats["errors"] == 0


def test_the_model_holds_only_the_cached_adapters_and_frees_the_evicted(many):
    """32 registered, 3 slots: the model's LoRA tensors are exactly three adapters' worth, and the tensors of an
    evicted adapter are freed (nothing, such as the mixed-batch stack, keeps them)."""
    import gc
    import weakref

    engine = Engine.load(many["base"], dict(list(many["paths"].items())[:32]), device="cpu", max_loaded_adapters=3)
    one = sum(v.numel() for v in load_file(f"{many['paths']['m0']}/adapter_model.safetensors").values())
    held = [t for _, m in smolpeft.lora.lora_layers(engine.model) for n in m.r for t in m.adapter_params(n)]
    assert len(engine.adapters) == 32 and len(_adapter_names_in_model(engine)) == 3
    assert sum(t.numel() for t in held) == 3 * one
    old = [weakref.ref(t) for t in held]
    del held
    ids = _prompt(many, 0)
    engine.start()
    try:
        for name in ("m3", "m4", "m5", "m6"):  # a mixed step stacks factors in every layer; then evicts them
            assert engine.generate(ids, name, SamplingParams(2, temperature=0)).finish_reason == "length"
    finally:
        engine.stop()
    gc.collect()
    assert not any(r() is not None for r in old)
    assert _adapter_names_in_model(engine) == {"m4", "m5", "m6"}


def test_an_adapter_whose_files_changed_after_eviction_fails_only_its_requests(many, tmp_path):
    import shutil

    paths = {n: str(tmp_path / n) for n in ("m0", "m1")}
    for n, p in paths.items():
        shutil.copytree(many["paths"][n], p)
    engine = Engine.load(many["base"], paths, device="cpu", max_loaded_adapters=1)  # m0 evicted by m1
    os.utime(f"{paths['m0']}/adapter_model.safetensors", ns=(1, 1))
    ids = _prompt(many, 0)
    reqs = [Request(ids, "m0", SamplingParams(3, temperature=0)), Request(ids, BASE, SamplingParams(3, temperature=0))]
    _run_together(engine, reqs)
    assert reqs[0].finish_reason == "error" and reqs[0].error.reason == Reason.CONFLICT
    assert "changed" in reqs[0].error.message
    assert reqs[1].out_ids == solo(many, ids, BASE, 3)
    with pytest.raises(ValueError, match="max_loaded_adapters"):
        Engine(many["ref"], engine.tokenizer, "m", max_loaded_adapters=1)  # the model comes with one adapter
