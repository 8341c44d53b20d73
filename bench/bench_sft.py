"""b) The same SFT job with `smolpeft train` and with TRL's SFTTrainer + peft: the built-in chat data, LoRA r=16 on
all linear layers, sequence length 512, packing, gradient checkpointing, same steps and batch. Each job runs in a
fresh process, alternating smolpeft and TRL over --rounds rounds (medians); tokens/s counts real tokens (no padding),
and peak RSS is the process's. Both train in fp32: TRL's default bf16 autocast is set off, since on a CPU without
bf16 matrix units it is many times slower and would not be a like-for-like comparison."""

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import median, parser, report, smollm2  # noqa: E402

TRL_CHILD = r"""
import json, resource, sys, torch
from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, data, out, steps, batch, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
args = SFTConfig(output_dir=out, max_length=512, packing=True, gradient_checkpointing=True, max_steps=int(steps),
                 per_device_train_batch_size=int(batch), learning_rate=2e-4, logging_steps=1, report_to=[],
                 save_strategy="no", use_cpu=True, seed=0, lr_scheduler_type="linear", bf16=False)
trainer = SFTTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data)["train"],
                     processing_class=tok, peft_config=LoraConfig(
                         r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
m = trainer.train().metrics
tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens": tokens, "train_s": m["train_runtime"], "peak_rss_mb": peak}))
"""

OURS_CHILD = r"""
import json, resource, sys, torch
from smolpeft.train import TrainConfig, train
model_dir, data, out, steps, batch, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
s = train(TrainConfig(model=model_dir, data=data, output_dir=out, max_steps=int(steps), batch_size=int(batch), lr=2e-4,
                      rank=16, alpha=32, dropout=0.0, targets="all-linear", max_length=512, packing=True,
                      gradient_checkpointing=True, train_on_prompt=True, log_every=1), log=lambda *_: None)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens": s["tokens"], "train_s": s["train_time_s"], "peak_rss_mb": peak}))
"""


def build(layers: int, root: str) -> tuple[str, str]:
    """The SmolLM2 shape saved with a BPE tokenizer trained on the chat data, and the data as JSONL."""
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
    return model_dir, data


def run_jobs(children: dict[str, str], model_dir: str, data: str, root: str, args) -> dict[str, list[dict]]:
    """Each child script as a fresh process per round, the order alternating; the JSON line each prints, plus
    tokens/s, per job name."""
    env = os.environ | {
        "TRANSFORMERS_VERBOSITY": "error",
        "TQDM_DISABLE": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    runs: dict[str, list[dict]] = {k: [] for k in children}
    for r in range(args.rounds):
        for name in list(children) if r % 2 == 0 else list(children)[::-1]:
            out_dir = os.path.join(root, f"{name}-{r}")
            cmd = [sys.executable, "-c", children[name], model_dir, data, out_dir, str(args.steps)]
            cmd += [str(args.batch), str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(res | {"tokens_per_s": res["tokens"] / res["train_s"]})
            print(
                f"round {r} {name}: {runs[name][-1]['tokens_per_s']:.1f} tokens/s, {res['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    return runs


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    root = tempfile.mkdtemp()
    model_dir, data = build(args.layers, root)
    runs = run_jobs({"smolpeft": OURS_CHILD, "trl+peft": TRL_CHILD}, model_dir, data, root, args)
    results = {name: {k: median([x[k] for x in rs]) for k in rs[0]} for name, rs in runs.items()}
    rows = [{"job": k, **v} for k, v in results.items()]
    ours, trl = results["smolpeft"], results["trl+peft"]
    key = (
        f"tokens/s smolpeft/TRL = {ours['tokens_per_s'] / trl['tokens_per_s']:.3f} (target >= 1.5); "
        f"peak RSS smolpeft/TRL = {ours['peak_rss_mb'] / trl['peak_rss_mb']:.3f} (target <= 0.6)"
    )
    report("sft_job", rows, key, {"args": vars(args)})


if __name__ == "__main__":
    main()
