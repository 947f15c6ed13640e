"""The fused decode read (backends/hf/fused_decode.py: plain PyTorch path, and the compiled kernel of
backends/hf/fused_kernel.py) against the explicit-gather reference attention."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import tiny_llama  # noqa: E402
from rdalloc.backends.hf import fused_kernel  # noqa: E402
from rdalloc.backends.hf.compat import generate  # noqa: E402
from rdalloc.backends.hf.compress import (  # noqa: E402
    CompressedCache,
    JointAttention,
    compressed_nbytes,
    observe_prefill,
    reference_attention,
    token_weights,
)
from rdalloc.backends.hf.fused_decode import fused_attention, unpack_codes  # noqa: E402
from rdalloc.backends.hf.joint import allocate_joint  # noqa: E402

from rdalloc.bitpack import pack_bits  # noqa: E402
from rdalloc.plan import Plan  # noqa: E402
from rdalloc.quantizers import KIVI, QuaRot, SymmetricAbsmax  # noqa: E402

L, H, HQ, D = 2, 2, 8, 16  # 4 query heads per kv head
SINK, WIN = 3, 4
QUANTIZERS = {"kivi": KIVI(group_size=8), "quarot": QuaRot(), "absmax": SymmetricAbsmax(group_size=8)}


def kv(C: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, C, D, generator=g), torch.randn(L, H, C, D, generator=g)


def make_plan(name: str, C: int, value: np.ndarray, key: np.ndarray) -> Plan:
    q = QUANTIZERS[name]
    # per-channel key bits (joint plans); QuaRot rotates channels together: one key width per head
    key_axes = ("layer", "kv_head") if name == "quarot" else ("layer", "kv_head", "channel")
    value = value.copy()
    value[:, :, :SINK] = 16
    value[:, :, C - WIN:] = 16
    return Plan(key=key, value=value, key_axes=key_axes, value_axes=("layer", "kv_head", "token"), quantizer=q.name,
                meta={"sink": SINK, "window": WIN, "quantizer_spec": q.spec()})


def random_plan(name: str, C: int, widths, seed: int, evict: float = 0.3) -> Plan:
    rng = np.random.default_rng(seed)
    value = rng.choice(widths, size=(L, H, C))
    value[rng.random((L, H, C)) < evict] = 0
    return make_plan(name, C, value, key_bits(name, rng.choice(widths, size=(L, H, D))))


def key_bits(name: str, per_channel: np.ndarray) -> np.ndarray:
    """Key bits the quantizer accepts: per channel (KIVI), constant over each group of 8 channels (absmax), or the
    first channel's width for the whole head (QuaRot)."""
    if name == "quarot":
        return per_channel[:, :, 0]
    if name == "absmax":
        return np.repeat(per_channel[:, :, ::8], 8, axis=2)
    return per_channel


def step(cache: CompressedCache, layer: int, n_new: int, seed: int = 7):
    """Append ``n_new`` random tokens to every row of ``layer``; the query of the last ``n_new``."""
    B = len(cache.layers[layer].rows)
    g = torch.Generator().manual_seed(seed)
    nk, nv = torch.randn(B, H, n_new, D, generator=g), torch.randn(B, H, n_new, D, generator=g)
    if not cache.layers[layer].is_initialized:
        cache.layers[layer].lazy_initialization(nk, nv)
    cache.layers[layer]._append(nk, nv)  # what update() does before handing the attention its pending read
    return torch.randn(B, HQ, n_new, D, generator=g)


@pytest.fixture(params=["plain", "kernel"])
def kernel(request) -> bool:
    """Both fused paths: the plain PyTorch ops and the compiled kernel (skipped where it cannot be built)."""
    if request.param == "kernel" and fused_kernel.load() is None:
        pytest.skip(f"compiled kernel unavailable: {fused_kernel.kernel_error()}")
    return request.param == "kernel"


