from export.export import main
from serve.contract import run_cli

run_cli(main)
