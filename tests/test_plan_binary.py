"""Plans at scale: the compact binary ``.npz`` form beside JSON. Round trips bit for bit, the two forms load to equal
plans, corruption and pickles are refused, the suffix chooses the form, a failed save leaves nothing behind."""

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdalloc import ExponentialModel, Plan, allocate
from rdalloc.cost import Usage
from rdalloc.plan import NPZ_HEADER, NPZ_VERSION, PLAN_VERSION, plan_format

TOKEN = ("layer", "kv_head", "token")
CHANNEL = ("layer", "kv_head", "channel")


def head_plan() -> Plan:
    """A solved head plan with eviction (0) and full precision (16) in it, certificate and usage recorded."""
    alpha = np.geomspace(1e-4, 1e3, 12)
    model = ExponentialModel(alpha, 4.0, eviction=1.01 * alpha, quantizer="kivi")
    alloc = allocate(model, 4096.0, average_bits=7.0, metadata=4096.0, menu=(0, 2, 4, 8, 16))
    plan = Plan.from_allocation(alloc, (2, 3), model=model,
                                meta={"model": "tiny", "head_dim": 64, "menu": (0, 2, 4, 8, 16),
                                      "quantizer_spec": {"name": "kivi", "group_size": 32}, "source": "tést ✓"})
    assert {0, 16} <= set(np.concatenate([plan.key.ravel(), plan.value.ravel()]).tolist())
    return plan


def token_plan(key_axes=TOKEN, shape=(3, 2, 257), seed=0) -> Plan:
    rng = np.random.default_rng(seed)
    value = rng.choice([0, 1, 2, 3, 4, 8, 16], size=shape)
    key = (np.where(value == 0, 0, rng.choice([2, 4, 16], size=shape)) if key_axes == TOKEN
           else rng.choice([2, 4, 8, 16], size=shape[:2] + (64,)))
    return Plan(key=key, value=value, key_axes=key_axes, value_axes=TOKEN, quantizer="quarot", budget_bits=1e9,
                usage=Usage(123456.0, 789.0, 4096.0), predicted_distortion=0.125,
                certificate={"gap": float("inf"), "lower_bound": float("nan"), "status": ["optimal", "limit"]},
                meta={"model": "tiny", "head_dim": 64})


def assert_identical(a: Plan, b: Plan) -> None:
    """Every field, bit for bit (the bits' dtype and shape included)."""
    for role in ("key", "value"):
        x, y = getattr(a, role), getattr(b, role)
        assert x.dtype == y.dtype == np.int8 and x.shape == y.shape and np.array_equal(x, y)
    for name in ("key_axes", "value_axes", "quantizer", "budget_bits", "usage", "predicted_distortion", "version",
                 "granularity", "layers", "kv_heads", "tokens"):
        assert getattr(a, name) == getattr(b, name), name
    assert json.dumps(a.to_dict()["certificate"]) == json.dumps(b.to_dict()["certificate"])
    assert json.dumps(a.to_dict()["meta"]) == json.dumps(b.to_dict()["meta"])
    assert a == b and a.to_dict() == b.to_dict()


PLANS = {"head": head_plan, "token": token_plan, "token, channel keys": lambda: token_plan(CHANNEL)}


# ---- round trips ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", PLANS.values(), ids=PLANS.keys())
def test_round_trip_bit_for_bit_in_both_forms(make, tmp_path):
    plan = make()
    plan.save(tmp_path / "p.npz")
    plan.save(tmp_path / "p.json")
    from_npz, from_json = Plan.load(tmp_path / "p.npz"), Plan.load(tmp_path / "p.json")
    assert_identical(from_npz, plan)
    assert_identical(from_json, plan)
    assert_identical(from_npz, from_json)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.npz"]


