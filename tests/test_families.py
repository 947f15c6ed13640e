"""rdalloc.backends.hf across model families (issue #14): tiny random Llama, Qwen2, Qwen3, Mistral and Gemma models
(tests/hf_families.py) in float32 and bfloat16, head_dim 16 and 32; Gemma2's sliding-window layers refused by name;
load_model's device, dtype and attention implementation; the CLI with --device, --dtype and --group-size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_families import FAMILIES, family_config, random_windows, tiny_model  # noqa: E402
from hf_fixtures import logits, save_model_dir  # noqa: E402
from rdalloc.backends.hf import (  # noqa: E402
    TransformCache,
    attention_importance,
    capture_kv,
    fisher_importance,
    identity_transform,
    load_model,
    model_facts,
)
from rdalloc.backends.hf.calibrate import calibrate  # noqa: E402
from rdalloc.backends.hf.capture import single_head_kl  # noqa: E402
from rdalloc.backends.hf.head_plans import (  # noqa: E402
    allocate_plan,
    evaluate_plan,
    plan_cache_factory,
    uniform_plan,
)

from rdalloc import Plan  # noqa: E402
from rdalloc.cli import main  # noqa: E402
from rdalloc.quantizers import get_quantizer  # noqa: E402

DTYPES = ("float32", "bfloat16")
CASES = [(f, d, hd) for f in FAMILIES for d in DTYPES for hd in (16, 32)]
IDS = random_windows(2, 24, seed=1)


def _kivi(head_dim):
    return get_quantizer("kivi", group_size=16 if head_dim == 16 else 32)


def _noise(layer, kind, var, generator):
    """A cache transform adding N(0, var) noise to kv-head 0's K (or V) of ``layer``, another draw per batch row."""

    def transform(layer_idx, key, value):
        if layer_idx != layer:
            return key, value
        x = key if kind == "key" else value
        n = torch.zeros_like(x)
        n[:, 0] = torch.randn(x[:, 0].shape, generator=generator, dtype=x.dtype) * math.sqrt(var)
        return (key + n, value) if kind == "key" else (key, value + n)

    return transform


# ---- the cache and plans: exact where they must be ------------------------------------------------------------------
@pytest.mark.parametrize("family, dtype, head_dim", CASES)
def test_identity_cache_and_16_bit_plan_give_the_plain_logits(family, dtype, head_dim):
    model, config = tiny_model(family, dtype=dtype, head_dim=head_dim)
    facts = model_facts(model)
    assert (facts.head_dim, facts.q_heads, facts.layers) == (head_dim, 4, 2)
    plain = logits(model, IDS)
    assert plain.dtype == getattr(torch, dtype)
    assert torch.equal(logits(model, IDS, TransformCache(identity_transform, config)), plain)
    full = uniform_plan(facts, _kivi(head_dim), 16, tokens=IDS.shape[1])
    assert torch.equal(logits(model, IDS, plan_cache_factory(full, config)()), plain)
    four = uniform_plan(facts, _kivi(head_dim), 4, tokens=IDS.shape[1])
    changed = logits(model, IDS, plan_cache_factory(four, config)())
    assert torch.isfinite(changed).all() and not torch.equal(changed, plain)
    # the error grows as the plan narrows: the plan is really applied, with its group
    two = logits(model, IDS, plan_cache_factory(uniform_plan(facts, _kivi(head_dim), 2, tokens=24), config)())
    err = [(x.float() - plain.float()).abs().mean().item() for x in (changed, two)]
    assert 0 < err[0] < err[1]


@pytest.mark.parametrize("family, dtype, head_dim", CASES)
def test_capture_returns_float32_kv_of_every_head(family, dtype, head_dim):
    model, config = tiny_model(family, dtype=dtype, head_dim=head_dim)
    kv = capture_kv(model, IDS, progress=False)
    kv_heads = config.num_key_value_heads
    assert kv.keys.shape == kv.values.shape == (2, IDS.shape[0], kv_heads, IDS.shape[1], head_dim)
    assert kv.keys.dtype == torch.float32 and torch.isfinite(kv.keys).all()
    # what the attention of layer 1 is handed for window 0 is exactly what was captured (upcast)
    cache = TransformCache(identity_transform, config, keep_transformed=True)
    logits(model, IDS[:1], cache)
    assert torch.equal(cache.layers[1].transformed[0].float(), kv.keys[1, :1])
    assert torch.equal(cache.layers[1].transformed[1].float(), kv.values[1, :1])