def check(cache: CompressedCache, n_new: int = 1, steps: int = 1, kernel: bool = False) -> None:
    for layer in range(L):
        for s in range(steps):
            query = step(cache, layer, n_new, seed=7 + s)
            out = fused_attention(cache.layers[layer], query, D ** -0.5, kernel=kernel)
            for b in range(query.shape[0]):
                ref = reference_attention(cache.layers[layer], query[b:b + 1], D ** -0.5, row=b)
                torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_every_width_equals_reference(name, width, kernel):
    C = 45  # odd, not a multiple of the group size: a KIVI key tail group
    keys, values = kv(C, seed=width)
    rng = np.random.default_rng(width)
    value = np.full((L, H, C), width)
    value[rng.random((L, H, C)) < 0.25] = 0  # evicted tokens inside groups
    plan = make_plan(name, C, value, key_bits(name, np.full((L, H, D), width)))
    cache = CompressedCache.compress(keys, values, plan, QUANTIZERS[name])
    assert all(row.fused is not None for layer in cache.layers for row in layer.rows)
    check(cache, n_new=1, steps=2, kernel=kernel)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("n_new", [1, 3])
def test_mixed_widths_gqa_and_several_queries(name, n_new, kernel):
    C = 61
    keys, values = kv(C, seed=3)
    plan = random_plan(name, C, [1, 2, 3, 4, 5, 6, 7, 8, 16], seed=11)
    cache = CompressedCache.compress(keys, values, plan, QUANTIZERS[name])
    check(cache, n_new=n_new, steps=2, kernel=kernel)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_head_without_kept_tokens(name, kernel):
    C = 40
    keys, values = kv(C, seed=5)
    plan = random_plan(name, C, [2, 4, 8], seed=2)
    value = plan.value.copy()
    value[0, 1, SINK:C - WIN] = 0  # layer 0, kv head 1 keeps only its sink and window
    value[1, :, SINK:C - WIN] = 0  # layer 1: no head keeps a middle token
    plan = make_plan(name, C, value, plan.key)
    cache = CompressedCache.compress(keys, values, plan, QUANTIZERS[name])
    assert cache.layers[0].rows[0].fused.kept[1].size == 0
    check(cache, kernel=kernel)


@pytest.mark.parametrize("name", ["kivi", "quarot"])
def test_batch_rows_with_different_plans(name, kernel):
    q = QUANTIZERS[name]
    rows = []
    for b, C in enumerate((37, 50)):
        k, v = kv(C, seed=20 + b)
        rows.append((k[:, None], v[:, None], random_plan(name, C, [2, 3, 4, 8, 16], seed=30 + b, evict=0.2 + 0.3 * b)))
    cache = CompressedCache.compress_rows(rows, q)
    check(cache, n_new=1, steps=3, kernel=kernel)


def test_unpack_codes_inverts_pack_bits():
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        for n in (1, 7, 8, 9, 64, 67):
            codes = torch.randint(0, 2 ** bits, (n,), generator=g, dtype=torch.uint8)
            assert torch.equal(unpack_codes(pack_bits(codes, bits), bits, n), codes)


def test_bytes_held_unchanged_and_buffers_preallocated():
    C = 48
    keys, values = kv(C)
    plan = random_plan("kivi", C, [2, 4, 8, 16], seed=4)
    cache = CompressedCache.compress(keys, values, plan, QUANTIZERS["kivi"])
    assert cache.compressed_nbytes == cache.predicted_nbytes == compressed_nbytes(plan, QUANTIZERS["kivi"],
                                                                                   head_dim=D)
    layer = cache.layers[0]
    reallocated = 0
    ptr = None
    for s in range(40):
        step(cache, 0, 1, seed=s)
        if layer._buffers[0].data_ptr() != ptr:
            reallocated += 1
            ptr = layer._buffers[0].data_ptr()
    assert reallocated <= 3  # 16 -> 32 -> 64 slots: doubling, never per step
    assert layer.keys.shape[-2] == 40 and layer.appended_nbytes == 2 * 2 * H * 40 * D
    assert cache.compressed_nbytes == cache.predicted_nbytes


