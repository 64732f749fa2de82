"""Point the course at a repository: the Colab/Binder badges and the Colab set-up cell fetch from it.

    python scripts/set_repo.py OWNER/NAME [--branch BRANCH]    # after forking, or to host the course
    python scripts/set_repo.py                                  # re-sync the notebooks with conventions.py

Step 1 rewrites REPO and BRANCH in qlearn/course/conventions.py (the one place they are set).
Step 2 gives every notebooks/*.ipynb the badges line and setup cell of that repository
(`conventions.sync_notebook`: cell 0's badges line and cell 1's source only; nothing re-runs).
Step 3 replaces the old repository's links in README.md and docs/*.md.
Then commit the changed files; tests/test_repo.py checks that they agree.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from qlearn.course import conventions

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+")
BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def configured(root: Path) -> tuple[str, str]:
    """(REPO, BRANCH) as conventions.py under `root` sets them."""
    text = (root / "qlearn" / "course" / "conventions.py").read_text()
    return (re.search(r'^REPO = "([^"]+)"', text, re.MULTILINE).group(1),
            re.search(r'^BRANCH = "([^"]+)"', text, re.MULTILINE).group(1))


def set_repo(root: Path, repo: str | None = None, branch: str | None = None) -> list[Path]:
    """Steps 1-3 under `root`; returns the files changed."""
    import nbformat

    old_repo, old_branch = configured(root)
    repo, branch = repo or old_repo, branch or old_branch
    if not NAME.fullmatch(repo):
        raise SystemExit(f"set_repo: repo must be OWNER/NAME as on GitHub (e.g. alice/qlearn), got {repo!r}")
    if not BRANCH_NAME.fullmatch(branch):
        raise SystemExit(f"set_repo: --branch must be a git branch name (e.g. main), got {branch!r}")
    changed = []
    # Step 1: the one place the repository is configured
    path = root / "qlearn" / "course" / "conventions.py"
    text = path.read_text()
    new = re.sub(r'^REPO = "[^"]+"', f'REPO = "{repo}"', text, count=1, flags=re.MULTILINE)
    new = re.sub(r'^BRANCH = "[^"]+"', f'BRANCH = "{branch}"', new, count=1, flags=re.MULTILINE)
    if new != text:
        path.write_text(new)
        changed.append(path)
    # Step 2: badges line and setup cell of every notebook
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if conventions.sync_notebook(nb, path.name, repo, branch):
            nbformat.write(nb, path)
            changed.append(path)
    # Step 3: README's badges and the clone links of README and docs
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if not path.is_file():
            continue
        text = path.read_text()
        new = conventions.BADGES.sub(lambda _: conventions.badges("00_start_here.ipynb", repo, branch), text)
        new = new.replace(f"github.com/{old_repo}", f"github.com/{repo}")
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", nargs="?", help="OWNER/NAME of the GitHub repository (default: keep conventions.py's)")
    ap.add_argument("--branch", help="the branch Colab and Binder fetch (default: keep conventions.py's)")
    ap.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)  # tests run it on a copy
    args = ap.parse_args(argv)
    changed = set_repo(args.root, args.repo, args.branch)
    repo, branch = configured(args.root)
    print(f"course repository: {repo} (branch {branch}); "
          f"{len(changed)} file{'s' * (len(changed) != 1)} changed")
    for path in changed:
        print(f"  {path.relative_to(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
