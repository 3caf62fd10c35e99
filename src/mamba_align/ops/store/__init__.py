"""The results folder: where each output lives, the keyed model store, and what every job recorded."""
