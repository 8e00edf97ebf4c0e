from skillkv.cli import run

run()
