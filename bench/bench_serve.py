"""d) Serving through HTTP on the SmolLM2-135M shape: tokens/s for 8 concurrent clients on 8 different adapters vs
8 clients on one adapter vs the same 8 requests one after another (`smolpeft serve`'s engine and API, in-process)."""

import concurrent.futures
import socket
import sys
import tempfile
import threading
import time

import httpx
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import alternate, median, parser, report, smollm2  # noqa: E402


def word_tokenizer(vocab: int):
    """One word per id ("t0".."tN"), so every generated id decodes; no EOS, so every request runs to max_tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def main():
    p = parser(__doc__)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per request")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, or all-linear")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import uvicorn

    import smolpeft
    from smolpeft.engine import Engine
    from smolpeft.serve import create_app

    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    d = tempfile.mkdtemp()
    for i in range(args.clients):  # one adapter per client, random B so none is the identity
        torch.manual_seed(100 + i)
        cfg = smolpeft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, init_lora_weights=False
        )
        smolpeft.get_peft_model(smollm2(args.layers), cfg).save_pretrained(f"{d}/a{i}")
    base = smollm2(args.layers)
    base.generation_config.eos_token_id = None
    engine = Engine(base, word_tokenizer(base.config.vocab_size), "smollm2-shape", max_batch=args.clients)
    for i in range(args.clients):
        engine.load_adapter(f"a{i}", f"{d}/a{i}")
    engine.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)

    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, base.config.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(args.clients)
    ]
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", timeout=600)

    def request(job):
        prompt, model = job
        r = http.post(
            "/completions", json={"model": model, "prompt": prompt, "max_tokens": args.tokens, "temperature": 0}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == args.tokens, r.text
        return r

    steps = {}

    def case(name, models, together):
        jobs = list(zip(prompts, models))

        def run():
            before = engine.stats["steps"]
            if together:
                with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
                    list(pool.map(request, jobs))
            else:
                for job in jobs:
                    request(job)
            steps[name] = engine.stats["steps"] - before

        return run

    mixed = [f"a{i}" for i in range(args.clients)]
    mixed_before = engine.stats["mixed_steps"]
    times = alternate(
        {
            "8 clients x 8 adapters": case("mixed", mixed, True),
            "8 clients x 1 adapter": case("single", ["a0"] * args.clients, True),
            "sequential, 8 adapters": case("sequential", mixed, False),
        },
        args.rounds,
    )
    server.should_exit = True
    engine.stop()
    n = args.clients * args.tokens
    med = {k: median(v) for k, v in times.items()}
    tps = {k: n / v for k, v in med.items()}
    single = tps["8 clients x 1 adapter"]
    rows = [
        {
            "case": k,
            "tokens": n,
            "decode_steps": steps[s],
            "median_s": med[k],
            "tokens_per_s": tps[k],
            "vs_single": tps[k] / single,
        }
        for k, s in zip(med, ("mixed", "single", "sequential"))
    ]
    mixed_tps = tps["8 clients x 8 adapters"]
    key = (
        f"mixed-8/single throughput = {mixed_tps / single:.3f} (target >= 0.8); mixed-8/sequential = "
        f"{mixed_tps / tps['sequential, 8 adapters']:.2f}x (target >= 3)"
    )
    report(
        "serve",
        rows,
        key,
        {"args": vars(args), "rounds_s": times, "mixed_adapter_steps": engine.stats["mixed_steps"] - mixed_before},
    )


if __name__ == "__main__":
    main()
