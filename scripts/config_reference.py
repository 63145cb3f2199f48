"""Write docs/configuration.md and conf/example.yaml from hvd_infer/config.py (make docs runs it).

    python scripts/config_reference.py           # write both
    python scripts/config_reference.py --check   # exit 1, naming the file, where either is out of date
"""
import os
import sys

from hvd_infer import config_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = {os.path.join("docs", "configuration.md"): config_reference.markdown,
         os.path.join("conf", "example.yaml"): config_reference.example_yaml}


def main(argv) -> int:
    stale = []
    for name, render in FILES.items():
        path, text = os.path.join(ROOT, name), render()
        current = open(path).read() if os.path.exists(path) else None
        if current == text:
            continue
        if "--check" in argv:
            stale.append(name)
        else:
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {name}")
    if stale:
        print(f"{', '.join(stale)} differ from hvd_infer/config.py: run python scripts/config_reference.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
