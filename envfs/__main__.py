from envfs.cli import run

run()
