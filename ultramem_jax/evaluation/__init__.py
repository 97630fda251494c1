"""The subcommands of eval.py, one module each."""
