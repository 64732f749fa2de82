"""Make the course's text corpus from the Python documentation sources (offline, reproducible).

Source: Debian's package `python3.11-doc` (the reStructuredText sources of the Python 3.11
documentation, under the PSF License Version 2), fetched with `apt-get download` from Debian's
package archive, the one registry this course may reach. Every `*.rst.txt` under `html/_sources/`
is one document. Documents are split by a hash of their path (about 1 in 25 to validation), so the
split does not depend on file order or on the package's other contents.

Outputs (under --out, default .scratch/corpus, not committed; only the validation split ships):
    train.txt, val.txt   documents joined by a blank line and a form feed
    manifest.json        package version, sha256 of the .deb, document counts, characters
and data/val.txt (the shipped validation split, cut to --val-chars).

    python scripts/make_corpus.py [--deb PATH] [--out .scratch/corpus]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEP = "\n\n\f\n"  # between documents: a form feed the tokenizer keeps as a boundary marker


def fetch_deb(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return next(workdir.glob("python3.11-doc_*.deb"))


def clean(text: str) -> str:
    """Light clean-up: drop rst comment blocks' directives noise is kept (it is real text); only
    collapse runs of blank lines and strip trailing spaces, so the model sees the documents as written."""
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def is_val(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 25 == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deb", type=Path, help="a python3.11-doc .deb (default: apt-get download it)")
    ap.add_argument("--out", type=Path, default=ROOT / ".scratch" / "corpus")
    ap.add_argument("--val-chars", type=int, default=200_000, help="characters of validation text to ship")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = args.deb or fetch_deb(tmp)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        sha = hashlib.sha256(deb.read_bytes()).hexdigest()
        src = next((tmp / "x").glob("usr/share/doc/python3.*/html/_sources"))
        train, val = [], []
        for path in sorted(src.rglob("*.rst.txt")):
            rel = path.relative_to(src).as_posix()
            doc = clean(path.read_text(encoding="utf-8"))
            if len(doc) < 200:
                continue
            (val if is_val(rel) else train).append(doc)
    (args.out / "train.txt").write_text(SEP.join(train), encoding="utf-8")
    (args.out / "val.txt").write_text(SEP.join(val), encoding="utf-8")
    shipped = SEP.join(val)[: args.val_chars]
    shipped = shipped[: shipped.rfind("\n")]  # end on a whole line
    (ROOT / "data").mkdir(exist_ok=True)
    (ROOT / "data" / "val.txt").write_text(shipped + "\n", encoding="utf-8")
    manifest = {"package": "python3.11-doc", "version": version, "deb_sha256": sha,
                "train_docs": len(train), "val_docs": len(val),
                "train_chars": sum(map(len, train)), "val_chars": sum(map(len, val)),
                "shipped_val_chars": len(shipped) + 1}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
