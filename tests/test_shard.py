"""Sharded loading's pieces in one process: row reads from safetensors, the meta skeleton, fill under a 1-rank mesh."""

import pytest
import torch
import transformers
from safetensors.torch import save_file

from smolpeft import shard
from smolpeft.loader import load


def test_read_rows_reads_only_the_asked_rows_in_any_dtype(tmp_path):
    a, b = torch.randn(10, 3), torch.randn(7, 2, 2).to(torch.bfloat16)
    save_file({"a": a, "b": b}, tmp_path / "model.safetensors")
    path = str(tmp_path / "model.safetensors")
    data_at, header = shard.read_header(path)
    out = torch.empty(4, 3)
    shard.read_rows(path, data_at, header["a"], 5, out)
    assert torch.equal(out, a[5:9])
    wide = torch.empty(3, 2, 2)  # a bf16 file into an fp32 shard goes through a buffer of the rows only
    shard.read_rows(path, data_at, header["b"], 4, wide)
    assert torch.equal(wide, b[4:7].float())
    with pytest.raises(ValueError, match="do not fit"):
        shard.read_rows(path, data_at, header["a"], 8, torch.empty(4, 3))


def test_meta_load_reads_nothing_and_fill_gives_the_loaded_model(lm, tmp_path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(lm / "base").eval()
    model, *_ = load(str(lm / "base"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ValueError, match="builds a causal LM base"):
        load(str(lm / "base"), device="meta", task_type="SEQ_CLS")
    from torch.distributed.device_mesh import init_device_mesh

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for block in shard.repeated_blocks(model):
            shard.fully_shard(block, mesh=mesh)
        shard.fully_shard(model, mesh=mesh)
        n_bytes = shard.fill(model, model, str(lm / "base"), 0, 1)
        assert n_bytes == sum(p.numel() * 4 for p in ref.parameters())
        ids = torch.tensor([[1, 5, 9, 17, 33]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-6, rtol=0)
    finally:
        torch.distributed.destroy_process_group()
