"""The `radis` console command: help at every level, clear config errors."""
import subprocess
import sys

import pytest

from radis.cli import SUBCOMMANDS, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radis.cli", *args], capture_output=True, text=True, timeout=120, check=False)


def test_top_level_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help(name):
    out = run_cli(name, "--help")
    assert out.returncode == 0, out.stderr
    assert f"radis {name}" in out.stdout


def test_unknown_subcommand_fails():
    assert run_cli("frobnicate").returncode == 2


def test_config_error_is_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {max_tokenz: 5}\n")
    assert main(["inspect-data", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "max_tokenz" in err and str(bad) in err


def test_overrides_before_and_after_options(tmp_path, capsys):
    """`key=value` overrides on both sides of an option: argparse's plain parse_args took
    the first group and refused the second ("unrecognized arguments"), which broke the
    generate stage of `make demo`."""
    main(["inspect-data", "--config", str(tmp_path / "absent.yaml"), "data.max_tokens=64", "--num", "1",
          "train.lr=1e-5"])
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "absent.yaml" in err
