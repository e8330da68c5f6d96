"""``python -m codebook_lens.browse DIR``: the same as ``codebook-lens browse DIR``."""

from codebook_lens.browse.server import main

raise SystemExit(main())
