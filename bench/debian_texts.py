"""A calibration file of another kind of English than the default corpus: paragraphs of the Debian packages' READMEs
and changelogs installed on this machine (one JSON object per line, field ``text``), for the calibration-data sweep
(examples/smollm2-135m-calibration.yaml's ``my-texts.jsonl``).

    python bench/debian_texts.py --out /tmp/measure/readme-cal.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def paragraphs(path: Path, min_chars: int) -> list[str]:
    """The file's blank-line separated paragraphs of at least ``min_chars`` characters, whitespace kept."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return []
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_chars]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--docs", type=Path, default=Path("/usr/share/doc"))
    parser.add_argument("--min-chars", type=int, default=500)
    parser.add_argument("--limit", type=int, default=227)
    args = parser.parse_args()
    files = sorted(p for p in args.docs.glob("*/*") if p.name.lower().startswith(("readme", "changelog")))
    texts = [t for f in files for t in paragraphs(f, args.min_chars)][: args.limit]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    print(f"{len(texts)} paragraphs from {len(files)} files -> {args.out}")


if __name__ == "__main__":
    main()
