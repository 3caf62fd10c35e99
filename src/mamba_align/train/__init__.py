"""The training stage: recipes, data preparation, preflight checks and sizes, the trainers, launch and resume."""
