"""The README's commands are the ones the project runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block_after(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_quick_start_is_what_scripts_quickstart_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    script = open(os.path.join(ROOT, "scripts", "quickstart.sh")).read()
    lines = [l for l in _block_after(readme, "## Quick start").splitlines() if l.strip()]
    assert lines[0].startswith("MODEL=")  # the script takes the model from the environment
    for line in lines[1:]:
        assert line in script, f"README quick-start line not in scripts/quickstart.sh: {line!r}"


def test_readme_set_up_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    set_up, test = [l.split("#")[0].strip() for l in re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()]
    assert set_up.replace("pip install", "python -m pip install -q") in ci
    assert test in ci
