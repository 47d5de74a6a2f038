"""README.md's examples run: its ```python blocks in order (one namespace), and its `modsplit`
command lines with tiny settings appended (later flags override earlier ones)."""
import importlib.util
import os
import re
import shlex

import pytest

from modsplit.app import cli

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TINY = ["--quiet", "--limit", "300", "--test-limit", "120"]
TINY_BY_COMMAND = {"demo": ["--train-epochs", "8", "--epochs", "1"],
                   "train": ["--epochs", "8"], "decompose": ["--epochs", "1"]}
HAVE_EXPORT = importlib.util.find_spec("modsplit.export") is not None


def blocks(language):
    """The README's fenced code blocks of `language`, as strings."""
    with open(README) as f:
        return re.findall(rf"^```{language}\n(.*?)^```", f.read(), re.S | re.M)


def test_readme_python_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = [b for b in blocks("python") if HAVE_EXPORT or ".export()" not in b]
    assert code
    namespace = {"__name__": "readme"}
    for block in code:
        exec(compile(block, README, "exec"), namespace)


def test_readme_command_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [line for b in blocks("bash") for line in b.splitlines()
             if line.startswith("modsplit ")]
    assert {"demo", "train", "decompose", "compose", "evaluate", "report"} <= {
        line.split()[1] for line in lines}
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0] in ("compose", "demo") and not HAVE_EXPORT:
            continue
        assert cli.main(argv + TINY + TINY_BY_COMMAND.get(argv[0], [])) == 0, line
    assert (tmp_path / "runs" / "fc1-report" / "report.md").is_file()


@pytest.mark.parametrize("command", ["bash .ci/run demo", "bash .ci/run test"])
def test_readme_keeps_the_set_up_commands(command):
    assert any(command in b for b in blocks("bash"))
