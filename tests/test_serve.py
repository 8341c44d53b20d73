"""The multi-adapter server, through the official openai client: greedy output equals offline generate, requests
for different adapters share decode steps, hot-loading, and every error case leaves the server serving."""

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import tiny
import torch
import uvicorn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import smolpeft
from smolpeft.cli import build_parser, main
from smolpeft.data import render_chat
from smolpeft.lora import BASE
from smolpeft.serve import Engine, Request, SamplingParams, create_app

KEY = "sk-test-key"
ADAPTERS = {  # different ranks and targets, so rows of one batch touch different layers
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "c": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"]),
}
PROMPTS = [
    "the quick brown fox",
    "hello ! how can i",
    "what is the capital of france ?",
    "two plus two equals",
    "a cat sat on the mat and looked at",
    "the weather today is",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(base_dir, out_dir, seed, **lora):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = smolpeft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora)  # random B: not the identity
    smolpeft.get_peft_model(model, config).save_pretrained(out_dir)


def _broken_adapters(root, outside) -> None:
    """Adapters under `root` that hot-loading must refuse, each a copy of the one in `outside` with one flaw."""
    config = json.loads((outside / "adapter_config.json").read_text())
    weights = (outside / "adapter_model.safetensors").read_bytes()
    flaws = {
        "alpha": ({"lora_alpha": "abc"}, "safetensors"),
        "bin": ({}, "bin"),
        "sneaky": ({}, "symlink"),
        "bomb": ({"r": 2**40}, "safetensors"),
        "nan": ({}, "nan"),
    }
    for name, (change, kind) in flaws.items():
        d = root / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps(config | change))
        if kind == "safetensors":
            (d / "adapter_model.safetensors").write_bytes(weights)
        elif kind == "bin":
            torch.save(load_file(outside / "adapter_model.safetensors"), d / "adapter_model.bin")
        elif kind == "symlink":  # the directory is inside, its weights are not
            (d / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
        else:  # NaN B matrices: every logit of a request on it is NaN
            nan = {
                k: torch.full_like(v, float("nan")) if "lora_B" in k else v
                for k, v in load_file(outside / "adapter_model.safetensors").items()
            }
            save_file(nan, d / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """A tiny Llama with adapters a, b (loaded) and c (on disk, for hot-loading), served on a loopback port."""
    d = tmp_path_factory.mktemp("serve")
    base = str(d / "base")
    tiny.tokenizer(base)
    tiny.llama(vocab=300).save_pretrained(base)
    for i, (name, lora) in enumerate(ADAPTERS.items()):
        _adapter(base, d / "adapters" / name, 10 + i, **lora)
    _adapter(base, d / "outside", 20, **ADAPTERS["a"])
    _adapter(base, d / "adapters" / "d", 14, lora_dropout=0.5, **ADAPTERS["a"])  # wrong unless served in eval mode
    _broken_adapters(d / "adapters", d / "outside")
    engine = Engine.load(
        base, {"a": str(d / "adapters" / "a"), "b": str(d / "adapters" / "b")}, max_batch=4, device="cpu"
    )
    engine.start()
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, api_key=KEY, adapter_dir=str(d / "adapters")),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    ref = smolpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(d / "adapters" / "a"), "a")
    for name in ("b", "c", "d"):
        ref.load_adapter(str(d / "adapters" / name), name)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
    yield SimpleNamespace(
        dir=d, base=base, engine=engine, url=url, client=client, ref=ref.eval(), tok=engine.tokenizer, thread=thread
    )
    server.should_exit = True
    thread.join(10)
    engine.stop()


_REFS: dict = {}


def offline(s, ids: list[int], model: str, max_tokens: int) -> tuple[list[int], str]:
    """Greedy `generate` on the offline model with the same adapter: (new token ids, their text)."""
    key = (tuple(ids), model, max_tokens)
    if key not in _REFS:
        name = BASE if model == s.base else model
        with torch.no_grad():
            out = s.ref.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                adapter_names=[name],
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        new = out[0, len(ids) :].tolist()
        _REFS[key] = new, s.tok.decode(new[:-1] if new[-1] == 2 else new, skip_special_tokens=True)
    return _REFS[key]


