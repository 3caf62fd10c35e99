"""What alpaca_eval 0.6.6 cannot do through its own arguments, and so is done here: each piece names the problem
and the version it is for, and tests/test_alpacaeval.py has a test per piece that fails once the installed
alpaca_eval no longer has the problem (then the piece goes).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from mamba_align.eval.alpacaeval_data import HF_REPO
from mamba_align.utils import UserError


@contextlib.contextmanager
def lc_file_from(data_dir: Path) -> Iterator[None]:
    """Serve alpaca_eval's run-time download of df_gamed.csv from data_dir, our pinned and hashed copy.

    alpaca_eval 0.6.6 takes no path for this file: metrics/glm_winrate.py calls hf_hub_download for it (unpinned,
    revision main) inside get_length_controlled_winrate, and neither that function, `evaluate` nor a constant
    lets us name another file. So the module's `hf_hub_download` is swapped for the length of the call.
    """
    from unittest import mock

    from alpaca_eval.metrics import glm_winrate

    def local_file(repo_id: str, filename: str, **kwargs: Any) -> str:
        path = data_dir / filename
        if repo_id != HF_REPO or not path.exists():
            raise UserError(f"alpaca_eval asked for {repo_id}/{filename}; expected it in {data_dir}")
        return str(path)

    with mock.patch.object(glm_winrate, "hf_hub_download", local_file):
        yield


def annotator_class():
    """alpaca_eval's PairwiseAnnotator, reading cached preferences back as floats.

    pandas 3 reads a cache of whole-number preferences (1.0, 2.0) back as int64, and alpaca_eval 0.6.6 then fails
    to write a 1.5 (tie) into that column on restart. `evaluate(Annotator=...)` is the library's way in.
    """
    from alpaca_eval.annotators import PairwiseAnnotator

    class CacheAsFloat(PairwiseAnnotator):
        def load_(self, path=None):
            super().load_(path)
            if self.df_annotations is not None and self.annotation_key in self.df_annotations:
                self.df_annotations[self.annotation_key] = self.df_annotations[self.annotation_key].astype(float)

    return CacheAsFloat


def metric(length_controlled: bool):
    """alpaca_eval's metric (`evaluate(fn_metric=...)`), after making the preferences numeric.

    With pandas 3, a missing annotation (unparsable judge answer) reaches the metric as None in an object column,
    which alpaca_eval 0.6.6 fails to round; as NaN it is dropped from the counts, as intended.
    """
    import pandas as pd
    from alpaca_eval import metrics

    def numeric_metric(annotations, **kwargs) -> dict:
        df = pd.DataFrame(list(annotations))
        df["preference"] = pd.to_numeric(df["preference"], errors="coerce")
        if length_controlled and df["preference"].notna().any():
            return metrics.get_length_controlled_winrate(df, **kwargs)
        return metrics.get_winrate(df)

    return numeric_metric
