"""Exports of codebooks to the tools sparse-autoencoder users have: Neuronpedia's bulk-import
files (:func:`export_neuronpedia`, ``codebook-lens export neuronpedia RUN --out DIR``;
docs/neuronpedia.md) and offline feature dashboards, one HTML page per site
(:func:`export_dashboard`, ``codebook-lens export dashboard RUN --out DIR``; docs/dashboards.md).
The SAELens architecture is :mod:`codebook_lens.saelens`."""

from codebook_lens.export.dashboard import (
    DASHBOARD_FORMAT,
    DashboardConfig,
    DashboardExport,
    dashboard_data,
    export_dashboard,
)
from codebook_lens.export.examples import SiteHits, hit_windows, site_hits
from codebook_lens.export.logit_extremes import LogitExtremes, logit_extremes
from codebook_lens.export.neuronpedia import (
    EXPORT_FORMAT,
    ExportedSource,
    NeuronpediaConfig,
    NeuronpediaExport,
    export_neuronpedia,
)

__all__ = [
    "DASHBOARD_FORMAT",
    "DashboardConfig",
    "DashboardExport",
    "dashboard_data",
    "export_dashboard",
    "EXPORT_FORMAT",
    "ExportedSource",
    "LogitExtremes",
    "NeuronpediaConfig",
    "NeuronpediaExport",
    "SiteHits",
    "export_neuronpedia",
    "hit_windows",
    "logit_extremes",
    "site_hits",
]