# ---- importance: right per (layer, kv_head) in every family --------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_importance_predicts_output_error(family):
    """w * D = E|d(attention block output)|^2 per token, sampled with noise on layer 1's kv-head 0 (GQA 1, 2 and 4,
    q/k norms, Gemma's scaling and head_dim * heads != hidden all go through the estimate)."""
    model, config = tiny_model(family, head_dim=32 if family == "gemma" else 16)
    imp = attention_importance(model, IDS, progress=False)
    samples, var, g = 40, 1e-4, torch.Generator().manual_seed(2)
    seen = {}
    hook = model.model.layers[1].self_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("y", o[0]))
    try:
        logits(model, IDS)
        clean = seen["y"].repeat(samples, 1, 1)
        batch = IDS.repeat(samples, 1)
        for kind in ("key", "value"):
            logits(model, batch, TransformCache(_noise(1, kind, var, g), config))
            err = ((seen["y"] - clean) ** 2).sum(-1).mean().item()
            assert err / var == pytest.approx(getattr(imp, kind)[1, 0], rel=0.12), kind
    finally:
        hook.remove()
    # relative=True divides by the energy of the residual stream entering each layer (Gemma scales its embeddings)
    energy = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, kw, i=i: energy.__setitem__(i, (a[0] if a else kw["hidden_states"]).double().pow(2).sum(-1)
                                                 .mean().item()), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    try:
        logits(model, IDS)
    finally:
        for h in hooks:
            h.remove()
    rel = attention_importance(model, IDS, relative=True, progress=False)
    for kind in ("key", "value"):
        np.testing.assert_allclose(getattr(rel, kind) * np.array([[energy[0]], [energy[1]]]), getattr(imp, kind),
                                   rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fisher_importance_predicts_kl(family):
    """sum w * D = mean KL(p || p_noisy) per token to second order, per layer, for kv-head 0."""
    model, config = tiny_model(family, head_dim=16)
    imp = fisher_importance(model, IDS, samples=16, progress=False)
    samples, var, g = 30, 1e-3, torch.Generator().manual_seed(3)
    clean = torch.log_softmax(logits(model, IDS)[:, :-1].double(), -1).repeat(samples, 1, 1)
    for kind in ("key", "value"):
        for layer in range(2):
            noisy = logits(model, IDS.repeat(samples, 1), TransformCache(_noise(layer, kind, var, g), config))
            noisy = torch.log_softmax(noisy[:, :-1].double(), -1)
            kl = (clean.exp() * (clean - noisy)).sum(-1).mean().item()
            assert kl / var == pytest.approx(getattr(imp, kind)[layer, 0], rel=0.3), (kind, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_importance_agrees_with_float32(family):
    """The same weights (to bf16's rounding of the model) from a bfloat16 model: statistics are upcast."""
    runs = {}
    for dtype in DTYPES:
        model, _ = tiny_model(family, dtype=dtype)
        runs[dtype] = (fisher_importance(model, IDS, labels="data", progress=False),
                       attention_importance(model, IDS, progress=False))
    for a, b in zip(runs["float32"], runs["bfloat16"]):
        for kind in ("key", "value"):
            x, y = getattr(a, kind), getattr(b, kind)
            assert np.isfinite(y).all() and (y > 0).all()
            np.testing.assert_allclose(y, x, rtol=0.15)


# ---- calibrate -> allocate -> evaluate ------------------------------------------------------------------------------
@pytest.mark.parametrize("family, dtype", [(f, d) for f in FAMILIES for d in DTYPES])
def test_calibrate_allocate_evaluate(family, dtype):
    model, _ = tiny_model(family, dtype=dtype, head_dim=16)
    facts = model_facts(model)
    with pytest.raises(ValueError, match="does not divide head_dim=16"):  # KIVI's default group of 32 channels
        calibrate(model, facts, IDS, quantizers=["kivi"], progress=False)
    kivi = get_quantizer("kivi", group_size=16)
    c = calibrate(model, facts, IDS, quantizers=[kivi, "quarot"], probe_bits=(2,), probe_length=16, progress=False)
    assert c.quantizer("kivi").spec() == kivi.spec()
    assert c.importance["fisher"].key.shape == (2, facts.kv_heads)
    assert c.environment["dtype"] == dtype
    plain = evaluate_plan(model, IDS, None, progress=False)
    for q in ("kivi", "quarot"):
        plan = allocate_plan(c, q, 6.0, tokens=IDS.shape[1])
        assert plan.meta["quantizer_spec"] == c.quantizer(q).spec()
        assert plan.usage.average_bits <= 6.0 * (1 + 1e-12)
        r = evaluate_plan(model, IDS, plan, progress=False)
        assert math.isfinite(r.nll) and r.nll != plain.nll
    again = type(c).from_dict(json.loads(json.dumps(c.to_dict())))  # the group survives the JSON round trip
    assert again.quantizer("kivi").spec() == kivi.spec()
    for bad in ({"name": "kivi", "group_size": 0}, {"name": "quarot"}, {"name": "kivi", "groups": 2}):
        d = c.to_dict()
        d["quantizer_specs"]["kivi"] = bad
        with pytest.raises(ValueError, match=r"corrupted calibration: quantizer_specs\['kivi'\]"):
            type(c).from_dict(d)
    with pytest.raises(ValueError, match="not the one this calibration measured"):
        allocate_plan(c, get_quantizer("kivi", group_size=8), 6.0, tokens=24)


# ---- refusals -------------------------------------------------------------------------------------------------------
def _gemma2():
    return tiny_model("gemma2", head_dim=16)


@pytest.mark.parametrize("entry", ["capture", "fisher", "attention", "single_head_kl", "calibrate", "cache",
                                   "head_plan"])
def test_sliding_window_layers_are_refused_by_layer_before_any_work(entry):
    model, config = _gemma2()
    facts = model_facts(model)
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    plan = uniform_plan(facts, _kivi(16), 16, tokens=24) if entry == "head_plan" else None
    run = {"capture": lambda: capture_kv(model, IDS, progress=False),
           "fisher": lambda: fisher_importance(model, IDS, progress=False),
           "attention": lambda: attention_importance(model, IDS, progress=False),
           "single_head_kl": lambda: single_head_kl(model, IDS, "quarot", 2, progress=False),
           "calibrate": lambda: calibrate(model, facts, IDS, quantizers=["quarot"], progress=False),
           "cache": lambda: TransformCache(identity_transform, config),
           "head_plan": lambda: evaluate_plan(model, IDS, plan, progress=False)}[entry]
    try:
        with pytest.raises(ValueError, match=r"layer 0 (of Gemma2Config )?is 'sliding_attention'") as e:
            run()
    finally:
        hook.remove()
    assert "full-attention layers only" in str(e.value) and "[0]" in str(e.value)
    assert calls == []


def test_soft_capped_logits_work_through_the_cache_and_are_refused_by_the_attention_probe():
    config = family_config("gemma2", head_dim=16)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert torch.equal(logits(model, IDS, TransformCache(identity_transform, config)), logits(model, IDS))
    assert fisher_importance(model, IDS, progress=False).key.shape == (2, 2)
    with pytest.raises(ValueError, match=r"layer 0 .*attn_logit_softcapping=50.0"):
        attention_importance(model, IDS, progress=False)
    with pytest.raises(ValueError, match="soft-capped"):
        calibrate(model, model_facts(model), IDS, quantizers=["quarot"], progress=False)
    c = calibrate(model, model_facts(model), IDS, quantizers=["quarot"], importance=["fisher"], progress=False)
    assert c.importance["fisher"].value.shape == (2, 2)


# ---- load_model -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("tiny_gemma")
    model, _ = tiny_model("gemma", head_dim=16)
    save_model_dir(model, d, "The cache holds keys and values of every token; quantize them well. " * 40)
    return d


def test_load_model_honours_device_dtype_and_attention(gemma_dir):
    model, _, facts = load_model(gemma_dir, device="cpu", dtype="bfloat16", attn_implementation="eager",
                                 progress=False)
    assert next(model.parameters()).dtype == torch.bfloat16 and model.device.type == "cpu"
    assert model.config._attn_implementation == "eager" and facts.head_dim == 16
    plain, _, _ = load_model(gemma_dir, progress=False)  # transformers' default attention, float32
    assert next(plain.parameters()).dtype == torch.float32
    assert plain.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kwargs, words", [
    ({"device": "gpu"}, ["device", "'gpu'"]),
    ({"device": "cuda:7"}, ["device", "'cuda:7'"]),
    ({"device": ""}, ["device", "''"]),
    ({"dtype": "int8"}, ["dtype", "'int8'"]),
    ({"attn_implementation": "fast"}, ["attn_implementation", "'fast'"]),
])
def test_load_model_refuses_bad_placement_naming_the_argument(kwargs, words, tmp_path):
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "missing", progress=False, **kwargs)  # checked before the source is even looked at
    assert all(w in str(e.value) for w in words), str(e.value)