def test_the_npz_holds_uint8_widths_and_a_json_header(tmp_path):
    plan = token_plan()
    plan.save(tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(["key", "value", NPZ_HEADER])
        key, value, header = z["key"], z["value"], json.loads(z[NPZ_HEADER][()])
    assert key.dtype == value.dtype == np.uint8 and value.shape == (3, 2, 257)
    assert np.array_equal(value, plan.value) and np.array_equal(key, plan.key)
    assert header["format"] == "rdalloc.plan" and header["npz_version"] == NPZ_VERSION
    assert header["version"] == PLAN_VERSION and header["granularity"] == "token" and header["quantizer"] == "quarot"
    assert header["value"] == {"axes": list(TOKEN), "shape": [3, 2, 257]} and header["digest"].startswith("sha256:")
    assert header["certificate"]["gap"] == "inf" and header["meta"] == {"model": "tiny", "head_dim": 64}
    assert (tmp_path / "p.npz").stat().st_size < 2 * 3 * 2 * 257 + 4096  # one byte a width, plus the zip and header


def test_suffix_chooses_the_form_and_load_reads_by_content(tmp_path):
    plan = head_plan()
    assert plan_format("a/p.json") == "json" and plan_format("P.NPZ") == "npz"
    plan.save(tmp_path / "upper.NPZ")
    assert zipfile.is_zipfile(tmp_path / "upper.NPZ")
    os.replace(tmp_path / "upper.NPZ", tmp_path / "renamed.bin")  # load tells the forms apart by content
    assert Plan.load(tmp_path / "renamed.bin") == plan
    (tmp_path / "fake.npz").write_text(json.dumps(plan.to_dict()))
    with pytest.raises(ValueError, match=r"fake.npz: not an npz \(zip\) archive"):
        Plan.load(tmp_path / "fake.npz")


@pytest.mark.parametrize("name, words", [("p.txt", "suffix '.txt'"), ("plan", "no suffix"),
                                         ("p.json.bak", "suffix '.bak'")])
def test_an_unknown_suffix_is_refused_naming_the_path(name, words, tmp_path):
    with pytest.raises(ValueError, match=rf"must end in .json \(JSON\) or .npz .*{name}'.*{words}"):
        head_plan().save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_plans_compare_by_content():
    plan = token_plan()
    assert plan == token_plan() and plan != token_plan(seed=1) and plan != head_plan() and plan != "plan"
    other = Plan(key=plan.key, value=plan.value, key_axes=TOKEN, value_axes=TOKEN, quantizer="quarot")
    assert plan != other  # same bits, other fields
    with pytest.raises(TypeError):
        hash(plan)


# ---- corruption ----------------------------------------------------------------------------------------------------
def rewrite(path: Path, **entries) -> None:
    """Rewrite the npz at ``path`` with some entries replaced (None drops one): a valid zip of other content."""
    with np.load(path, allow_pickle=False) as z:
        d = {name: z[name] for name in z.files}
    d.update(entries)
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in d.items() if v is not None})


def header(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return json.loads(z[NPZ_HEADER][()])


def test_every_flipped_byte_is_refused_or_changes_nothing(tmp_path):
    """Flip each byte of a small npz plan in turn: a ValueError naming the file, or (zip timestamps and the like) the
    very plan written; flips inside the widths are always refused."""
    plan = token_plan(shape=(1, 2, 40))
    path = tmp_path / "p.npz"
    plan.save(path)
    raw = path.read_bytes()
    refused = []
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x10
        path.write_bytes(bytes(flipped))
        try:
            back = Plan.load(path)
        except ValueError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e), e
            refused.append(i)
            continue
        assert_identical(back, plan)
    start = raw.index(np.ascontiguousarray(plan.value, dtype=np.uint8).tobytes())
    assert set(range(start, start + plan.value.size)) <= set(refused)
    assert len(refused) > len(raw) // 2


