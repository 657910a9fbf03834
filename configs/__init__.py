"""The shipped YAML configs, as package data (``rims_rl.configs``): one file per env family, and W&B sweeps."""