def test_adapter_dir_has_the_peft_files_vllm_reads(srv):
    for name, lora in ADAPTERS.items():  # the adapters under test; the broken ones have their own tests
        d = srv.dir / "adapters" / name
        assert sorted(os.listdir(d)) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ]  # + model card
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == lora["r"] and cfg["lora_alpha"] == lora["lora_alpha"]
        assert cfg["base_model_name_or_path"] == srv.base and cfg["target_modules"]
        with safe_open(d / "adapter_model.safetensors", "pt") as f:
            keys = list(f.keys())
            assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
            assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
            assert f.get_tensor(next(k for k in keys if "lora_A" in k)).shape[0] == lora["r"]


def test_models_lists_base_and_adapters(srv):
    ids = [m.id for m in srv.client.models.list().data]
    assert ids == [srv.base, "a", "b"]


@pytest.mark.parametrize("model", ["a", "b", "base"])
def test_completion_equals_offline_greedy(srv, model):
    model = srv.base if model == "base" else model
    r = srv.client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    new, text = offline(srv, srv.tok(PROMPTS[0])["input_ids"], model, 12)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(new)
    assert r.usage.prompt_tokens == len(srv.tok(PROMPTS[0])["input_ids"]) and r.model == model
    assert r.choices[0].finish_reason == ("stop" if new[-1] == 2 else "length")


def test_adapters_change_the_output(srv):
    ids = srv.tok(PROMPTS[1])["input_ids"]
    assert len({tuple(offline(srv, ids, m, 10)[0]) for m in ("a", "b", srv.base)}) == 3  # so routing is tested


@pytest.mark.parametrize("model", ["a", "base"])
def test_chat_equals_offline_greedy(srv, model):
    model = srv.base if model == "base" else model
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two ?"}]
    r = srv.client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    ids = render_chat(
        srv.tok, messages, add_generation_prompt=True
    )  # the tiny tokenizer has no template: the default one
    new, text = offline(srv, ids, model, 10)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(new))


def test_token_ids_prompt(srv):
    ids = srv.tok(PROMPTS[2])["input_ids"]
    r = srv.client.completions.create(model="b", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == offline(srv, ids, "b", 6)[1]


@pytest.mark.parametrize("model", ["a", "b", "base"])
def test_streaming_equals_non_streaming(srv, model):
    model = srv.base if model == "base" else model
    ids = srv.tok(PROMPTS[3])["input_ids"]
    chunks = list(
        srv.client.completions.create(
            model=model,
            prompt=PROMPTS[3],
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    new, text = offline(srv, ids, model, 15)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(new) and not chunks[-1].choices

    messages = [{"role": "user", "content": PROMPTS[3]}]
    chunks = list(
        srv.client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    got = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert got == offline(srv, render_chat(srv.tok, messages, add_generation_prompt=True), model, 8)[1]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_engine_token_for_token_with_joins(srv):
    """More requests than --max-batch: later ones join as earlier ones leave; each row equals offline generate."""
    engine = srv.engine
    before = dict(engine.stats)
    jobs = [(srv.tok(PROMPTS[i % 6])["input_ids"], ["a", "b", BASE][i % 3], 3 + 2 * i) for i in range(10)]
    reqs = [engine.submit(Request(ids, name, SamplingParams(n, temperature=0))) for ids, name, n in jobs]
    for (ids, name, n), req in zip(jobs, reqs):
        assert req.done.wait(30) and req.finish_reason in ("stop", "length")
        assert req.out_ids == offline(srv, ids, srv.base if name == BASE else name, n)[0]
    assert engine.stats["max_rows"] == engine.max_batch and engine.stats["mixed_steps"] > before["mixed_steps"]
    assert engine.stats["prefills"] - before["prefills"] == 10


def test_sampling_is_seeded(srv):
    kw = dict(model="a", prompt=PROMPTS[4], max_tokens=12, temperature=0.9, top_p=0.9)
    texts = [srv.client.completions.create(seed=s, **kw).choices[0].text for s in (1, 1, 2, 3)]
    assert texts[0] == texts[1] and len(set(texts)) > 1


def test_stop_string_cuts_the_output(srv):
    ids = srv.tok(PROMPTS[5])["input_ids"]
    _, text = offline(srv, ids, "b", 20)
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i : i + 2])
    r = srv.client.completions.create(model="b", prompt=PROMPTS[5], max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_hot_load_then_unload(srv):
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "c", "path": "c"}, headers=h)
    assert r.status_code == 200, r.text
    assert "c" in [m.id for m in srv.client.models.list().data]
    got = srv.client.completions.create(model="c", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert got == offline(srv, srv.tok(PROMPTS[0])["input_ids"], "c", 8)[1]
    assert httpx.post(f"{srv.url}/v1/adapters", json={"name": "c", "path": "c"}, headers=h).status_code == 409
    assert httpx.delete(f"{srv.url}/v1/adapters/c", headers=h).status_code == 200
    assert "c" not in [m.id for m in srv.client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        srv.client.completions.create(model="c", prompt=PROMPTS[0], max_tokens=2)
    assert httpx.delete(f"{srv.url}/v1/adapters/c", headers=h).status_code == 404
    got = srv.client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert got == offline(srv, srv.tok(PROMPTS[0])["input_ids"], "a", 8)[1]  # the others are untouched


def test_adapter_paths_outside_adapter_dir_are_refused(srv):
    h = {"Authorization": f"Bearer {KEY}"}
    link = srv.dir / "adapters" / "link"
    if not link.exists():
        link.symlink_to(srv.dir / "outside")
    for path in ["../outside", str(srv.dir / "outside"), "link", "a/../../outside"]:
        r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "x", "path": path}, headers=h)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (path, r.text)
    r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "x", "path": "missing"}, headers=h)
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    assert "x" not in srv.engine.adapters