def test_a_consistent_edit_of_the_widths_is_caught_by_the_digest(tmp_path):
    path = tmp_path / "p.npz"
    token_plan().save(path)
    value = token_plan().value.astype(np.uint8)
    key = token_plan().key.astype(np.uint8)
    value[0, 0, np.argmax(value[0, 0] == 2)] = 3  # still a valid plan, but not the one written
    rewrite(path, value=value, key=key)
    with pytest.raises(ValueError, match=r"p.npz: corrupted plan: its content does not match its digest"):
        Plan.load(path)


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update(budget_bits=2e9), "does not match its digest"),
    (lambda h: h["meta"].update(model="other"), "does not match its digest"),
    (lambda h: h.pop("digest"), "the npz header has no digest"),
    (lambda h: h.update(npz_version=NPZ_VERSION + 1), f"npz plan format version {NPZ_VERSION + 1} is newer than "
                                                      f"this rdalloc reads \\({NPZ_VERSION}\\): upgrade rdalloc"),
    (lambda h: h.update(npz_version="1"), "npz_version must be a positive integer, got '1'"),
    (lambda h: h.update(version=PLAN_VERSION + 1), "written by a newer rdalloc: upgrade rdalloc"),
    (lambda h: h.update(format="other"), "not an rdalloc plan: format='other'"),
    (lambda h: h["value"].update(shape=[3, 2, 256]), r"'value' entry has shape \(3, 2, 257\), but the header says"),
    (lambda h: h["key"].update(axes=["layer", "token"]), "key_axes must be one of"),
    (lambda h: h.update(granularity="head"), "says granularity 'head'"),
    (lambda h: h.update(quantizer="nope"), "quantizer 'nope' is not a registered quantizer"),
    (lambda h: h["usage"].update(elements="1"), "usage.elements must be a number or None, got str '1'"),
])
def test_edited_metadata_is_refused(edit, match, tmp_path):
    path = tmp_path / "p.npz"
    token_plan().save(path)
    h = header(path)
    edit(h)
    rewrite(path, **{NPZ_HEADER: np.array(json.dumps(h).encode())})
    with pytest.raises(ValueError, match=match):
        Plan.load(path)


@pytest.mark.parametrize("entries, match", [
    ({"key": np.array([{"evil": 1}], dtype=object)}, "'key' holds pickled Python objects: refused"),
    ({NPZ_HEADER: np.array({"format": "rdalloc.plan"}, dtype=object)}, "'plan' holds pickled Python objects"),
    ({"value": None}, r"exactly the entries \['key', 'plan', 'value'\], got \['key', 'plan'\]"),
    ({"extra": np.zeros(3)}, r"got \['extra', 'key', 'plan', 'value'\]"),
    ({NPZ_HEADER: None}, "the npz archive has no 'plan' entry"),
    ({NPZ_HEADER: np.frombuffer(b'{"format": "rdalloc.plan"}', np.uint8)}, "'plan' entry must be a JSON string"),
    ({NPZ_HEADER: np.array(b"{not json")}, "'plan' entry is not valid JSON"),
    ({NPZ_HEADER: np.array('{"format": "rdalloc.plan"}')}, "'plan' entry must be a JSON string, got an array of "
                                                            "dtype <U"),
    ({"value": np.zeros((3, 2, 257), dtype=np.int64)}, "'value' entry must be a uint8 array, got dtype int64"),
    ({"value": np.full((3, 2, 257), 17, dtype=np.uint8)}, r"value bits must be integers in \[0, 16\], got 17"),
])
def test_foreign_or_pickled_entries_are_refused(entries, match, tmp_path):
    path = tmp_path / "p.npz"
    token_plan().save(path)
    with np.load(path, allow_pickle=False) as z:
        d = {name: z[name] for name in z.files}
    d.update(entries)
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v for k, v in d.items() if v is not None})  # savez pickles object arrays
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=match):
        Plan.load(path)


def test_truncated_or_foreign_archives(tmp_path):
    path = tmp_path / "p.npz"
    token_plan().save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="p.npz: corrupted npz"):
        Plan.load(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match=r"no 'plan' entry \(entries: \['readme.txt'\]\)"):
        Plan.load(path)


