"""b) The same SFT job with `smolpeft train` and with TRL's SFTTrainer + peft: the first --rows rows of the built-in
chat data (`messages`, loss on every token as TRL computes it), LoRA r=16 on all linear layers, sequence length 512,
packing, gradient checkpointing, batch 2, one epoch (or --steps), the adapter saved at the end. Each job runs in a
fresh process, alternating smolpeft and TRL over --rounds rounds (medians). Two measures: the whole job as a user
waits for it (process start to exit: imports, loading, tokenizing, training, smolpeft's before/after evaluation,
saving) and the training loop alone; tokens/s counts real tokens trained (no padding), peak RSS is the process's.
Each child also reports when its imports, its set-up (model, data, trainer) and its training ended, so the table
says where the wall time goes. Both train in fp32: TRL's default bf16 autocast is set off, since on a CPU without
bf16 matrix units it is many times slower and would not be a like-for-like comparison."""

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import median, parser, report, smollm2  # noqa: E402

# Each child is a `python -c` script that prints one JSON line: tokens trained, and when its imports ended (t0 is the
# parent's clock at launch), how long set-up (model, data, trainer) and training took.
TRL_CHILD = r"""
import json, sys, time, torch
from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, data, out, steps, batch, t0 = sys.argv[1:7]
t_imports = time.time()
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
args = SFTConfig(output_dir=out, max_length=512, packing=True, gradient_checkpointing=True,
                 max_steps=int(steps) or -1, num_train_epochs=1, per_device_train_batch_size=int(batch),
                 learning_rate=2e-4, logging_steps=1, report_to=[], save_strategy="no",
                 use_cpu=True, seed=0, lr_scheduler_type="linear", bf16=False)
trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
                     processing_class=tok, peft_config=LoraConfig(
                         r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
t_setup = time.time()
m = trainer.train().metrics
trainer.save_model(out)
tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
print(json.dumps({"tokens": tokens, "import_s": t_imports - float(t0), "setup_s": t_setup - t_imports,
                  "train_s": m["train_runtime"], "eval_s": 0.0}))
"""


def smolpeft_train(model_dir: str, data: str, out: str, args) -> list[str]:
    """The `smolpeft train` command a user types for the same job (it evaluates before and after on its held-out
    10%, writes the adapter, metrics and a PNG); its summary.json says where the time went."""
    cmd = [sys.executable, "-m", "smolpeft", "train", "--model", model_dir, "--data", data, "--output-dir", out]
    cmd += ["--epochs", "1", "--batch-size", str(args.batch), "--lr", "2e-4", "--r", "16", "--lora-alpha", "32"]
    cmd += ["--lora-dropout", "0", "--target-modules", "all-linear", "--max-length", "512", "--packing"]
    cmd += ["--gradient-checkpointing", "--train-on-prompt", "--log-every", "1"]
    return cmd + (["--max-steps", str(args.steps)] if args.steps else [])


def _summary_phases(out: str, t0: float) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {
        "tokens": s["tokens"],
        "import_s": s["started_at"] - t0,
        "setup_s": s["setup_time_s"],
        "train_s": s["train_time_s"],
        "eval_s": s["eval_time_s"],
    }


def build(layers: int, root: str, rows: int | None = None) -> tuple[str, str]:
    """The SmolLM2 shape (its 49,152-token head) saved with a BPE tokenizer trained on the chat data, and the first
    `rows` rows of the data as JSONL."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from smolpeft.data import DEFAULT_CHAT_TEMPLATE

    data = str(resources.files("smolpeft") / "tasks" / "chat" / "train.jsonl")
    texts = [m["content"] for line in open(data) for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=4000,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    model_dir = os.path.join(root, "model")
    fast.save_pretrained(model_dir)
    smollm2(layers).save_pretrained(model_dir)
    if rows:
        with open(data) as f:
            head = [next(f) for _ in range(rows)]
        data = os.path.join(root, "data.jsonl")
        with open(data, "w") as f:
            f.writelines(head)
    return model_dir, data


def run_jobs(children: dict, model_dir: str, data: str, root: str, args) -> dict[str, list[dict]]:
    """Each job as a fresh process per round, the order alternating. A job is a `python -c` script (see TRL_CHILD)
    or a function giving a command that writes a smolpeft summary.json. Per job name, per round: tokens, the phases,
    `finish_s` (the rest of the wall time: saving, the plot, interpreter exit), the whole job's wall time, its peak
    RSS (the kernel's high-water mark for that process) and tokens/s over the whole job and the training loop."""
    env = os.environ | {
        "TRANSFORMERS_VERBOSITY": "error",
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "OMP_NUM_THREADS": str(args.threads),
    }
    runs: dict[str, list[dict]] = {k: [] for k in children}
    for r in range(args.rounds):
        for name in list(children) if r % 2 == 0 else list(children)[::-1]:
            job, out_dir = children[name], os.path.join(root, f"{name}-{r}")
            t0 = time.time()
            if callable(job):
                cmd = job(model_dir, data, out_dir, args)
            else:
                cmd = [sys.executable, "-c", job, model_dir, data, out_dir, str(args.steps), str(args.batch), repr(t0)]
            with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
                _, status, usage = os.wait4(proc.pid, 0)  # wait4: this process's own rusage, peak RSS included
                proc.returncode = os.waitstatus_to_exitcode(status)
                wall = time.time() - t0
                out.seek(0), err.seek(0)
                stdout, stderr = out.read(), err.read()
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
            res = _summary_phases(out_dir, t0) if callable(job) else json.loads(stdout.strip().splitlines()[-1])
            res["finish_s"] = wall - res["import_s"] - res["setup_s"] - res["train_s"] - res["eval_s"]
            res |= {
                "wall_s": wall,
                "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
                "job_tokens_per_s": res["tokens"] / wall,
                "loop_tokens_per_s": res["tokens"] / res["train_s"],
            }
            runs[name].append(res)
            print(
                f"round {r} {name}: job {res['job_tokens_per_s']:.1f} tokens/s ({wall:.1f} s), loop "
                f"{res['loop_tokens_per_s']:.1f} tokens/s, {res['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    return runs


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=0, help="0: one epoch")
    p.add_argument("--rows", type=int, default=48, help="chat rows trained on (0: all 378)")
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    root = tempfile.mkdtemp()
    model_dir, data = build(args.layers, root, args.rows)
    runs = run_jobs({"smolpeft": smolpeft_train, "trl+peft": TRL_CHILD}, model_dir, data, root, args)
    results = {name: {k: median([x[k] for x in rs]) for k in rs[0]} for name, rs in runs.items()}
    rows = [{"job": k, **v} for k, v in results.items()]
    ours, trl = results["smolpeft"], results["trl+peft"]
    key = (
        f"{args.layers} layers, {args.rows} rows: tokens/s smolpeft/TRL whole job = "
        f"{ours['job_tokens_per_s'] / trl['job_tokens_per_s']:.3f} (target >= 1.5), training loop = "
        f"{ours['loop_tokens_per_s'] / trl['loop_tokens_per_s']:.3f}; "
        f"peak RSS smolpeft/TRL = {ours['peak_rss_mb'] / trl['peak_rss_mb']:.3f} (target <= 0.6)"
    )
    report("sft_job", rows, key, {"args": vars(args)})


if __name__ == "__main__":
    main()