def test_errors_are_openai_json_and_the_server_keeps_serving(srv):
    c = srv.client
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="a", prompt=[5] * (srv.engine.context + 10), max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="a", prompt=[5] * 100, max_tokens=srv.engine.context)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="a", prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="a", prompt="hi", presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="a", messages=[])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()
    h = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (b"{not json", h, 400),
        (b"[1, 2]", h, 400),
        (json.dumps({"model": "a", "prompt": "hi", "max_tokens": "many"}).encode(), h, 400),
        (json.dumps({"model": "a"}).encode(), h, 400),
        (json.dumps({"model": "a", "prompt": "hi", "temperature": -1}).encode(), h, 400),
        (json.dumps({"model": "a", "prompt": "hi"}).encode(), {}, 401),
        (json.dumps({"model": "a", "prompt": "hi"}).encode(), {"Authorization": "Basic " + KEY}, 401),
    ]
    for body, headers, status in cases:
        r = httpx.post(
            f"{srv.url}/v1/completions", content=body, headers=headers | {"Content-Type": "application/json"}
        )
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"], err
    assert httpx.get(f"{srv.url}/v1/nowhere", headers=h).json()["error"]["code"] == "not_found"
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
    got = c.completions.create(model="b", prompt=PROMPTS[0], max_tokens=5, temperature=0).choices[0].text
    assert got == offline(srv, srv.tok(PROMPTS[0])["input_ids"], "b", 5)[1]


def test_disconnect_mid_stream_frees_the_slot(srv):
    engine = srv.engine
    before = dict(engine.stats)
    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        while engine.stats["tokens"] - before["tokens"] < 20:  # it is decoding
            time.sleep(0.01)
    deadline = time.time() + 10
    while (engine.stats["active"] or engine.stats["cancelled"] == before["cancelled"]) and time.time() < deadline:
        time.sleep(0.02)
    assert engine.stats["cancelled"] == before["cancelled"] + 1 and engine.stats["active"] == 0
    assert engine.stats["tokens"] - before["tokens"] < 1500
    got = srv.client.completions.create(model="a", prompt=PROMPTS[1], max_tokens=4, temperature=0).choices[0].text
    assert got == offline(srv, srv.tok(PROMPTS[1])["input_ids"], "a", 4)[1]


