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
from transformers import AutoModelForCausalLM

import smolpeft
from smolpeft.cli import build_parser, main
from smolpeft.data import _chat
from smolpeft.lora import BASE
from smolpeft.serve import Engine, Request, SamplingParams, create_app

KEY = "sk-test-key"
ADAPTERS = {  # different ranks and targets, so rows of one batch touch different layers
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "c": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"]),
}
PROMPTS = ["the quick brown fox", "hello ! how can i", "what is the capital of france ?", "two plus two equals",
           "a cat sat on the mat and looked at", "the weather today is"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(base_dir, out_dir, seed, **lora):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = smolpeft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora)  # random B: not the identity
    smolpeft.get_peft_model(model, config).save_pretrained(out_dir)


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
    engine = Engine.load(base, {"a": str(d / "adapters" / "a"), "b": str(d / "adapters" / "b")}, max_batch=4, device="cpu")
    engine.start()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key=KEY, adapter_dir=str(d / "adapters")),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    ref = smolpeft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(d / "adapters" / "a"), "a")
    for name in ("b", "c"):
        ref.load_adapter(str(d / "adapters" / name), name)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)
    yield SimpleNamespace(dir=d, base=base, engine=engine, url=url, client=client, ref=ref.eval(), tok=engine.tokenizer)
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
            out = s.ref.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 adapter_names=[name], max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        _REFS[key] = new, s.tok.decode(new[:-1] if new[-1] == 2 else new, skip_special_tokens=True)
    return _REFS[key]


def test_adapter_dir_has_the_peft_files_vllm_reads(srv):
    for name, lora in ADAPTERS.items():
        d = srv.dir / "adapters" / name
        assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]
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
    ids = _chat(srv.tok, messages, add_generation_prompt=True)  # the tiny tokenizer has no template: the default one
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
    chunks = list(srv.client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=15, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    new, text = offline(srv, ids, model, 15)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(new) and not chunks[-1].choices

    messages = [{"role": "user", "content": PROMPTS[3]}]
    chunks = list(srv.client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                     stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    got = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert got == offline(srv, _chat(srv.tok, messages, add_generation_prompt=True), model, 8)[1]
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


def test_64_concurrent_requests_mixed_adapters(srv, caplog):
    models = ["a", "b", srv.base]
    jobs = [(PROMPTS[i % 6], models[i % 3], 4 + i % 9) for i in range(64)]

    def run(job):
        prompt, model, n = job
        return srv.client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    mixed = srv.engine.stats["mixed_steps"]
    with caplog.at_level(logging.DEBUG, logger="smolpeft.engine"):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(run, job) for job in jobs]
            results = [f.result() for f in futures]  # any error raises here
    for (prompt, model, n), text in zip(jobs, results):
        assert text == offline(srv, srv.tok(prompt)["input_ids"], model, n)[1], (prompt, model, n)
    assert srv.engine.stats["mixed_steps"] > mixed
    steps = [r.getMessage() for r in caplog.records if r.name == "smolpeft.engine" and "adapters {" in r.getMessage()]
    assert any(m.split("adapters ")[1].count(":") >= 2 for m in steps), steps[:5]  # rows of two or more adapters


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
        r = httpx.post(f"{srv.url}/v1/completions", content=body, headers=headers | {"Content-Type": "application/json"})
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
    port = _free_port()
    cmd = [sys.executable, "-m", "smolpeft", "serve", "--model", srv.base, "--adapter", f"a={srv.dir / 'adapters' / 'a'}",
           "--port", str(port), "--max-batch", "2"]
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
    stream = srv.client.chat.completions.create(model="c2", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                max_tokens=1500, temperature=0, stream=True)
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
    from transformers import LlamaConfig, LlamaForCausalLM

    from smolpeft.qlora import bnb_config

    torch.manual_seed(0)  # wide enough for bitsandbytes' CPU blocks of 64
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tok = tiny.tokenizer(tmp_path / "base")
    _adapter(str(tmp_path / "base"), tmp_path / "a", 1, **ADAPTERS["b"])
    engine = Engine.load(str(tmp_path / "base"), {"a": str(tmp_path / "a")}, quantize="nf4", max_batch=4, device="cpu")
    assert type(engine.model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config(), device_map={"": "cpu"})
    ref = smolpeft.PeftModel.from_pretrained(base, str(tmp_path / "a"), "a").eval()
    engine.start()
    try:
        jobs = [(tok(p)["input_ids"], name) for p in PROMPTS[:3] for name in ("a", BASE)]
        reqs = [engine.submit(Request(ids, name, SamplingParams(6, temperature=0))) for ids, name in jobs]
        for (ids, name), req in zip(jobs, reqs):
            assert req.done.wait(30)
            with torch.no_grad():
                out = ref.generate(input_ids=torch.tensor([ids]), adapter_names=[name], max_new_tokens=6,
                                   do_sample=False, pad_token_id=0)
            assert req.out_ids == out[0, len(ids):].tolist(), (name, ids)
    finally:
        engine.stop()
