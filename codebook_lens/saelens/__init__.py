"""Codebooks in SAELens (transformer-lens 3.x, where SAELens installs): the SAE architecture
``"codebook"`` and conversions both ways. Importing this package registers the architecture, so
``SAE.load_from_disk`` can reopen a saved codebook SAE (docs/sae_ecosystem.md)."""

try:
    import sae_lens  # noqa: F401 - the import that tells the user what is missing
except ImportError as e:  # pragma: no cover - the transformer-lens 4 leg checks the message
    raise ImportError(
        "codebook_lens.saelens needs SAELens: pip install sae-lens (SAELens requires "
        "transformer-lens < 4, so install it next to transformer-lens 3.x)"
    ) from e

from codebook_lens.saelens.architecture import ARCHITECTURE, CodebookSAE, CodebookSAEConfig
from codebook_lens.saelens.convert import codebook_from_sae, to_sae_lens

__all__ = ["ARCHITECTURE", "CodebookSAE", "CodebookSAEConfig", "codebook_from_sae", "to_sae_lens"]
