"""Ctrl-C while the command line starts up: exit 130 with one line, not numpy's import error."""

from __future__ import annotations

import signal
import subprocess
import sys

from npystream.cli import main


def test_early_interrupt_exits_130_quietly():
    code = (
        "import os, signal, time\n"
        "from npystream.cli import _quit_on_interrupt\n"
        "assert _quit_on_interrupt() is signal.default_int_handler\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(10)\n"
        "print('not reached')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130
    assert r.stderr.strip() == "npystream: interrupted"
    assert "not reached" not in r.stdout


def test_main_with_argv_leaves_the_handler_alone(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    assert main(["info", str(tmp_path / "missing.npy")]) == 1
    assert signal.getsignal(signal.SIGINT) is before


def test_command_line_restores_the_handler_after_start_up():
    code = (
        "import signal, sys\n"
        "import npystream.cli as cli\n"
        "seen = []\n"
        "real = cli.build_parser\n"
        "def spy():\n"
        "    seen.append(signal.getsignal(signal.SIGINT) is cli._early_interrupt)\n"
        "    return real()\n"
        "cli.build_parser = spy\n"
        "sys.argv = ['npystream', '--help']\n"
        "rc = cli.main()\n"
        "print(seen, signal.getsignal(signal.SIGINT) is signal.default_int_handler, rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "[True] True 0", r.stdout + r.stderr
