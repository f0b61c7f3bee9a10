"""CASSIA-style LLM agents: the annotator with its validator, scoring, boost, consensus and merging, and the
pipeline that chains them."""
