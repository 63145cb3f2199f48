"""Command line: `hvd-infer [-np N] [--config FILE] [key.sub=value ...]` (or `python -m hvd_infer`).

    hvd-infer -np 4 --config job.yaml                         # checks the job, then 4 ranks via horovodrun
    hvd-infer -np 8 -H host1:4,host2:4 --config job.yaml      # horovodrun's host and network options pass through
    horovodrun -np 4 python -m hvd_infer --config job.yaml    # the same ranks, started by horovodrun directly
    torchrun --nproc-per-node 4 -m hvd_infer --config job.yaml
    python -m hvd_infer                                       # a world of one: the embedded demo (conf/default.yaml)
    python -m hvd_infer --config job.yaml --print-config      # the resolved config, then exit
    hvd-infer --config-keys                                   # every config key: type, default, what it does

Every config key is listed in docs/configuration.md and conf/example.yaml, as `hvd-infer --config-keys` prints it.
"""
from __future__ import annotations

import argparse
import os
import sys

from hvd_infer.errors import ERROR_PREFIX, EXIT_USER_ERROR, ConfigError, UserError


def main(argv=None) -> int:
    from hvd_infer import launcher

    parser = argparse.ArgumentParser(prog="hvd_infer", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", "-c", default=None, help="job YAML (default: conf/default.yaml, the demo)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--config-keys", action="store_true",
                        help="print every config key with its type, default and meaning, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override any config key")
    launcher.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.config_keys:
        from hvd_infer.config_reference import text

        print(text(), end="")
        return 0
    from hvd_infer.context import launcher_rank, started_as_rank

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
        if args.np and not started_as_rank():
            return launcher.launch(cfg, args, (["--config", args.config] if args.config else []) + args.overrides)
        from hvd_infer.runner import run

        run(cfg)
        return _done(0, argv)
    except UserError as e:
        # An error every rank raised (config, input, model checks) is printed once, by rank 0.
        if launcher_rank() == 0 or not e.all_ranks:
            print(f"{ERROR_PREFIX}{e}", file=sys.stderr, flush=True)
        return _done(EXIT_USER_ERROR, argv)


def _done(code: int, argv) -> int:
    """The exit code; a process started as hvd-infer or `python -m hvd_infer` (argv None) exits here, after the
    atexit handlers, skipping the interpreter's slow teardown of torch's, transformers' and MLflow's objects."""
    if argv is not None:
        return code
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
