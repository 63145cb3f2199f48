"""Command line: `python -m hvd_infer [--config FILE] [key.sub=value ...]` (or `hvd-infer`).

    horovodrun -np 2 python -m hvd_infer                        # the embedded demo (conf/default.yaml)
    horovodrun -np 4 python -m hvd_infer --config conf/example.yaml output.mode=resume
    python -m hvd_infer --config job.yaml --print-config         # the resolved config, then exit
"""
from __future__ import annotations

import argparse
import os
import sys

from hvd_infer.errors import ConfigError, UserError

# User errors: one line, exit 2. Anything else is a bug or an environment problem: traceback, exit 1.
EXIT_USER_ERROR = 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hvd_infer", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", "-c", default=None, help="job YAML (default: conf/default.yaml, the demo)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any config key")
    args = parser.parse_args(argv)
    rank = os.environ.get("HOROVOD_RANK", "0")
    try:
        from hvd_infer.config import load_config, mask_secrets

        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(mask_secrets(cfg.to_dict()), sort_keys=False), end="")
            return 0
        if args.config is None and not os.path.exists(cfg.model.path):
            raise ConfigError(f"the demo is not built ({cfg.model.path} does not exist): build it once with "
                              "`make demo` or `.venv/bin/python scripts/make_demo.py`, or give --config JOB.yaml")
        from hvd_infer.runner import run

        run(cfg)
        return 0
    except UserError as e:
        # An error every rank raised (config, input, model checks) is printed once, by rank 0.
        if rank == "0" or not e.all_ranks:
            print(f"hvd_infer: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
