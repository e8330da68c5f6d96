"""codebook_lens: codebook features (top-k vector-quantization bottlenecks) for TransformerLens.

Attach codebooks at hook points of a ``HookedTransformer`` or ``TransformerBridge``, finetune
them, read their discrete codes from ``run_with_cache`` and patch them with ordinary hooks.
"""

from codebook_lens.backends import backend_of, boot_hf, build_model
from codebook_lens.config import CodebookConfig
from codebook_lens.convert import from_codebook_features
from codebook_lens.errors import BackendError, CheckpointError
from codebook_lens.evaluation import Evaluation, evaluate_codebooks
from codebook_lens.init import init_from_activations, kmeans
from codebook_lens.model import CodebookModel, codes_hook_name
from codebook_lens.quantizer import Codebook
from codebook_lens.topk import topk_codes

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "CodebookConfig",
    "Codebook",
    "CodebookModel",
    "from_codebook_features",
    "CheckpointError",
    "BackendError",
    "backend_of",
    "boot_hf",
    "build_model",
    "codes_hook_name",
    "topk_codes",
    "init_from_activations",
    "kmeans",
    "evaluate_codebooks",
    "Evaluation",
]
