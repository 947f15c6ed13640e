"""The ``rdalloc`` command: ``solve`` (bundled real problem, flags, problem files, plan output, errors) and the
real-model commands it discovers (light to load, and naming the extra they need)."""

import json
import subprocess
import sys

import pytest

from rdalloc import Plan
from rdalloc.cli import main


def test_bundled_problem_prints_plan_and_certificate(capsys, tmp_path):
    assert main(["solve", "--average-bits", "3", "--plan-out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "layer  K0  K1  K2   V0  V1  V2" in out and '"status_message": "optimal' in out
    cert = json.loads(out[out.index("certificate:") + len("certificate:"):])
    assert cert["budget_used"] <= cert["budget_bits"] and cert["average_bits"] == pytest.approx(3.0)
    plan = Plan.load(tmp_path / "plan.json")
    assert (plan.layers, plan.kv_heads, plan.quantizer) == (30, 3, "kivi")


def test_flags_menu_and_continuous(capsys):
    assert main(["solve", "--alpha", "1,2,4,8", "--eviction", "1,2,4,8", "--sizes", "64", "--metadata", "32",
                 "--menu", "0,1,2,3,4,8,16", "--average-bits", "3"]) == 0
    out = capsys.readouterr().out
    assert "bits: 2 2 3 3" in out
    assert main(["solve", "--alpha", "1,16", "--average-bits", "4", "--continuous"]) == 0
    out = capsys.readouterr().out
    assert "bits: 3.000 5.000" in out


def test_problem_file(tmp_path, capsys):
    p = tmp_path / "problem.json"
    p.write_text(json.dumps({"model": {"kind": "tabulated", "bits": [0, 2, 4], "distortion": [[4, 1, 0.5], [9, 2, 1]]},
                             "sizes": 1.0}))
    assert main(["solve", "--problem", str(p), "--budget", "4"]) == 0
    assert "bits: 2 2" in capsys.readouterr().out


def test_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["solve", "--problem", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="must be a JSON object"):
        main(["solve", "--problem", str(tmp_path / "bad.json")])
    assert main(["solve", "--alpha", "1,2", "--average-bits", "0.5"]) == 2
    assert "infeasible" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["calibrate", "--out", "c.json"], ["eval"],
                                     ["allocate", "--calibration", "c.json", "--average-bits", "3", "--out", "p.json"]])
def test_real_model_commands_without_the_hf_extra_say_what_to_install(command, tmp_path):
    """torch hidden from the import system, as in a core-only install: one line naming the extra, no traceback."""
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "from rdalloc.cli import main\n"
            f"sys.exit(main({command!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"rdalloc: error: 'rdalloc {command[0]}' needs the hf extra (module 'torch' is missing): "
        "pip install 'rdalloc[hf]'"]


@pytest.mark.parametrize("command", [["--help"], ["calibrate", "--help"], ["solve", "--average-bits", "3"]])
def test_help_and_solve_import_no_framework(command, tmp_path):
    """The real-model commands come from the ``rdalloc.commands`` entry point without importing torch."""
    code = ("import sys\n"
            "from rdalloc.cli import main\n"
            "try:\n"
            f"    main({command!r})\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    if command == ["--help"]:
        assert "calibrate" in r.stdout and "allocate" in r.stdout and "eval" in r.stdout
