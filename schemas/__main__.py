"""python -m schemas export | check"""

from __future__ import annotations

import sys

from schemas.export import drifted, export


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "export"
    if command == "export":
        for path in export():
            print(path)
        return 0
    if command == "check":
        stale = drifted()
        for name in stale:
            print(f"{name}: schema file is out of date; run `python -m schemas export`", file=sys.stderr)
        return 1 if stale else 0
    print("usage: python -m schemas [export|check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