def test_cli_serve(srv):
    """`smolpeft serve` in a subprocess: loopback by default, adapters from NAME=PATH, answers the openai client."""
    args = build_parser().parse_args(["serve", "--model", "m", "--adapter", "x=/p", "--adapter", "y=/q"])
    assert (args.host, args.port, args.adapter, args.quantize) == ("127.0.0.1", 8000, ["x=/p", "y=/q"], None)
    assert (args.api_key, args.max_body_bytes, args.max_prompt_tokens, args.max_waiting) == (None, 4 * 2**20, None, 256)
    assert args.max_loaded_adapters is None
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "m",
            "--api-key-file",
            "k",
            "--max-body-bytes",
            "100",
            "--max-prompt-tokens",
            "50",
            "--max-waiting",
            "3",
            "--max-loaded-adapters",
            "2",
        ]
    )
    assert (args.api_key_file, args.max_body_bytes, args.max_prompt_tokens, args.max_waiting) == ("k", 100, 50, 3)
    assert args.max_loaded_adapters == 2
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "smolpeft",
        "serve",
        "--model",
        srv.base,
        "--adapter",
        f"a={srv.dir / 'adapters' / 'a'}",
        "--port",
        str(port),
        "--max-batch",
        "2",
    ]
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # on the CPU, like the offline reference
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == [srv.base, "a"]
        got = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[0].text
        assert got == offline(srv, srv.tok(PROMPTS[0])["input_ids"], "a", 6)[1]
    finally:
        proc.terminate()
        proc.communicate(timeout=20)


def test_cli_serve_refuses_an_adapter_without_a_name(capsys):
    assert main(["serve", "--model", "m", "--adapter", "runs/x"]) == 1
    assert "NAME=PATH" in capsys.readouterr().err


def test_a_failed_step_fails_its_requests_and_the_server_keeps_serving(srv, monkeypatch):
    errors = srv.engine.stats["errors"]

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(srv.engine, "_forward", broken)
    with pytest.raises(openai.InternalServerError) as e:
        srv.client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert "simulated device failure" in e.value.body["message"] and srv.engine.stats["errors"] == errors + 1
    monkeypatch.undo()
    got = srv.client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=4, temperature=0).choices[0].text
    assert got == offline(srv, srv.tok(PROMPTS[0])["input_ids"], "a", 4)[1]


def test_unloading_an_adapter_ends_its_requests_in_flight(srv):
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{srv.url}/v1/adapters", json={"name": "c2", "path": "c"}, headers=h).status_code == 200
    stream = srv.client.chat.completions.create(
        model="c2", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=1500, temperature=0, stream=True
    )
    assert next(iter(stream)).choices[0].delta.role == "assistant"
    assert httpx.delete(f"{srv.url}/v1/adapters/c2", headers=h).status_code == 200
    with pytest.raises(openai.APIError, match="unloaded"):
        list(stream)
    got = srv.client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=3, temperature=0).choices[0].text
    assert got == offline(srv, srv.tok(PROMPTS[0])["input_ids"], "b", 3)[1]


def test_plain_base_engine_hot_loads_its_first_adapter(srv):
    """No adapters at start: the plain transformers model serves the base; the first load wraps it in a PeftModel."""
    engine = Engine.load(srv.base, {}, max_batch=2, device="cpu")
    engine.start()
    try:
        ids = srv.tok(PROMPTS[2])["input_ids"]
        params = SamplingParams(7, temperature=0)
        assert engine.generate(ids, BASE, params).out_ids == offline(srv, ids, srv.base, 7)[0]
        engine.load_adapter("b", str(srv.dir / "adapters" / "b"))
        base, adapted = engine.submit(Request(ids, BASE, params)), engine.submit(Request(ids, "b", params))
        assert base.done.wait(10) and adapted.done.wait(10)
        assert (base.out_ids, adapted.out_ids) == (offline(srv, ids, srv.base, 7)[0], offline(srv, ids, "b", 7)[0])
        engine.delete_adapter("b")
        assert engine.adapters == [] and engine.generate(ids, BASE, params).out_ids == offline(srv, ids, srv.base, 7)[0]
    finally:
        engine.stop()


