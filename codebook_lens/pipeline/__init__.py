"""The run pipeline: one run directory, the steps that fill it.

``train_run(cfg)`` boots a Hugging Face model, attaches codebooks at the configured sites,
trains, evaluates and writes the run directory; ``evaluate_run`` and ``collect_run`` continue
it. The command line is ``codebook-lens train | evaluate | collect | browse``; docs/runs.md
describes the config and the layout.
"""

from codebook_lens.pipeline.collect import collect_run
from codebook_lens.pipeline.config import RunConfig, load_config_file
from codebook_lens.pipeline.evaluate import evaluate_run
from codebook_lens.pipeline.load import LoadedRun, load_run
from codebook_lens.pipeline.models import ModelConfig, load_model, resolve_device
from codebook_lens.pipeline.rundir import RunDir
from codebook_lens.pipeline.sites import SiteGroup, attach_site_groups, match_sites
from codebook_lens.pipeline.sources import DataConfig, TokenSource
from codebook_lens.pipeline.train import TrainedRun, train_run

__all__ = [
    "RunConfig",
    "load_config_file",
    "ModelConfig",
    "load_model",
    "resolve_device",
    "DataConfig",
    "TokenSource",
    "SiteGroup",
    "match_sites",
    "attach_site_groups",
    "RunDir",
    "train_run",
    "TrainedRun",
    "evaluate_run",
    "collect_run",
    "load_run",
    "LoadedRun",
]
