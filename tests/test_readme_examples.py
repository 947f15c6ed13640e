"""The README's inference-stack example runs as written, on a tiny model (its plan file made here)."""

import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_families import tiny_model
from rdalloc.backends.hf import model_facts
from rdalloc.backends.hf.head_plans import uniform_plan

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_inference_stack_example_runs_and_holds_its_bytes(tmp_path, monkeypatch):
    model, _ = tiny_model("llama", head_dim=32)
    monkeypatch.chdir(tmp_path)
    uniform_plan(model_facts(model), "kivi", 4, tokens=128).save("plan.json")
    ids = torch.randint(5, 100, (2, 96), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    scope = {"model": model, "inputs": {"input_ids": ids, "attention_mask": mask}}
    code = _block("## In an inference stack").replace("retention=0.1", "retention=0.5")  # a tiny context
    exec(compile(code, "README.md", "exec"), scope)
    cache, out = scope["cache"], scope["out"]
    assert cache.nbytes == cache.predicted_nbytes < cache.fp16_nbytes
    assert out.shape[0] == 2 and 96 < out.shape[1] <= 96 + 64  # the joint-compressed generate ran last
