"""The demo (`python -m trainer.demo`, what `make demo` runs) and its report: `pipeline` runs every stage
through the real command-line tools, `report` measures the trained models and writes report.md."""
