"""The Open LLM Leaderboard-style evaluation through lm-evaluation-harness: the Mamba model class (lm.py,
scoring.py) and the workflow side that runs the suite and reports it."""
