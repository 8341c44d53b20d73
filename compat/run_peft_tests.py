"""Run PEFT's own LoRA / prompt-tuning tests against peft or smolpeft and compare the results.

    cd /work/wt/compat && export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    PEFT=/work/.mirror/huggingface+peft/repo
    python compat/run_peft_tests.py --peft-repo $PEFT --lib peft      # the oracle: results/peft.json (~40 min)
    python compat/run_peft_tests.py --peft-repo $PEFT --lib smolpeft  # results/smolpeft.json (~10 min) + REPORT.md
    python compat/run_peft_tests.py --report-only                     # rebuild REPORT.md from the saved results

The smolpeft run alone is the loop after a code change: it reuses the saved results/peft.json. Needs pytest,
diffusers and attrs (PEFT's test helpers import them) and, for a per-test timeout, pytest-timeout.

What it does, in order:
1. Extracts PEFT's `tests/` (from a bare git repo with `git archive HEAD`, or from a checkout) into a temp dir.
2. Rewrites every `import peft...` / `from peft... import ...` in those files into a guarded import of the
   chosen library (same submodule path). A name the library lacks becomes a `Missing` stand-in, so one missing
   class fails only the tests that use it, not the whole module. Done identically for both libraries.
3. Builds tiny random models with a local tokenizer under the Hub ids that test_decoder_models.py loads
   (`from_pretrained("org/name")` loads the relative directory), so those tests run offline.
4. Runs pytest on the four files with this module as a plugin (`-p run_peft_tests`), which deselects what is out of
   scope (see `selected()`), turns a pass that touched a `Missing` stand-in into a failure, and writes
   `<lib>.json` (nodeid -> outcome, first error line, seconds).
5. Writes compat/REPORT.md from peft.json and smolpeft.json.
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEST_FILES = ["test_config.py", "test_custom_models.py", "test_initialization.py", "test_decoder_models.py"]
HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------------
# Selection rule (identical for both libraries; it only looks at test ids and parameter values).
#
# An item is kept iff none of these name something out of scope:
#  * a word of its function name or parameter id (split on non-alphanumerics, lowercased) is another PEFT method,
#    a LoRA variant or an excluded target type (EXCLUDED_WORDS), or a `...Config` other than the two we test;
#  * its test class name (lowercased) contains another method's name (TestVeraInitialization, TestLokr...);
#  * a parameter value is a config class other than LoraConfig / PromptTuningConfig, or a dict / config
#    object that sets a refused LoRA feature (EXCLUDED_KWARGS: DoRA, LoRA bias, bias != "none", targeting
#    parameters or trainable tokens, and the variants configured through a sub-config).
# Tests that need the Hub are not filtered: they fail offline for real peft too and drop out of the comparison.
# ----------------------------------------------------------------------------------------------------------------
# fmt: off
OTHER_METHODS = [
    "multitask_prompt_tuning", "p_tuning", "prefix_tuning", "adaption_prompt", "ln_tuning", "trainable_tokens",
    "trainable_token", "adalora", "adamss", "boft", "ia3", "beft", "lily", "loha", "lokr", "oft", "poly", "vera",
    "frod", "pvera", "fourierft", "glora", "xlora", "hra", "vblora", "unilora", "cpt", "miss", "randlora", "road",
    "hira", "shira", "c3a", "waveft", "osf", "delora", "gralora", "cartridge", "tinylora", "psoft", "peanut",
    "shadow", "supertuning", "deft", "bone", "kasa", "velora", "monteclora", "bdlora", "arrow", "qalora", "alora",
    "prompt_encoder",
]
EXCLUDED_WORDS = {
    "dora", "mha", "multihead", "multiheadattention", "paramwrapper", "target_parameters", "lora_bias", "with_bias",
}
EXCLUDED_TARGET = re.compile(r"^conv[123]d")  # torch Conv1d/2d/3d (GPT-2's Conv1D shows up as "embconv1d" etc.)
KEPT_CONFIGS = {"LoraConfig", "PromptTuningConfig"}
EXCLUDED_KWARGS = {
    "use_dora", "lora_bias", "target_parameters", "trainable_token_indices", "use_qalora", "alora_invocation_tokens",
    "kasa_config", "velora_config", "monteclora_config", "arrow_config", "use_bdlora",
}
# fmt: on


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def _excluded_text(text: str) -> str | None:
    """Why this function name / parameter id is out of scope, or None."""
    words = _words(text)
    joined = "_" + "_".join(words) + "_"
    for m in OTHER_METHODS + sorted(EXCLUDED_WORDS):
        if f"_{m}_" in joined:
            return m
    for w in words:
        if EXCLUDED_TARGET.match(w):
            return w
        if w.endswith("config") and len(w) > 6 and w not in {c.lower() for c in KEPT_CONFIGS} | {"peftconfig"}:
            return w
    return None


def _excluded_value(value: Any, depth: int = 0) -> str | None:
    if depth > 3:
        return None
    if isinstance(value, type) and value.__name__.endswith("Config") and value.__name__ not in KEPT_CONFIGS:
        return value.__name__ if value.__name__ != "PeftConfig" else None
    if isinstance(value, dict):
        for k, v in value.items():
            if k in EXCLUDED_KWARGS and v:
                return k
            if k == "bias" and v not in (None, "none"):
                return f"bias={v}"
        return next((r for v in value.values() if (r := _excluded_value(v, depth + 1))), None)
    if isinstance(value, (list, tuple)):
        return next((r for v in value if (r := _excluded_value(v, depth + 1))), None)
    if type(value).__name__.endswith("Config") and hasattr(value, "to_dict"):
        if type(value).__name__ not in KEPT_CONFIGS:
            return type(value).__name__
        return _excluded_value(value.to_dict(), depth + 1)
    return None


def selected(item: Any) -> str | None:
    """None if the item is in scope, else the reason it is not."""
    cls = item.cls.__name__.lower() if getattr(item, "cls", None) else ""
    for m in OTHER_METHODS:
        if m.replace("_", "") in cls:
            return f"class:{m}"
    reason = _excluded_text(item.originalname if hasattr(item, "originalname") else item.name)
    callspec = getattr(item, "callspec", None)
    if reason is None and callspec is not None:
        reason = _excluded_text(callspec.id) or next(
            (r for v in callspec.params.values() if (r := _excluded_value(v))), None
        )
        bias = callspec.params.get("bias", callspec.params.get("lora_bias"))
        if reason is None and bias not in (None, "none", False):  # e.g. test_lora_with_bias_argument[all]
            reason = f"bias={bias}"
    return reason


# ----------------------------------------------------------------------------------------------------------------
# Guarded imports: the rewritten test files call `module()` / `names()` instead of `import`.
# ----------------------------------------------------------------------------------------------------------------
TOUCHED: list[str] = []  # Missing stand-ins used by the running test
MISSING: set[str] = set()  # every name the tests asked for and the library lacks
_IN_TEST = False


class MissingError(ImportError):
    pass


class _MissingMeta(type):
    """A class standing in for a name the library lacks: inert while modules load, a failure inside a test."""

    def _touch(cls) -> None:
        if _IN_TEST:
            TOUCHED.append(cls._path)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if not _IN_TEST:  # module level, e.g. `torch_device = infer_device()`: stay inert until a test uses it
            return missing(f"{cls._path}()")
        cls._touch()
        raise MissingError(f"missing in library: {cls._path}")

    def __repr__(cls) -> str:
        return f"<missing in library: {cls._path}>"

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):  # pytest and mock probe private names; those are no part of the library's API
            raise AttributeError(name)
        cls._touch()
        return missing(f"{cls._path}.{name}")

    # isinstance/issubclass against a class the library lacks answer False, which is true of the library's objects
    # (PEFT's tests branch on other methods' configs this way), so these checks do not fail a test.
    def __instancecheck__(cls, obj: Any) -> bool:
        return False

    def __subclasscheck__(cls, sub: Any) -> bool:
        return False


def missing(path: str) -> type:
    MISSING.add(path)
    # A metaclass named after the path, so that an error about the stand-in's type (torch: "got (Missing<...>)")
    # names it.
    meta = type(f"Missing<{path}>", (_MissingMeta,), {})
    return meta(path.rsplit(".", 1)[-1], (), {"_path": path})


def module(path: str) -> Any:
    try:
        return importlib.import_module(path)
    except ImportError:
        return missing(path)


def names(path: str, wanted: list[str]) -> list[Any]:
    mod = module(path)
    out = []
    for n in wanted:
        try:
            out.append(getattr(mod, n) if not isinstance(mod, _MissingMeta) else missing(f"{path}.{n}"))
        except AttributeError:
            out.append(module(f"{path}.{n}"))
    return out


def rewrite(source: str, lib: str) -> str:
    """Replace each peft import statement by guarded calls into `lib`, keeping line numbers."""
    lines = source.splitlines(keepends=True)
    edits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "peft":
            mod = lib + node.module[4:]
            wanted = [a.name for a in node.names]
            targets = [a.asname or a.name for a in node.names]
            code = f"{', '.join(targets)}, = _compat.names({mod!r}, {wanted!r})"
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "peft" for a in node.names):
            parts = []
            for a in node.names:
                real = (lib + a.name[4:]) if a.name.split(".")[0] == "peft" else a.name
                if a.asname:
                    parts.append(f"{a.asname} = _compat.module({real!r})")
                else:
                    parts.append(
                        f"_compat.module({real!r}); {a.name.split('.')[0]} = _compat.module({real.split('.')[0]!r})"
                    )
            code = "; ".join(parts)
        else:
            continue
        edits.append((node.lineno, node.end_lineno, node.col_offset, code))
    for start, end, col, code in sorted(edits, reverse=True):
        indent = lines[start - 1][:col]
        lines[start - 1 : end] = [f"{indent}import run_peft_tests as _compat; {code}\n"] + ["\n"] * (end - start)
    return "".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Pytest plugin hooks (active when pytest runs with `-p run_peft_tests`).
# ----------------------------------------------------------------------------------------------------------------
_RESULTS: dict[str, dict[str, Any]] = {}


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    keep, drop, reasons = [], [], {}
    for item in items:
        reasons[item.nodeid] = why = selected(item)
        (drop if why else keep).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
    if os.environ.get("COMPAT_SELECTION"):  # nodeid -> reason it was deselected (null: kept)
        Path(os.environ["COMPAT_SELECTION"]).write_text(json.dumps(reasons, indent=0))


def pytest_runtest_setup(item: Any) -> None:
    global _IN_TEST
    TOUCHED.clear()
    _IN_TEST = True


def pytest_runtest_teardown(item: Any, nextitem: Any) -> None:
    global _IN_TEST
    _IN_TEST = False


def _first_line(rep: Any) -> str:
    crash = getattr(rep.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(rep.longrepr)
    if isinstance(rep.longrepr, tuple):  # skips: (path, line, reason)
        text = rep.longrepr[2]
    line = text.strip().splitlines()[0][:300] if text.strip() else ""
    return line


try:
    import pytest

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item: Any, call: Any) -> Any:
        outcome = yield
        rep = outcome.get_result()
        if rep.when == "call" and rep.passed and TOUCHED:
            rep.outcome = "failed"
            rep.longrepr = f"MissingError: test used names missing in library: {sorted(set(TOUCHED))}"
        entry = _RESULTS.setdefault(item.nodeid, {"outcome": "passed", "error": "", "seconds": 0.0})
        entry["seconds"] = round(entry["seconds"] + rep.duration, 3)
        if rep.failed and entry["outcome"] != "failed":
            entry.update(outcome="failed" if rep.when == "call" else "error", error=_first_line(rep))
        elif rep.skipped and entry["outcome"] == "passed":
            entry.update(outcome="skipped", error=_first_line(rep))
        if rep.when == "teardown" and os.environ.get("COMPAT_RESULTS"):  # progress survives a killed run
            with open(os.environ["COMPAT_RESULTS"] + "l", "a") as f:
                f.write(json.dumps({item.nodeid: entry}) + "\n")

except ImportError:  # running as a script without pytest importable: hooks are not needed
    pass


def pytest_collectreport(report: Any) -> None:
    if report.failed:
        _RESULTS[report.nodeid] = {"outcome": "collection-error", "error": _first_line(report), "seconds": 0.0}


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("COMPAT_RESULTS")
    if path:
        Path(path).write_text(json.dumps(_RESULTS, indent=0, sort_keys=True))
        Path(path).with_suffix(".missing.json").write_text(json.dumps(sorted(MISSING), indent=0))


# ----------------------------------------------------------------------------------------------------------------
# Tiny local models under the Hub ids that test_decoder_models.py loads.
# ----------------------------------------------------------------------------------------------------------------
TINY = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=128,
)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": (
        "OPTConfig",
        dict(
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=1000,
            word_embed_proj_dim=16,
            max_position_embeddings=128,
        ),
    ),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": (
        "GPT2Config",
        dict(n_embd=16, n_layer=2, n_head=4, vocab_size=1000, n_positions=128),
    ),
    "hf-internal-testing/tiny-random-gpt2": (
        "GPT2Config",
        dict(n_embd=16, n_layer=2, n_head=4, vocab_size=1000, n_positions=128),
    ),
    "peft-internal-testing/tiny-random-GPTJForCausalLM": (
        "GPTJConfig",
        dict(n_embd=16, n_layer=2, n_head=4, vocab_size=1000, n_positions=128, rotary_dim=4),
    ),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": ("LlamaConfig", TINY),
    "hf-internal-testing/tiny-random-MistralForCausalLM": ("MistralConfig", TINY),
    "peft-internal-testing/tiny-dummy-qwen2": ("Qwen2Config", TINY),
    "trl-internal-testing/tiny-Qwen3ForCausalLM": ("Qwen3Config", dict(TINY, head_dim=4)),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        dict(TINY, head_dim=4, sliding_window=16),
    ),
}


def build_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over a fixed vocabulary, built without the Hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 127)]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character, so any text encodes
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def build_models(root: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    tok = build_tokenizer(1000)
    for model_id, (config_name, kwargs) in MODELS.items():
        cfg = getattr(transformers, config_name)(pad_token_id=0, bos_token_id=2, eos_token_id=3, **kwargs)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(root / model_id)
        tok.save_pretrained(root / model_id)


# ----------------------------------------------------------------------------------------------------------------
# Driver and report.
# ----------------------------------------------------------------------------------------------------------------
def extract_tests(peft_repo: Path, dest: Path) -> None:
    if (peft_repo / "tests").is_dir():
        shutil.copytree(peft_repo / "tests", dest / "tests")
        return
    archive = subprocess.run(
        ["git", "--git-dir", str(peft_repo), "archive", "HEAD", "tests"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"peft-tests-{args.lib}-"))
    t0 = time.time()
    extract_tests(Path(args.peft_repo), work)
    for path in (work / "tests").rglob("*.py"):
        src = path.read_text()
        if "peft" in src:
            path.write_text(rewrite(src, args.lib))
    build_models(work)
    t_setup = time.time() - t0
    files = [f"tests/{f}" for f in (args.files or TEST_FILES)]
    results = out / f"{args.lib}.json"
    for stale in (results, Path(str(results) + "l")):
        stale.unlink(missing_ok=True)
    env = dict(
        os.environ,
        COMPAT_RESULTS=str(results),
        COMPAT_SELECTION=str(out / f"{args.lib}.selection.json"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *files,
        "-p",
        "run_peft_tests",
        "-p",
        "no:cacheprovider",
        "-q",
        "--continue-on-collection-errors",
        "--no-header",
        "-rN",
        "--tb=line",
        f"--junitxml={out / f'{args.lib}.junit.xml'}",
    ]
    if importlib.util.find_spec("pytest_timeout"):
        cmd.append(f"--timeout={args.timeout}")
    if args.k:
        cmd += ["-k", args.k]
    cmd += args.pytest_args
    print(" ".join(cmd), flush=True)
    t1 = time.time()
    with open(out / f"{args.lib}.log", "w") as log:
        subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    timing = {
        "lib": args.lib,
        "setup_s": round(t_setup),
        "pytest_s": round(time.time() - t1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "files": files,
        "k": args.k,
    }
    (out / f"{args.lib}.timing.json").write_text(json.dumps(timing, indent=1))
    print(json.dumps(timing), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print("kept", work)


def _group_key(error: str) -> str:
    error = re.sub(r"0x[0-9a-f]+", "0x…", error)
    error = re.sub(r"/tmp/[^\s'\"]+", "/tmp/…", error)
    return error[:200] or "(no message)"


def load_results(path: Path) -> dict[str, Any]:
    """<lib>.json, or the per-test lines <lib>.jsonl of a run that did not finish."""
    if path.exists():
        return json.loads(path.read_text())
    lines = Path(str(path) + "l").read_text().splitlines() if Path(str(path) + "l").exists() else []
    return {k: v for line in lines for k, v in json.loads(line).items()}


def report(out: Path, report_path: Path) -> None:
    peft = load_results(out / "peft.json")
    smol = load_results(out / "smolpeft.json")
    timings = {
        lib: json.loads(p.read_text()) for lib in ("peft", "smolpeft") if (p := out / f"{lib}.timing.json").exists()
    }
    passed = sorted(k for k, v in peft.items() if v["outcome"] == "passed")
    # The rule may have grown since the peft run: leave out what the smolpeft run's collection deselected.
    sel_path = out / "smolpeft.selection.json"
    dropped = {k for k, why in json.loads(sel_path.read_text()).items() if why} if sel_path.exists() else set()
    passed = [k for k in passed if k not in dropped]
    smol_collect_errors = {k: v for k, v in smol.items() if v["outcome"] == "collection-error"}
    both = [k for k in passed if smol.get(k, {}).get("outcome") == "passed"]
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for k in passed:
        r = smol.get(k)
        if r is None:
            module_err = next((v["error"] for m, v in smol_collect_errors.items() if k.startswith(m)), None)
            key = f"not collected: {module_err}" if module_err else "not run/collected under smolpeft"
        elif r["outcome"] == "passed":
            continue
        else:
            key = f"[{r['outcome']}] {_group_key(r['error'])}"
        groups[key].append(k)
    per_file = collections.Counter(k.split("::")[0] for k in passed)
    per_file_ok = collections.Counter(k.split("::")[0] for k in both)
    outcomes = {
        lib: collections.Counter(v["outcome"] for v in res.values())
        for lib, res in (("peft", peft), ("smolpeft", smol))
    }
    lines = [
        "# PEFT test-suite compatibility",
        "",
        "Generated by `compat/run_peft_tests.py` (its docstring says how to run it). Scope: PEFT's test_config.py,",
        "test_custom_models.py, test_initialization.py and test_decoder_models.py, minus items whose id, class or",
        "parameters name another PEFT method, a LoRA variant (DoRA, lora_bias, bias != none, aLoRA, KaSA, VeLoRA, "
        "...),"
        "or a Conv1d/2d/3d, MultiheadAttention or nn.Parameter target (`selected()` in the script: one rule, "
        "both libs).",
        "Items that need the Hub fail under peft too and so drop out of the comparison.",
        "",
    ]
    ratio = f"{len(both) / len(passed):.1%}" if passed else "n/a"
    lines += [f"**peft passes {len(passed)} items; smolpeft passes {len(both)} of them ({ratio}).**", ""]
    if (out / "smolpeft.before.json").exists():  # an earlier smolpeft run kept for comparison
        before = json.loads((out / "smolpeft.before.json").read_text())
        n = sum(before.get(k, {}).get("outcome") == "passed" for k in passed)
        lines += [f"Earlier run kept as smolpeft.before.json: {n} of them ({n / len(passed):.1%}).", ""]
    for lib, c in outcomes.items():
        t = timings.get(lib, {})
        lines.append(
            f"- {lib}: {dict(sorted(c.items()))}; pytest {t.get('pytest_s', '?')} s + setup {t.get('setup_s', '?')} s"
            f" (finished {t.get('finished', '?')})"
        )
    lines += ["", "| file | peft passes | smolpeft passes of those |", "|---|---|---|"]
    for f in sorted(per_file):
        lines.append(f"| {f} | {per_file[f]} | {per_file_ok[f]} |")
    lines += ["", "## Items peft passes and smolpeft does not, grouped by first error line", ""]
    for key, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        tests = collections.Counter(re.sub(r"\[.*", "", k.split("::", 1)[1]) for k in items)
        lines.append(f"### {len(items)} × `{key}`")
        lines.append("")
        shown = ", ".join(f"`{t}` ({n})" for t, n in tests.most_common(12))
        more = f", and {len(tests) - 12} more tests" if len(tests) > 12 else ""
        lines.append(shown + more)
        lines.append("")
    missing_path = out / "smolpeft.missing.json"
    if missing_path.exists():  # names the four test files import from the library that smolpeft lacks
        names = {re.sub(r"\(\)$", "", n) for n in json.loads(missing_path.read_text())}
        names = sorted(
            n
            for n in names
            if not n.endswith("Config")
            and not any(f".tuners.{m}" in n for m in OTHER_METHODS + ["delora", "lokr", "lily"])
        )
        lines += [
            "## Names the tests import that smolpeft lacks (other methods' configs left out)",
            "",
            ", ".join(f"`{n}`" for n in names),
            "",
        ]
    report_path.write_text("\n".join(lines) + "\n")
    print(f"peft passes {len(passed)}; smolpeft passes {len(both)} of those ({ratio}); {len(groups)} failure groups")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peft-repo", help="PEFT bare git repo or checkout (its tests/ are read, never copied into ours)")
    p.add_argument("--lib", choices=["peft", "smolpeft"])
    p.add_argument("--out", default=str(HERE / "results"), help="where <lib>.json, logs and junit xml go")
    p.add_argument("--report", default=str(HERE / "REPORT.md"))
    p.add_argument("--report-only", action="store_true", help="only rebuild REPORT.md from saved results")
    p.add_argument("--timeout", type=int, default=120, help="per-test timeout (pytest-timeout)")
    p.add_argument("--files", nargs="*", help="debug: a subset of " + " ".join(TEST_FILES))
    p.add_argument("-k", help="debug: extra pytest -k expression (the comparison is then partial)")
    p.add_argument("--keep", action="store_true", help="keep the temp working dir")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    args = p.parse_args()
    if not args.report_only:
        if not (args.peft_repo and args.lib):
            p.error("--peft-repo and --lib are required unless --report-only")
        run(args)
    if (Path(args.out) / "peft.json").exists() or (Path(args.out) / "peft.jsonl").exists():
        report(Path(args.out), Path(args.report))


if __name__ == "__main__":
    main()