def _array_bytes(obj, seen=None) -> int:
    """Bytes of the distinct numpy arrays and torch storages reachable from ``obj``'s attributes, dicts and
    sequences (what a compressed row really keeps alive)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        key = ("t", obj.untyped_storage().data_ptr())
        return 0 if key in seen or seen.add(key) else obj.untyped_storage().nbytes()
    if isinstance(obj, np.ndarray):
        base = obj
        while isinstance(base.base, np.ndarray):
            base = base.base
        key = ("n", base.__array_interface__["data"][0])
        return 0 if key in seen or seen.add(key) or base.base is not None else base.nbytes
    if isinstance(obj, dict):
        return sum(_array_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_array_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, Plan)) and not hasattr(obj, "grouping"):
        return sum(_array_bytes(v, seen) for v in vars(obj).values())
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_array_bytes(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return 0


@pytest.mark.parametrize("retention", [0.1, 0.5])
def test_a_compressed_row_keeps_about_its_bytes_not_its_packing_indices(retention):
    """Packing leaves per-element widths and int64 inverse maps in the layouts (several times the packed bytes: the
    joint cache held 24-54x its bytes in RSS). A row read through the fused layout drops them; the reference path
    still works, rebuilding them from the plan."""
    C = 160
    keys, values = kv(C)
    rng = np.random.default_rng(3)
    value = rng.choice([2, 4], size=(L, H, C))
    value[rng.random((L, H, C)) > retention] = 0
    plan = make_plan("kivi", C, value, key_bits("kivi", rng.choice([2, 4], size=(L, H, D))))
    cache = CompressedCache.compress(keys, values, plan, QUANTIZERS["kivi"])
    for layer in cache.layers:
        row = layer.rows[0]
        assert row.fused is not None
        for part in (row.packed.keys, row.packed.values):
            assert part.layout._host is None and not part.layout._device and "elem_bits" not in vars(part.layout)
        held = _array_bytes(row)
        assert held <= 3 * row.nbytes, (held, row.nbytes)  # payload, float16 params, dense float32, fused indices
    query = torch.randn(1, HQ, 1, D)
    step(cache, 0, 1)
    ref = reference_attention(cache.layers[0], query)  # unpacks: the layouts are rebuilt on demand
    got = fused_attention(cache.layers[0], query)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(layers=2, q_heads=8, kv_heads=2, hidden=64, vocab=128)


@pytest.mark.parametrize("name", ["kivi", "quarot"])
def test_generate_same_tokens_as_gather_path(tiny, name):
    q = QUANTIZERS[name] if name != "kivi" else KIVI(group_size=8)
    ids = torch.randint(3, 128, (80,), generator=torch.Generator().manual_seed(1))
    pre = observe_prefill(tiny, ids[:64], window=8)
    plan = allocate_joint(token_weights(pre), pre.keys, pre.values, retention=0.3, quantizer=KIVI(group_size=8),
                          sink=4, window=8)
    if name == "quarot":  # joint plans give keys per-channel bits; QuaRot takes the kept tokens and one key width
        plan = Plan(key=np.full(plan.value.shape[:2], 3), value=plan.value, key_axes=("layer", "kv_head"),
                    value_axes=plan.value_axes, quantizer=q.name, meta={**plan.meta, "quantizer_spec": q.spec()})
    outs = []
    for fused in (False, True):
        cache = CompressedCache.compress(pre.keys, pre.values, plan, q)
        assert all(row.fused is not None for layer in cache.layers for row in layer.rows)  # fused=True reads it
        with torch.no_grad(), JointAttention(tiny, fused=fused):
            outs.append(generate(tiny, cache, ids[None, :65], max_new_tokens=12, min_new_tokens=12, do_sample=False))
        assert cache.compressed_nbytes == cache.predicted_nbytes
        assert cache.get_seq_length() == 64 + 12
    assert torch.equal(outs[0], outs[1])


def test_joint_attention_rejects_bad_fused(tiny):
    with pytest.raises(TypeError, match="fused"):
        JointAttention(tiny, fused="yes")


def test_unsupported_storage_falls_back_with_one_warning(tiny):
    C = 40
    keys, values = kv(C)
    cache = CompressedCache.compress(keys, values, random_plan("kivi", C, [2, 4], seed=1), QUANTIZERS["kivi"])
    for layer in cache.layers:
        for row in layer.rows:
            row.fused, row.fused_reason = None, "test"
    attention = JointAttention(tiny, fused=True)
    attention.attach(cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in cache.layers:
            layer.update(torch.zeros(1, H, 1, D), torch.zeros(1, H, 1, D))
    assert sum("fused decode path" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("fused", [True, False])
def test_both_paths_through_joint_attention_equal_reference(fused):
    C = 53
    keys, values = kv(C, seed=9)
    cache = CompressedCache.compress(keys, values, random_plan("kivi", C, [2, 3, 4, 8, 16], seed=6),
                                     QUANTIZERS["kivi"])
    attention = JointAttention(None, fused=fused)
    attention.attach(cache)
    g = torch.Generator().manual_seed(2)
    for layer in range(L):
        module = type("M", (), {"layer_idx": layer})()
        for _ in range(3):  # three decode steps: the appended buffer grows
            new_k, new_v = torch.randn(1, H, 1, D, generator=g), torch.randn(1, H, 1, D, generator=g)
            k, v = cache.layers[layer].update(new_k, new_v)
            assert (layer in attention.pending) and (k.shape[-2] == cache.layers[layer].keys.shape[-2]) == fused
            query = torch.randn(1, HQ, 1, D, generator=g)
            out, _ = attention.attention(module, query, k, v, None, scaling=D ** -0.5)
            ref = reference_attention(cache.layers[layer], query, D ** -0.5)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not attention.pending


def test_lossless_rows_take_the_exact_path():
    C = 30
    keys, values = kv(C)
    value = np.full((L, H, C), 16)
    cache = CompressedCache.compress(keys, values, make_plan("kivi", C, value, np.full((L, H, D), 16)),
                                     QUANTIZERS["kivi"])
    assert all(row.fused.lossless for layer in cache.layers for row in layer.rows)
    lossy = CompressedCache.compress(keys, values, random_plan("kivi", C, [4, 16], seed=3), QUANTIZERS["kivi"])
    assert not any(row.fused.lossless for layer in lossy.layers for row in layer.rows)
    attention = JointAttention(None, fused=True)
    attention.attach(cache)
    cache.layers[0].update(torch.zeros(1, H, 1, D), torch.zeros(1, H, 1, D))
    assert isinstance(attention.pending.pop(0), tuple)  # the masked-SDPA path's (valid, P, T)


# --- the compiled kernel (backends/hf/fused_kernel.py) ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["kivi", "absmax", "quarot"])
def test_kernel_head_dim_64_group_32(name):
    """The model's shapes: head_dim 64, groups of 32 channels (the kernel's unrolled value loop), 3 query heads per
    kv head, every width, odd length, several key-channel counts per width (the 4-channel key loop's tails)."""
    if fused_kernel.load() is None:
        pytest.skip(f"compiled kernel unavailable: {fused_kernel.kernel_error()}")
    q = {"kivi": KIVI(group_size=32), "absmax": SymmetricAbsmax(group_size=32), "quarot": QuaRot()}[name]
    Lx, Hx, Gx, Dx, C = 1, 2, 3, 64, 77
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(Lx, Hx, C, Dx, generator=g), torch.randn(Lx, Hx, C, Dx, generator=g)
    rng = np.random.default_rng(5)
    widths = [1, 2, 3, 4, 5, 6, 7, 8, 16]
    value = rng.choice(widths, size=(Lx, Hx, C))
    value[rng.random((Lx, Hx, C)) < 0.3] = 0
    value[:, :, :SINK] = 16
    value[:, :, C - WIN:] = 16
    key = rng.choice(widths, size=(Lx, Hx, Dx))
    key_axes = ("layer", "kv_head", "channel")
    if name == "quarot":
        key, key_axes = key[:, :, 0], ("layer", "kv_head")
    elif name == "absmax":
        key = np.repeat(key[:, :, ::32], 32, axis=2)
    plan = Plan(key=key, value=value, key_axes=key_axes, value_axes=("layer", "kv_head", "token"), quantizer=q.name,
                meta={"sink": SINK, "window": WIN, "quantizer_spec": q.spec()})
    cache = CompressedCache.compress(keys, values, plan, q)
    layer = cache.layers[0]
    assert layer.rows[0].fused is not None
    for _ in range(3):
        nk, nv = torch.randn(1, Hx, 1, Dx, generator=g), torch.randn(1, Hx, 1, Dx, generator=g)
        if not layer.is_initialized:
            layer.lazy_initialization(nk, nv)
        layer._append(nk, nv)
        query = torch.randn(1, Hx * Gx, 1, Dx, generator=g)
        ref = reference_attention(layer, query)
        plain = fused_attention(layer, query, kernel=False)
        got = fused_attention(layer, query, kernel=True)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_kernel_builds_where_a_compiler_is():
    """With g++ on PATH the kernel must build and load: a broken build would otherwise hide behind the fallback."""
    if shutil.which("g++") is None and not __import__("os").environ.get("CXX"):
        pytest.skip("no C++ compiler")
    assert fused_kernel.load() is not None, fused_kernel.kernel_error()


def _small_cache():
    C = 40
    keys, values = kv(C, seed=4)
    return CompressedCache.compress(keys, values, random_plan("kivi", C, [2, 4, 16], seed=8), QUANTIZERS["kivi"])


def test_kernel_build_failure_falls_back_with_one_warning(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused_kernel, "_STATE", {})
    monkeypatch.setattr(fused_kernel, "_build", broken)
    cache = _small_cache()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layer in range(L):
            query = step(cache, layer, 1)
            out = fused_attention(cache.layers[layer], query, kernel=True)
            torch.testing.assert_close(out, reference_attention(cache.layers[layer], query), rtol=1e-5, atol=1e-5)
    assert sum("no compiler here" in str(w.message) for w in caught) == 1
    assert fused_kernel.load() is None and "no compiler here" in fused_kernel.kernel_error()


def test_kernel_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(fused_kernel, "_STATE", {})
    monkeypatch.setenv("RDALLOC_FUSED_KERNEL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_kernel.load() is None
    assert "RDALLOC_FUSED_KERNEL" in fused_kernel.kernel_error()


def test_compile_errors_name_the_compiler(tmp_path):
    with pytest.raises(RuntimeError, match="could not run"):
        fused_kernel._compile(tmp_path / "k.so", str(tmp_path / "no-such-g++"))
    false = shutil.which("false")
    if false:
        with pytest.raises(RuntimeError, match="failed"):
            fused_kernel._compile(tmp_path / "k.so", false)
    assert not (tmp_path / "k.so").exists()


def test_float64_queries_take_the_plain_path():
    """The kernel computes in float32 (errors ~1e-7); a float64 query must get the float64 path (the reference
    dequantizes in float32 from float16 parameters, so agreement is ~1e-9, not 1e-15)."""
    cache = _small_cache()
    query = step(cache, 0, 1).double()
    layer = cache.layers[0]
    layer.keys, layer.values = layer.keys.double(), layer.values.double()
    out = fused_attention(layer, query, kernel=True)
    assert out.dtype == torch.float64
    ref = reference_attention(layer, query)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-8, atol=1e-8)


def test_kernel_argument_checked():
    cache = _small_cache()
    query = step(cache, 0, 1)
    with pytest.raises(TypeError, match="kernel"):
        fused_attention(cache.layers[0], query, kernel="yes")
