"""The aggregation kernel: the run-level summaries, the cross-dataset QC and the report, made from the
run folder's files alone (so a run can be re-aggregated later, from any machine that sees it).
"""
