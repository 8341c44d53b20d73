import json

import pytest
import tiny


@pytest.fixture(scope="session")
def lm(tmp_path_factory):
    """A tiny Llama and its locally trained tokenizer in `base/`, chat rows in `chat.jsonl` (messages) and
    arithmetic in `pc.jsonl` (prompt/completion)."""
    d = tmp_path_factory.mktemp("lm")
    tiny.tokenizer(d / "base")
    tiny.llama(vocab=300).save_pretrained(d / "base")
    sums = [(a, b) for a in range(8) for b in range(8)]
    with open(d / "chat.jsonl", "w") as f:
        for a, b in sums[:48]:
            msgs = [
                {"role": "user", "content": f"what is {a} plus {b} ?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b} ."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with open(d / "pc.jsonl", "w") as f:
        for a, b in sums:
            f.write(json.dumps({"prompt": f"what is {a} plus {b} ?", "completion": f" {a + b} ."}) + "\n")
    return d
