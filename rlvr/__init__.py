"""The recipe's shared parts, one concept a file: the RL maths, rollouts and their parts, verifiers and
their prompts, rules, families, rewards without a verifier, models and sharding, checkpoints, metrics,
config, the process group. The scripts at the top level (train_rl.py, train_verifier.py, reward.py,
data.py, compare.py, bench.py) are what a researcher runs and forks; they import from here."""
