"""The README's settings table is `python app.py --help`, row for row (settings are declared once, in config.py)."""

from __future__ import annotations

import re
from pathlib import Path

from model_loader.config import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
HELP = re.compile(r"^(?P<help>.*) \[env (?P<env>\w+); default (?P<default>.*)\]$", re.S)


def help_rows() -> list[str]:
    """One Markdown row per setting, read off argparse's help: flag, env, default, meaning."""
    rows = []
    for action in build_parser()._actions:
        m = HELP.match(action.help or "")
        if not m:
            continue
        flag = max(action.option_strings, key=len).replace("--no-", "--[no-]", 1)
        if flag.startswith("--") and f"--no-{flag[2:]}" in action.option_strings:
            flag = f"--[no-]{flag[2:]}"
        default = m["default"].strip("'")
        choices = f" ({', '.join(action.choices)})" if action.choices else ""
        rows.append(f"| `{flag}` | `{m['env']}` | {default or '—'} | {' '.join(m['help'].split())}{choices} |")
    return rows


def readme_rows() -> list[str]:
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- settings table: tests/test_readme.py -->", 1)[1].split("\n\n", 1)[0]
    return [line for line in table.strip().splitlines()[2:]]


def test_readme_settings_table_is_the_help():
    assert readme_rows() == help_rows(), "\n".join(["README table out of date; it should read:", *help_rows()])


def test_readme_user_sections_fit_two_screens():
    text = README.read_text(encoding="utf-8")
    user_part = text.split("\n## More\n", 1)[0]
    table = len(help_rows())
    assert len(user_part.splitlines()) - table <= 80
