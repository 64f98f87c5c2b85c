"""``auglocal --help``, ``--version`` and usage errors answer without importing torch (or timm, torchvision).

Each case runs in a fresh interpreter, since this test process has torch loaded already.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "torchvision", "timm", "numpy")

_PROBE = textwrap.dedent(
    """
    import json, sys
    from auglocal_fx.cli.main import main
    try:
        main(sys.argv[2:], prog_name="auglocal")
        code = 0
    except SystemExit as exc:
        code = exc.code
    with open(sys.argv[1], "w") as f:
        json.dump({"code": code, "loaded": sorted(m for m in %r if m in sys.modules)}, f)
    """ % (HEAVY,)
)


def _probe(tmp_path, *args):
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "AUGLOCAL_DEBUG"}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(report), *args], capture_output=True, text=True,
                          timeout=120, env=env)
    assert report.is_file(), done.stderr
    return json.loads(report.read_text()), done.stdout + done.stderr


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        (["-h"], 0),
        (["--version"], 0),
        (["convert", "--help"], 0),
        (["inspect", "--help"], 0),
        (["export", "--help"], 0),
        (["train", "--help"], 0),
        (["zoo", "--help"], 0),
        (["bench", "--help"], 0),
        (["plan", "--help"], 0),
        (["convert"], 2),  # missing argument
        (["convert", "resnet18", "--no-such-option"], 2),  # unknown option
        (["convert", "resnet18", "--layers", "zero"], 2),  # malformed value
        (["no-such-command"], 2),
    ],
)
def test_answers_without_importing_torch(tmp_path, args, code):
    report, output = _probe(tmp_path, *args)
    assert report["code"] == code, output
    assert report["loaded"] == [], f"`auglocal {' '.join(args)}` imported {report['loaded']}"


def test_version_names_the_libraries_without_importing_them(tmp_path):
    import torch

    report, output = _probe(tmp_path, "--version")
    assert report["loaded"] == []
    assert output.startswith("auglocal-fx ") and f"torch {torch.__version__.split('+')[0]}" in output


def test_help_lists_every_command(tmp_path):
    report, output = _probe(tmp_path, "--help")
    for command in ("convert", "inspect", "export", "train", "zoo", "bench", "plan"):
        assert f"  {command}" in output


def test_package_attributes_are_imported_on_first_use():
    done = subprocess.run(
        [sys.executable, "-c", "import json, sys, auglocal_fx; print(json.dumps(['torch' in sys.modules]))"],
        capture_output=True, text=True, timeout=120,
    )
    assert json.loads(done.stdout) == [False], done.stderr

    import auglocal_fx
    import auglocal_fx.convert  # noqa: F401  (the submodules of the same name do not replace the functions)
    import auglocal_fx.train._recipe  # noqa: F401
    from auglocal_fx.convert import convert
    from auglocal_fx.train import train

    assert auglocal_fx.convert is convert and auglocal_fx.train is train
    assert auglocal_fx.hub.create_model is auglocal_fx.create_model
    assert set(auglocal_fx.__all__) <= set(dir(auglocal_fx))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        auglocal_fx.no_such_name