def test_nf4_base_equals_offline_generate_on_the_same_4bit_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from smolpeft.qlora import bnb_config

    tiny.llama(vocab=300, width=128).save_pretrained(tmp_path / "base")
    tok = tiny.tokenizer(tmp_path / "base")
    _adapter(str(tmp_path / "base"), tmp_path / "a", 1, **ADAPTERS["b"])
    engine = Engine.load(str(tmp_path / "base"), {"a": str(tmp_path / "a")}, quantize="nf4", max_batch=4, device="cpu")
    assert type(engine.model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config(), device_map={"": "cpu"}
    )
    ref = smolpeft.PeftModel.from_pretrained(base, str(tmp_path / "a"), "a").eval()
    engine.start()
    try:
        jobs = [(tok(p)["input_ids"], name) for p in PROMPTS[:3] for name in ("a", BASE)]
        reqs = [engine.submit(Request(ids, name, SamplingParams(6, temperature=0))) for ids, name in jobs]
        for (ids, name), req in zip(jobs, reqs):
            assert req.done.wait(30)
            with torch.no_grad():
                out = ref.generate(
                    input_ids=torch.tensor([ids]),
                    adapter_names=[name],
                    max_new_tokens=6,
                    do_sample=False,
                    pad_token_id=0,
                )
            assert req.out_ids == out[0, len(ids) :].tolist(), (name, ids)
    finally:
        engine.stop()


# --- trust: one request's failure, limits, bad input, hot-load checks, auth (issue 12) and a load test -------------

H = {"Authorization": f"Bearer {KEY}"}


def _hot(srv, *names: str):
    """Load adapters from the adapter directory under their own names; the context unloads them again."""
    import contextlib

    @contextlib.contextmanager
    def loaded():
        for name in names:
            r = httpx.post(f"{srv.url}/v1/adapters", json={"name": name, "path": name}, headers=H)
            assert r.status_code == 200, r.text
        try:
            yield
        finally:
            for name in names:
                httpx.delete(f"{srv.url}/v1/adapters/{name}", headers=H)

    return loaded()


def test_a_failing_request_does_not_fail_the_requests_beside_it(srv):
    """temperature 1e-39 and a sampled request on an adapter with NaN weights once failed the whole batch with 500s."""
    ids = srv.tok(PROMPTS[0])["input_ids"]
    body = dict(prompt=PROMPTS[0], max_tokens=24, seed=7)
    jobs = [
        dict(model="nan", temperature=0.7),
        dict(model="a", temperature=1e-39),
        dict(model="b", temperature=0),
        dict(model=srv.base, temperature=0),
        dict(model="nan", temperature=0),
    ]
    with _hot(srv, "nan"), concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        rs = list(
            pool.map(lambda job: httpx.post(f"{srv.url}/v1/completions", json=body | job, headers=H, timeout=30), jobs)
        )
    for job, r in zip(jobs, rs):
        if job["model"] == "nan":
            assert r.status_code == 500 and "non-finite" in r.json()["error"]["message"], r.text
        else:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == offline(srv, ids, job["model"], 24)[1]  # 1e-39 is greedy


