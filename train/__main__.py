from serve.contract import run_cli
from train.train import main

run_cli(main)
