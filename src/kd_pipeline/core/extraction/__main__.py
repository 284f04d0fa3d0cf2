"""`python -m kd_pipeline.core.extraction ...`: see `cli.main`."""

from kd_pipeline.core.extraction.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