# ---- atomic saves --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["p.npz", "p.json"])
def test_a_failed_save_leaves_no_partial_file_and_keeps_the_old_one(name, tmp_path, monkeypatch):
    path = tmp_path / name
    old = head_plan()
    old.save(path)
    before = path.read_bytes()
    new = token_plan()

    def full(f, *args, **kwargs):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    target = "_write_npz" if name.endswith(".npz") else "_write_json"
    monkeypatch.setattr(Plan, target, lambda self, f: full(f))
    with pytest.raises(OSError, match="No space left on device"):
        new.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [name]
    monkeypatch.undo()

    def no_rename(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr("rdalloc._io.os.replace", no_rename)
    with pytest.raises(PermissionError):
        new.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [name]
    monkeypatch.undo()
    new.save(path)
    assert Plan.load(path) == new and [p.name for p in tmp_path.iterdir()] == [name]


def test_a_saved_file_has_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        head_plan().save(tmp_path / "p.npz")
    finally:
        os.umask(umask)
    assert (tmp_path / "p.npz").stat().st_mode & 0o777 == 0o644


# ---- any small plan --------------------------------------------------------------------------------------------
@st.composite
def plans(draw) -> Plan:
    """Small valid plans: head or token granularity (keys per head, per channel or per token; eviction coinciding),
    bits anywhere in [0, 16], optional fields present or not, non-finite certificate entries, unicode meta."""
    layers, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    widths = st.integers(0, 16)

    def bits(shape):
        return np.asarray(draw(st.lists(widths, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
                          ).reshape(shape)

    kind = draw(st.sampled_from(["head", "channel", "token", "token keys"]))
    if kind == "head":
        key, value, ka, va = bits((layers, heads)), bits((layers, heads)), ("layer", "kv_head"), ("layer", "kv_head")
    else:
        tokens = draw(st.integers(1, 9))
        value, va = bits((layers, heads, tokens)), TOKEN
        if kind == "channel":
            key, ka = bits((layers, heads, draw(st.integers(1, 8)))), CHANNEL
        elif kind == "token":
            key, ka = np.where(value == 0, 0, np.maximum(bits(value.shape), 1)), TOKEN
        else:
            key, ka = bits((layers, heads)), ("layer", "kv_head")
    numbers = st.none() | st.floats(0, 1e12, allow_nan=False)
    payload, metadata = draw(st.floats(0, 1e9)), draw(st.floats(0, 1e9))
    usage = draw(st.none() | st.just(Usage(payload, metadata, draw(st.floats(0, 1e9)))))
    budget = draw(st.none() | st.floats(payload + metadata, 1e19)) if usage is not None else draw(numbers)
    scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=5)
    return Plan(key=key, value=value, key_axes=ka, value_axes=va, quantizer=draw(st.sampled_from([None, "kivi"])),
                budget_bits=budget, usage=usage, predicted_distortion=draw(numbers),
                certificate=draw(st.dictionaries(st.text(max_size=4), scalars, max_size=3)),
                meta=draw(st.fixed_dictionaries({}, optional={"model": st.text(max_size=6),
                                                              "head_dim": st.integers(1, 256)})))


@settings(max_examples=60, deadline=None)
@given(plan=plans())
def test_any_small_plan_round_trips_in_both_forms(plan):
    with tempfile.TemporaryDirectory() as d:
        for name in ("p.npz", "p.json"):
            plan.save(Path(d) / name)
        from_npz, from_json = Plan.load(Path(d) / "p.npz"), Plan.load(Path(d) / "p.json")
    assert_identical(from_npz, from_json)
    assert np.array_equal(from_npz.key, plan.key) and np.array_equal(from_npz.value, plan.value)
    assert from_npz == plan and from_npz.to_dict() == plan.to_dict()
