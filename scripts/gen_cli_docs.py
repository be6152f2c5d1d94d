"""Regenerate docs/cli.md, the reference of the ``azolla`` command line, from its commands.

Run: ``python scripts/gen_cli_docs.py``; ``python scripts/gen_cli_docs.py --check`` exits
non-zero when the committed page is stale (CI and tests/e2e/test_cli_docs.py check it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from azolla.app.cli_docs import render

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def main() -> int:
    """Write the page, or with ``--check`` compare it; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="fail if docs/cli.md differs from what would be generated")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text(encoding="utf-8") != text:
            print(f"{PAGE} is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
