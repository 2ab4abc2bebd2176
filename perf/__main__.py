from perf.bench import main
from train.errors import run_cli

run_cli(main)
