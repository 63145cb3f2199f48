"""Write docs/configuration.md and conf/example.yaml from hvd_infer/config.py (make docs runs it).

    python scripts/config_reference.py           # write both
    python scripts/config_reference.py --check   # exit 1, naming the file, where either is out of date
"""
import os
import sys

from hvd_infer.config_reference import EXAMPLE_VALUES, sections, wrap, yaml_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def markdown() -> str:
    """docs/configuration.md."""
    lines = ["# Configuration reference", "",
             "Every key of a job's YAML, its type, default and meaning. A key is set in the YAML file given with",
             "`--config`, or on the command line as `section.key=value`, which overrides the file. Paths in the",
             "file are relative to the file; paths on the command line are relative to the working directory.",
             "`hvd-infer --config-keys` prints this list, `hvd-infer --config FILE --print-config` prints the job",
             "as it will run, and `conf/example.yaml` holds every key at its default.", ""]
    for section, keys in sections().items():
        lines += [f"## {section}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for k in keys:
            default = "required" if k.name in EXAMPLE_VALUES else f"`{yaml_value(k.default)}`"
            cells = [f"`{k.name}`", k.type, default, k.doc]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def example_yaml() -> str:
    """conf/example.yaml: every key at its default (the paths at an example), its description above it."""
    lines = ["# Every key of a job, at its default, with what it does (docs/configuration.md is the same list).",
             "# Run:  hvd-infer -np 4 --config conf/example.yaml [section.key=value ...]",
             "#   or: torchrun --nproc-per-node 4 -m hvd_infer --config conf/example.yaml",
             "# Relative paths are relative to this file; command-line overrides are relative to the working directory."]
    for section, keys in sections().items():
        lines += ["", f"{section}:"]
        for k in keys:
            lines += [f"  # {line}" for line in wrap(k.doc, 104)]
            value = EXAMPLE_VALUES.get(k.name, k.default)
            lines.append(f"  {k.name.split('.', 1)[1]}: {yaml_value(value)}")
    return "\n".join(lines) + "\n"


FILES = {os.path.join("docs", "configuration.md"): markdown, os.path.join("conf", "example.yaml"): example_yaml}


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
