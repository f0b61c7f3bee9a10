"""The offline marker reference: the curated marker catalog and the two ways of scoring a cluster on it
(on its cells' expression, or on its ranked marker list)."""
