"""One dataset's kernel: what the template notebook calls, from reading the input to writing its outputs
(read, QC and preprocessing, markers, :mod:`~cassia_helpers.dataset.annotate`, ontology, evidence, figures,
output files).

Nothing here imports the driver (:mod:`cassia_helpers.batch`) or the aggregation
(:mod:`cassia_helpers.summary`).
"""