def test_request_limits(srv, monkeypatch):
    big = b'{"model": "a", "prompt": "' + b"x" * 20_000_000 + b'"}'
    r = httpx.post(f"{srv.url}/v1/completions", content=big, headers=H, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large" and len(r.content) < 1000

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"model": "a", "prompt": "'
        for _ in range(40):
            yield b"x" * 128_000
        yield b'"}'

    r = httpx.post(f"{srv.url}/v1/completions", content=chunks(), headers=H, timeout=30)
    assert r.status_code == 413, r.text
    t = time.monotonic()  # 3 MB of text: within the body limit, refused by its length before any tokenizing
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model="a", prompt="the " * 750_000, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and time.monotonic() - t < 5
    monkeypatch.setattr(srv.engine, "max_prompt_tokens", 8)  # --max-prompt-tokens 8
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.completions.create(model="a", prompt=PROMPTS[4], max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and "8" in e.value.body["message"]
    monkeypatch.setattr(srv.engine, "max_waiting", 0)  # --max-waiting 0: every new request finds the queue full
    with pytest.raises(openai.RateLimitError):
        srv.client.completions.create(model="a", prompt="hi", max_tokens=2)
    monkeypatch.undo()
    huge = "m" * 1_000_000  # errors quote input clipped, never whole
    for path, body in [
        ("/v1/completions", {"model": huge, "prompt": "hi"}),
        ("/v1/completions", {"model": "a", "prompt": "hi", "logit_bias": {huge: 1}}),
        ("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "\ud800" + huge}]}),
        ("/v1/adapters", {"name": "x", "path": huge}),
    ]:
        r = httpx.post(f"{srv.url}{path}", content=json.dumps(body), headers=H, timeout=30)  # json: escapes "\ud800"
        assert 400 <= r.status_code < 500 and len(r.content) < 2000, (path, r.status_code, r.content[:200])
    assert (
        srv.client.completions.create(model="a", prompt="hi", max_tokens=2, temperature=0).choices[0].text is not None
    )


def test_tokenizing_runs_off_the_event_loop(srv, monkeypatch):
    """The server's event loop runs in srv.thread: a prompt's tokenizing (seconds for megabytes) must not block it."""
    threads = []
    for name in ("encode", "encode_chat"):
        original = getattr(srv.engine, name)
        monkeypatch.setattr(srv.engine, name, lambda *a, _f=original: threads.append(threading.get_ident()) or _f(*a))
    srv.client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=2)
    srv.client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert len(threads) == 2 and srv.thread.ident not in threads


BAD_INPUTS = [  # (path, raw JSON body, status); JSON's "\ud800" escape is a lone surrogate once parsed
    ("/v1/completions", '{"model": "a", "prompt": "hi \\ud800 there", "max_tokens": 2}', 400),
    ("/v1/completions", '{"model": "a", "prompt": ["\\udfff"], "max_tokens": 2}', 400),
    ("/v1/chat/completions", '{"model": "a", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("/v1/chat/completions", '{"model": "a", "messages": [{"role": "\\ud800", "content": "hi"}]}', 400),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "stop": ["\\ud800"]}', 400),
    ("/v1/completions", '{"model": "a\\ud800", "prompt": "hi"}', 404),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "seed": 18446744073709551616}', 400),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "seed": -99999999999999999999999}', 400),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "temperature": NaN}', 400),
    ("/v1/completions", '{"model": "a", "prompt": "hi", "max_tokens": 1e400}', 400),
    ("/v1/completions", '{"model": "a", "prompt": [99999999999999999999999]}', 400),
    ("/v1/completions", b'{"model": "a", "prompt": "\xff\xfe"}', 400),
    ("/v1/adapters", '{"name": "x", "path": "alpha"}', 400),  # lora_alpha: "abc"
    ("/v1/adapters", '{"name": "x", "path": "bin"}', 400),  # adapter_model.bin only
    ("/v1/adapters", '{"name": "x", "path": "sneaky"}', 403),  # its weights are a symlink out of --adapter-dir
    ("/v1/adapters", '{"name": "x\\ud800", "path": "c"}', 400),
    ("/v1/adapters", '{"name": "x", "path": "bomb"}', 400),  # r = 2**40
]


def test_bad_input_is_a_4xx_and_the_keep_alive_connection_stays_usable(srv):
    with httpx.Client(base_url=srv.url, headers=H | {"Content-Type": "application/json"}, timeout=30) as client:
        ports = set()
        for path, body, status in BAD_INPUTS:
            r = client.post(path, content=body if isinstance(body, bytes) else body.encode())
            ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1])
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error", (body, err)
        r = client.post("/v1/completions", json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0})
        ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1])
    assert r.json()["choices"][0]["text"] == offline(srv, srv.tok(PROMPTS[0])["input_ids"], "a", 5)[1]
    assert len(ports) == 1  # one TCP connection for all of them
    assert "safetensors" in httpx.post(f"{srv.url}/v1/adapters", json={"name": "x", "path": "bin"}, headers=H).text
    assert "x" not in srv.engine.adapters and not any(m.training for m in srv.engine.model.modules())


