"""Operations around the science: where jobs run (jobenv), the results folder (store), plan and report (reporting)."""
