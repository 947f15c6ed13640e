"""The command line fails early and loses nothing (issue #18): every argument and output path checked before any
work, one-line errors with exit status 2, results written atomically. Core commands here; the real-model commands
and the experiment grids below, on the tiny Llama of tests/test_experiment.py with the expensive steps stubbed out."""

import json

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
    cases = {str(tmp_path): "is a directory", str(tmp_path / "missing" / "p.json"): "does not exist",
             str(foreign): "refusing to overwrite"}
    for path, words in cases.items():
        assert main(["solve", "--plan-out", path]) == 2
        line = _error(capsys)
        assert "--plan-out" in line and words in line, line
    assert foreign.read_text() == '{"mine": true}'


def test_solve_overwrites_its_own_plan(tmp_path, capsys):
    path = tmp_path / "p.json"
    for _ in range(2):
        assert main(["solve", "--plan-out", str(path)]) == 0
    assert Plan.load(path).layers == 30 and [p.name for p in tmp_path.iterdir()] == ["p.json"]


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