def test_with_an_api_key_only_health_answers_without_it(srv):
    client = httpx.Client(base_url=srv.url)
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/redoc"),
        ("GET", "/v1/nowhere"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/adapters"),
        ("DELETE", "/v1/adapters/a"),
        ("GET", "/v1/completions"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = client.request(method, path, headers=headers, json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path, r.text)
    for path in ("/openapi.json", "/docs", "/redoc"):  # not served at all
        assert client.get(path, headers=H).status_code == 404
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert str(srv.dir) not in r.text and "/" not in r.text and "adapters" not in r.json()
    assert "a" in srv.engine.adapters  # the DELETE above did nothing
    client.close()


def test_the_api_key_can_come_from_a_file_or_the_environment(tmp_path):
    from smolpeft.serve import resolve_api_key

    (tmp_path / "key").write_text("sk-from-file\n")
    assert resolve_api_key(None, str(tmp_path / "key"), environ={}) == "sk-from-file"
    assert resolve_api_key(None, None, environ={"SMOLPEFT_API_KEY": "sk-env"}) == "sk-env"
    assert resolve_api_key("sk-arg", None, environ={"SMOLPEFT_API_KEY": "sk-env"}) == "sk-arg"
    assert resolve_api_key(None, None, environ={}) is None
    with pytest.raises(ValueError):
        resolve_api_key("sk-arg", str(tmp_path / "key"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError):
        resolve_api_key(None, str(tmp_path / "empty"))


def test_serve_applies_its_limits_and_reads_the_key_file(srv, tmp_path, monkeypatch):
    """serve(): the limits reach the engine and the app, the key comes from the file (uvicorn itself is stubbed)."""
    from fastapi.testclient import TestClient

    import smolpeft.serve

    apps, engines, load = [], [], Engine.load
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setattr(
        Engine, "load", classmethod(lambda cls, *a, **kw: engines.append(load(*a, **kw)) or engines[-1])
    )
    (tmp_path / "key").write_text("sk-file\n")
    smolpeft.serve.serve(
        srv.base,
        api_key_file=str(tmp_path / "key"),
        max_body_bytes=100,
        max_prompt_tokens=5,
        max_waiting=3,
        max_loaded_adapters=2,
    )
    assert (engines[0].max_prompt_tokens, engines[0].max_waiting, engines[0].max_loaded) == (5, 3, 2)
    client = TestClient(apps[0])
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-file"}).status_code == 200
    r = client.post(
        "/v1/completions", json={"model": srv.base, "prompt": "x" * 200}, headers={"Authorization": "Bearer sk-file"}
    )
    assert r.status_code == 413


def test_greedy_is_deterministic_mixed_and_after_hot_loads(srv):
    """c and d are hot-loaded after the first adapters (d with dropout 0.5: equal to offline only in eval mode)."""
    jobs = [(PROMPTS[i % 3], m, 10) for i, m in enumerate(["a", "b", "c", "d", srv.base] * 2)]

    def run(job):
        prompt, model, n = job
        return srv.client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with _hot(srv, "c", "d"), concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        rounds = [list(pool.map(run, jobs)) for _ in range(2)]
        alone = [run(job) for job in jobs[:5]]
    assert rounds[0] == rounds[1] and alone == rounds[0][:5]
    for (prompt, model, n), text in zip(jobs, rounds[0]):
        assert text == offline(srv, srv.tok(prompt)["input_ids"], model, n)[1], (prompt, model)


def test_load_64_concurrent_requests_a_sixth_malformed(srv, caplog):
    """Four adapters and the base; every valid request's greedy output equals its solo run, every malformed one
    gets a 4xx, and the server serves on."""
    models = ["a", "b", "c", "d", srv.base]
    jobs = []
    for i in range(64):
        if i % 6 == 5:
            path, body, status = BAD_INPUTS[(i // 6) % 12]
            jobs.append((path, body.encode() if isinstance(body, str) else body, status, None))
        else:
            prompt, model, n = PROMPTS[i % 6], models[i % 5], 3 + i % 8
            body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 1e-39 if i % 4 == 0 else 0}
            jobs.append(("/v1/completions", json.dumps(body).encode(), 200, (prompt, model, n)))
    limits = httpx.Limits(max_connections=16)
    mixed = srv.engine.stats["mixed_steps"]
    with (
        caplog.at_level(logging.DEBUG, logger="smolpeft.engine"),
        _hot(srv, "c", "d"),
        httpx.Client(base_url=srv.url, headers=H, timeout=60, limits=limits) as client,
    ):
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            rs = list(
                pool.map(
                    lambda job: client.post(job[0], content=job[1], headers={"Content-Type": "application/json"}), jobs
                )
            )
    assert sum(job[3] is None for job in jobs) == 10
    for (_, body, status, solo), r in zip(jobs, rs):
        assert r.status_code == status, (body[:100], r.text)
        if solo:
            prompt, model, n = solo
            assert r.json()["choices"][0]["text"] == offline(srv, srv.tok(prompt)["input_ids"], model, n)[1], solo
    assert srv.engine.stats["active"] == 0 and httpx.get(f"{srv.url}/health").json()["status"] == "ok"
    assert srv.engine.stats["mixed_steps"] > mixed
    steps = [r.getMessage() for r in caplog.records if r.name == "smolpeft.engine" and "adapters {" in r.getMessage()]
    assert any(m.split("adapters ")[1].count(":") >= 3 for m in steps), steps[:5]  # rows of three or more adapters


def test_hot_loading_a_pissa_adapter_leaves_the_shared_base_alone(srv, tmp_path):
    """Needs the lead's model.py fix (PiSSA/OLoRA adapters become plain LoRA on load): loading one must not rewrite
    the base weights that every other adapter and the base model share. A server of its own, so a failure here
    cannot leak into the other tests."""
    from fastapi.testclient import TestClient

    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(srv.base)
    smolpeft.get_peft_model(
        base,
        smolpeft.LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    ).save_pretrained(tmp_path / "pissa")
    engine = Engine.load(srv.base, {"a": str(srv.dir / "adapters" / "a")}, max_batch=4, device="cpu")
    engine.start()
    try:
        with TestClient(create_app(engine, adapter_dir=str(tmp_path))) as client:

            def greedy(model: str) -> str:
                r = client.post(
                    "/v1/completions", json={"model": model, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
                )
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            assert client.post("/v1/adapters", json={"name": "p", "path": "pissa"}).status_code == 200
            ids = srv.tok(PROMPTS[1])["input_ids"]
            assert greedy(srv.base) == offline(srv, ids, srv.base, 8)[1]
            assert greedy("a") == offline(srv, ids, "a", 8)[1]
    finally:
        engine.stop()


def test_a_server_with_fewer_adapter_slots_than_adapters(srv):
    """Four adapters through two slots: /v1/models lists all four, concurrent requests over all of them (and the
    base) equal offline greedy, evicted adapters come back, and hot load and unload work on the registry."""
    from fastapi.testclient import TestClient

    adapters = srv.dir / "adapters"
    engine = Engine.load(
        srv.base, {n: str(adapters / n) for n in ("a", "b", "c")}, max_batch=3, device="cpu", max_loaded_adapters=2
    )
    engine.start()
    try:
        with TestClient(create_app(engine, adapter_dir=str(adapters))) as client:
            assert client.post("/v1/adapters", json={"name": "d", "path": "d"}).status_code == 200
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [srv.base, "a", "b", "c", "d"]
            jobs = [(PROMPTS[i % 4], m) for i, m in enumerate(["a", "b", "c", "d", srv.base, "a", "d", "b"] * 2)]

            def run(job):
                body = {"model": job[1], "prompt": job[0], "max_tokens": 6, "temperature": 0}
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                texts = list(pool.map(run, jobs))
            for (prompt, model), text in zip(jobs, texts):
                assert text == offline(srv, srv.tok(prompt)["input_ids"], model, 6)[1], (prompt, model)
            stats = client.get("/health").json()["stats"]
            assert stats["loaded_adapters"] == 2 and stats["adapter_loads"] > 0 and stats["adapter_evictions"] > 0
            assert client.delete("/v1/adapters/a").status_code == 200
            assert client.post("/v1/completions", json={"model": "a", "prompt": "x"}).status_code == 404
            assert run((PROMPTS[0], "b")) == offline(srv, srv.tok(PROMPTS[0])["input_ids"], "b", 6)[1]
    finally:
        engine.stop()
