"""Data loading: bad files are reported by file and line, and a huge row costs no more than max_length."""

import json

import pytest
import transformers

from smolpeft.config import TaskType
from smolpeft.data import CHARS_PER_TOKEN, Dataset, encode, load_data, load_user_data


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv"])
def test_empty_file_names_the_file(tmp_path, ext):
    f = tmp_path / f"empty.{ext}"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{f}: the file is empty"):
        load_user_data(str(f))


def test_bad_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(ValueError, match=rf"{f}: line 3: invalid JSON \(Expecting ',' delimiter at column 13\)"):
        load_user_data(str(f))
    f.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(ValueError, match=f"{f}: line 2: expected a JSON object, found list"):
        load_user_data(str(f))


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_non_utf8_names_file_and_line(tmp_path, ext):
    f = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    else:
        f.write_bytes(b"text,label\nfine,a\ncaf\xe9,b\n")
    line = 2 if ext == "jsonl" else 3
    with pytest.raises(ValueError, match=rf"{f}: line {line}: not UTF-8 text \(byte 0xe9 at column"):
        load_user_data(str(f))


def test_unreadable_csv_names_the_file(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('text,label\n"unclosed,a\n')
    with pytest.raises(ValueError, match=f"{f}: could not be read as CSV"):
        load_user_data(str(f))


class _Recording:
    """A tokenizer wrapper that records the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_huge_row_is_cut_before_tokenizing(lm):
    tok = _Recording(transformers.AutoTokenizer.from_pretrained(lm / "base"))
    huge = "the quick brown fox " * 500_000  # 10 MB
    for ds in (
        Dataset([{"text": huge, "label": "a"}], [], TaskType.SEQ_CLS, ["a"], "x.jsonl"),
        Dataset([{"prompt": huge, "completion": "done"}], [], TaskType.CAUSAL_LM, name="x.jsonl"),
        Dataset([{"text": huge}], [], TaskType.CAUSAL_LM, name="x.jsonl"),
    ):
        tok.longest = 0
        examples, truncated = encode(ds, "train", tok, 32)
        assert truncated == 1 and len(examples[0]["input_ids"]) == 32
        assert tok.longest <= 32 * CHARS_PER_TOKEN
    # the cut keeps the tokens a whole-text tokenization keeps
    small = "the quick brown fox " * 400
    whole = tok.tok(small)["input_ids"][:32]
    assert (
        encode(Dataset([{"text": small}], [], TaskType.CAUSAL_LM, name="x"), "train", tok, 32)[0][0]["input_ids"]
        == whole
    )


def test_library_errors_do_not_name_cli_flags(tmp_path):
    from smolpeft.train import TrainConfig, train

    with pytest.raises(ValueError, match="model is needed for chat/text data") as e:
        train(TrainConfig(task="chat", output_dir=str(tmp_path / "o")), log=lambda *_: None)
    assert "--" not in str(e.value)
    with pytest.raises(ValueError) as e:
        load_data(str(tmp_path / "d.jsonl"), "sentiment")
    assert "--" not in str(e.value)
    bad = tmp_path / "d.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="1 row; need at least 2"):
        load_data(str(bad), None)
    bad.write_text(2 * (json.dumps({"text": "x"}) + "\n"))
    with pytest.raises(ValueError) as e:
        load_data(str(bad), None, labels=["a"])
    assert "--" not in str(e.value)