# ---- the command line -----------------------------------------------------------------------------------------------
def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_bfloat16_group_16_end_to_end(gemma_dir, tmp_path, capsys):
    calib, plan, result = tmp_path / "c.json", tmp_path / "p.json", tmp_path / "e.json"
    source = ["--model", str(gemma_dir), "--text", str(gemma_dir / "text.txt"), "--length", "32", "--device", "cpu",
              "--dtype", "bfloat16", "--no-progress"]
    assert main(["calibrate", *source, "--windows", "2", "--quantizers", "kivi", "--importance", "fisher,attention",
                 "--group-size", "16", "--out", str(calib)]) == 0
    assert json.loads(calib.read_text())["quantizer_specs"]["kivi"]["group_size"] == 16
    assert main(["allocate", "--calibration", str(calib), "--average-bits", "5", "--tokens", "32",
                 "--out", str(plan)]) == 0
    assert Plan.load(plan).meta["quantizer_spec"] == {"name": "kivi", "group_size": 16}
    capsys.readouterr()
    assert main(["eval", *source, "--windows", "1", "--plan", str(plan), "--out", str(result)]) == 0
    r = json.loads(result.read_text())
    assert math.isfinite(r["nll"]) and r["environment"]["dtype"] == "bfloat16"
    assert r["environment"]["device"] == "cpu" and r["environment"]["attn_implementation"] == "sdpa"
    assert json.loads(calib.read_text())["environment"]["device"] == "cpu"
    assert main(["allocate", "--calibration", str(calib), "--average-bits", "4", "--group-size", "8",
                 "--out", str(plan)]) == 2
    assert "--group-size 8" in _error(capsys)


