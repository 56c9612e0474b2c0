"""The README's Python blocks run as pasted (all in one namespace, in order), except those fenced
`python no-run` (they need the hub)."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_quickstart_runs_as_pasted(tmp_path, monkeypatch, capsys):
    code = blocks()
    assert len(code) >= 2, "the README lost its runnable Quickstart blocks"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in code:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "torch.Size([1, 64])" in printed
    assert (tmp_path / "kept.png").is_file()
    stats = namespace["handle"].stats
    assert len(stats.layer_average) == 2 and not namespace["handle"].attached
