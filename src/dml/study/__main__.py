"""``python -m dml.study [study=full|quick] [out=docs/results.md] [runs=logs/study/<time>]``."""

from dml.study.runner import main

main()
