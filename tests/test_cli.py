"""The command line: every command is listed, and a command imports only its own module."""

import subprocess
import sys

import pytest

from engine.cli import COMMANDS, build_parser


def test_help_lists_every_command():
    text = build_parser().format_help()
    assert all(name in text for name in COMMANDS)


@pytest.mark.parametrize("command", ["fit", "flops"])
def test_analysis_commands_do_not_import_torch(command):
    """`ceiling fit --help` (pure analysis) starts without torch or transformers (a fresh interpreter)."""
    code = (f"import sys\nfrom engine.cli import main\ntry:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
