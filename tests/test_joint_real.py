"""Joint compression after prefill on the bundled SmolLM2 (slow: loads the real model)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    from rdalloc.backends.hf import load_model, text_windows

    try:
        model, tok, _ = load_model(progress=False)
    except (ImportError, FileNotFoundError, OSError) as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"bundled model unavailable: {e}")
    ids = text_windows(tok, length=576, calibration=1, evaluation=1).evaluation[0]
    return model, ids


def test_bytes_and_nll_at_half_retention(setup):
    from rdalloc.backends.hf.compat import forward
    from rdalloc.backends.hf.compress import CompressedCache, JointAttention, observe_prefill, token_weights
    from rdalloc.backends.hf.joint import allocate_joint

    model, ids = setup
    C = 512
    pre = observe_prefill(model, ids[:C], window=32)
    plan = allocate_joint(token_weights(pre), pre.keys, pre.values, retention=0.5, sink=4, window=8)
    cache = CompressedCache.compress(pre.keys, pre.values, plan)
    assert cache.compressed_nbytes == cache.predicted_nbytes
    assert 0.45 < cache.retention <= 0.5 + 1e-3
    with torch.no_grad():
        full = model(ids[None]).logits[0, C:-1]
        with JointAttention(model):
            comp = forward(model, cache, ids[None, C:]).logits[0, :-1]
    tgt = ids[C + 1:]
    nll = lambda lg: float(-torch.log_softmax(lg.float(), -1).gather(-1, tgt[:, None]).mean())  # noqa: E731
    assert abs(nll(comp) - nll(full)) < 0.05, (nll(comp), nll(full))


def test_joint_grid_on_the_real_model(tmp_path, capsys):
    import json

    from experiments import joint_grid

    out = tmp_path / "joint"
    assert joint_grid.main(["--retentions", "0.5", "--windows", "1", "--length", "256", "--no-progress",
                            "--out", str(out)]) == 0
    assert "joint-global" in capsys.readouterr().out
    result = json.loads((out / "joint_1x256.json").read_text())
    assert result["rows"], result


def test_one_call_on_a_left_padded_batch(setup):
    """``compress_after_prefill`` on the real model: two sequences of 160 and 128 tokens, left-padded, half retention
    each; the bytes held are the plans' prediction and each row's continuation NLL stays near its full cache's."""
    from rdalloc.backends.hf import compress_after_prefill
    from rdalloc.backends.hf.compat import forward
    from transformers.cache_utils import DynamicCache

    model, ids = setup
    C, M, short = 160, 24, 128
    seqs = [ids[:C + M], ids[C + M:2 * C + 2 * M][C - short:]]  # 160 + 24 and 128 + 24 tokens of other text
    batch = torch.zeros(2, C + M, dtype=torch.long)
    mask = torch.zeros(2, C + M, dtype=torch.long)
    for row, s in enumerate(seqs):
        batch[row, C + M - len(s):], mask[row, C + M - len(s):] = s, 1
    with torch.no_grad():
        full = [model(s[None]).logits[0, -M:-1] for s in seqs]
        with compress_after_prefill(model, retention=0.5, sink=4, window=8) as press:
            cache = DynamicCache(config=model.config)
            forward(model, cache, batch[:, :C], attention_mask=mask[:, :C])
            comp = forward(model, cache, batch[:, C:], attention_mask=mask).logits[:, :-1]
    assert [p.tokens for p in press.plans] == [C, short]
    assert press.cache.compressed_nbytes == press.cache.predicted_nbytes
    assert all(p.usage.total_bits <= p.budget_bits for p in press.plans)
    def nll(logits, targets):
        return float(-torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).mean())

    for row, s in enumerate(seqs):
        tgt = s[-M + 1:]
        assert abs(nll(comp[row], tgt) - nll(full[row], tgt)) < 0.1, (row, nll(comp[row], tgt), nll(full[row], tgt))
