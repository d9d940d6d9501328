"""Fail on a pointer that leads nowhere: dead relative links in Markdown, and files named in code that are not there.

    .venv/bin/python scripts/check_links.py        # exit 1 and one line per problem; run by scripts/check.sh

Checked, over the repository's tracked files (``git ls-files``, so build and benchmark work folders are skipped):

- every Markdown link ``[text](target)`` that is not a URL: the target file exists, relative to the Markdown
  file; a ``#anchor`` on a Markdown target names one of its headings (GitHub's slugs);
- every document named anywhere (code, comments, docs; an upper-case ``NAME.md`` such as a README): it exists,
  relative to the repository root or to the mentioning file;
- every path into the repository's own folders mentioned in code or docs (``docs/…``, ``tasks/…``,
  ``benchmarks/results/…``, …) with a file extension: it exists.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MD_NAME = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[A-Z][A-Z_]+\.md)\b")  # README.md, docs/X.md: documents
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:dda_kernel|storage|tasks|flows|deployments|tests|benchmarks|docs|scripts)/[\w./-]*\w\.(?:py|md|json|yaml|yml|sh|png|toml))\b"
)
TEXT = {".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg", ".txt", ""}
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (``-`` and ``_`` kept), spaces → ``-``."""
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*_]{1,2}", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (fenced code blocks skipped)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {slug(h) for h in HEADING.findall(text)}


SKIP_DIRS = {".git", ".venv", ".bench-work", "dda-data", "__pycache__", "build", "dist", ".cache"}


def tracked(root: Path) -> list[Path]:
    """The repository's text files, relative to ``root``: what git tracks (and untracked files it does not
    ignore); outside a git checkout, every file under ``root`` but work, build and environment folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
        names = [Path(p) for p in out]
    except (OSError, subprocess.CalledProcessError):
        names = [p.relative_to(root) for p in root.rglob("*")
                 if not SKIP_DIRS & set(p.relative_to(root).parts) and not any(
                     part.endswith((".egg-info", "_cache")) for part in p.relative_to(root).parts)]  # fmt: skip
    return [p for p in names if p.suffix in TEXT and (root / p).is_file()]


def _link_problems(root: Path, rel: Path, text: str) -> list[str]:
    problems = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target == "#":
            continue
        file, _, anchor = target.partition("#")
        dest = (root / rel).parent / file if file else root / rel
        if not dest.exists():
            problems.append(f"{rel}: dead link {target!r} ({file} does not exist)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{rel}: dead link {target!r} (no heading #{anchor} in {file or rel.name})")
    return problems


def _mention_problems(root: Path, rel: Path, text: str) -> list[str]:
    problems = []
    named = set(MD_NAME.findall(text)) | set(REPO_PATH.findall(text))
    for name in sorted(named):
        if name.startswith(("http", "/")) or "://" in name:
            continue
        if not ((root / name).exists() or ((root / rel).parent / name).exists()):
            problems.append(f"{rel}: names {name}, which is not in the repository")
    return problems


def problems(root: Path) -> list[str]:
    """Every dead pointer under ``root`` (a git checkout), one line each."""
    out: list[str] = []
    for rel in tracked(root):
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        if rel.suffix == ".md":
            out += _link_problems(root, rel, text)
            text = re.sub(r"\]\([^)\s]*\)", "]", text)  # link targets are checked above, once
        if rel.name != "check_links.py":
            out += _mention_problems(root, rel, text)
    return out


def main() -> int:
    found = problems(Path(__file__).resolve().parents[1])
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