@pytest.fixture
def no_model_load(monkeypatch):
    import rdalloc.backends.hf as hf

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(hf, "load_model", never)


@pytest.mark.parametrize("command, extra, words", [
    ("calibrate", ["--device", "gpu"], ["--device 'gpu'"]),
    ("calibrate", ["--device", "cuda:9"], ["--device 'cuda:9'", "not available"]),
    ("eval", ["--attn-implementation", "fast"], ["--attn-implementation 'fast'"]),
    ("calibrate", ["--group-size", "0"], ["--group-size", "at least 1"]),
    ("calibrate", ["--group-size", "32"], ["--group-size 32", "head_dim=16"]),
    ("calibrate", [], ["--group-size", "32 channels", "head_dim=16"]),
    ("calibrate", ["--quantizers", "kivi,quarot", "--group-size", "12"], ["--group-size 12", "head_dim=16"]),
    ("eval", ["--plan", "{plan}", "--group-size", "32"], ["--group-size 32:", "head_dim=16"]),
    ("eval", ["--plan", "{plan32}"], ["--plan", "'group_size': 32", "pass --group-size", "head_dim=16"]),
    ("eval", ["--plan", "{plan}", "--group-size", "-1"], ["--group-size", "at least 1"]),
])
def test_cli_refuses_bad_placement_and_groups_before_loading(command, extra, words, gemma_dir, tmp_path,
                                                            no_model_load, capsys):
    plan, plan32 = tmp_path / "p.json", tmp_path / "p32.json"
    uniform_plan(model_facts(tiny_model("gemma", head_dim=16)[0]), _kivi(16), 4, tokens=32).save(plan)
    p32 = uniform_plan(model_facts(tiny_model("gemma", head_dim=32)[0]), _kivi(32), 4, tokens=32)
    Plan(key=p32.key, value=p32.value, quantizer="kivi", meta={**p32.meta, "head_dim": 16}).save(plan32)
    argv = [command, "--model", str(gemma_dir), *[a.format(plan=plan, plan32=plan32) for a in extra]]
    if command == "calibrate":
        argv += ["--out", str(tmp_path / "c.json")]
    assert main(argv) == 2
    line = _error(capsys)
    assert all(w in line for w in words), line
    assert not (tmp_path / "c.json").exists()


def test_cli_refuses_an_unknown_dtype(gemma_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", "--model", str(gemma_dir), "--dtype", "int8", "--out", str(tmp_path / "c.json")])
    assert e.value.code == 2
    assert "--dtype" in capsys.readouterr().err


# ---- on a GPU (skipped without one) ---------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_on_cuda_in_bfloat16(family, gemma_dir):
    import copy

    cpu, config = tiny_model(family, dtype="bfloat16", head_dim=16)
    model = copy.deepcopy(cpu).to("cuda")
    ids, facts = IDS.to("cuda"), model_facts(model)
    plain = logits(model, ids)
    assert torch.equal(logits(model, ids, TransformCache(identity_transform, config)), plain)
    full = uniform_plan(facts, _kivi(16), 16, tokens=IDS.shape[1])
    assert torch.equal(logits(model, ids, plan_cache_factory(full, config)()), plain)
    c = calibrate(model, facts, IDS, quantizers=[_kivi(16)], progress=False)
    reference = fisher_importance(cpu, IDS, labels="data", progress=False)
    np.testing.assert_allclose(fisher_importance(model, IDS, labels="data", progress=False).key, reference.key,
                               rtol=0.15)
    r = evaluate_plan(model, IDS, allocate_plan(c, "kivi", 6.0, tokens=IDS.shape[1]), progress=False)
    assert math.isfinite(r.nll)
    loaded, _, _ = load_model(gemma_dir, device="cuda", dtype="bfloat16", progress=False)
    assert loaded.device.type == "cuda" and next(loaded.parameters()).dtype == torch.bfloat16
