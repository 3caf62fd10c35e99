"""Where a job runs: its GPUs (locks, the count chosen at submission) and its environment (PYTHONPATH, HTCondor)."""
