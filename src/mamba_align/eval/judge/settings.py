"""The judge's settings, one object for both benchmarks: `JudgeSettings`, built once from the config's `judge`
section (`from_config`, in workflow/rules/common.smk when the workflow is read) or from the dict a judge rule
passes as params (`from_params`, in the job), and checked by one validator (`__post_init__`), whose defaults and
bounds are the schema's (tests/test_judge_settings.py holds them together). The start-up check, the judge rules'
GPU count and params, MT-Bench's `JudgeClient` and AlpacaEval's annotators all read it.

The one benchmark-specific setting is AlpacaEval's judge model: `eval.alpaca_eval.judge_model` replaces
`judge.model` there (null: each annotator's own model, as on the public leaderboard). `for_alpaca_eval` is the one
place that replacement is made, and it says so when it changes the model; everything else (endpoint, key,
concurrency, retries, timeout, local judge) is shared. temperature, max_tokens and repeats are MT-Bench's:
AlpacaEval's annotator configs set their own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mamba_align.utils import UserError

log = logging.getLogger(__name__)

BACKENDS = ("openai", "local")
URL = re.compile(r"https?://[^\s/:?#]+(:\d+)?(/\S*)?")  # the schema's judge.base_url pattern


@dataclass(frozen=True)
class LocalJudge:
    """judge.local: the model the local judge server loads (backend local)."""

    model_path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    rating_from_logprobs: bool = False
    device: str = "cpu"


@dataclass(frozen=True)
class JudgeSettings:
    """judge.*: the defaults are the schema's."""

    backend: str = "openai"
    model: str | None = "gpt-4"  # None only for AlpacaEval: each annotator's own model (`for_alpaca_eval`)
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    repeats: int = 1
    max_retries: int = 8
    timeout_s: float = 120
    temperature: float = 0.0
    max_tokens: int = 2048
    local: LocalJudge = field(default_factory=LocalJudge)
    # AlpacaEval's annotations per write of its cache (None: max(16, 4 x concurrency)); not a config key
    chunksize: int | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"judge.backend is {self.backend!r}; expected 'openai' or 'local'")
        if self.model is not None and not (isinstance(self.model, str) and self.model.strip()):
            raise UserError(f"judge.model is {self.model!r}; expected a model name")
        if self.base_url is not None and not URL.fullmatch(str(self.base_url)):
            raise UserError(f"judge.base_url is {self.base_url!r}; expected an http(s) URL such as "
                            f"https://api.openai.com/v1 or http://localhost:8000/v1 (or null for api.openai.com)")
        if not (isinstance(self.api_key_env, str) and self.api_key_env):
            raise UserError(f"judge.api_key_env is {self.api_key_env!r}; expected the name of an environment variable")
        for name, least in (("concurrency", 1), ("repeats", 1), ("max_retries", 0), ("max_tokens", 1)):
            _integer(name, getattr(self, name), least)
        if self.chunksize is not None:
            _integer("chunksize", self.chunksize, 1)
        for name in ("timeout_s", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"judge.{name} is {value!r}; expected a number")
        if not isinstance(self.local, LocalJudge):
            raise UserError(f"judge.local is {self.local!r}; expected a mapping of {_names(LocalJudge)}")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: Mapping) -> JudgeSettings:
        """From judge.* as a dict (a judge rule's `params.judge`, a --judge-config file); missing keys take the
        schema's defaults, an unknown key is an error naming it."""
        if isinstance(params, cls):
            return params
        if not isinstance(params, Mapping):
            raise UserError(f"the judge settings are {type(params).__name__}; expected the mapping judge.*")
        _no_unknown("judge", params, cls)
        local = params.get("local") or {}
        if not isinstance(local, Mapping):
            raise UserError(f"judge.local is {local!r}; expected a mapping of {_names(LocalJudge)}")
        _no_unknown("judge.local", local, LocalJudge)
        return cls(**{**params, "local": LocalJudge(**local)})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> JudgeSettings:
        """From a --judge-config file: judge.* as JSON or YAML (an empty file: every default)."""
        import yaml

        with open(path) as f:
            return cls.from_params(yaml.safe_load(f) or {})

    @classmethod
    def from_config(cls, config: Mapping) -> JudgeSettings:
        """From a whole config (its `judge` section)."""
        return cls.from_params(config.get("judge") or {})

    def for_alpaca_eval(self, judge_model: str | None, logger: logging.Logger | None = log) -> JudgeSettings:
        """The settings AlpacaEval judges with: `eval.alpaca_eval.judge_model` in place of judge.model (None: each
        annotator's own model, gpt-4 for 1.0 and gpt-4-1106-preview for 2.0). Said on `logger` when that changes the
        model (the workflow builds its params with `logger=None` when it is read, and says it once per run, when
        AlpacaEval jobs are to run, on snakemake's log)."""
        if logger is not None and judge_model != self.model:
            used = judge_model or "each annotator's own"
            # formatted here: snakemake's log handler prints a message without its arguments
            logger.info(f"AlpacaEval judge model: {used} (eval.alpaca_eval.judge_model), not judge.model {self.model}")
        return dataclasses.replace(self, model=judge_model)

    def as_dict(self) -> dict:
        """judge.* as plain data (JSON, YAML, a judge rule's params), without the keys that are not config keys when
        unset: for settings read from a config, its section as the schema filled it, value for value (so what
        Snakemake records of a judge rule's params is what it recorded of the section itself)."""
        out = dataclasses.asdict(self)
        if out["chunksize"] is None:
            del out["chunksize"]
        return out

    # -- what the settings mean --------------------------------------------------------------
    @property
    def starts_local_judge(self) -> bool:
        """The judge job starts the local judge server itself (backend local and no base_url)."""
        return self.backend == "local" and not self.base_url

    @property
    def gpus(self) -> int:
        """GPUs a judge job holds (its `gpu` resource): 1 where it starts the local judge on CUDA, else 0 (an API, or
        a judge server already running at base_url, needs none)."""
        return int(self.starts_local_judge and str(self.local.device or "cpu").startswith("cuda"))

    @property
    def annotations_per_write(self) -> int:
        """AlpacaEval's chunk: annotations reach its cache after each, so a crash loses at most the one in flight."""
        return self.chunksize or max(16, 4 * self.concurrency)

    def client_kwargs(self) -> dict:
        """The openai client's retries (408/409/429/5xx, timeouts; Retry-After honoured) and timeout."""
        return {"max_retries": int(self.max_retries), "timeout": float(self.timeout_s)}

    def api_key(self, environ: Mapping = os.environ) -> str:
        """The key sent to the judge: api_key_env's value for the API, a placeholder for a local server."""
        if self.backend != "openai":
            return "local-judge"  # our local server ignores it; the openai client wants one
        return environ[self.api_key_env].strip()

    def check_environment(self, environ: Mapping = os.environ, local_exec: bool = True) -> None:
        """For the OpenAI backend a non-empty key in the environment (an empty one is as good as none); for a local
        judge on CUDA, jobs that run on this machine (`local_exec`: the judge rules are localrules, so on a cluster
        they run where snakemake runs, which is seldom a GPU node)."""
        if self.gpus and not local_exec:
            raise UserError(
                f"judge.local.device is {self.local.device!r}, but the judge rules run where snakemake runs "
                f"(localrules), not on the cluster's GPU nodes; set judge.local.device: cpu, or serve the judge "
                f"model on a GPU node behind an OpenAI-compatible server (e.g. vLLM) and set judge.base_url to it")
        env = self.api_key_env
        if self.backend == "openai" and not environ.get(env, "").strip():
            raise UserError(f"judge.backend is 'openai' but the environment variable {env} (judge.api_key_env) is "
                            f"{'empty' if env in environ else 'not set'}; export it or use backend 'local'")


def _integer(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"judge.{name} is {value!r}; expected an integer >= {least}")


def _names(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _no_unknown(where: str, given: Mapping, cls) -> None:
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise UserError(f"unknown key {where}.{unknown[0]}; expected some of {_names(cls)}")
